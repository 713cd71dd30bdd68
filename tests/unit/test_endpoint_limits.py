"""Lanes without a broker: what is admitted, what waits and what is turned away, and why;
alone, and holding a share of limits split between processes."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import pytest

from dispatcher.config import BreakerConfig, SubscriberConfig
from dispatcher.decisions.circuit_breaker import BreakerState, Signal
from dispatcher.decisions.cluster_shares import ALONE, Standing
from dispatcher.decisions.endpoint_limits import Admitted, Deferred, Lane, send_at
from tests.support.fake_time import FakeTime


def lane(time: FakeTime, **sub: object) -> Lane:
    cfg = SubscriberConfig(id="s", url="https://s.example/h", **sub)  # type: ignore[arg-type]
    breaker = BreakerConfig(failure_threshold=1, cooldown=30)
    return Lane(cfg, breaker, room=0, clock=time.clock)


async def test_a_full_lane_defers_work_but_a_patient_delivery_waits() -> None:
    lane_ = lane(FakeTime(100.0), max_in_flight=1)
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    assert await lane_.acquire() == Deferred("lane_full")
    waiting = asyncio.create_task(lane_.acquire(patient=True))
    await asyncio.sleep(0.01)
    assert not waiting.done() and (lane_.waiting, lane_.waiting_parked) == (0, 1)
    lane_.release(first, True)
    assert isinstance(await waiting, Admitted)
    assert (lane_.in_flight, lane_.waiting_parked) == (1, 0)


async def test_a_delivery_that_waited_while_the_breaker_opened_is_not_attempted() -> None:
    clock = FakeTime(100.0)
    lane_ = lane(clock, max_in_flight=1)
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    waiting = asyncio.create_task(lane_.acquire(patient=True))
    await asyncio.sleep(0.01)
    opened = clock.now
    lane_.release(first, False)  # the attempt failed: the breaker opens (threshold 1)
    assert lane_.breaker.state is BreakerState.OPEN
    assert await waiting == Deferred("breaker_open")
    assert lane_.in_flight == 0
    # Until the cooldown (30 s) is over everything is deferred; then the next one is the probe.
    clock.now = opened + 29.99
    assert await lane_.acquire(patient=True) == Deferred("breaker_open")
    clock.now = opened + 30
    probe = await lane_.acquire(patient=True)
    assert isinstance(probe, Admitted) and probe.probe
    assert lane_.breaker.state is BreakerState.HALF_OPEN


async def test_a_distant_rate_turn_defers_work_but_not_a_patient_delivery() -> None:
    clock = FakeTime(100.0)
    lane_ = lane(clock, rate_limit=1)
    lane_.max_rate_wait = 0.0  # a work-queue delivery waits for no turn at all
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    lane_.release(first, True)
    # The next turn is one interval (1 s) after the first: deferred just before it, sent at it.
    clock.now = 100.99
    assert await lane_.acquire() == Deferred("rate_limited")
    clock.now = 101.0
    second = await lane_.acquire()
    assert isinstance(second, Admitted)
    lane_.release(second, True)
    assert await lane_.acquire() == Deferred("rate_limited")  # the next turn is at 102

    async def advance() -> None:
        await asyncio.sleep(0.01)
        clock.now += 1.0

    patient, _ = await asyncio.gather(lane_.acquire(patient=True), advance())
    assert isinstance(patient, Admitted)
    assert clock.now >= 102.0  # it waited for its turn, one interval after the second


# --- shares of a limit held by several processes ------------------------------------------------


class Announcements:
    """Stands in for the cluster member: records what a lane announces."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Signal]] = []
        self.heard: list[Callable[[], None]] = []

    def announce(self, lane_: Lane, signal: Signal, on_heard: Callable[[], None] | None) -> bool:
        self.sent.append((lane_.sub.id, signal))
        if on_heard is not None:
            self.heard.append(on_heard)
        return on_heard is not None

    def parking_here(self, lane_: Lane) -> None:
        self.sent.append((lane_.sub.id, "parking_here"))  # type: ignore[arg-type]


