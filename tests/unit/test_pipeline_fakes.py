"""The pipeline without a broker or a network: a fake sender answers, a fake settlement records
what it is asked to publish, a fake channel records the acks. One injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from dispatcher.config import Config, parse_config
from dispatcher.decisions.circuit_breaker import BreakerState
from dispatcher.decisions.retry_policy import DeadLetter, Outcome, OutcomeKind, Park, Retry
from dispatcher.names import H_BATCH_ID, H_BATCH_SIZE
from dispatcher.process.metrics import Metrics
from dispatcher.process.pipeline import Pipeline
from tests.support.fake_time import FakeTime

EXCHANGE = "unit.events"


class FakeSender:
    """Answers every POST with the next status of its script (the last one repeats)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[str, bytes, Mapping[str, str]]] = []

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Outcome:
        self.posts.append((url, body, headers))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if 200 <= status < 300:
            return Outcome(OutcomeKind.DELIVERED, status=status)
        if status == 410:
            return Outcome(OutcomeKind.GONE, status=status)
        return Outcome(OutcomeKind.FAILED, status=status)


class FakeSettlement:
    """Records each decision it is asked to publish, confirmed at once."""

    def __init__(self) -> None:
        self.settled: list[tuple[Retry | Park | DeadLetter, bytes, dict[str, Any]]] = []
        self.dead: list[str] = []

    async def settle(
        self, decision: Retry | Park | DeadLetter, body: bytes, **kw: Any
    ) -> str | None:
        self.settled.append((decision, body, kw))
        return "dead-1" if isinstance(decision, DeadLetter) else None

    async def dead_letter(self, body: bytes, *, reason: str, **_: Any) -> str:
        self.dead.append(reason)
        return "dead-2"


class FakeChannel:
    """The consume channel: records the tags acked and handed back."""

    is_closed = False

    def __init__(self) -> None:
        self.acked: set[int] = set()
        self.nacked: set[int] = set()

    async def basic_ack(
        self, delivery_tag: int, multiple: bool = False, wait: bool = False
    ) -> None:
        self.acked |= set(range(1, delivery_tag + 1)) if multiple else {delivery_tag}

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = False
    ) -> None:
        self.nacked |= set(range(1, delivery_tag + 1)) if multiple else {delivery_tag}


class FakeMessage:
    routing_key = "Message.Delivered"
    timestamp = None
    redelivered = False
    exchange = EXCHANGE

    def __init__(self, body: bytes, tag: int, channel: FakeChannel) -> None:
        self.body = body
        self.message_id = f"m-{tag}"
        self.headers: dict[str, Any] = {}
        self.delivery_tag = tag
        self.channel = channel


def event(n: int) -> bytes:
    return orjson.dumps(
        {
            "event": "Message.Delivered",
            "timestamp": "2026-01-01T00:00:00Z",
            "data": {"recipient": f"r{n}@example.com"},
        }
    )


def config(tmp_path: Path, **sub: Any) -> Config:
    return parse_config(
        {
            "allow_private_networks": True,
            "broker": {"exchange": EXCHANGE, "queue": "unit.q", "prefetch": 64},
            "signing": {"keys_dir": str(tmp_path / "keys")},
            "retry": {"schedule": ["1s", "2s"], "jitter": 0.0, "max_age": "1h"},
            "breaker": {"failure_threshold": 1, "cooldown": "30s"},
            "subscribers": [{"id": "s", "url": "http://127.0.0.1:9/hook", "events": ["*"], **sub}],
        },
        env={},
    )


