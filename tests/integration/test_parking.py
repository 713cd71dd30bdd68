"""Parking: deliveries a lane turns away wait in the subscriber's own queue, on the real broker.

The rules under test (dispatcher/broker/parking.py): an open breaker parks every delivery for its
subscriber and stops consuming its parking queue; when the cooldown ends one parked delivery is
fetched as the probe, with no new event needed; a closed breaker drains the queue; a full lane
parks, and parked deliveries wait their turn instead of bouncing; a removed subscriber's parked
deliveries are dead-lettered and its queue deleted; a park that nothing routes fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiormq.exceptions import ChannelNotFoundEntity, PublishError
from structlog.testing import capture_logs

from dispatcher.broker.settlement import Settlement
from dispatcher.broker.topology import declare, declare_parking, queue_depths
from dispatcher.decisions.circuit_breaker import BreakerState
from dispatcher.decisions.records import Delivery
from dispatcher.names import parking_queue
from tests.support.harness import (
    Publisher,
    Receiver,
    ReceiverServer,
    always,
    event_body,
    running,
    slow,
    wait_for_dead_letters,
    wait_ready,
    wait_until,
)
from tests.support.ports import free_port


async def depths(cfg) -> dict[str, int]:
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel()
        return await queue_depths(channel, cfg.broker, [s.id for s in cfg.subscribers])


async def wait_for_depth(cfg, kind: str, want: int, timeout: float = 15.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    found = await depths(cfg)
    while found[kind] != want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        found = await depths(cfg)
    return found


def switchable() -> tuple[dict[str, bool], object]:
    """A receiver behaviour that answers 500 until ``state["healed"]`` is set."""
    state = {"healed": False}

    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=200 if state["healed"] else 500)

    return state, behaviour


def sample(disp, name: str, **labels: str) -> float:
    value = disp.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_an_open_breaker_parks_and_a_parked_probe_closes_it(make, receivers) -> None:
    state, behaviour = switchable()
    rec = receivers.add("flaky", behaviour)  # type: ignore[arg-type]
    cfg = make(
        [{"id": "flaky", "url": rec.url, "max_in_flight": 1}],
        breaker={"failure_threshold": 2, "cooldown": "2s", "max_cooldown": "4s"},
    )
    n = 20
    with capture_logs() as logs:
        async with running(cfg) as disp, Publisher(cfg) as pub:
            await pub.publish_many([event_body(n=i, event_id=f"p{i}") for i in range(n)])
            # Two failures open the breaker; the other 18, and the two retries when they come
            # back from the delay tiers, are parked without an attempt.
            parked = await wait_for_depth(cfg, "parked", n)
            # (Not the delay tiers: the queues are read one after another, so the two retries
            # may be counted in a tier and, a moment later, in the parking queue.)
            assert (parked["parked"], parked["work"], parked["dead"]) == (n, 0, 0), parked
            assert rec.attempts == 2
            assert disp.parking is not None and disp.parking.consuming == []
            state["healed"] = True
            # Nothing new is published: the probe can only come from the parking queue.
            assert await wait_until(lambda: rec.count == n, timeout=20)
            left = await wait_for_depth(cfg, "parked", 0)
            assert left == {"work": 0, "dead": 0, "retry": 0, "parked": 0}, left
            lane = disp.pipeline.lanes.get("flaky")  # type: ignore[union-attr]
            assert lane is not None and lane.breaker.state is BreakerState.CLOSED
            assert disp.parking.consuming == ["flaky"]
            assert sample(disp, "dispatcher_parked_total", subscriber="flaky", why="breaker_open")
    assert sorted(rec.ids()) == sorted(f"p{i}" for i in range(n))
    assert rec.attempts == n + 2  # nothing was attempted while the breaker was open
    changes = [(e["old"], e["new"]) for e in logs if e["event"] == "breaker_state_changed"]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_failed_probes_back_off_and_later_probes_still_come_from_parking(
    make, receivers
) -> None:
    state, behaviour = switchable()
    rec = receivers.add("down", behaviour)  # type: ignore[arg-type]
    cfg = make(
        [{"id": "down", "url": rec.url, "max_in_flight": 1}],
        breaker={"failure_threshold": 1, "cooldown": "200ms", "max_cooldown": "400ms"},
        retry={"schedule": ["50ms"] * 20},
    )
    with capture_logs() as logs:
        async with running(cfg), Publisher(cfg) as pub:
            await pub.publish_many([event_body(n=i, event_id=f"d{i}") for i in range(5)])
            # The first attempt opens the breaker; then only probes reach the receiver, each
            # one fetched from the parking queue when a cooldown ends.
            assert await wait_until(lambda: rec.attempts >= 4, timeout=20)
            state["healed"] = True
            assert await wait_until(lambda: rec.count == 5, timeout=20)
    assert sorted(rec.ids()) == [f"d{i}" for i in range(5)]
    changes = [(e["old"], e["new"]) for e in logs if e["event"] == "breaker_state_changed"]
    assert changes.count(("half_open", "open")) >= 3 and changes[-1] == ("half_open", "closed")
    cooldowns = [e["why"] for e in logs if e["event"] == "breaker_state_changed"]
    assert "probe failed, cooling down 0.4s" in cooldowns


async def test_a_full_lane_parks_and_parked_deliveries_wait_their_turn(make, receivers) -> None:
    small = receivers.add("small", slow(0.02))
    fast = receivers.add("fast")
    cfg = make(
        [
            {"id": "small", "url": small.url, "max_in_flight": 2},
            {"id": "fast", "url": fast.url},
        ],
        broker={"prefetch": 16},
    )
    n = 120
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"f{i}") for i in range(n)])
        assert await wait_until(lambda: small.count == n and fast.count == n, timeout=60)
        lane_full = sample(disp, "dispatcher_parked_total", subscriber="small", why="lane_full")
        consumed_parked = sample(disp, "dispatcher_events_total", kind="parked")
        retries = sample(disp, "dispatcher_retries_scheduled_total", subscriber="small")
    assert small.max_in_flight <= 2
    assert sorted(small.ids()) == sorted(fast.ids()) == sorted(f"f{i}" for i in range(n))
    # Parked once, then waiting in the lane: each parked delivery is consumed back once.
    assert lane_full > 0 and consumed_parked == lane_full
    assert retries == 0


async def test_parking_consumers_are_capped_and_take_turns(make, receivers) -> None:
    """Broker consumers must not grow with the subscribers that parked: one slot here, four
    subscribers parking at once, and every parked delivery still arrives."""
    names = [f"s{i}" for i in range(4)]
    recs = {name: receivers.add(name, slow(0.01)) for name in names}
    cfg = make(
        [{"id": name, "url": recs[name].url, "max_in_flight": 1} for name in names],
        broker={"prefetch": 16},
    )
    n = 60
    most = 0
    async with running(cfg) as disp, Publisher(cfg) as pub:
        assert disp.parking is not None
        disp.parking.tuning = replace(disp.parking.tuning, max_consumers=1, idle=0.2)

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(disp.parking.consuming))  # type: ignore[union-attr]
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            await pub.publish_many([event_body(n=i, event_id=f"c{i}") for i in range(n)])
            assert await wait_until(lambda: all(r.count == n for r in recs.values()), timeout=60), {
                k: r.count for k, r in recs.items()
            }
        finally:
            watcher.cancel()
        parked = sum(
            sample(disp, "dispatcher_parked_total", subscriber=name, why="lane_full")
            for name in names
        )
    assert parked > 0
    assert most == 1
    for rec in recs.values():
        assert sorted(rec.ids()) == sorted(f"c{i}" for i in range(n))


async def test_a_removed_subscribers_parked_deliveries_are_dead_lettered(
    make, receivers: ReceiverServer
) -> None:
    gone = receivers.add("gone", always(500))
    keep = receivers.add("keep")
    cfg = make(
        [
            {"id": "gone", "url": gone.url, "max_in_flight": 1},
            {"id": "keep", "url": keep.url},
        ],
        breaker={"failure_threshold": 1, "cooldown": "1m", "max_cooldown": "1m"},
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"g{i}") for i in range(5)])
        assert (await wait_for_depth(cfg, "parked", 5))["parked"] == 5
        assert keep.count == 5
        assert disp.reload(replace(cfg, subscribers=(cfg.subscriber("keep"),)))
        letters = await wait_for_dead_letters(cfg, 5)
        assert sorted((dl.record.event_id, dl.record.reason) for dl in letters) == [
            (f"g{i}", "subscriber_removed") for i in range(5)
        ]
        assert {dl.record.subscriber for dl in letters} == {"gone"}
        # Drained, the removed subscriber's lot is let go once idle; the broker deletes the
        # unused queue itself (x-expires). A healthy subscriber never had a parking queue.
        assert disp.parking is not None and disp.parking.known == ["gone"]
        disp.parking.tuning = replace(disp.parking.tuning, idle=0.0)
        await disp.parking.sweep()
        assert disp.parking.known == [] and disp.parking.consuming == []
        assert await queue_disappears(cfg, parking_queue(cfg.broker.queue, "keep"), timeout=0.5)
    assert gone.attempts == 1


async def queue_disappears(cfg, name: str, timeout: float = 10.0) -> bool:
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            channel = await connection.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                return True
            await channel.close()
            await asyncio.sleep(0.2)
    return False


@contextlib.asynccontextmanager
async def settlement_on(cfg) -> AsyncIterator[tuple[Any, Settlement]]:
    """The declared topology and a `Settlement` on a confirming channel whose returns raise."""
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare(channel, cfg.broker)
        yield channel, Settlement(channel, cfg.broker)


async def park(settlement: Settlement, sub: str, event_id: str, body: bytes) -> None:
    delivery = Delivery(sub, 1, time.time())
    await settlement.park(
        body, event_id=event_id, event_type="Message.Bounced", delivery=delivery, carry={}
    )


async def test_a_park_that_nothing_routes_fails_instead_of_vanishing(make) -> None:
    cfg = make([])
    body = event_body(event_id="lost?")
    async with settlement_on(cfg) as (channel, settlement):
        with pytest.raises(PublishError):
            await park(settlement, "nobody", "lost?", body)
        queue = await declare_parking(channel, cfg.broker, "nobody")
        await park(settlement, "nobody", "kept", body)
        message = await queue.get(no_ack=True, timeout=5)
        assert message.body == body and message.message_id == "kept"
        assert message.headers["x-dispatch-subscriber"] == "nobody"
        await queue.delete(if_unused=False, if_empty=False)


async def test_queue_depths_count_parked_deliveries_and_skip_missing_queues(make) -> None:
    cfg = make([])
    async with settlement_on(cfg) as (channel, settlement):
        await declare_parking(channel, cfg.broker, "present")
        for i in range(3):
            await park(settlement, "present", f"q{i}", event_body(n=i))
        found = await queue_depths(channel, cfg.broker, ["missing", "present", "also-missing"])
        assert found == {"work": 0, "dead": 0, "retry": 0, "parked": 3}
        # The channel it was given still works: a missing queue did not close it.
        assert (await queue_depths(channel, cfg.broker))["parked"] == 0
        await channel.queue_delete(parking_queue(cfg.broker.queue, "present"))


async def test_parked_deliveries_survive_a_killed_dispatcher(make, receivers, tmp_path) -> None:
    """Parked deliveries live in the broker: a dispatcher killed with -9 loses none, and the
    next one (its breaker starts closed) delivers them without any new event."""
    state, behaviour = switchable()
    rec = receivers.add("outage", behaviour)  # type: ignore[arg-type]
    toml = tmp_path / "dispatcher.toml"
    port = free_port()
    cfg = make(
        [{"id": "outage", "url": rec.url, "max_in_flight": 1}],
        toml=toml,
        broker={"queue_type": "quorum"},
        breaker={"failure_threshold": 1, "cooldown": "10m", "max_cooldown": "10m"},
        retry={"schedule": ["50ms"] * 3},
        http={"listen": f"127.0.0.1:{port}"},
    )

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(toml), "run", "--workers", "1"],
            env=dict(os.environ),
        )

    n = 30
    proc = start()
    try:
        assert await wait_ready(port)
        async with Publisher(cfg) as pub:
            await pub.publish_many([event_body(n=i, event_id=f"k{i}") for i in range(n)])
        assert (await wait_for_depth(cfg, "parked", n))["parked"] == n
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert (rec.attempts, rec.count) == (1, 0)
        state["healed"] = True
        proc = start()
        assert await wait_until(lambda: rec.count == n, timeout=30)
        assert sorted(rec.ids()) == sorted(f"k{i}" for i in range(n))
        assert (await wait_for_depth(cfg, "parked", 0))["parked"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
