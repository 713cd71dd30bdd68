"""Parking lots without a broker: a fake queue records consumers, the lanes own the breakers
and the lots follow them through the lane set's one notification. One injected clock."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dispatcher.broker import parking as parking_module
from dispatcher.broker.parking import ParkingLots, ParkingTuning
from dispatcher.config import BreakerConfig, BrokerConfig, SubscriberConfig
from dispatcher.decisions.circuit_breaker import BreakerState, Signal
from dispatcher.decisions.endpoint_limits import Admitted, Lane, LaneSet
from tests.support.fake_time import FakeTime


class FakeQueue:
    """A parking queue: one consumer at most, and what a basic.get would return."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.consumer: Any = None
        self.consumes = 0
        self.cancels = 0
        self.ready: list[Any] = []

    async def consume(self, callback: Any, no_ack: bool = False) -> str:
        assert self.consumer is None, "consumed twice"
        self.consumer = callback
        self.consumes += 1
        return f"tag-{self.consumes}"

    async def cancel(self, tag: str) -> None:
        self.consumer = None
        self.cancels += 1

    async def get(self, no_ack: bool = False, fail: bool = True) -> Any:
        return self.ready.pop(0) if self.ready else None


class FakeExchange:
    async def publish(self, *_: Any, **__: Any) -> None:
        return None


SUB = SubscriberConfig(id="s", url="https://s.example/h")


class Rig:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.time = FakeTime(1000.0)
        self.queues: dict[str, FakeQueue] = {}
        self.handled: list[Any] = []

        async def declare(_: Any, __: Any, sub: str, *, park_ttl: float) -> FakeQueue:
            return self.queues.setdefault(sub, FakeQueue(sub))

        monkeypatch.setattr(parking_module, "declare_parking", declare)
        clock = self.time.clock
        self.lanes = LaneSet(
            BreakerConfig(failure_threshold=1, cooldown=30), prefetch=64, clock=clock
        )
        self.lanes.retain({SUB.id}, {SUB.id: SUB})
        self.lane: Lane = self.lanes.lane(SUB)

        async def handler(message: Any) -> None:
            self.handled.append(message)
            # The pipeline would attempt it: the probe succeeds and closes the breaker.
            slot = await self.lane.acquire(patient=True)
            assert isinstance(slot, Admitted) and slot.probe
            self.lane.release(slot, True)

        self.lots = ParkingLots(
            types.SimpleNamespace(default_exchange=FakeExchange()),  # type: ignore[arg-type]
            BrokerConfig(queue="unit.q"),
            handler=handler,
            lanes=self.lanes,
            tuning=ParkingTuning(park_ttl=60.0, idle=5.0),
            clock=clock,
        )

    def open_breaker(self, open_for: float) -> None:
        self.lane.breaker.heard(Signal.OPENED, self.time(), open_for=open_for)

    async def declared(self) -> FakeQueue:
        """The subscriber's queue declared, as its first park does, and the lot settled (consumed
        or not, as the lane allows)."""
        await self.lots.ensure(SUB.id)
        await settled()
        return self.queues[SUB.id]


async def settled() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    """The lots closed after the test, as the daemon closes them on its way out."""
    rig = Rig(monkeypatch)
    yield rig
    await rig.lots.close()


async def test_a_lot_is_consumed_only_while_its_breaker_is_closed(rig: Rig) -> None:
    queue = await rig.declared()
    assert rig.lots.consuming == ["s"] and queue.consumer is not None

    rig.open_breaker(30.0)  # the lane set tells the lots; nothing else relays it
    await settled()
    assert rig.lots.consuming == [] and queue.cancels == 1

    rig.lane.breaker.heard(Signal.CLOSED, rig.time())
    await settled()
    assert rig.lots.consuming == ["s"] and queue.consumes == 2
    await rig.lots.close()
    assert rig.lots.consuming == []


async def test_a_lot_declared_while_the_breaker_is_open_waits(rig: Rig) -> None:
    rig.open_breaker(30.0)
    queue = await rig.declared()
    assert rig.lots.known == ["s"] and rig.lots.consuming == []
    await rig.lots.sweep()  # a sweep does not wake a lot its breaker holds back
    await settled()
    assert rig.lots.consuming == [] and queue.consumes == 0


async def test_the_end_of_a_cooldown_fetches_one_parked_delivery_as_the_probe(rig: Rig) -> None:
    queue = await rig.declared()
    queue.ready.append("parked-1")
    rig.open_breaker(0.0)  # a cooldown that is over at once: the probe timer fires
    await asyncio.sleep(0.1)
    await settled()
    assert rig.handled == ["parked-1"]
    assert rig.lane.breaker.state is BreakerState.CLOSED
    assert rig.lots.consuming == ["s"]  # closed again: consumed


async def test_an_idle_lot_is_released_and_a_busy_one_kept(rig: Rig) -> None:
    queue = await rig.declared()
    rig.time.now += 4.0
    await rig.lots.sweep()
    assert rig.lots.known == ["s"] and rig.lots.consuming == ["s"]  # not idle long enough
    rig.time.now += 1.0
    await rig.lots.sweep()
    assert rig.lots.known == [] and queue.consumer is None and queue.cancels == 1


async def test_a_removed_subscribers_lot_is_drained_even_with_its_breaker_open(rig: Rig) -> None:
    rig.open_breaker(30.0)
    await rig.declared()
    assert rig.lots.consuming == []
    rig.lanes.retain(set(), {})  # the reload's order: lanes first, then the lots
    rig.lots.retain(set())
    await settled()
    assert rig.lots.consuming == ["s"]  # the pipeline dead-letters what it finds
