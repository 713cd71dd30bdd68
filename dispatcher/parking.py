"""Parking: each subscriber's own queue for the deliveries its lane turned away.

A delivery that is not attempted (the subscriber's breaker is open, its lane is full, its rate
limit is reached) is published to ``<queue>.parked.<subscriber>`` and its work-queue message is
acked; nothing waits in memory and the work queue keeps flowing for everyone else. Each parking
queue is consumed on a channel of its own (its prefetch window, not the work queue's), and only
while its subscriber can take deliveries:

    breaker     parking consumer   what happens to parked deliveries
    closed      consuming          they wait in the lane (patient) until a slot is free
    open        cancelled          they stay in the broker; when the cooldown ends, one is
                                   fetched (basic.get) and becomes the breaker's probe
    half_open   as it was          the probe's verdict moves the breaker to closed or open

So an outage costs each of the subscriber's deliveries one trip to its parking queue, however
long it lasts, instead of one trip through the delay tiers per cooldown. Parking queues of
subscribers removed by a reload are drained (their deliveries are dead-lettered
``subscriber_removed`` by the pipeline) and then deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity

from dispatcher.circuit_breaker import BreakerState
from dispatcher.config import BrokerConfig
from dispatcher.endpoint_limits import LaneSet
from dispatcher.topology import declare_parking, parking_queue

__all__ = ["ParkingLots", "parking_prefetch"]

log = structlog.get_logger("dispatcher.parking")

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

_REMOVED_CHECK = 1.0  # seconds between checks that a removed subscriber's queue is empty
_TIMER_SLACK = 0.01


def parking_prefetch(prefetch: int) -> int:
    """Messages each parking consumer may hold: a quarter of the work queue's window."""
    return max(1, prefetch // 4)


class _Lot:
    """One subscriber's parking queue and whether it should be consumed."""

    def __init__(self, sub: str, queue: AbstractQueue) -> None:
        self.sub = sub
        self.queue = queue
        self.wanted = True  # consume unless the breaker says stay away
        self.removed = False
        self.tag: str | None = None
        self.lock = asyncio.Lock()
        self.probe_timer: asyncio.TimerHandle | None = None


class ParkingLots:
    """The parking queues of one worker, consumed as the subscribers' breakers allow."""

    def __init__(
        self,
        channel: AbstractChannel,
        cfg: BrokerConfig,
        *,
        handler: Handler,
        lanes: LaneSet,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._cfg = cfg
        self._handler = handler
        self._lanes = lanes
        self._clock = clock
        self._lots: dict[str, _Lot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- subscribers ---------------------------------------------------------------------------

    async def sync(self, subscribers: Iterable[str]) -> None:
        """Declare and consume the parking queues of these subscribers; drain the others'."""
        ids = list(subscribers)
        for sub in ids:
            lot = self._lots.get(sub)
            if lot is None:
                queue = await declare_parking(self._channel, self._cfg, sub)
                lot = self._lots[sub] = _Lot(sub, queue)
            lot.removed = False
            lane = self._lanes.get(sub)
            if lane is None or lane.breaker.state is BreakerState.CLOSED:
                lot.wanted = True  # a new or reconfigured subscriber starts with a closed breaker
            await self._reconcile(lot)
        for sub, lot in list(self._lots.items()):
            if sub not in ids and not lot.removed:
                lot.removed = True
                lot.wanted = True  # drain it: the pipeline dead-letters what it finds
                await self._reconcile(lot)
                task = asyncio.create_task(self._retire(lot))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @property
    def consuming(self) -> list[str]:
        return sorted(sub for sub, lot in self._lots.items() if lot.tag is not None)

    # --- breaker -------------------------------------------------------------------------------

    def breaker_changed(self, sub: str, new: BreakerState, reopen_in: float) -> None:
        """Follow a subscriber's breaker: consume while closed; probe when a cooldown ends."""
        lot = self._lots.get(sub)
        if lot is None or lot.removed or self._closed:
            return
        if new is BreakerState.HALF_OPEN:
            return
        lot.wanted = new is BreakerState.CLOSED
        if lot.probe_timer is not None:
            lot.probe_timer.cancel()
            lot.probe_timer = None
        if new is BreakerState.OPEN:
            self._arm(lot, reopen_in)
        self._spawn(self._reconcile(lot))

    def _arm(self, lot: _Lot, delay: float) -> None:
        # A little late rather than early: the loop may run a timer up to its clock's
        # resolution ahead, and a probe that finds the cooldown not quite over re-arms.
        lot.probe_timer = asyncio.get_running_loop().call_later(
            max(0.0, delay) + _TIMER_SLACK, lambda: self._spawn(self._probe(lot))
        )

    async def _probe(self, lot: _Lot) -> None:
        """The cooldown is over: fetch parked deliveries one at a time until one is the probe.

        A fetched delivery that turns out not to need the subscriber (too old, say) leaves the
        breaker ready for a probe, so the next one is fetched; an empty queue ends it (the next
        delivery from the work queue probes instead).
        """
        lot.probe_timer = None
        while not self._closed and not lot.wanted:
            lane = self._lanes.get(lot.sub)
            if lane is None or lane.breaker.state is BreakerState.CLOSED:
                # A reload replaced the lane: its successor starts closed, so consume again.
                lot.wanted = True
                await self._reconcile(lot)
                return
            breaker, now = lane.breaker, self._clock()
            if breaker.state is BreakerState.OPEN and now < breaker.open_until:
                self._arm(lot, breaker.open_until - now)
                return
            if not breaker.would_admit(now):
                return  # a probe is out: its verdict closes the breaker or re-arms
            try:
                message = await lot.queue.get(no_ack=False, fail=False)
            except Exception as exc:  # the link is down: the next change or delivery retries
                log.warning("parking_probe_failed", subscriber=lot.sub, error=str(exc))
                return
            if message is None:
                return
            await self._handler(message)

    # --- consumers -----------------------------------------------------------------------------

    async def _reconcile(self, lot: _Lot) -> None:
        """Make the consumer match ``lot.wanted`` (the latest wish wins, whatever the order)."""
        async with lot.lock:
            want = lot.wanted and not self._closed
            try:
                if want and lot.tag is None:
                    lot.tag = await lot.queue.consume(self._handler, no_ack=False)
                    log.debug("parking_consuming", subscriber=lot.sub)
                elif not want and lot.tag is not None:
                    tag, lot.tag = lot.tag, None
                    await lot.queue.cancel(tag)
                    log.debug("parking_paused", subscriber=lot.sub)
            except Exception as exc:  # a broken link: the robust channel restores consumers
                log.warning("parking_consumer_failed", subscriber=lot.sub, error=str(exc))

    async def _retire(self, lot: _Lot) -> None:
        """Delete a removed subscriber's parking queue once it has been drained."""
        name = parking_queue(self._cfg.queue, lot.sub)
        while not self._closed and lot.removed:
            await asyncio.sleep(_REMOVED_CHECK)
            if await self._depth(name) != 0:
                continue
            async with lot.lock:
                if not lot.removed:
                    return
                if lot.tag is not None:
                    with contextlib.suppress(Exception):
                        await lot.queue.cancel(lot.tag)
                    lot.tag = None
                if await self._delete_if_empty(name):
                    del self._lots[lot.sub]
                    log.info("parking_queue_deleted", subscriber=lot.sub, queue=name)
                    return
                lot.tag = await lot.queue.consume(self._handler, no_ack=False)

    async def _depth(self, name: str) -> int | None:
        """Messages ready in a removed subscriber's queue; 0 once it is gone, None if unknown."""
        try:
            async with self._throwaway() as channel:
                declared = await channel.queue_declare(name, passive=True)
        except ChannelNotFoundEntity:
            return 0  # already deleted (another worker retired it)
        except Exception:
            return None
        return int(declared.message_count or 0)

    async def _delete_if_empty(self, name: str) -> bool:
        try:
            async with self._throwaway() as channel:
                await channel.queue_delete(name, if_empty=True)
        except Exception:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _throwaway(self) -> AsyncIterator[Any]:
        """A raw channel of its own: a failed passive declare or a refused delete closes the
        channel it runs on, and must not take the parking consumers' channel with it."""
        raw = await self._channel.get_underlay_channel()
        channel = await raw.connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    # --- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop consuming every parking queue (shutdown).

        Messages already taken are the pipeline's: its drain settles or hands them back, a
        probe included. What is left here only waits (timers, removed queues' retirement).
        """
        self._closed = True
        for lot in self._lots.values():
            if lot.probe_timer is not None:
                lot.probe_timer.cancel()
            await self._reconcile(lot)
        for task in list(self._retiring):
            task.cancel()
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=5)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
