"""Per-subscriber lanes: the one place that bounds in-flight work, rate and waiting.

A lane admits a delivery, or tells the caller to defer it (park it in the subscriber's own
queue) so that a slow, saturated or failing subscriber never holds more than its share of the
consumer's prefetch window and never starves the others:

* at most ``budget`` requests in flight: this process's share of ``max_in_flight``;
* at most ``room`` of the prefetch window held, in flight and queued behind them together
  (the whole window for a lone subscriber, at most half of it otherwise); beyond that, defer.
  The room is the process's, not the share's: a process holding half of ``max_in_flight``
  queues more behind it, so a healthy subscriber is not parked for the split;
* at most its share of ``rate_limit`` requests per second: turns evenly spaced, never two sends
  closer than three quarters of a turn, and never more sends in any one second than the share
  rounded up
  (so a late wake-up is made up for, but a stalled loop releases no burst); a delivery whose
  turn is further away than ``max_rate_wait`` is deferred instead of held;
* the circuit breaker's verdict first: while it is open, everything is deferred.

The limits in the config are the subscriber's as a whole, over every process on the queue;
`LaneSet.apply` takes this process's shares of them from the cluster's `Standing`
(dispatcher/decisions/cluster_shares.py). A process alone in its cluster has the whole limits.
A process holding no share of a subscriber (joining, cut off from the others, or ranked beyond an
in-flight limit smaller than the number of processes) defers its deliveries (``no_share``) and
does not consume its parking queue.

A *patient* delivery (one taken from the subscriber's own parking queue, whose consumer has a
prefetch window of its own) is never deferred for a full lane or a distant rate turn: it waits,
and that window bounds how many wait. Only an open breaker or a missing share turns it away.

What a lane's breaker sees it announces through the `Announcer` (the cluster member): failures,
the first success after them, openings and closings; a healthy subscriber announces nothing.
While other processes share the subscriber, the slot of a failed attempt stays taken until the
announcement has come back from the broker, so every process has counted the failure (or can)
before this one starts another request: a dead endpoint gets at most ``failure_threshold +
max_in_flight`` requests before every breaker is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import BreakerConfig, SubscriberConfig
from dispatcher.decisions.circuit_breaker import BreakerState, CircuitBreaker, Signal
from dispatcher.decisions.cluster_shares import ALONE, Standing

__all__ = [
    "Admitted",
    "Announcer",
    "BreakerWatcher",
    "ClusterState",
    "Deferred",
    "Lane",
    "LaneSet",
    "send_at",
]

_HOLDING = (Signal.FAILED, Signal.OPENED)
_NO_ROOM = ("no_share", "lane_full", "rate_limited")
# Sends that fell behind their turns (a late wake-up) catch up at most 4/3 as fast as the rate:
# at twice, the bunched requests plus a receiver's own timing were measured at 57 in one second
# for a 50/s limit; at 4/3, a late wake-up is still made up for.
_CATCH_UP = 0.75


@dataclass(frozen=True, slots=True)
class Deferred:
    """Not admitted, and why: ``breaker_open``, ``lane_full``, ``rate_limited`` or ``no_share``.

    Nothing about when: a deferred delivery is parked, and it comes back when the parking lots
    consume its queue again (they follow the lane's breaker and shares), not after a delay."""

    why: str


class Admitted:
    """A held slot; release it exactly once with `Lane.release`."""

    __slots__ = ("probe",)

    def __init__(self, probe: bool) -> None:
        self.probe = probe


def send_at(turn: float, *, last: float, interval: float, recent: deque[float]) -> float:
    """When a request whose rate turn is ``turn`` may go: not before its turn, not within 3/4
    of a turn of the last send, and not while the last second already holds as many sends as
    the share allows (``recent``: the latest sends, at most that many). A turn missed by a late
    wake-up is made up for at up to 4/3 of the rate, never beyond the per-second cap."""
    at = max(turn, last + interval * _CATCH_UP)
    if recent.maxlen is not None and len(recent) == recent.maxlen:
        at = max(at, recent[0] + 1.0)
    return at


class _TurnWait:
    """A slot waiting for its rate turn; `give_up` wakes it to let the slot go."""

    __slots__ = ("_future", "_gave_up", "turn")

    def __init__(self, turn: float) -> None:
        self.turn = turn
        self._gave_up = False
        self._future: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> bool:
        """Sleep; True if it was told to give up (then at once)."""
        if self._gave_up:
            return True
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        timer = loop.call_later(seconds, _wake, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None
        return self._gave_up

    def give_up(self) -> None:
        self._gave_up = True
        _wake(self._future)

    def move_to(self, turn: float) -> None:
        """An earlier turn (the share of the rate grew): wake up to wait for that one."""
        self.turn = turn
        _wake(self._future)


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class Announcer(Protocol):
    def announce(self, lane: Lane, signal: Signal, on_heard: Callable[[], None] | None) -> bool:
        """Tell the other processes. With ``on_heard``: True means it will be called once the
        announcement came back (or was given up); False, never (the slot is freed at once)."""
        ...

    def parking_here(self, lane: Lane) -> None:
        """This process parks the lane's deliveries for want of room (its share is used up):
        the others holding a share should consume the parking queue too."""
        ...


class ClusterState:
    """What the cluster says now, shared by a process's lanes: until when (monotonic) this
    process may start requests (the cluster member moves it on each time it hears its own
    heartbeat back; on its own, a process never stops), and its standing."""

    __slots__ = ("standing", "until")

    def __init__(self) -> None:
        self.until = math.inf
        self.standing = ALONE


_ALWAYS = ClusterState()


class Lane:
    def __init__(
        self,
        sub: SubscriberConfig,
        breaker: BreakerConfig,
        *,
        room: int,
        max_rate_wait: float = 1.0,
        on_breaker_change: Callable[[BreakerState, BreakerState, str], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        standing: Standing = ALONE,
        cluster: ClusterState = _ALWAYS,
        on_refresh: Callable[[Lane], None] | None = None,
        announcer: Announcer | None = None,
        over: set[str] | None = None,
    ) -> None:
        self.sub = sub
        self._room = room
        self.max_waiting = 0  # work-queue deliveries that may queue: the room beyond the budget
        self.max_rate_wait = max_rate_wait
        self.breaker = CircuitBreaker(breaker, on_change=on_breaker_change)
        self.announcer = announcer
        self._clock = clock.monotonic  # breakers, turns, and until when the cluster lets it send
        self._fresh = cluster
        self._on_refresh = on_refresh
        self.stale = False  # the standing changed while the lane was idle: apply it when used
        self._over_set = over
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._next_turn = 0.0
        self._last_sent = -1e9
        self._interval = 0.0
        self._sent: deque[float] = deque(maxlen=1)  # the last sends, as many as a second allows
        self._turn_waits: list[_TurnWait] = []  # slots held, waiting for their rate turn
        self._alone = True
        self._over = False
        self._retired = False
        self._successor: Lane | None = None
        self.in_flight = 0  # slots taken: requests, and deliveries waiting for their rate turn
        self.held = 0  # slots of failed attempts whose announcement is not back yet
        self.inherited = 0  # slots still taken in the lane this one replaced (a reload)
        self.waiting = 0  # work-queue deliveries waiting for a slot (at most max_waiting)
        self.waiting_parked = 0  # patient ones, bounded by their consumer's prefetch window
        self._budget = 0
        self.target = 0
        self._rate = 0.0
        self.apply(standing, new=True)

    @property
    def room(self) -> int:
        """How much of the prefetch window this lane may hold: in flight and waiting."""
        return self._room

    @room.setter
    def room(self, value: int) -> None:
        self._room = value
        self._fit_waiting()

    def _fit_waiting(self) -> None:
        """What may queue is the room its budget does not use (the budget or the room moved)."""
        self.max_waiting = max(0, self._room - self._budget)

    # --- shares ----------------------------------------------------------------------------------

    def apply(self, standing: Standing, *, new: bool = False) -> bool:
        """Take this process's shares from the standing. True when the parking lots should
        look again: the lane started or stopped taking parked deliveries, or this process
        became the one to probe its open breaker."""
        self.stale = False
        before = (self._takes_parked(), self.breaker.prober)
        sub = self.sub
        self._budget = standing.in_flight(sub.id, sub.max_in_flight, None if new else self._budget)
        self.target = standing.target(sub.max_in_flight)
        if sub.rate_limit > 0:
            self._rate = standing.rate(sub.rate_limit, None if new else self._rate)
            if self._rate <= 0:
                self._budget = self.target = 0  # no part of the rate here: no part at all
            else:  # (at 0 the spacing of the last rate is kept, for turns already reserved)
                faster = self._interval and 1.0 / self._rate < self._interval
                self._interval = 1.0 / self._rate
                if faster:
                    self._respace()
                per_second = max(1, math.ceil(self._rate - 1e-9))
                if per_second != self._sent.maxlen:
                    self._sent = deque(self._sent, maxlen=per_second)
        self._alone = standing.alone
        self.breaker.prober = standing.prober
        self._fit_waiting()
        if self._budget <= 0:
            self._turn_away_waiters()
        else:
            self._give_back(self.used() - self._budget)
            self._grant()
        self._note()
        became_prober = self.breaker.prober and not before[1]
        return self._takes_parked() != before[0] or (
            became_prober and self.breaker.state is not BreakerState.CLOSED
        )

    @property
    def budget(self) -> int:
        """Requests this process may have in flight to the subscriber (its share)."""
        if self.stale:
            self.refresh()
        return self._budget

    @property
    def rate(self) -> float:
        """Requests per second this process may send the subscriber (its share; 0 when the
        subscriber has no rate limit or this process has no part of it)."""
        if self.stale:
            self.refresh()
        return self._rate

    @property
    def takes_parked(self) -> bool:
        """Should this process consume the subscriber's parking queue?"""
        if self.stale:
            self.refresh()
        return self._takes_parked()

    def _takes_parked(self) -> bool:
        return self.breaker.state is BreakerState.CLOSED and self._budget > 0 and not self._retired

    @property
    def probe_again(self) -> float | None:
        """When an open breaker's probe found the parking queue empty: look again this much
        later (others park what they get), or None on its own (its next delivery probes)."""
        return None if self._alone else self.breaker.policy.cooldown

    def used(self) -> int:
        return self.in_flight + self.held + self.inherited

    @property
    def turns(self) -> list[float]:
        """The rate turns handed out to deliveries that wait for them."""
        return sorted(w.turn for w in self._turn_waits)

    # --- admission -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Slots taken or waited for, or a breaker not closed: standing changes apply at once."""
        return bool(
            self.used()
            or self._waiters
            or self._turn_waits
            or self.breaker.state is not BreakerState.CLOSED
        )

    def refresh(self) -> None:
        """Apply a standing that changed while this lane was idle (as to a new lane)."""
        self.stale = False
        if self.apply(self._fresh.standing, new=not self.busy) and self._on_refresh is not None:
            self._on_refresh(self)

    async def acquire(self, *, patient: bool = False) -> Admitted | Deferred:
        if self.stale:
            self.refresh()
        got = await self._acquire(patient)
        if (
            isinstance(got, Deferred)
            and got.why in _NO_ROOM
            and self.announcer is not None
            and not self._alone
        ):
            self.announcer.parking_here(self)
        return got

    async def _acquire(self, patient: bool) -> Admitted | Deferred:
        now = self._clock()
        if self.breaker.ask(now) is not None:
            return Deferred("breaker_open")
        slot = Admitted(self.breaker.state is BreakerState.HALF_OPEN)
        if self._budget <= 0 or now > self._fresh.until or self._retired:
            self._drop_probe(slot)
            return Deferred("no_share")
        if self.used() >= self._budget or self._waiters:
            if not patient and self.waiting >= self.max_waiting:
                self._drop_probe(slot)
                return Deferred("lane_full")
            try:
                granted = await self._wait(patient)
            except BaseException:
                self._drop_probe(slot)
                raise
            if not granted:
                self._drop_probe(slot)
                return Deferred("no_share")
        else:
            self.in_flight += 1
        if not slot.probe and self.breaker.state is not BreakerState.CLOSED:
            # The breaker opened while this delivery waited: ask again (it may be the probe).
            if self.breaker.ask(self._clock()) is not None:
                self.release(slot, None)
                return Deferred("breaker_open")
            slot.probe = True
        if not self._interval:
            return slot
        # Turns are handed out after a slot is held, so sends stay evenly spaced.
        now = self._clock()
        turn = max(now, self._next_turn)
        if not patient and turn - now > self.max_rate_wait:
            self.release(slot, None)
            return Deferred("rate_limited")
        self._next_turn = turn + self._interval
        waiting = _TurnWait(turn)
        self._turn_waits.append(waiting)
        try:
            # Wait for the reserved turn, for 3/4 of a turn since the last real send, and until
            # the last second holds room for one more (at the current share): a late wake-up is
            # made up for, but an event loop that stalled releases no burst when it wakes. A
            # timed wait, not a poll: each pass sleeps exactly until the next allowed send, or
            # until the share shrinks and this slot is one too many.
            while (
                wait := send_at(
                    waiting.turn, last=self._last_sent, interval=self._interval, recent=self._sent
                )
                - self._clock()
            ) > 0:
                if await waiting.sleep(wait):
                    self.release(slot, None)
                    return Deferred("lane_full" if self._budget > 0 else "no_share")
        except BaseException:
            self.release(slot, None)
            raise
        finally:
            self._turn_waits.remove(waiting)
        now = self._clock()
        if now > self._fresh.until:  # cut off from the others while it waited
            self.release(slot, None)
            return Deferred("no_share")
        self._last_sent = now
        self._sent.append(now)
        return slot

    async def _wait(self, patient: bool) -> bool:
        """Queue for a slot (first come, first served). True: it is ours (counted in_flight)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if patient:
            self.waiting_parked += 1
        else:
            self.waiting += 1
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled() and future.result():
                self._free(1)  # granted just as it was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise
        finally:
            if patient:
                self.waiting_parked -= 1
            else:
                self.waiting -= 1

    def _grant(self) -> None:
        if self._fresh.until < self._clock():
            return
        while self._waiters and self.used() < self._budget:
            future = self._waiters.popleft()
            if future.done():
                continue
            self.in_flight += 1
            future.set_result(True)

    def _turn_away_waiters(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(False)
        self._give_back(len(self._turn_waits))

    def _respace(self) -> None:
        """The share of the rate grew: turns already handed out move up to the new spacing
        (never later than they were), so the larger share is used at once."""
        if not self._turn_waits:
            return
        waits = sorted(self._turn_waits, key=lambda w: w.turn)
        at = max(self._clock(), waits[0].turn)
        for waiting in waits:
            if at < waiting.turn:
                waiting.move_to(at)
            at = waiting.turn + self._interval
        self._next_turn = min(self._next_turn, at)

    def _give_back(self, n: int) -> None:
        """The share shrank: the ``n`` slots waiting for the latest rate turns let go (they
        are deferred), and those turns go to whoever comes next."""
        if n <= 0:
            return
        latest = sorted(self._turn_waits, key=lambda w: w.turn, reverse=True)[:n]
        for waiting in latest:
            waiting.give_up()
        if latest:
            self._next_turn = min(self._next_turn, min(w.turn for w in latest))

    def _drop_probe(self, slot: Admitted) -> None:
        if slot.probe:
            self.breaker.release_probe()

    def release(self, slot: Admitted, ok: bool | None) -> None:
        """Give the slot back; ``ok`` is the breaker verdict (None: no verdict)."""
        self.in_flight -= 1
        if ok is True:
            signal = self.breaker.success()
        elif ok is False:
            signal = self.breaker.failure(self._clock())
        else:
            self._drop_probe(slot)
            signal = None
        if signal is not None and self.announcer is not None:
            if signal in _HOLDING and not self._alone:
                self.held += 1  # the slot stays taken until the others can have counted it
                if self.announcer.announce(self, signal, self._heard):
                    self._note()
                    return
                self.held -= 1
            else:
                self.announcer.announce(self, signal, None)
        self._free(1, counted=True)

    def _heard(self) -> None:
        """A failure this lane announced came back: every process could count it."""
        self.held -= 1
        self._free(1, counted=True)

    def _free(self, n: int, *, counted: bool = False) -> None:
        """``n`` slots of this lane (or, ``counted``, already taken off) were freed."""
        if not counted:
            self.in_flight -= n
        if self._successor is not None:
            self._successor._inherited_freed(n)
        self._note()
        self._grant()

    def _inherited_freed(self, n: int) -> None:
        self.inherited -= n
        self._free(n, counted=True)

    def _note(self) -> None:
        over = self.used() > self.target
        if over != self._over and self._over_set is not None:
            if over:
                self._over_set.add(self.sub.id)
            else:
                self._over_set.discard(self.sub.id)
        self._over = over

    # --- reload ----------------------------------------------------------------------------------

    def retire(self) -> None:
        """This lane is no longer used (its subscriber was removed or reconfigured): what
        waits in it is deferred."""
        self._retired = True
        self._turn_away_waiters()
        if self._over_set is not None and self._over:
            self._over_set.discard(self.sub.id)
        self._over = False
        self._over_set = None

    def succeed(self, successor: Lane) -> None:
        """A reload replaced this lane: its slots still taken count against the successor
        until they are given back, the rate keeps its spacing, and what waits is deferred
        (parked, to come back through the successor)."""
        self.retire()
        self._successor = successor
        successor.inherited = self.used()
        successor._next_turn = self._next_turn
        successor._last_sent = self._last_sent
        successor._sent = deque(self._sent, maxlen=successor._sent.maxlen)
        successor._note()


BreakerWatcher = Callable[["Lane", BreakerState, BreakerState, str], None]


class LaneSet:
    """Lanes by subscriber id; rebuilt on reload, keeping a lane whose limits did not change."""

    def __init__(
        self,
        breaker: BreakerConfig,
        *,
        prefetch: int,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._breaker = breaker
        self._prefetch = prefetch
        # Told of every state change of a current lane's breaker (a replaced lane's stragglers
        # are not passed on): the one notification the parking lots and the metrics follow.
        self._breaker_watchers: list[BreakerWatcher] = []
        self._clock = clock  # every lane's
        self._monotonic = clock.monotonic
        self._lanes: dict[str, Lane] = {}
        self._subs: Mapping[str, SubscriberConfig] = {}
        self._alone = False
        self._over: set[str] = set()
        self._wanted_here: set[str] = set()  # parked elsewhere, while this one had no share
        self.standing: Standing = ALONE
        self.cluster = ClusterState()
        self._announcer: Announcer | None = None
        # Told when a subscriber's lane starts or stops taking parked deliveries, or becomes
        # this process's to probe; and when another process parks a subscriber's deliveries
        # for want of room (the daemon points both at the parking lots).
        self.on_share_change: Callable[[str], None] | None = None
        self.on_parked_elsewhere: Callable[[str], None] | None = None

    def watch_breakers(self, watcher: BreakerWatcher) -> None:
        """Call ``watcher(lane, old, new, why)`` on every state change of a current lane's
        breaker; the lane (its ``breaker``) is what holds the state, watchers keep no copy."""
        self._breaker_watchers.append(watcher)

    def _breaker_changed(self, lane: Lane, old: BreakerState, new: BreakerState, why: str) -> None:
        if self._lanes.get(lane.sub.id) is not lane:
            return  # a straggler of a lane that a reload replaced
        for watcher in self._breaker_watchers:
            watcher(lane, old, new, why)

    @property
    def announcer(self) -> Announcer | None:
        return self._announcer

    @announcer.setter
    def announcer(self, announcer: Announcer | None) -> None:
        self._announcer = announcer
        for lane in self._lanes.values():
            lane.announcer = announcer

    def lane(self, sub: SubscriberConfig) -> Lane:
        lane = self._lanes.get(sub.id)
        if lane is None or lane.sub != sub:
            old, lane = lane, self._make(sub)
            if old is not None:
                old.succeed(lane)
            self._lanes[sub.id] = lane
            if not lane.takes_parked and self.on_share_change is not None:
                self.on_share_change(sub.id)  # a parking queue found meanwhile: not for us
        return lane

    def get(self, sub_id: str) -> Lane | None:
        return self._lanes.get(sub_id)

    def retain(self, ids: set[str], current: Mapping[str, SubscriberConfig] | None = None) -> None:
        """Keep the lanes of these subscribers only, and size them for how many there are.

        With ``current``, a lane whose subscriber's settings changed is replaced too (its
        successor starts with a closed breaker, and inherits the slots still taken).
        """
        if current is not None:
            self._subs = dict(current)
        for sub_id in list(self._lanes):
            old = self._lanes[sub_id]
            if sub_id not in ids:
                del self._lanes[sub_id]
                old.retire()
            elif current is not None and current[sub_id] != old.sub:
                self._lanes[sub_id] = successor = self._make(current[sub_id])
                old.succeed(successor)
        self._over &= set(self._lanes)
        self._alone = len(ids) == 1
        for lane in self._lanes.values():
            lane.room = self._room(lane.sub)

    # --- the cluster -----------------------------------------------------------------------------

    def apply(self, standing: Standing) -> None:
        """A new standing in the cluster: recompute every lane's shares (only those of the
        subscribers it (un)blocks, when nothing else changed)."""
        old, self.standing = self.standing, standing
        self.cluster.standing = standing
        same_view = (old.holding, old.members, old.rank, old.agreed, old.settled) == (
            standing.holding,
            standing.members,
            standing.rank,
            standing.agreed,
            standing.settled,
        )
        if same_view and old.blocked is not None and standing.blocked is not None:
            touched: Iterable[Lane] = [
                lane
                for sub_id in old.blocked ^ standing.blocked
                if (lane := self._lanes.get(sub_id)) is not None
            ]
        elif old == standing:
            return
        else:
            touched = self._lanes.values()
        for lane in list(touched):
            # Idle lanes (most of them, with tens of thousands of subscribers) catch up when
            # they are next used: a view change costs a pass over the busy ones only. A lane
            # whose parking queue others asked this process to take is not left for later:
            # it gets no delivery of its own to be used by.
            if not lane.busy and lane.sub.id not in self._wanted_here:
                lane.stale = True
            elif lane.apply(standing):
                self._refreshed(lane)

    def _refreshed(self, lane: Lane) -> None:
        """A lane's shares changed what the parking lots should do for it."""
        sub_id = lane.sub.id
        if self.on_share_change is not None:
            self.on_share_change(sub_id)
        if lane.takes_parked and sub_id in self._wanted_here:
            self._wanted_here.discard(sub_id)
            if self.on_parked_elsewhere is not None:
                self.on_parked_elsewhere(sub_id)

    def over(self, cap: int) -> frozenset[str] | None:
        """Subscribers whose slots taken here exceed this process's share (None: more than
        ``cap`` of them, i.e. treat all as over)."""
        return None if len(self._over) > cap else frozenset(self._over)

    def heard(
        self, sub_id: str, signal: Signal, *, open_for: float = 0.0, cooldown: float = 0.0
    ) -> None:
        """Another process's breaker for this subscriber announced ``signal``."""
        lane = self._known(sub_id, create=signal in _HOLDING)
        if lane is not None:
            lane.breaker.heard(signal, self._monotonic(), open_for=open_for, cooldown=cooldown)

    def parked_elsewhere(self, sub_id: str) -> None:
        """Another process parks this subscriber's deliveries for want of room: if this one
        holds a share of it, it should consume the parking queue too (now, or as soon as it
        holds one)."""
        lane = self._known(sub_id, create=True)
        if lane is None:
            return
        if lane.takes_parked:
            if self.on_parked_elsewhere is not None:
                self.on_parked_elsewhere(sub_id)
        elif len(self._wanted_here) < 10_000:
            self._wanted_here.add(sub_id)

    def restore(self, sub_id: str, failures: int, open_for: float | None, cooldown: float) -> None:
        """A member's breaker state, sent to this (joining) process."""
        lane = self._known(sub_id, create=True)
        if lane is not None:
            lane.breaker.restore(failures, open_for, cooldown, self._monotonic())

    def unhealthy(self) -> list[tuple[str, int, float | None, float]]:
        """(subscriber, failures, seconds still open or None, cooldown) of every breaker that
        is not closed with no failures: what a joining process is told."""
        now = self._monotonic()
        out = []
        for sub_id, lane in self._lanes.items():
            digest = lane.breaker.digest(now)
            if digest is not None:
                out.append((sub_id, *digest))
        return out

    def _known(self, sub_id: str, *, create: bool) -> Lane | None:
        lane = self._lanes.get(sub_id)
        if lane is None and create and (sub := self._subs.get(sub_id)) is not None:
            lane = self.lane(sub)
        if lane is not None and lane.stale:
            lane.refresh()
        return lane

    def _room(self, sub: SubscriberConfig) -> int:
        if self._alone:
            # Nobody else to starve: the only subscriber may wait on the whole window.
            return self._prefetch
        # One subscriber may hold at most half of the prefetch window, and no more than twice
        # its in-flight limit (in flight + waiting).
        return min(2 * sub.max_in_flight, self._prefetch // 2)

    def _make(self, sub: SubscriberConfig) -> Lane:
        def changed(old: BreakerState, new: BreakerState, why: str) -> None:
            self._breaker_changed(lane, old, new, why)

        lane = Lane(
            sub,
            self._breaker,
            room=self._room(sub),
            on_breaker_change=changed,
            clock=self._clock,
            standing=self.standing,
            cluster=self.cluster,
            on_refresh=self._refreshed,
            announcer=self._announcer,
            over=self._over,
        )
        return lane
