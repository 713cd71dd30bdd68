"""Batches against the real broker and real receivers: a batch is the unit of delivery, retry,
parking and dead-lettering, and every member event is delivered exactly once inside one."""

from __future__ import annotations

import hashlib

import aio_pika
import orjson
from aiohttp import web

from dispatcher.broker import frames
from dispatcher.broker.dead_letters import DeadLetterTool
from dispatcher.config import BatchConfig, SubscriberConfig
from dispatcher.decisions.batching import Batcher, Member, batch_body
from dispatcher.decisions.events import parse_event
from signing import WebhookVerifier
from tests.support.harness import (
    Publisher,
    Receiver,
    ReceiverServer,
    always,
    broker_url,
    event_body,
    fail_times,
    hang,
    running,
    settle,
    wait_for_dead_letters,
    wait_until,
)


def members_of(rec: Receiver) -> list[list[str]]:
    """The event ids in each batch the receiver accepted, in order."""
    return [[e["id"] for e in orjson.loads(r.body)] for r in rec.requests]


# --- the batcher (no broker) -------------------------------------------------------------------


def batched(max_events: int = 3, max_bytes: int = 1024 * 1024) -> SubscriberConfig:
    return SubscriberConfig(
        id="b",
        url="https://b.example/h",
        batch=BatchConfig(max_events=max_events, max_wait=60.0, max_bytes=max_bytes),
    )


async def test_a_batch_closes_at_max_events_and_keeps_the_order() -> None:
    sent: list[list[str]] = []
    batcher = Batcher(lambda sub, members: sent.append([m.event.id for m in members]))
    sub = batched(3)
    for i in range(7):
        batcher.add(sub, Member(parse_event(event_body(event_id=f"e{i}")), {}))
    assert sent == [["e0", "e1", "e2"], ["e3", "e4", "e5"]]
    assert len(batcher) == 1
    assert batcher.flush() == 1
    assert sent[-1] == ["e6"] and len(batcher) == 0


async def test_a_batch_never_grows_past_max_bytes() -> None:
    sent: list[int] = []
    batcher = Batcher(
        lambda sub, members: sent.append(len(batch_body([m.event.body for m in members])))
    )
    body = event_body(event_id="x")
    sub = batched(100, max_bytes=3 * (len(body) + 1) + 2)
    for _ in range(7):
        batcher.add(sub, Member(parse_event(body), {}))
    batcher.flush()
    assert all(size <= sub.batch.max_bytes for size in sent)  # type: ignore[union-attr]
    assert len(sent) == 3


def test_the_body_is_the_exact_bytes_as_a_json_array() -> None:
    a, b = b'{"event": "x",  "n": 1}', b'{"n":2}'
    assert batch_body([a, b]) == b"[" + a + b"," + b + b"]"
    assert orjson.loads(batch_body([a, b])) == [{"event": "x", "n": 1}, {"n": 2}]


# --- end to end --------------------------------------------------------------------------------


async def test_every_event_is_delivered_once_inside_a_batch_in_order(
    make, receivers: ReceiverServer
) -> None:
    bulk = receivers.add("bulk")
    single = receivers.add("single")
    cfg = make(
        [
            {"id": "bulk", "url": bulk.url, "batch": {"max_events": 10, "max_wait": "200ms"}},
            {"id": "single", "url": single.url},
        ]
    )
    n = 45
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"b{i:02}") for i in range(n)])
        assert await wait_until(lambda: sum(map(len, members_of(bulk))) == n and single.count == n)
        await settle()
        jwks = disp.keyring.jwks()
    batches = members_of(bulk)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [f"b{i:02}" for i in range(n)]  # each exactly once
    assert flat == sorted(flat)  # one consumer: the order of consumption is the publish order
    assert max(map(len, batches)) == 10 and len(batches) >= 5
    verifier = WebhookVerifier(jwks=jwks, audience=bulk.url, issuer=cfg.signing.issuer)
    for got, ids in zip(bulk.requests, batches, strict=True):
        assert got.headers["webhook-batch-size"] == str(len(ids))
        assert got.headers["webhook-id"].startswith("bat_")
        claims = await verifier.verify(got.headers, got.body)
        assert isinstance(claims, dict) and claims["webhook_id"] == got.headers["webhook-id"]
        # The body is the exact published bytes of each event.
        assert (
            got.body == b"[" + b",".join(event_body(n=int(i[1:]), event_id=i) for i in ids) + b"]"
        )
    assert sorted(single.ids()) == [f"b{i:02}" for i in range(n)]
    assert "webhook-batch-size" not in single.requests[0].headers


