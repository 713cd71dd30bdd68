"""Subscriber protection and isolation: limits, head-of-line, breaker — measured at receivers."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aio_pika
from aiohttp import web
from structlog.testing import capture_logs

from dispatcher.broker.topology import queue_depths
from dispatcher.decisions.circuit_breaker import BreakerState
from tests.support.harness import (
    Publisher,
    ReceiverServer,
    event_body,
    fail_times,
    hang,
    running,
    slow,
    wait_for_dead_letters,
    wait_until,
)


async def test_in_flight_cap_holds_and_nothing_is_lost(make, receivers: ReceiverServer) -> None:
    rec = receivers.add("small", slow(0.1))
    cfg = make([{"id": "small", "url": rec.url, "max_in_flight": 3}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"e{i}") for i in range(40)])
        assert await wait_until(lambda: rec.count == 40, timeout=30)
    assert rec.max_in_flight <= 3
    assert sorted(rec.ids()) == sorted(f"e{i}" for i in range(40))


async def test_rate_limit_holds_at_the_receiver(make, receivers: ReceiverServer) -> None:
    rec = receivers.add("limited")
    cfg = make([{"id": "limited", "url": rec.url, "rate_limit": 20}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"r{i}") for i in range(50)])
        assert await wait_until(lambda: rec.count == 50, timeout=30)
    times = sorted(r.at for r in rec.requests)
    # In any one-second window at most rate + 1 requests arrive (evenly spaced turns).
    worst = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert worst <= 21, worst
    assert len(set(rec.ids())) == 50


async def test_a_hanging_subscriber_does_not_starve_the_others(make, receivers) -> None:
    stuck = receivers.add("stuck", hang(3600))
    a = receivers.add("a")
    b = receivers.add("b")
    cfg = make(
        [
            {"id": "stuck", "url": stuck.url, "timeout": "60s", "max_in_flight": 16},
            {"id": "a", "url": a.url},
            {"id": "b", "url": b.url},
        ],
        broker={"prefetch": 64},
        dispatcher={"drain_timeout": "1s"},
    )
    n = 600  # far more than the prefetch window: without isolation a and b would stall at 64
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"h{i}") for i in range(n)])
        assert await wait_until(lambda: a.count == n and b.count == n, timeout=60)
        assert disp.pipeline is not None
        lane = disp.pipeline.lanes.lane(cfg.subscriber("stuck"))
        assert stuck.in_flight <= 16 and lane.in_flight + lane.waiting <= 32
        # The rest waits in the broker, in stuck's own parking queue, not in the work queue's
        # window: 16 in flight, 16 waiting, 16 more held by the parking consumer (64 / 4).
        assert lane.waiting_parked <= 16
        left = await queue_depths_of(cfg)
        assert left["work"] == 0 and left["parked"] >= n - 48, left
    assert sorted(a.ids()) == sorted(f"h{i}" for i in range(n))
    assert stuck.count == 0


async def test_breaker_opens_probes_and_closes(make, receivers) -> None:
    rec = receivers.add("wobbly", fail_times(4))
    cfg = make(
        [{"id": "wobbly", "url": rec.url}],
        breaker={"failure_threshold": 3, "cooldown": "300ms", "max_cooldown": "1s"},
        retry={"schedule": ["10ms"] * 8},
    )
    with capture_logs() as logs:
        async with running(cfg) as disp, Publisher(cfg) as pub:
            for i in range(6):
                await pub.publish(event_body(n=i, event_id=f"w{i}"))
            assert await wait_until(lambda: rec.count == 6, timeout=30)
            assert disp.pipeline is not None
            assert disp.pipeline.lanes.lane(cfg.subscriber("wobbly")).breaker.state is (
                BreakerState.CLOSED
            )
    changes = [(e["old"], e["new"]) for e in logs if e["event"] == "breaker_state_changed"]
    assert changes[0] == ("closed", "open")
    assert ("open", "half_open") in changes and changes[-1] == ("half_open", "closed")
    parked = [e for e in logs if e["event"] == "delivery_parked" and e["why"] == "breaker_open"]
    assert parked, "while open, deliveries wait in the subscriber's parking queue"
    assert sorted(rec.ids()) == [f"w{i}" for i in range(6)]
    assert rec.attempts == 10  # four failures, six successes: nothing attempted while open


async def test_retry_of_a_removed_subscriber_is_dead_lettered_not_lost(make, receivers) -> None:
    rec = receivers.add("leaving", fail_times(100))
    cfg = make([{"id": "leaving", "url": rec.url}], retry={"schedule": ["300ms"]})
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="orphan"))
        assert await wait_until(lambda: rec.attempts == 1)
        assert disp.reload(make_config_like(cfg, []))
        [letter] = await wait_for_dead_letters(cfg, 1)
    assert (letter.record.reason, letter.record.subscriber) == ("subscriber_removed", "leaving")


async def queue_depths_of(cfg) -> dict[str, int]:
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel()
        return await queue_depths(channel, cfg.broker, [s.id for s in cfg.subscribers])


def make_config_like(cfg, subscribers):
    return replace(cfg, subscribers=tuple(subscribers))


async def test_response_body_is_read_only_up_to_the_cap(make, receivers) -> None:
    async def enormous(_, __, ___) -> web.StreamResponse:
        return web.Response(status=500, body=b"x" * (8 * 1024 * 1024))

    rec = receivers.add("big", enormous)
    cfg = make(
        [{"id": "big", "url": rec.url}],
        retry={"schedule": []},
        dispatcher={"max_response_bytes": 1024},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="big1"))
        [letter] = await wait_for_dead_letters(cfg, 1)
    assert letter.record.last_status == 500
    assert len(letter.record.last_error) <= 220
    await asyncio.sleep(0)


def test_a_lone_subscriber_may_wait_on_the_whole_window() -> None:
    from dispatcher.config import BreakerConfig, SubscriberConfig
    from dispatcher.decisions.endpoint_limits import LaneSet

    a = SubscriberConfig(id="a", url="https://a.example/h", max_in_flight=64)
    b = SubscriberConfig(id="b", url="https://b.example/h", max_in_flight=64)
    lanes = LaneSet(BreakerConfig(), prefetch=256)
    lanes.retain({"a"})
    assert lanes.lane(a).max_waiting == 192
    lanes.retain({"a", "b"})
    assert lanes.lane(a).max_waiting == 64 and lanes.lane(b).max_waiting == 64
