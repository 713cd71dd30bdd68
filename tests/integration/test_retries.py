"""Durable retries and dead letters against the real broker, with schedules of milliseconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import aio_pika

from dispatcher.broker.topology import queue_depths
from tests.support.harness import (
    Publisher,
    ReceiverServer,
    always,
    event_body,
    fail_times,
    running,
    settle,
    wait_for_dead_letters,
    wait_ready,
    wait_until,
)
from tests.support.ports import free_port


async def test_fails_twice_then_succeeds_gets_one_attempt_per_failure_and_stops(
    make, receivers: ReceiverServer
) -> None:
    flaky = receivers.add("flaky", fail_times(2))
    healthy = receivers.add("healthy")
    cfg = make([{"id": "flaky", "url": flaky.url}, {"id": "healthy", "url": healthy.url}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="e1"))
        assert await wait_until(lambda: flaky.count == 1)
        await settle(0.8)  # longer than the whole schedule: nothing more may arrive
    assert flaky.attempts == 3 and flaky.ids() == ["e1"]
    assert [f.headers["webhook-id"] for f in flaky.failures] == ["e1", "e1"]
    assert healthy.ids() == ["e1"]  # never again because another subscriber failed


async def test_always_failing_ends_in_dead_letters_after_exactly_the_schedule(
    make, receivers: ReceiverServer
) -> None:
    dead = receivers.add("dead", always(502))
    healthy = receivers.add("healthy")
    cfg = make([{"id": "dead", "url": dead.url}, {"id": "healthy", "url": healthy.url}])
    async with running(cfg), Publisher(cfg) as pub:
        for i in range(5):
            await pub.publish(event_body("Message.Complained", n=i, event_id=f"c{i}"))
        letters = await wait_for_dead_letters(cfg, 5)
        await settle(0.5)
    assert dead.attempts == 5 * 4  # first try + 3 scheduled retries, per event
    assert sorted(healthy.ids()) == [f"c{i}" for i in range(5)]
    assert len(letters) == 5
    for letter in letters:
        rec = letter.record
        assert (rec.subscriber, rec.event, rec.attempts, rec.reason, rec.last_status) == (
            "dead",
            "Message.Complained",
            4,
            "attempts_exhausted",
            502,
        )
        assert rec.last_error == "http 502" and rec.dead_lettered_at.endswith("Z")
    assert sorted(d.record.event_id for d in letters) == [f"c{i}" for i in range(5)]


async def test_gone_is_dead_lettered_at_once(make, receivers) -> None:
    gone = receivers.add("gone", always(410))
    cfg = make([{"id": "gone", "url": gone.url}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="g1"))
        [letter] = await wait_for_dead_letters(cfg, 1)
        await settle(0.4)
    assert gone.attempts == 1
    assert (letter.record.reason, letter.record.last_status, letter.record.attempts) == (
        "endpoint_gone",
        410,
        1,
    )


async def test_retry_after_is_honoured(make, receivers) -> None:
    seen: list[float] = []

    async def throttled(_, __, n):
        from aiohttp import web

        seen.append(time.monotonic())
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    rec = receivers.add("throttled", throttled)
    cfg = make([{"id": "throttled", "url": rec.url}])  # schedule says 50 ms
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="t1"))
        assert await wait_until(lambda: rec.count == 1, timeout=10)
    assert seen[1] - seen[0] >= 1.0


async def test_pending_retry_survives_a_killed_dispatcher(make, receivers, tmp_path) -> None:
    rec = receivers.add("later", fail_times(1))
    toml = tmp_path / "dispatcher.toml"
    port = free_port()
    cfg = make(
        [{"id": "later", "url": rec.url}],
        toml=toml,
        retry={"schedule": ["3s"], "jitter": 0.0},
        http={"listen": f"127.0.0.1:{port}"},
    )

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(toml), "run", "--workers", "1"],
            env=dict(os.environ),
        )

    proc = start()
    try:
        assert await wait_ready(port)
        async with Publisher(cfg) as pub:
            await pub.publish(event_body(event_id="survivor"))
        assert await wait_until(lambda: rec.attempts == 1, timeout=20)
        conn = await aio_pika.connect(cfg.broker.url)
        async with conn:
            channel = await conn.channel()

            async def retry_parked() -> bool:
                depths = await queue_depths(channel, cfg.broker)
                return depths["retry"] == 1 and depths["work"] == 0

            deadline = time.monotonic() + 5
            while not await retry_parked():
                assert time.monotonic() < deadline, "the retry was never parked in the broker"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert rec.count == 0
        proc = start()
        assert await wait_until(lambda: rec.count == 1, timeout=20)
        assert rec.ids() == ["survivor"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


async def test_quorum_queues_carry_retries_and_dead_letters(make, receivers) -> None:
    """The production default: quorum work, tier and dead-letter queues."""
    flaky = receivers.add("flaky", fail_times(1))
    dead = receivers.add("dead", always(500))
    cfg = make(
        [{"id": "flaky", "url": flaky.url}, {"id": "dead", "url": dead.url}],
        broker={"queue_type": "quorum"},
        retry={"schedule": ["30ms"]},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="q1"))
        [letter] = await wait_for_dead_letters(cfg, 1)
        assert await wait_until(lambda: flaky.count == 1)
    assert (letter.record.subscriber, letter.record.attempts) == ("dead", 2)
    assert flaky.ids() == ["q1"] and flaky.attempts == 2