async def test_a_batch_that_fails_twice_is_retried_whole(make, receivers) -> None:
    rec = receivers.add("flaky", fail_times(2))
    cfg = make(
        [{"id": "flaky", "url": rec.url, "batch": {"max_events": 5, "max_wait": "5s"}}],
        retry={"schedule": ["50ms", "50ms", "50ms"], "jitter": 0.0},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"r{i}") for i in range(5)])
        assert await wait_until(lambda: rec.count == 1)
        await settle()
    attempts = rec.failures + rec.requests
    assert len(attempts) == 3
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    assert len({hashlib.sha256(a.body).digest() for a in attempts}) == 1
    assert members_of(rec) == [[f"r{i}" for i in range(5)]]


async def test_a_batch_to_a_gone_endpoint_is_one_dead_letter_and_replays(make, receivers) -> None:
    state = {"gone": True}

    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=410 if state["gone"] else 200)

    rec = receivers.add("moved", behaviour)  # type: ignore[arg-type]
    cfg = make([{"id": "moved", "url": rec.url, "batch": {"max_events": 4, "max_wait": "5s"}}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"g{i}") for i in range(4)])
        letters = await wait_for_dead_letters(cfg, 1)
        assert letters[0].record.reason == "endpoint_gone"
        assert letters[0].record.event_id == rec.failures[0].headers["webhook-id"]
        assert [e["id"] for e in orjson.loads(letters[0].body)] == ["g0", "g1", "g2", "g3"]
        shown = letters[0].export()  # what dlq show and dlq export print
        assert shown["batch"] == {
            "id": letters[0].record.event_id,
            "size": 4,
            "members": ["g0", "g1", "g2", "g3"],
        }
        assert shown["event"] == "batch"
        state["gone"] = False
        replayed, missing, kept = await DeadLetterTool(cfg, progress=None).replay(None)
        assert (replayed, missing, kept) == (1, set(), set())
        assert await wait_until(lambda: rec.count == 1)
    assert members_of(rec) == [["g0", "g1", "g2", "g3"]]
    assert rec.requests[0].headers["webhook-id"] == rec.failures[0].headers["webhook-id"]


async def test_a_full_prefetch_window_flushes_instead_of_waiting(make, receivers) -> None:
    rec = receivers.add("bulk")
    cfg = make(
        [{"id": "bulk", "url": rec.url, "batch": {"max_events": 1000, "max_wait": "4s"}}],
        broker={"prefetch": 8},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"w{i:02}") for i in range(30)])
        # Long before the oldest event has waited 4 s: the window of 8 keeps being flushed.
        assert await wait_until(lambda: sum(map(len, members_of(rec))) >= 16, timeout=2)
        # The last few wait out max_wait: the window is not full any more.
        assert await wait_until(lambda: sum(map(len, members_of(rec))) == 30, timeout=15)
    assert max(map(len, members_of(rec))) <= 8