class Rig:
    def __init__(self, tmp_path: Path, *statuses: int, **sub: Any) -> None:
        self.time = FakeTime(1_700_000_000.0)
        self.sender = FakeSender(*statuses)
        self.settlement = FakeSettlement()
        self.channel = FakeChannel()
        self.metrics = Metrics()
        self.pipeline = Pipeline(
            config(tmp_path, **sub),
            sender=self.sender,  # type: ignore[arg-type]
            settlement=self.settlement,  # type: ignore[arg-type]
            minter=None,
            metrics=self.metrics,
            clock=self.time.clock,
        )
        self._tag = 0

    def message(self, body: bytes) -> FakeMessage:
        self._tag += 1
        return FakeMessage(body, self._tag, self.channel)

    async def handle(self, *bodies: bytes) -> list[int]:
        messages = [self.message(b) for b in bodies]
        await asyncio.gather(*(self.pipeline.handle(m) for m in messages))  # type: ignore[arg-type]
        await self.pipeline.drain(1.0)  # sends the ack frames
        return [m.delivery_tag for m in messages]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


async def test_a_delivered_event_is_acked_and_nothing_is_published(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 204)
    (tag,) = await rig.handle(event(1))
    assert rig.channel.acked == {tag} and not rig.channel.nacked
    assert rig.settlement.settled == [] and len(rig.sender.posts) == 1
    assert rig.sample("dispatcher_deliveries_total", subscriber="s", outcome="delivered") == 1
    assert rig.pipeline.held == 0
    assert rig.sample("dispatcher_prefetch_in_use") == 0
    assert rig.sample("dispatcher_in_flight", subscriber="s") == 0


async def test_a_500_schedules_a_retry_through_the_settlement(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 500)
    (tag,) = await rig.handle(event(1))
    assert rig.channel.acked == {tag}
    ((decision, body, kw),) = rig.settlement.settled
    assert isinstance(decision, Retry) and decision.next_attempt == 2 and decision.delay == 1.0
    assert body == event(1)
    assert kw["delivery"].last_status == 500
    assert kw["delivery"].first_attempt_at == rig.time.now  # the injected clock's reading
    assert rig.sample("dispatcher_retries_scheduled_total", subscriber="s") == 1


async def test_a_410_dead_letters_the_delivery(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 410)
    (tag,) = await rig.handle(event(1))
    assert rig.channel.acked == {tag}
    ((decision, _, _),) = rig.settlement.settled
    assert decision == DeadLetter("endpoint_gone")
    assert rig.sample("dispatcher_dead_letters_total", reason="endpoint_gone") == 1
    assert rig.sample("dispatcher_deliveries_total", subscriber="s", outcome="dead_lettered") == 1


async def test_an_invalid_event_is_dead_lettered_and_never_posted(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 204)
    (tag,) = await rig.handle(b'{"event": "Nope"}')
    assert rig.channel.acked == {tag}
    assert rig.sender.posts == [] and rig.settlement.settled == []
    assert [r.split(":")[0] for r in rig.settlement.dead] == ["invalid_event"]
    assert rig.sample("dispatcher_dead_letters_total", reason="invalid_event") == 1


async def test_a_subscriber_whose_breaker_is_open_is_parked(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 500)
    await rig.handle(event(1))  # threshold 1: this failure opens the breaker
    lane = rig.pipeline.lanes.get("s")
    assert lane is not None and lane.breaker.state is BreakerState.OPEN
    # The gauge follows the lane set's one notification.
    assert rig.sample("dispatcher_breaker_state", subscriber="s") == 2
    (tag,) = await rig.handle(event(2))
    assert rig.channel.acked == {1, tag}
    assert len(rig.sender.posts) == 1  # the second one was not attempted
    decision, body, _ = rig.settlement.settled[-1]
    assert isinstance(decision, Park) and body == event(2)
    assert rig.sample("dispatcher_parked_total", subscriber="s", why="breaker_open") == 1
    # When the injected clock passes the cooldown, the next delivery is the probe.
    rig.time.now += 30
    rig.sender.statuses = [204]
    await rig.handle(event(3))
    assert lane.breaker.state is BreakerState.CLOSED
    assert rig.sample("dispatcher_breaker_state", subscriber="s") == 0


