"""This process's membership of the dispatchers on one queue: the control plane that keeps every
subscriber's limits and breaker whole across worker processes and instances.

It runs over RabbitMQ itself (already there, and highly available), and stays off the hot path:
no delivery waits for the broker on its account, and a healthy subscriber causes no control
traffic at all. One exchange, and one queue and one consumer per process, whatever the number
of subscribers:

    <queue>.control            fanout exchange; every process publishes its control messages here
    <queue>.control.<member>   each process's own queue (classic, exclusive), bound to it
    <queue>.control.members    shared, never published to: its consumer count is the number of
                               processes registered, which a newcomer asks once as it joins

    message     sent                                           carries
    heartbeat   every HEARTBEAT s, and at once after a change  the view numbers it has seen,
                                                               subscribers it is over its share
                                                               on, whether it is joining
    bye         on a clean stop, after the drain               -
    state       when a member joins, by each holding member    its breakers that are not healthy,
                                                               subscribers it parks for
    failed      a failed attempt, breaker still closed         subscriber, echo token
    recovered   the first success after failures               subscriber
    opened      the breaker opened (threshold, failed probe)   subscriber, open for, cooldown,
                                                               echo token
    closed      the probe succeeded                            subscriber
    parked      deliveries parked for want of room (when it     subscriber
                starts, then at most every 10 s while it goes on)

Every process hears its own messages too: its own heartbeat coming back is how it knows it is
still connected to the others (not heard for ISOLATED seconds: it is cut off and holds nothing
until it has rejoined), and its own failure coming back (the echo token) is when the lane frees
the failed attempt's slot. The decisions are elsewhere: dispatcher/decisions/cluster_shares.py
(views, shares, budgets) and dispatcher/decisions/circuit_breaker.py (what a breaker does with
what it hears); this module moves messages and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)

from dispatcher.broker.topology import declare_control, side_channel
from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import BrokerConfig
from dispatcher.decisions.circuit_breaker import Signal
from dispatcher.decisions.cluster_shares import (
    DISCOVER,
    GONE,
    HEARTBEAT,
    ISOLATED,
    Heartbeat,
    MemberView,
    Standing,
)
from dispatcher.decisions.endpoint_limits import Lane, LaneSet
from dispatcher.names import control_names
from dispatcher.process.metrics import Metrics

__all__ = ["ClusterMember"]

log = structlog.get_logger("dispatcher.cluster")

_TICK = 0.1  # seconds between looks at the clock (members gone, cut off)
_REPLY_SPACING = 0.02  # at least this long between two heartbeats sent early
_OVER_CAP = 256  # more subscribers over their share than this: "all of them"
_STATE_CHUNK = 200
_OUTBOX_CAP = 1000  # heartbeats are dropped (not queued) beyond this backlog
_UNSETTLED_WARN = 10.0
# "parked" for one subscriber: when it starts parking after DEMAND_QUIET seconds without (the
# others let an idle parking consumer go after 5 s), and at most every DEMAND_EVERY seconds while
# it goes on.
_DEMAND_QUIET = 5.0
_DEMAND_EVERY = 10.0
_SIGNALS = {s.value: s for s in Signal}


async def _ignore(_: Any) -> None:
    return None


class ClusterMember:
    """An async context manager: joins on entry, says goodbye on exit (after the drain)."""

    def __init__(
        self,
        connection: AbstractConnection,
        cfg: BrokerConfig,
        lanes: LaneSet,
        *,
        metrics: Metrics | None = None,
        heartbeat: float = HEARTBEAT,
        gone: float = GONE,
        isolated: float = ISOLATED,
        discover: float = DISCOVER,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.id = secrets.token_hex(6)
        self._connection = connection
        self._cfg = cfg
        self._lanes = lanes
        self._metrics = metrics
        self._interval = heartbeat
        self._isolated = isolated
        self._clock: Callable[[], float] = clock.monotonic
        self._view = MemberView(self.id, gone=gone, isolated=isolated, discover=discover)
        self._standing: Standing | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, int | None]] = asyncio.Queue()
        self._pending: dict[int, tuple[float, Callable[[], None]]] = {}
        self._token = 0
        self._soon = asyncio.Event()
        self._joined = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._counting: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._presence: AbstractQueue | None = None
        self._began = 0.0
        self._count_again = float("inf")
        self._changes_seen = 0
        self._over_sent: frozenset[str] | None = frozenset()
        self._demand_sent: dict[str, float] = {}
        self._parking: dict[str, float] = {}  # subscriber -> last deferral for want of room
        self._unsettled_since: float | None = None
        self._stopped = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> ClusterMember:
        channel = self._channel = await self._connection.channel(publisher_confirms=False)
        self._exchange, own, self._presence = await declare_control(channel, self._cfg, self.id)
        await own.consume(self._on_message, no_ack=True)
        # Registered before counting: whoever counts after this sees this process.
        await self._presence.consume(_ignore, no_ack=True)
        self._began = self._clock()
        self._view.begin(self._began)
        self._lanes.announcer = self
        self._after_change()
        # A lost link loses the control messages sent meanwhile (the member queue goes with
        # the connection): hold nothing from the moment it is lost, and rejoin once it is back.
        self._connection.close_callbacks.add(self._link_changed)
        if isinstance(self._connection, AbstractRobustConnection):
            self._connection.reconnect_callbacks.add(self._link_changed)
        self._tasks = [
            asyncio.create_task(self._send_forever()),
            asyncio.create_task(self._beat_forever()),
        ]
        self._count_members()
        return self

    async def joined(self, timeout: float) -> bool:
        """Wait until this process holds its shares (True), at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._joined.wait(), timeout)
        return self._joined.is_set()

    def _link_changed(self, *_: Any) -> None:
        if self._stopped:
            return
        if self._view.standing.holding:
            self._view.begin(self._clock())
            self._after_change()
        elif self._view.joining:
            self._count_members()  # the count taken before may be stale

    @property
    def standing(self) -> Standing:
        return self._view.standing

    @property
    def members(self) -> tuple[str, ...]:
        return self._view.members

    async def __aexit__(self, *exc: object) -> None:
        """Goodbye: the others take over this process's shares at once (its requests ended)."""
        self._stopped = True
        self._lanes.announcer = None
        with contextlib.suppress(Exception):
            self._connection.close_callbacks.discard(self._link_changed)
            if isinstance(self._connection, AbstractRobustConnection):
                self._connection.reconnect_callbacks.discard(self._link_changed)
        self._release_all()
        sender, beats = self._tasks or (None, None)
        for task in (beats, self._counting):  # nothing may follow the goodbye
            if task is not None:
                task.cancel()
        self._send("bye", {"k": "bye", "m": self.id})
        if sender is not None and not sender.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics is not None:
            self._metrics.cluster_holding.set(0)
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._channel.close(), timeout=5)

    # --- what the lanes tell ---------------------------------------------------------------------

    def parking_here(self, lane: Lane) -> None:
        """This process's share of the subscriber is used up and it parks the rest: the others
        holding a share consume the parking queue too (parking queues are consumed only where
        they are known), so the subscriber gets its whole limit however the load falls."""
        now, sub = self._clock(), lane.sub.id
        resumed = now - self._parking.get(sub, -1e9) >= _DEMAND_QUIET
        self._parking[sub] = now
        if self._stopped or not (
            resumed or now - self._demand_sent.get(sub, -1e9) >= _DEMAND_EVERY
        ):
            return
        self._demand_sent[sub] = now
        if len(self._demand_sent) > 10_000:
            self._demand_sent = {
                s: t for s, t in self._demand_sent.items() if now - t < _DEMAND_EVERY
            }
            self._parking = {s: t for s, t in self._parking.items() if now - t < _DEMAND_EVERY}
        self._send("parked", {"k": "parked", "m": self.id, "s": sub})

    def announce(self, lane: Lane, signal: Signal, on_heard: Callable[[], None] | None) -> bool:
        """Tell every process what this lane's breaker saw (see `Announcer`)."""
        if self._stopped:
            return False
        doc: dict[str, Any] = {"k": signal.value, "m": self.id, "s": lane.sub.id}
        if signal is Signal.OPENED:
            doc["for"] = round(max(0.0, lane.breaker.open_until - self._clock()), 3)
            doc["c"] = lane.breaker.cooldown
        token = None
        if on_heard is not None:
            self._token += 1
            token = doc["i"] = self._token
            self._pending[token] = (self._clock(), on_heard)
        self._send(signal.value, doc, token)
        return on_heard is not None

    # --- incoming --------------------------------------------------------------------------------

    async def _on_message(self, message: Any) -> None:
        """Every control message, in the order the broker delivered them (no awaits here)."""
        try:
            doc = orjson.loads(message.body)
            kind, member = doc["k"], doc["m"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if not isinstance(member, str):
            return
        now = self._clock()
        if kind == "hb":
            beat = _heartbeat(member, doc)
            if beat is None:
                return
            self._view.heard(beat, now)
        elif kind == "bye":
            if member != self.id:
                self._view.left(member, now)
        elif member == self.id:
            token = doc.get("i")
            found = self._pending.pop(token, None) if isinstance(token, int) else None
            if found is not None:
                found[1]()
            return
        elif kind == "state":
            if not self._view.standing.holding:
                self._restore(doc.get("b"))
                for sub in doc.get("p") or ():
                    if isinstance(sub, str):
                        self._lanes.parked_elsewhere(sub)
            return
        elif kind == "parked":
            if isinstance(sub := doc.get("s"), str):
                self._lanes.parked_elsewhere(sub)
            return
        else:
            self._heard_breaker(kind, doc)
            return
        self._after_change()

    def _heard_breaker(self, kind: str, doc: dict[str, Any]) -> None:
        signal = _SIGNALS.get(kind)
        sub = doc.get("s")
        if signal is None or not isinstance(sub, str):
            return
        self._lanes.heard(
            sub, signal, open_for=_number(doc.get("for")), cooldown=_number(doc.get("c"))
        )

    def _restore(self, entries: Any) -> None:
        if not isinstance(entries, list):
            return
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
                continue
            sub, failures, open_for, cooldown = entry
            self._lanes.restore(
                sub,
                int(_number(failures)),
                None if open_for is None else _number(open_for),
                _number(cooldown),
            )

    # --- the view changes ------------------------------------------------------------------------

    def _after_change(self) -> None:
        view, now = self._view, self._clock()
        self._lanes.cluster.until = view.fresh_until()
        standing = view.standing
        old, self._standing = self._standing, standing
        if standing != old:
            self._lanes.apply(standing)
            self._log_change(old, standing, now)
            if standing.holding:
                self._joined.set()
            elif old is not None and old.holding:
                self._began = now
                self._release_all()
                self._count_members()
        if view.reply_wanted:
            self._soon.set()
        joiners = view.take_joiners()
        if joiners and standing.holding:
            self._send_states()
        if self._metrics is not None:
            self._metrics.cluster_members.set(standing.members)
            self._metrics.cluster_holding.set(1 if standing.holding else 0)
            if view.view_changes != self._changes_seen:
                self._metrics.cluster_view_changes.inc(view.view_changes - self._changes_seen)
        self._changes_seen = view.view_changes
        self._watch_agreement(standing, now)

    def _log_change(self, old: Standing | None, new: Standing, now: float) -> None:
        fields = {"member": self.id, "members": new.members, "rank": new.rank}
        if new.holding and (old is None or not old.holding):
            log.info("cluster_joined", **fields, took=round(now - self._began, 3))
        elif not new.holding and old is not None and old.holding:
            log.warning(
                "cluster_cut_off",
                **fields,
                why=f"broker link lost, or own heartbeat not heard back for {self._isolated:g}s",
                hint="holding no share of any limit until rejoined",
            )
        elif old is not None and old.members != new.members:
            log.info("cluster_view_changed", **fields, was=old.members)

    def _watch_agreement(self, standing: Standing, now: float) -> None:
        if standing.agreed or not standing.holding:
            self._unsettled_since = None
            return
        if self._unsettled_since is None:
            self._unsettled_since = now
        elif now - self._unsettled_since >= _UNSETTLED_WARN:
            log.warning(
                "cluster_unsettled",
                member=self.id,
                disagreeing=self._view.disagreeing(),
                seconds=round(now - self._unsettled_since, 1),
                hint="shares do not grow until every process sees the same members",
            )
            self._unsettled_since = now

    def _count_members(self) -> None:
        """Ask the broker how many processes are registered (in the background)."""
        self._count_again = self._clock() + 1.0
        if self._counting is None or self._counting.done():
            self._counting = asyncio.get_running_loop().create_task(self._count())

    async def _count(self) -> None:
        count: int | None = None
        try:
            assert self._channel is not None
            # A channel of its own: a failed passive declare closes the channel it runs on.
            probe = await side_channel(self._channel)
            try:
                declared = await probe.queue_declare(
                    control_names(self._cfg.queue).presence, passive=True
                )
                count = int(declared.consumer_count or 0) or None
            finally:
                with contextlib.suppress(Exception):
                    await probe.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the link is down: DISCOVER seconds decide instead
            log.debug("cluster_count_failed", error=str(exc) or type(exc).__name__)
        if count is not None:
            self._count_again = float("inf")
        if self._view.joining:
            self._view.expect(count, self._clock())
            self._after_change()

    # --- outgoing --------------------------------------------------------------------------------

    def _send(self, kind: str, doc: dict[str, Any], token: int | None = None) -> None:
        if kind == "heartbeat" and self._outbox.qsize() > _OUTBOX_CAP:
            return
        self._outbox.put_nowait((kind, orjson.dumps(doc), token))

    def _send_heartbeat(self) -> None:
        over = self._over_sent = self._lanes.over(_OVER_CAP)
        beat = self._view.heartbeat(over)
        doc = {
            "k": "hb",
            "m": self.id,
            "s": dict(beat.seen),
            "o": None if over is None else sorted(over),
            "j": beat.joining,
        }
        self._send("heartbeat", doc)

    def _send_states(self) -> None:
        entries = [list(e) for e in self._lanes.unhealthy()]
        now = self._clock()
        parking = [s for s, t in self._parking.items() if now - t < _DEMAND_EVERY]
        for i in range(0, max(len(entries), len(parking)), _STATE_CHUNK):
            doc = {
                "k": "state",
                "m": self.id,
                "b": entries[i : i + _STATE_CHUNK],
                "p": parking[i : i + _STATE_CHUNK],
            }
            self._send("state", doc)

    async def _send_forever(self) -> None:
        """The one publisher on the control channel: messages leave in the order queued."""
        while True:
            kind, body, token = await self._outbox.get()
            try:
                assert self._exchange is not None
                await asyncio.wait_for(
                    self._exchange.publish(
                        aio_pika.Message(body, content_type="application/json"), routing_key=""
                    ),
                    timeout=2.0,
                )
                if self._metrics is not None:
                    self._metrics.cluster_messages.labels(kind).inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the link is down: the own-heartbeat check notices
                if token is not None:
                    self._release(token)
                log.debug("cluster_send_failed", kind=kind, error=str(exc) or type(exc).__name__)
            finally:
                self._outbox.task_done()

    async def _beat_forever(self) -> None:
        next_beat = last = 0.0
        while True:
            now = self._clock()
            try:
                self._view.tick(now)
                self._release_stale(now)
                if self._lanes.over(_OVER_CAP) != self._over_sent:
                    self._soon.set()  # the others may wait for this to grow their shares
                if self._view.joining and self._count_again <= now:
                    self._count_members()  # the last count failed (link down): ask again
                self._after_change()
                early = self._soon.is_set() and now - last >= _REPLY_SPACING
                if now >= next_beat or early:
                    self._soon.clear()
                    self._view.reply_wanted = False
                    self._send_heartbeat()
                    last, next_beat = now, now + self._interval
            except Exception as exc:  # a bug: without heartbeats this process would be cut off
                error = f"{type(exc).__name__}: {exc}"
                log.error("cluster_beat_failed", error=error, exc_info=True)
                last, next_beat = now, now + self._interval
            wait = max(0.0, min(next_beat - self._clock(), _TICK))
            if self._soon.is_set():
                wait = max(0.0, min(wait, last + _REPLY_SPACING - self._clock()))
                await asyncio.sleep(wait)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._soon.wait(), wait)

    # --- held slots ------------------------------------------------------------------------------

    def _release(self, token: int) -> None:
        found = self._pending.pop(token, None)
        if found is not None:
            found[1]()

    def _release_stale(self, now: float) -> None:
        for token in [t for t, (at, _) in self._pending.items() if now - at > self._isolated]:
            self._release(token)

    def _release_all(self) -> None:
        for token in list(self._pending):
            self._release(token)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _heartbeat(member: str, doc: dict[str, Any]) -> Heartbeat | None:
    seen = doc.get("s")
    if not isinstance(seen, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in seen.items()
    ):
        return None
    over = doc.get("o")
    if over is None:
        blocked = None
    elif isinstance(over, list) and all(isinstance(s, str) for s in over):
        blocked = frozenset(over)
    else:
        return None
    return Heartbeat(member, seen, blocked, bool(doc.get("j")))
