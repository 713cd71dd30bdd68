"""Per-subscriber lanes: the one place that bounds in-flight work, rate and waiting.

A lane admits a delivery, or tells the caller to defer it (park it in the subscriber's own
queue) so that a slow, saturated or failing subscriber never holds more than its share of the
consumer's prefetch window and never starves the others:

* at most ``max_in_flight`` requests in flight;
* at most ``max_waiting`` work-queue deliveries queued behind them; beyond that, defer;
* at most ``rate_limit`` requests per second (evenly spaced); a delivery whose turn is further
  away than ``max_rate_wait`` is deferred instead of held;
* the circuit breaker's verdict first: while it is open, everything is deferred.

A *patient* delivery (one taken from the subscriber's own parking queue, whose consumer has a
prefetch window of its own) is never deferred for a full lane or a distant rate turn: it waits,
and that window bounds how many wait. Only an open breaker turns it away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dispatcher.circuit_breaker import BreakerState, CircuitBreaker
from dispatcher.config import BreakerConfig, SubscriberConfig

__all__ = ["Admitted", "Deferred", "Lane", "LaneSet"]


@dataclass(frozen=True, slots=True)
class Deferred:
    delay: float
    why: str


class Admitted:
    """A held slot; release it exactly once with `Lane.release`."""

    __slots__ = ("probe",)

    def __init__(self, probe: bool) -> None:
        self.probe = probe


class Lane:
    def __init__(
        self,
        sub: SubscriberConfig,
        breaker: BreakerConfig,
        *,
        max_waiting: int,
        max_rate_wait: float = 1.0,
        on_breaker_change: Callable[[BreakerState, BreakerState, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sub = sub
        self.max_waiting = max_waiting
        self.max_rate_wait = max_rate_wait
        self.breaker = CircuitBreaker(breaker, on_change=on_breaker_change)
        self._clock = clock
        self._slots = asyncio.Semaphore(sub.max_in_flight)
        self._interval = 1.0 / sub.rate_limit if sub.rate_limit > 0 else 0.0
        self._next_turn = 0.0
        self._last_sent = -1e9
        self.in_flight = 0
        self.waiting = 0  # work-queue deliveries waiting for a slot (at most max_waiting)
        self.waiting_parked = 0  # patient ones, bounded by their consumer's prefetch window

    async def acquire(self, *, patient: bool = False) -> Admitted | Deferred:
        stay_away = self.breaker.ask(self._clock())
        if stay_away is not None:
            return Deferred(stay_away, "breaker_open")
        slot = Admitted(self.breaker.state is BreakerState.HALF_OPEN)
        if not patient and self._slots.locked() and self.waiting >= self.max_waiting:
            self._drop_probe(slot)
            return Deferred(0.0, "lane_full")
        if patient:
            self.waiting_parked += 1
        else:
            self.waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._drop_probe(slot)
            raise
        finally:
            if patient:
                self.waiting_parked -= 1
            else:
                self.waiting -= 1
        self.in_flight += 1
        if not slot.probe and self.breaker.state is not BreakerState.CLOSED:
            # The breaker opened while this delivery waited: ask again (it may be the probe).
            stay_away = self.breaker.ask(self._clock())
            if stay_away is not None:
                self.release(slot, None)
                return Deferred(stay_away, "breaker_open")
            slot.probe = True
        if not self._interval:
            return slot
        # Turns are handed out after a slot is held, so sends stay evenly spaced.
        now = self._clock()
        turn = max(now, self._next_turn)
        if not patient and turn - now > self.max_rate_wait:
            self.release(slot, None)
            return Deferred(turn - now, "rate_limited")
        self._next_turn = turn + self._interval
        try:
            # Wait for the reserved turn, then also for the spacing since the last real send:
            # an event loop that stalled must not release a burst when it wakes.
            # A timed wait, not a poll: each pass sleeps exactly until the next allowed send.
            while (wait := max(turn, self._last_sent + self._interval) - self._clock()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
        except BaseException:
            self.release(slot, None)
            raise
        self._last_sent = self._clock()
        return slot

    def _drop_probe(self, slot: Admitted) -> None:
        if slot.probe:
            self.breaker.release_probe()

    def release(self, slot: Admitted, ok: bool | None) -> None:
        """Give the slot back; ``ok`` is the breaker verdict (None: no verdict)."""
        self.in_flight -= 1
        self._slots.release()
        if ok is True:
            self.breaker.success()
        elif ok is False:
            self.breaker.failure(self._clock())
        else:
            self._drop_probe(slot)


class LaneSet:
    """Lanes by subscriber id; rebuilt on reload, keeping a lane whose limits did not change."""

    def __init__(
        self,
        breaker: BreakerConfig,
        *,
        prefetch: int,
        on_breaker_change: Callable[[Lane, BreakerState, BreakerState, str], None] | None = None,
    ) -> None:
        self._breaker = breaker
        self._prefetch = prefetch
        self._on_change = on_breaker_change
        self._lanes: dict[str, Lane] = {}
        self._alone = False

    def lane(self, sub: SubscriberConfig) -> Lane:
        lane = self._lanes.get(sub.id)
        if lane is None or lane.sub != sub:
            lane = self._make(sub)
            self._lanes[sub.id] = lane
        return lane

    def get(self, sub_id: str) -> Lane | None:
        return self._lanes.get(sub_id)

    def lanes(self) -> list[Lane]:
        return list(self._lanes.values())

    def retain(self, ids: set[str], current: Mapping[str, SubscriberConfig] | None = None) -> None:
        """Keep the lanes of these subscribers only, and size them for how many there are.

        With ``current``, a lane whose subscriber's settings changed is dropped too (its
        successor starts with a closed breaker when the next delivery comes).
        """
        for sub_id in list(self._lanes):
            if sub_id not in ids or (
                current is not None and current[sub_id] != self._lanes[sub_id].sub
            ):
                del self._lanes[sub_id]
        self._alone = len(ids) == 1
        for lane in self._lanes.values():
            lane.max_waiting = self._max_waiting(lane.sub)

    def _max_waiting(self, sub: SubscriberConfig) -> int:
        if self._alone:
            # Nobody else to starve: the only subscriber may wait on the whole window.
            return max(0, self._prefetch - sub.max_in_flight)
        # One subscriber may hold at most half of the prefetch window (in flight + waiting).
        return max(0, min(sub.max_in_flight, self._prefetch // 2 - sub.max_in_flight))

    def _make(self, sub: SubscriberConfig) -> Lane:
        callback = self._on_change

        def changed(old: BreakerState, new: BreakerState, why: str) -> None:
            if callback is not None:
                callback(lane, old, new, why)

        lane = Lane(
            sub, self._breaker, max_waiting=self._max_waiting(sub), on_breaker_change=changed
        )
        return lane