@pytest.mark.parametrize("status", [204, 500])
async def test_a_batch_is_sent_and_settled_as_a_unit(tmp_path: Path, status: int) -> None:
    rig = Rig(tmp_path, status, batch={"max_events": 3, "max_wait": "10s"})
    tags = await rig.handle(event(1), event(2), event(3))
    assert rig.channel.acked == set(tags) and not rig.channel.nacked
    ((_, body, _),) = rig.sender.posts  # one POST for the three events
    assert orjson.loads(body) == [orjson.loads(event(n)) for n in (1, 2, 3)]
    if status == 204:
        assert rig.settlement.settled == []
        assert rig.sample("dispatcher_deliveries_total", subscriber="s", outcome="delivered") == 3
    else:
        ((decision, settled_body, kw),) = rig.settlement.settled  # one retry for the batch
        assert isinstance(decision, Retry) and settled_body == body
        assert kw["carry"][H_BATCH_SIZE] == 3 and kw["carry"][H_BATCH_ID]


async def test_a_failed_settlement_hands_the_message_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 500)

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("publish failed")

    rig.settlement.settle = broken  # type: ignore[method-assign]
    (tag,) = await rig.handle(event(1))
    assert rig.channel.nacked == {tag} and not rig.channel.acked


async def test_apply_updates_routing_lanes_and_metrics_in_one_call(tmp_path: Path) -> None:
    rig = Rig(tmp_path, 204)
    await rig.handle(event(1))
    assert rig.sample("dispatcher_deliveries_total", subscriber="s", outcome="delivered") == 1
    cfg = rig.pipeline.config
    rig.pipeline.apply(parse_config({**_doc(cfg, tmp_path), "subscribers": []}, env={}))
    assert rig.pipeline.lanes.get("s") is None
    assert rig.sample("dispatcher_deliveries_total", subscriber="s", outcome="delivered") is None
    await rig.handle(event(2))
    assert len(rig.sender.posts) == 1  # routed nowhere now


async def test_apply_routes_with_the_index_built_beforehand(tmp_path: Path) -> None:
    """A SIGHUP builds the routing index in the reload thread; apply then uses that one, and
    the event goes where the new config says."""
    from dispatcher.decisions.routing import RoutingTable
    from dispatcher.process.daemon import _read_for_reload

    rig = Rig(tmp_path, 204)
    broker = rig.pipeline.config.broker
    path = tmp_path / "reload.toml"
    path.write_text(
        "allow_private_networks = true\n"
        f"[broker]\nexchange = {broker.exchange!r}\nqueue = {broker.queue!r}\nprefetch = 64\n"
        f"[signing]\nkeys_dir = {str(tmp_path / 'keys')!r}\n"
        '[[subscribers]]\nid = "t"\nurl = "http://127.0.0.1:9/other"\nevents = ["*"]\n'
    )
    new, routing = _read_for_reload(str(path))
    assert isinstance(routing, RoutingTable) and [s.id for s in new.subscribers] == ["t"]
    rig.pipeline.apply(new, routing)
    assert rig.pipeline._routing is routing
    await rig.handle(event(1))
    assert [url for url, _, _ in rig.sender.posts] == ["http://127.0.0.1:9/other"]


def _doc(cfg: Config, tmp_path: Path) -> dict[str, Any]:
    return {
        "allow_private_networks": True,
        "broker": {"exchange": cfg.broker.exchange, "queue": cfg.broker.queue, "prefetch": 64},
        "signing": {"keys_dir": str(tmp_path / "keys")},
    }


async def test_drain_also_waits_for_work_taken_after_it_began(tmp_path: Path) -> None:
    """A delivery that reached the consumer just before it was cancelled is taken a moment
    later; the drain must not stop (and the process exit) before that message is acked."""
    rig = Rig(tmp_path, 204)
    late = rig.message(event(1))
    loop = asyncio.get_running_loop()
    loop.call_soon(rig.pipeline.take, late)  # type: ignore[arg-type]
    assert await rig.pipeline.drain(1.0) == 0
    assert rig.channel.acked == {late.delivery_tag} and len(rig.sender.posts) == 1
    assert rig.pipeline.held == 0