async def test_a_breaker_opened_by_a_batch_parks_the_batch_whole(make, receivers) -> None:
    state = {"down": True}

    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=503 if state["down"] else 200)

    rec = receivers.add("down", behaviour)  # type: ignore[arg-type]
    cfg = make(
        [
            {
                "id": "down",
                "url": rec.url,
                "max_in_flight": 1,
                "batch": {"max_events": 3, "max_wait": "100ms"},
            }
        ],
        breaker={"failure_threshold": 1, "cooldown": "500ms", "max_cooldown": "500ms"},
        retry={"schedule": ["50ms"] * 10, "jitter": 0.0},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"p{i}") for i in range(9)])
        assert await wait_until(lambda: len(rec.failures) >= 2, timeout=15)
        state["down"] = False
        assert await wait_until(lambda: sum(map(len, members_of(rec))) == 9, timeout=20)
        await settle()
    flat = sorted(i for b in members_of(rec) for i in b)
    assert flat == [f"p{i}" for i in range(9)]
    assert all(len(b) == 3 for b in members_of(rec))  # parked and retried whole


async def test_a_dead_letter_survives_for_a_batch_to_an_always_failing_endpoint(
    make, receivers
) -> None:
    rec = receivers.add("broken", always(500))
    cfg = make(
        [{"id": "broken", "url": rec.url, "batch": {"max_events": 2, "max_wait": "5s"}}],
        retry={"schedule": ["20ms"], "jitter": 0.0},
        breaker={"failure_threshold": 100},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"x{i}") for i in range(2)])
        letters = await wait_for_dead_letters(cfg, 1)
    record = letters[0].record
    assert (record.reason, record.attempts, record.subscriber) == (
        "attempts_exhausted",
        2,
        "broken",
    )
    assert [e["id"] for e in orjson.loads(letters[0].body)] == ["x0", "x1"]


async def test_events_only_batched_subscribers_want_are_settled_without_a_task_each(
    make, receivers: ReceiverServer
) -> None:
    """Such events join their batches as they arrive (no task waits on each); every message is
    still acked only through its batch, and none is left in the queue."""
    first = receivers.add("first")
    second = receivers.add("second")
    batch = {"max_events": 8, "max_wait": "200ms"}
    cfg = make(
        [
            {"id": "first", "url": first.url, "batch": batch},
            {"id": "second", "url": second.url, "batch": batch},
        ]
    )
    n = 30
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"t{i:02}") for i in range(n)])
        assert await wait_until(
            lambda: sum(map(len, members_of(first))) == n and sum(map(len, members_of(second))) == n
        )
        await settle()
        assert disp.pipeline.held == 0
        consumer = disp._consumer
        assert consumer is not None and consumer.taken == n  # all through the tap
        assert frames.installed() and consumer.from_reader == n  # taken from the bytes
    for rec in (first, second):
        assert [i for b in members_of(rec) for i in b] == [f"t{i:02}" for i in range(n)]
    connection = await aio_pika.connect(broker_url())
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(cfg.broker.queue, passive=True)
        assert declared.declaration_result.message_count == 0


async def queued(cfg) -> int:  # type: ignore[no-untyped-def]
    """Messages ready in the work queue (after the dispatcher stopped: what it handed back)."""
    connection = await aio_pika.connect(broker_url())
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(cfg.broker.queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def test_stopping_sends_the_open_batch_and_acks_its_members(make, receivers) -> None:
    rec = receivers.add("bulk")
    cfg = make([{"id": "bulk", "url": rec.url, "batch": {"max_events": 100, "max_wait": "5m"}}])
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"o{i:02}") for i in range(12)])
        assert await wait_until(lambda: disp.pipeline.held == 12)
        assert rec.count == 0  # waiting for more, for up to five minutes
    assert members_of(rec) == [[f"o{i:02}" for i in range(12)]]
    assert await queued(cfg) == 0


async def test_a_batch_still_in_flight_when_the_drain_ends_hands_its_members_back(
    make, receivers
) -> None:
    rec = receivers.add("stuck", hang(30))
    cfg = make(
        [{"id": "stuck", "url": rec.url, "timeout": "30s", "batch": {"max_events": 5}}],
        dispatcher={"drain_timeout": "1s"},
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"h{i}") for i in range(5)])
        assert await wait_until(lambda: disp.pipeline.held == 5 and rec.in_flight == 1)
    assert await queued(cfg) == 5  # none acked, none lost: the broker has them all again