def shared(time: FakeTime, standing: Standing, **sub: object) -> Lane:
    cfg = SubscriberConfig(id="s", url="https://s.example/h", **sub)  # type: ignore[arg-type]
    return Lane(
        cfg,
        BreakerConfig(failure_threshold=3, cooldown=30),
        room=0,
        clock=time.clock,
        standing=standing,
    )


async def test_a_lane_takes_its_share_and_defers_without_one() -> None:
    clock = FakeTime(100.0)
    last_of_four = Standing(members=4, rank=3, settled=(4, 3))
    lane_ = shared(clock, last_of_four, max_in_flight=2, rate_limit=40)
    assert (lane_.budget, lane_.rate) == (0, 10.0)  # rank 3 of 4: none of 2 slots
    assert await lane_.acquire() == Deferred("no_share")
    assert await lane_.acquire(patient=True) == Deferred("no_share")
    assert not lane_.takes_parked
    # Two of the four are gone (agreed): the last is second of two, with one slot and 20/s.
    assert lane_.apply(Standing(members=2, rank=1, settled=(2, 1)))  # it now takes parked
    assert (lane_.budget, lane_.rate, lane_.takes_parked) == (1, 20.0, True)


async def test_a_growing_share_lets_waiting_deliveries_in() -> None:
    clock = FakeTime(100.0)
    lane_ = shared(clock, Standing(members=2, rank=1, settled=(2, 1)), max_in_flight=2)
    first = await lane_.acquire()
    assert isinstance(first, Admitted) and lane_.budget == 1
    waiting = asyncio.create_task(lane_.acquire(patient=True))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    lane_.apply(ALONE)  # the other process left: the whole limit is this one's
    assert isinstance(await waiting, Admitted) and lane_.in_flight == 2


async def test_losing_every_share_turns_waiting_deliveries_away() -> None:
    lane_ = shared(FakeTime(100.0), ALONE, max_in_flight=1)
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    waiting = asyncio.create_task(lane_.acquire(patient=True))
    await asyncio.sleep(0.01)
    lane_.apply(Standing(holding=False))  # cut off from the others
    assert await waiting == Deferred("no_share")
    assert lane_.used() == 1 and lane_.target == 0  # over its share until it ends


async def test_a_failed_attempt_keeps_its_slot_until_every_process_could_count_it() -> None:
    clock = FakeTime(100.0)
    lane_ = shared(clock, Standing(members=2, rank=0, settled=(2, 0)), max_in_flight=2)
    said = Announcements()
    lane_.announcer = said
    slot = await lane_.acquire()
    assert isinstance(slot, Admitted) and lane_.budget == 1
    lane_.release(slot, False)
    assert said.sent == [("s", Signal.FAILED)]
    assert (lane_.in_flight, lane_.held, lane_.used()) == (0, 1, 1)
    assert await lane_.acquire() == Deferred("lane_full")
    # No room here: the others (holding their shares) are told to take parked deliveries too.
    assert said.sent[-1] == ("s", "parking_here")
    said.heard.pop()()  # the failure came back from the broker
    assert lane_.used() == 0 and isinstance(await lane_.acquire(), Admitted)


async def test_alone_a_failure_is_announced_but_frees_its_slot_at_once() -> None:
    lane_ = shared(FakeTime(100.0), ALONE, max_in_flight=1)
    said = Announcements()
    lane_.announcer = said
    slot = await lane_.acquire()
    assert isinstance(slot, Admitted)
    lane_.release(slot, False)
    assert said.sent == [("s", Signal.FAILED)] and not said.heard and lane_.used() == 0
    slot = await lane_.acquire()
    assert isinstance(slot, Admitted)
    lane_.release(slot, True)  # the first success after a failure is announced too
    slot = await lane_.acquire()
    assert isinstance(slot, Admitted)
    lane_.release(slot, True)  # a healthy subscriber: nothing more
    assert said.sent == [("s", Signal.FAILED), ("s", Signal.RECOVERED)]


