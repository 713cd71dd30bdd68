"""Parking: each subscriber's own queue for the deliveries its lane turned away.

A delivery that is not attempted (the subscriber's breaker is open, its lane is full, its rate
limit is reached) is published to ``<queue>.parked.<subscriber>`` and its work-queue message is
acked; nothing waits in memory and the work queue keeps flowing for everyone else.

Parking queues cost the broker nothing while a subscriber is healthy. A provider has tens of
thousands of endpoints, so a parking queue exists only while it is needed:

    when                                what happens
    a delivery is parked                the queue is declared (once; again every park_ttl),
                                        and consumed here if the breaker is closed
    the breaker opens                   its consumer is cancelled; parked deliveries stay
    a cooldown ends                     one parked delivery is fetched (basic.get): the probe
    the breaker closes                  consumed again; its deliveries wait in the lane
    nothing came for `idle` seconds     the consumer is let go
    `max_consumers` queues are consumed the next one waits for a free slot (oldest first); a
                                        consumer that held its slot a `turn` while others wait
                                        goes to the back of the line
    nobody used the queue for 3 x ttl   the broker deletes it (x-expires)
    a parked delivery waited park_ttl   it expires back into the work queue (x-message-ttl,
                                        dead-lettered into the due exchange), so a queue that
                                        no process knows of (after a restart) is never stranded

A small index queue (``<queue>.parked-index``) gets one message per declare, naming the
subscriber. A process that starts reads it and looks (passively, in the background) for the
parking queues it names, so deliveries parked before a restart are consumed as soon as their
subscriber is healthy, without start-up paying one round trip per configured subscriber.
Each parking consumer has a channel and prefetch window of its own, so parked deliveries never
take from the work queue's window. The times and the cap above are a `ParkingTuning`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity

from dispatcher.broker.topology import (
    PARK_TTL_DEFAULT,
    declare_parking,
    declare_parking_index,
    side_channel,
)
from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import BrokerConfig
from dispatcher.decisions.circuit_breaker import BreakerState
from dispatcher.decisions.endpoint_limits import Lane, LaneSet
from dispatcher.names import parking_index, parking_queue

__all__ = ["ParkingLots", "ParkingTuning", "parking_prefetch"]

log = structlog.get_logger("dispatcher.parking")

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

_SWEEP = 5.0
_TIMER_SLACK = 0.01


@dataclass(frozen=True, slots=True)
class ParkingTuning:
    """How long parked deliveries and parking consumers last, and how many are consumed at once.

    The daemon takes ``park_ttl`` from the retry config; the rest are the defaults in
    production (tests shorten them to watch a consumer let go or take its turn).
    """

    park_ttl: float = PARK_TTL_DEFAULT  # then a parked delivery returns to the work queue
    idle: float = 5.0  # seconds without a parked delivery before a consumer is let go
    max_consumers: int = 16  # parking queues one process consumes at once; the others wait
    turn: float = 60.0  # seconds a consumer may keep its slot while other parking queues wait


def parking_prefetch(prefetch: int) -> int:
    """Messages each parking consumer may hold: a quarter of the work queue's window."""
    return max(1, prefetch // 4)


class _Lot:
    """One subscriber's parking queue as this process knows it."""

    __slots__ = (
        "active",
        "consuming_since",
        "declared_at",
        "last_active",
        "lock",
        "on_message",
        "probe_timer",
        "queue",
        "sub",
        "tag",
    )

    def __init__(
        self,
        sub: str,
        queue: AbstractQueue,
        now: float,
        consume: Callable[[_Lot, AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        self.sub = sub

        async def on_message(message: AbstractIncomingMessage) -> None:
            await consume(self, message)

        self.on_message = on_message
        self.queue = queue
        self.tag: str | None = None
        self.lock = asyncio.Lock()
        self.probe_timer: asyncio.TimerHandle | None = None
        self.declared_at = now
        self.last_active = now
        self.active = 0  # parked deliveries taken from this queue and not yet settled
        self.consuming_since = 0.0


class ParkingLots:
    """The parking queues one worker knows of, consumed as the subscribers' breakers allow.

    The lanes own the breakers (and this process's shares): the lots keep no copy of either.
    Whether a lot is consumed is asked of its lane each time (`_may_consume`); the lots follow
    the lane set's breaker changes directly (`LaneSet.watch_breakers`) and its share changes.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        cfg: BrokerConfig,
        *,
        handler: Handler,
        lanes: LaneSet,
        tuning: ParkingTuning = ParkingTuning(),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._channel = channel
        self._cfg = cfg
        self._index = parking_index(cfg.queue)  # where each declare leaves its hint
        self._handler = handler
        self._lanes = lanes
        self.tuning = tuning  # read where it is used, so a test may shorten it on a running worker
        self._clock = clock.monotonic
        self._waiting: dict[str, _Lot] = {}  # lots that want a consumer slot, oldest first
        self._slots: set[str] = set()  # lots consuming (or starting to)
        self._lots: dict[str, _Lot] = {}
        self._declaring: dict[str, asyncio.Future[_Lot]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        lanes.watch_breakers(self._breaker_changed)
        lanes.on_share_change = self.share_changed
        lanes.on_parked_elsewhere = self.join_parked

    # --- what the pipeline tells -----------------------------------------------------------------

    async def ensure(self, sub: str) -> None:
        """The subscriber's parking queue exists and is bound: a park may be published.

        Declared once per process, and again every ``park_ttl`` so that the queue's expiry
        (three times that, counted from its last use) never comes before its newest
        delivery's return.
        """
        lot = self._lots.get(sub)
        if lot is not None and self._clock() - lot.declared_at < self.tuning.park_ttl:
            return
        pending = self._declaring.get(sub)
        if pending is None:
            pending = self._declaring[sub] = asyncio.ensure_future(self._declare(sub))
            pending.add_done_callback(lambda _: self._declaring.pop(sub, None))
        await asyncio.shield(pending)

    def forget(self, sub: str) -> None:
        """A park for ``sub`` failed (its queue may be gone): declare it again next time."""
        lot = self._lots.get(sub)
        if lot is not None:
            lot.declared_at = -1e18

    def retain(self, subscribers: set[str]) -> None:
        """After a reload: removed subscribers' lots are drained (the pipeline dead-letters
        what it finds, ``subscriber_removed``), then let go like any idle lot."""
        for sub, lot in self._lots.items():
            if sub not in subscribers:
                if lot.probe_timer is not None:
                    lot.probe_timer.cancel()
                    lot.probe_timer = None
                if lot.tag is None:  # its lane is gone: nothing holds it back any more
                    self._spawn(self._reconcile(lot))

    @property
    def consuming(self) -> list[str]:
        return sorted(sub for sub, lot in self._lots.items() if lot.tag is not None)

    @property
    def known(self) -> list[str]:
        """Subscribers whose parking queue this process knows (declared or found)."""
        return sorted(self._lots)

    # --- breaker -------------------------------------------------------------------------------

    def _breaker_changed(self, lane: Lane, old: BreakerState, new: BreakerState, why: str) -> None:
        """A current lane's breaker changed (the lane set tells): follow it."""
        self._follow(lane)

    def _follow(self, lane: Lane) -> None:
        """Follow a subscriber's breaker, as its lane holds it now: consume while closed; probe
        when a cooldown ends."""
        sub, state = lane.sub.id, lane.breaker.state
        lot = self._lots.get(sub)
        if lot is None and state is BreakerState.OPEN and lane.breaker.prober:
            # This process probes for the cluster (dispatcher/decisions/cluster_shares.py): it
            # needs the queue, even if it never parked a delivery of its own there.
            self._spawn(self._ensure_quietly(sub))
            return
        if lot is None or self._closed or state is BreakerState.HALF_OPEN:
            return
        if lot.probe_timer is not None:
            lot.probe_timer.cancel()
            lot.probe_timer = None
        if state is BreakerState.OPEN:
            self._arm(lot, lane.breaker.open_until - self._clock())
        self._spawn(self._reconcile(lot))

    def share_changed(self, sub: str) -> None:
        """The subscriber's lane gained or lost this process's share of its limits, or made
        this process the one to probe its open breaker: consume, or probe, accordingly."""
        lane = self._lanes.get(sub)
        if lane is None or self._closed:
            return
        if lane.breaker.state is not BreakerState.CLOSED:
            self._follow(lane)
            return
        lot = self._lots.get(sub)
        if lot is not None and (lot.tag is not None) != lane.takes_parked:
            self._spawn(self._reconcile(lot))

    def join_parked(self, sub: str) -> None:
        """Another process parks deliveries of ``sub`` it has no room for, and this one holds a
        share of the subscriber's limits: consume its parking queue here too."""
        if sub not in self._lots and not self._closed:
            self._spawn(self._ensure_quietly(sub))

    async def _ensure_quietly(self, sub: str) -> None:
        try:
            await self.ensure(sub)
        except Exception as exc:  # the link is down: the next change or delivery retries
            log.warning("parking_declare_failed", subscriber=sub, error=str(exc))

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
        while not self._closed and self._lots.get(lot.sub) is lot:
            lane = self._lanes.get(lot.sub)
            if lane is None or lane.breaker.state is BreakerState.CLOSED:
                # A reload replaced the lane: its successor starts closed, so consume again
                # (if this process holds a share of the subscriber's limits).
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
                if lane.probe_again is not None:  # other processes park what they get
                    self._arm(lot, lane.probe_again)
                return
            await self._consume_one(lot, message)

    # --- queues and consumers --------------------------------------------------------------------

    async def _declare(self, sub: str) -> _Lot:
        park_ttl = self.tuning.park_ttl
        queue = await declare_parking(self._channel, self._cfg, sub, park_ttl=park_ttl)
        # A hint for whoever starts next, renewed with every declare so the index outlives
        # the queue (not confirmed: losing one costs at most a wait of park_ttl, after which
        # the parked deliveries return to the work queue by themselves).
        with contextlib.suppress(Exception):
            await self._channel.default_exchange.publish(
                aio_pika.Message(sub.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self._index,
            )
        return self._adopt(sub, queue)

    async def recover(self, limit: int = 10_000) -> int:
        """At start: look for the parking queues the index names (subscribers that parked in
        the last three park_ttl), so deliveries parked before a restart are consumed without
        waiting for a new park. Returns how many subscribers the index named."""
        index = await declare_parking_index(self._channel, self._cfg, park_ttl=self.tuning.park_ttl)
        held: dict[str, AbstractIncomingMessage] = {}
        extra: list[AbstractIncomingMessage] = []
        try:
            while len(held) + len(extra) < limit:
                message = await index.get(no_ack=False, fail=False)
                if message is None:
                    break
                sub = message.body.decode("utf-8", "replace")
                if sub in held:
                    extra.append(held[sub])  # keep the newest entry of each subscriber
                held[sub] = message
        finally:
            for message in extra:
                with contextlib.suppress(Exception):
                    await message.ack()
            for message in held.values():
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
        # One at a time, on one throwaway channel each: a burst of channel opens is what a
        # broker connection is worst at, and nothing waits for this.
        for sub in held:
            await self._look_for(sub)
        return len(held)

    def _adopt(self, sub: str, queue: AbstractQueue) -> _Lot:
        now = self._clock()
        lot = self._lots.get(sub)
        if lot is not None:
            lot.queue, lot.declared_at = queue, now
            return lot
        lot = self._lots[sub] = _Lot(sub, queue, now, self._consume_one)
        lane = self._lanes.get(sub)
        if lane is not None and lane.breaker.state is not BreakerState.CLOSED:
            self._arm(lot, lane.breaker.open_until - now)
        self._start_sweeper()
        self._spawn(self._reconcile(lot))
        return lot

    async def _look_for(self, sub: str) -> None:
        name = parking_queue(self._cfg.queue, sub)
        try:
            async with self._throwaway() as channel:
                declared = await channel.queue_declare(name, passive=True)
        except ChannelNotFoundEntity:
            return  # none: the usual case
        except Exception as exc:  # the link is down: the deliveries return by park_ttl anyway
            log.debug("parking_lookup_failed", subscriber=sub, error=str(exc))
            return
        if not declared.message_count or sub in self._lots or self._closed:
            return
        log.info("parking_queue_found", subscriber=sub, parked=declared.message_count)
        try:
            await self.ensure(sub)
        except Exception as exc:
            log.warning("parking_declare_failed", subscriber=sub, error=str(exc))

    async def _consume_one(self, lot: _Lot, message: AbstractIncomingMessage) -> None:
        lot.active += 1
        lot.last_active = self._clock()
        try:
            await self._handler(message)
        finally:
            lot.active -= 1
            lot.last_active = self._clock()

    async def _reconcile(self, lot: _Lot) -> None:
        """Make the consumer match what the lot's lane allows now (`_may_consume`: asked under
        the lock, so the latest state wins, whatever the order of the changes).

        At most ``max_consumers`` parking queues are consumed at once (broker consumers must
        not grow with the number of subscribers that parked): a lot that finds no free slot
        waits for one, oldest first.
        """
        freed = False
        async with lot.lock:
            want = self._wanted(lot)
            try:
                if want and lot.tag is None:
                    if self._consumers() >= self.tuning.max_consumers:
                        self._waiting.setdefault(lot.sub, lot)
                        return
                    self._waiting.pop(lot.sub, None)
                    lot.last_active = lot.consuming_since = self._clock()
                    self._slots.add(lot.sub)  # taken before the await: no two take the last
                    try:
                        lot.tag = await lot.queue.consume(lot.on_message, no_ack=False)
                    finally:
                        if lot.tag is None:
                            self._slots.discard(lot.sub)
                    log.debug("parking_consuming", subscriber=lot.sub)
                elif not want and lot.tag is not None:
                    tag, lot.tag = lot.tag, None
                    self._slots.discard(lot.sub)
                    freed = True
                    await lot.queue.cancel(tag)
                    log.debug("parking_paused", subscriber=lot.sub)
                elif not want:
                    self._waiting.pop(lot.sub, None)
            except Exception as exc:  # a broken link: the robust channel restores consumers
                log.warning("parking_consumer_failed", subscriber=lot.sub, error=str(exc))
        if freed:
            self._next_turn()

    def _wanted(self, lot: _Lot) -> bool:
        """Should ``lot`` be consumed now?"""
        return not self._closed and self._lots.get(lot.sub) is lot and self._may_consume(lot.sub)

    def _may_consume(self, sub: str) -> bool:
        lane = self._lanes.get(sub)
        return lane is None or (lane.breaker.state is BreakerState.CLOSED and lane.takes_parked)

    def _consumers(self) -> int:
        return len(self._slots)

    def _next_turn(self) -> None:
        """A slot came free: the lot that waited longest gets it."""
        while self._waiting and self._consumers() < self.tuning.max_consumers:
            sub, lot = next(iter(self._waiting.items()))
            del self._waiting[sub]
            if self._wanted(lot):
                self._spawn(self._reconcile(lot))
                return

    def _start_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(min(_SWEEP, self.tuning.idle / 2))
            await self.sweep()

    async def sweep(self) -> None:
        """Let go of consumers that had nothing to do for ``idle`` seconds, and of those that
        held their slot for a whole turn while other parking queues wait."""
        now, tuning = self._clock(), self.tuning
        for lot in list(self._lots.values()):
            wanted = self._may_consume(lot.sub)
            waiting = lot.sub in self._waiting  # quiet because it has had no turn yet
            if wanted and lot.tag is None and lot.probe_timer is None and not waiting:
                # A share regained while the lane was idle (after a rejoin, say) tells nobody:
                # look at every paused lot here, so none waits for a delivery to wake it.
                self._spawn(self._reconcile(lot))
                continue
            quiet = lot.active == 0 and now - lot.last_active >= tuning.idle
            if quiet and wanted and lot.probe_timer is None and not waiting:
                await self._release(lot)
            elif self._waiting and lot.tag is not None and now - lot.consuming_since >= tuning.turn:
                await self._yield_turn(lot)
        self._next_turn()

    async def _release(self, lot: _Lot) -> None:
        async with lot.lock:
            if lot.active or self._lots.get(lot.sub) is not lot:
                return
            if lot.tag is not None:
                tag, lot.tag = lot.tag, None
                self._slots.discard(lot.sub)
                with contextlib.suppress(Exception):
                    await lot.queue.cancel(tag)
            del self._lots[lot.sub]
            self._waiting.pop(lot.sub, None)
        log.debug("parking_released", subscriber=lot.sub)

    async def _yield_turn(self, lot: _Lot) -> None:
        async with lot.lock:
            if lot.tag is None:
                return
            tag, lot.tag = lot.tag, None
            self._slots.discard(lot.sub)
            with contextlib.suppress(Exception):
                await lot.queue.cancel(tag)
            self._waiting[lot.sub] = lot  # to the back of the line
        log.debug("parking_turn_over", subscriber=lot.sub)

    @contextlib.asynccontextmanager
    async def _throwaway(self) -> AsyncIterator[Any]:
        """A raw channel of its own: a failed passive declare closes the channel it runs on,
        and must not take the parking consumers' channel with it."""
        channel = await side_channel(self._channel)
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    # --- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop consuming every parking queue (shutdown).

        Messages already taken are the pipeline's: its drain settles or hands them back, a
        probe included. What is left here only waits (timers, lookups).
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
        for lot in self._lots.values():
            if lot.probe_timer is not None:
                lot.probe_timer.cancel()
            await self._reconcile(lot)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
