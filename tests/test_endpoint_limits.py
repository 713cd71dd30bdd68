"""Lanes without a broker: what is admitted, what waits and what is turned away, and why."""

from __future__ import annotations

import asyncio

from dispatcher.circuit_breaker import BreakerState
from dispatcher.config import BreakerConfig, SubscriberConfig
from dispatcher.endpoint_limits import Admitted, Deferred, Lane


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lane(clock: Clock, **sub: object) -> Lane:
    cfg = SubscriberConfig(id="s", url="https://s.example/h", **sub)  # type: ignore[arg-type]
    return Lane(cfg, BreakerConfig(failure_threshold=1, cooldown=30), max_waiting=0, clock=clock)


async def test_a_full_lane_defers_work_but_a_patient_delivery_waits() -> None:
    lane_ = lane(Clock(), max_in_flight=1)
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    assert await lane_.acquire() == Deferred(0.0, "lane_full")
    waiting = asyncio.create_task(lane_.acquire(patient=True))
    await asyncio.sleep(0.01)
    assert not waiting.done() and (lane_.waiting, lane_.waiting_parked) == (0, 1)
    lane_.release(first, True)
    assert isinstance(await waiting, Admitted)
    assert (lane_.in_flight, lane_.waiting_parked) == (1, 0)


async def test_a_delivery_that_waited_while_the_breaker_opened_is_not_attempted() -> None:
    clock = Clock()
    lane_ = lane(clock, max_in_flight=1)
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    waiting = asyncio.create_task(lane_.acquire(patient=True))
    await asyncio.sleep(0.01)
    lane_.release(first, False)  # the attempt failed: the breaker opens (threshold 1)
    assert lane_.breaker.state is BreakerState.OPEN
    assert await waiting == Deferred(30.0, "breaker_open")
    assert lane_.in_flight == 0
    # When the cooldown is over, the next one is the probe.
    clock.now += 30
    probe = await lane_.acquire(patient=True)
    assert isinstance(probe, Admitted) and probe.probe
    assert lane_.breaker.state is BreakerState.HALF_OPEN


async def test_a_distant_rate_turn_defers_work_but_not_a_patient_delivery() -> None:
    clock = Clock()
    lane_ = lane(clock, rate_limit=1)
    lane_.max_rate_wait = 0.0
    first = await lane_.acquire()
    assert isinstance(first, Admitted)
    lane_.release(first, True)
    assert await lane_.acquire() == Deferred(1.0, "rate_limited")

    async def advance() -> None:
        await asyncio.sleep(0.01)
        clock.now += 1.0

    patient, _ = await asyncio.gather(lane_.acquire(patient=True), advance())
    assert isinstance(patient, Admitted)
    assert clock.now >= 101.0  # it waited for its turn, one interval after the first