async def test_a_reloaded_lane_counts_the_slots_its_predecessor_still_holds() -> None:
    from dispatcher.decisions.endpoint_limits import LaneSet

    before = SubscriberConfig(id="s", url="https://s.example/h", max_in_flight=4)
    after = SubscriberConfig(id="s", url="https://s.example/h", max_in_flight=2)
    lanes = LaneSet(BreakerConfig(), prefetch=64)
    lanes.retain({"s"}, {"s": before})
    old = lanes.lane(before)
    slots = [await old.acquire() for _ in range(3)]
    lanes.retain({"s"}, {"s": after})
    new = lanes.lane(after)
    assert new is not old and (new.budget, new.inherited) == (2, 3)
    new.room = 0
    assert await new.acquire() == Deferred("lane_full")
    assert lanes.over(10) == frozenset({"s"})  # 3 taken, share 2
    for slot in slots[:2]:
        old.release(slot, True)  # type: ignore[arg-type]
    assert new.inherited == 1 and lanes.over(10) == frozenset()
    assert isinstance(await new.acquire(), Admitted)


def recent(*sends: float, per_second: int) -> deque[float]:
    return deque(sends, maxlen=per_second)


@pytest.mark.parametrize(
    ("turn", "last", "sends", "at", "why"),
    [
        (10.0, 9.9, (), 10.0, "on schedule: at its turn"),
        (10.0, 9.0, (), 10.0, "a turn already past (a late wake-up): at once"),
        (10.0, 9.98, (), 10.055, "never within 3/4 of a turn (0.075 s) of the last send"),
        (10.0, 9.9, (9.2, 9.3, 9.4), 10.2, "the last second is full (3 a second): wait"),
        (10.0, 9.9, (8.9, 9.3, 9.4), 10.0, "the third-last send left the second: go"),
    ],
)
def test_when_a_rate_limited_request_may_go(
    turn: float, last: float, sends: tuple[float, ...], at: float, why: str
) -> None:
    got = send_at(turn, last=last, interval=0.1, recent=recent(*sends, per_second=3))
    assert got == pytest.approx(at), why


async def test_a_growing_rate_share_moves_waiting_turns_up() -> None:
    clock = FakeTime(100.0)
    lane_ = shared(clock, Standing(members=2, rank=0, settled=(2, 0)), rate_limit=20)
    assert lane_.rate == 10
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    waiting = [asyncio.create_task(lane_.acquire(patient=True)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert lane_.turns == pytest.approx([100.1, 100.2, 100.3])
    lane_.apply(ALONE)  # the other process is gone: 20/s here
    assert lane_.turns == pytest.approx([100.1, 100.15, 100.2])  # never later than before
    lane_.apply(Standing(members=2, rank=0, settled=(2, 0)))  # back to 10/s: turns stay,
    assert lane_.turns == pytest.approx([100.1, 100.15, 100.2])  # the per-second cap holds
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert lane_.turns == [] and lane_.in_flight == 1


async def test_a_lone_subscriber_with_half_the_limit_still_waits_on_the_whole_window() -> None:
    """The room is the process's prefetch window, not the share's: with its in-flight limit
    split between two processes, a healthy lone subscriber's deliveries queue in the lane
    instead of being parked (`lane_full`) for the split."""
    from dispatcher.decisions.endpoint_limits import LaneSet

    sub = SubscriberConfig(id="s", url="https://s.example/h", max_in_flight=64)
    lanes = LaneSet(BreakerConfig(), prefetch=256)
    lanes.retain({"s"}, {"s": sub})
    lane_ = lanes.lane(sub)
    assert (lane_.budget, lane_.max_waiting) == (64, 192)
    lanes.apply(Standing(members=2, rank=0, settled=(2, 0)))
    assert (lane_.budget, lane_.max_waiting) == (32, 224)
    held = [await lane_.acquire() for _ in range(32)]
    assert all(isinstance(slot, Admitted) for slot in held)
    waiting = [asyncio.create_task(lane_.acquire()) for _ in range(224)]
    await asyncio.sleep(0.01)
    assert lane_.waiting == 224 and not any(w.done() for w in waiting)
    assert await lane_.acquire() == Deferred("lane_full")  # beyond the window: one too many
    for slot in held:
        lane_.release(slot, True)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert sum(isinstance(w.result(), Admitted) for w in waiting if w.done()) == 32
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    # Beside other subscribers a lane holds at most half of the window, whatever its share.
    lanes.retain({"s", "t"}, {"s": sub, "t": replace(sub, id="t")})
    assert (lane_.budget, lane_.max_waiting) == (32, 96)
