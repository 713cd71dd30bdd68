"""Nothing lost on RabbitMQ 3.x or 4.x: reads, hand-backs and crash loops on the real broker.

RabbitMQ 4 gives a quorum queue without ``x-delivery-limit`` a limit of 20 and drops the message
at its 21st delivery; reading a dead letter (get, then hand back) and handing back a parked or
in-flight delivery each count as one. These tests run against whichever broker
DISPATCHER_TEST_BROKER_URL names (`make test` the 3.10 broker on 5672, `make test-rabbitmq4` the
4.x node on 5673), with quorum queues (the production default) and classic queues.

A "hand-back" here is done the way the broker sees it when a dispatcher is stopped, killed or
loses its channel while holding a message: a basic.get followed by a requeue, or by the channel
or connection going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from dispatcher.broker.dead_letters import DeadLetterTool
from dispatcher.broker.topology import declare, migration_policies, queue_depths
from dispatcher.config import Config
from dispatcher.names import LEVELS, WORK_DELIVERY_LIMIT, parking_queue
from tests.support.harness import (
    BROKER_URL,
    RABBITMQCTL,
    Publisher,
    Receiver,
    ReceiverServer,
    dead_letters,
    event_body,
    running,
    wait_for_dead_letters,
    wait_ready,
    wait_until,
)
from tests.support.ports import free_port

QUEUE_TYPES = pytest.mark.parametrize("queue_type", ["quorum", "classic"])


async def broker_version() -> str:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = props.get("version", b"")
        return version.decode() if isinstance(version, bytes) else str(version)


def switchable(failing: int) -> tuple[dict[str, bool], Any]:
    """A receiver that answers ``failing`` until ``state["healed"]`` is set, then 204."""
    state = {"healed": False}

    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=204 if state["healed"] else failing)

    return state, behaviour


async def depths(cfg: Config) -> dict[str, int]:
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel()
        return await queue_depths(channel, cfg.broker, [s.id for s in cfg.subscribers])


async def hand_back(queue_name: str, times: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message of the queue and hand it back, ``times`` times over: alternately by a
    requeue (a dispatcher draining on shutdown) and by closing the connection with the message
    unacked (a restart, a crash, a lost channel). Returns what the last round saw."""
    seen: list[aio_pika.abc.AbstractIncomingMessage] = []
    for round_ in range(times):
        connection = await aio_pika.connect(BROKER_URL)
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        seen = []
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            seen.append(message)
        if round_ % 2 == 0:
            for message in seen:
                await message.nack(requeue=True)
        else:
            await channel.close()  # the channel goes, the messages unacked
        await connection.close()
    return seen


# --- reading dead letters -------------------------------------------------------------------


@QUEUE_TYPES
async def test_ten_dead_letters_survive_fifty_listings_shows_and_exports_in_order(
    make, receivers: ReceiverServer, tmp_path: Path, queue_type: str
) -> None:
    state, behaviour = switchable(410)  # gone: dead-lettered at the first attempt
    rec = receivers.add("acme", behaviour)
    toml = tmp_path / "d.toml"
    cfg = make([{"id": "acme", "url": rec.url}], toml=toml, broker={"queue_type": queue_type})
    tool = DeadLetterTool(cfg, progress=None)
    async with running(cfg), Publisher(cfg) as pub:
        for i in range(10):
            await pub.publish(event_body(n=i, event_id=f"ev{i}"))
        assert len(await wait_for_dead_letters(cfg, 10)) == 10
        first = [dl.record for dl in await tool.list()]
        order = [r.id for r in first]
        assert sorted(r.event_id or "" for r in first) == [f"ev{i}" for i in range(10)]

        for i in range(50):
            assert [dl.record.id for dl in await tool.list()] == order, f"listing {i}"
            shown = await tool.show(order[i % 10])
            assert shown is not None and shown.record == first[i % 10], f"show {i}"
            exported = tmp_path / "dead.jsonl"
            assert await tool.export(str(exported)) == 10
            lines = [orjson.loads(x) for x in exported.read_bytes().splitlines()]
            assert [x["id"] for x in lines] == order, f"export {i}"
            if i % 10 == 9:  # the command line does the same
                listed = await asyncio.to_thread(
                    subprocess.run,
                    [
                        sys.executable,
                        "-m",
                        "dispatcher",
                        "dlq",
                        "list",
                        "--json",
                        "--config",
                        str(toml),
                    ],
                    capture_output=True,
                    timeout=60,
                )
                assert listed.returncode == 0, listed.stderr
                assert [orjson.loads(x)["id"] for x in listed.stdout.splitlines()] == order
        assert (await depths(cfg))["dead"] == 10

        # Replay still delivers every one of them afterwards.
        state["healed"] = True
        replayed, missing, kept = await tool.replay(None)
        assert (replayed, missing, kept) == (10, set(), set())
        assert await wait_until(lambda: rec.count == 10, timeout=20)
    assert sorted(rec.ids()) == [f"ev{i}" for i in range(10)]
    assert await dead_letters(cfg) == []


@QUEUE_TYPES
async def test_a_dead_letter_some_client_rejects_comes_back_to_the_dead_letter_queue(
    make, receivers: ReceiverServer, queue_type: str
) -> None:
    rec = receivers.add("gone", switchable(410)[1])
    cfg = make([{"id": "gone", "url": rec.url}], broker={"queue_type": queue_type})
    async with running(cfg), Publisher(cfg) as pub:
        for i in range(3):
            await pub.publish(event_body(n=i, event_id=f"r{i}"))
        before = [dl.record for dl in await wait_for_dead_letters(cfg, 3)]
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(cfg.broker.dead_letter_queue, ensure=False)
        message = await queue.get(no_ack=False)
        await message.reject(requeue=False)  # what a careless script or UI might do
    after = [dl.record for dl in await wait_for_dead_letters(cfg, 3, timeout=5)]
    assert len(after) == 3, "a rejected dead letter was dropped"
    # It went to the end, with its record as it was.
    assert after == [*before[1:], before[0]]


# --- hand-backs of parked deliveries --------------------------------------------------------


@QUEUE_TYPES
async def test_a_parked_delivery_handed_back_thirty_times_is_delivered_once_its_subscriber_heals(
    make, receivers: ReceiverServer, queue_type: str
) -> None:
    state, behaviour = switchable(500)
    rec = receivers.add("down", behaviour)
    cfg = make(
        [{"id": "down", "url": rec.url, "max_in_flight": 1}],
        broker={"queue_type": queue_type},
        retry={"schedule": ["50ms", "50ms", "50ms", "50ms"], "max_age": "1h"},
        # One failure opens the breaker for longer than the test: nothing probes meanwhile.
        breaker={"failure_threshold": 1, "cooldown": "10m", "max_cooldown": "10m"},
    )
    n = 3
    parked_queue = parking_queue(cfg.broker.queue, "down")
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"p{i}") for i in range(n)])
        assert await wait_until(lambda: rec.attempts >= 1)
        found: dict[str, int] = {}

        async def all_parked() -> bool:
            found.update(await depths(cfg))
            return found["parked"] == n and found["work"] == found["retry"] == 0

        deadline = time.monotonic() + 20
        while not await all_parked() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert found["parked"] == n, found
    # A restart while the subscriber is still down: the new process consumes the parking queue,
    # fails once, opens its breaker and parks again.
    attempts = rec.attempts
    async with running(cfg):
        assert await wait_until(lambda: rec.attempts > attempts, timeout=20)
        deadline = time.monotonic() + 20
        while not await all_parked() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert found["parked"] == n, found
    attempts = rec.attempts

    last = await hand_back(parked_queue, 30)
    assert len(last) == n, "a parked delivery was dropped while being handed back"
    if queue_type == "quorum":  # the broker counted every one of those deliveries
        counts = [int((m.headers or {}).get("x-delivery-count", 0)) for m in last]
        assert min(counts) >= 29, counts
    assert rec.attempts == attempts
    assert (await depths(cfg))["parked"] == n

    state["healed"] = True
    async with running(cfg):
        assert await wait_until(lambda: rec.count == n, timeout=30)
    assert sorted(set(rec.ids())) == [f"p{i}" for i in range(n)]
    assert await dead_letters(cfg) == []
    left = await depths(cfg)
    assert (left["parked"], left["work"], left["retry"]) == (0, 0, 0), left


# --- a message that crashes the dispatcher on every try -------------------------------------


def _start(toml: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "run", "--workers", "1", "--config", str(toml)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_message_that_kills_the_dispatcher_every_time_ends_as_a_dead_letter_with_a_reason(
    make, receivers: ReceiverServer, tmp_path: Path
) -> None:
    """Quorum queues: after WORK_DELIVERY_LIMIT tries the broker dead-letters it, with the
    reason the record spells out. The first tries are real: a dispatcher process holding the
    message is killed (SIGKILL); the rest hand it back the same way, faster."""
    hanging = asyncio.Event()

    async def hang(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        hanging.set()
        await asyncio.sleep(3600)
        return web.Response(status=204)

    rec = receivers.add("slow", hang)
    port = free_port()
    toml = tmp_path / "d.toml"
    cfg = make(
        [{"id": "slow", "url": rec.url, "timeout": "30s"}],
        toml=toml,
        broker={"queue_type": "quorum"},
        http={"listen": f"127.0.0.1:{port}"},
    )
    async with Publisher(cfg) as pub:
        kills = 0
        for _ in range(2):
            proc = _start(toml)
            try:
                assert await wait_ready(port, timeout=30), "the dispatcher did not start"
                if kills == 0:
                    await pub.publish(event_body(event_id="killer"))
                assert await asyncio.wait_for(hanging.wait(), 20) is True
                hanging.clear()
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=20)
            kills += 1

    tries = kills
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        work = await channel.get_queue(cfg.broker.queue, ensure=False)
        while True:
            left = await hand_back(cfg.broker.queue, 1)
            if not left:
                break
            tries += 1
            assert tries <= WORK_DELIVERY_LIMIT + 1, "the broker let it loop past its limit"
        assert (
            await channel.declare_queue(work.name, passive=True)
        ).declaration_result.message_count == 0
    assert tries == WORK_DELIVERY_LIMIT + 1  # 20 hand-backs, dead-lettered at the 21st

    [dead] = await wait_for_dead_letters(cfg, 1)
    assert dead.record.event_id == "killer"
    assert dead.record.reason == (
        "broker_delivery_limit: delivered until the queue's delivery limit, never settled: the "
        f"dispatcher crashed or lost its channel on every try, in {cfg.broker.queue}"
    )
    # The same record however often it is read.
    assert [dl.record for dl in await dead_letters(cfg)] == [dead.record]
    assert dead.body == event_body(event_id="killer")


async def test_classic_queues_redeliver_a_crashing_message_without_limit_and_lose_nothing(
    make, receivers: ReceiverServer
) -> None:
    """What the README says of classic queues: no delivery limit, on 3.x or 4.x. A message
    that crashes every try keeps coming back (an operator moves it); it is never dropped."""
    rec = receivers.add("ok")
    cfg = make([{"id": "ok", "url": rec.url}], broker={"queue_type": "classic"})
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await declare(channel, cfg.broker)
    async with Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="loops"))
    for _ in range(WORK_DELIVERY_LIMIT + 5):
        assert len(await hand_back(cfg.broker.queue, 1)) == 1
    async with running(cfg):
        assert await wait_until(lambda: rec.count == 1)
    assert rec.ids() == ["loops"]


# --- queues declared by an older version ----------------------------------------------------


def _old_arguments(cfg: Config) -> dict[str, dict[str, Any]]:
    """What the previous release declared: no delivery limits, no dead-letter exchange on the
    dead-letter and parking queues."""
    q, qt = cfg.broker.queue, cfg.broker.queue_type
    safe = (
        {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        if qt == "quorum"
        else {}
    )
    out: dict[str, dict[str, Any]] = {
        q: {"x-queue-type": qt, "x-dead-letter-exchange": f"{q}.dead", **safe},
        f"{q}.dead": {"x-queue-type": qt},
    }
    for k in range(LEVELS):
        below = f"{q}.delay.{k - 1}" if k else f"{q}.retry.due"
        out[f"{q}.retry.{2**k}ms"] = {
            "x-queue-type": qt,
            "x-message-ttl": 2**k,
            "x-dead-letter-exchange": below,
            **safe,
        }
    for sub in cfg.subscribers:
        out[parking_queue(q, sub.id)] = {"x-queue-type": qt}
    return out


async def _ctl(*args: str) -> str:
    assert RABBITMQCTL is not None
    done = await asyncio.to_thread(
        subprocess.run, [*RABBITMQCTL, *args], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def _raw_dead_letters(cfg: Config, n: int, tag: str) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(f"{cfg.broker.queue}.dead", ensure=False)
        for i in range(n):
            await exchange.publish(
                aio_pika.Message(
                    b"{}",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={"x-dead-id": f"{tag}{i}", "x-dead-reason": "test"},
                ),
                routing_key="",
            )


@QUEUE_TYPES
async def test_queues_declared_the_old_way_start_and_the_migration_brings_them_up_to_date(
    make, receivers: ReceiverServer, tmp_path: Path, queue_type: str
) -> None:
    rec = receivers.add("acme")
    toml = tmp_path / "d.toml"
    cfg = make([{"id": "acme", "url": rec.url}], toml=toml, broker={"queue_type": queue_type})
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        for name, arguments in _old_arguments(cfg).items():
            await channel.declare_queue(name, durable=True, arguments=arguments)

    # It starts, works, and says once what is wrong and how to fix it.
    with capture_logs() as logs:
        async with running(cfg), Publisher(cfg) as pub:
            await pub.publish(event_body(event_id="still-works"))
            assert await wait_until(lambda: rec.count == 1)
    warnings = [e for e in logs if e["event"] == "queues_declared_with_other_arguments"]
    assert warnings, "no warning about the queues declared by the old version"
    named = {q for e in warnings for q in e["queues"]}
    assert cfg.broker.dead_letter_queue in named  # it had no dead-letter exchange
    if queue_type == "quorum":  # no delivery limits
        assert {cfg.broker.queue, f"{cfg.broker.queue}.retry.1ms"} <= named
    assert all("dispatcher migrate-queues" in e["fix"] for e in warnings)
    assert warnings[0]["differ"]  # which arguments differ

    version = await broker_version()
    await _raw_dead_letters(cfg, 3, "old")
    tool = DeadLetterTool(cfg, progress=None)
    if queue_type == "quorum" and version.startswith("4."):
        # Before the migration RabbitMQ 4 has its default limit of 20 on the old dead-letter
        # queue: the 21st read loses them. (This is what the migration is for.)
        for _ in range(21):
            await tool.list()
        assert await tool.list() == []
        await _raw_dead_letters(cfg, 3, "old")

    if RABBITMQCTL is None:
        pytest.skip("no rabbitmqctl for this broker (DISPATCHER_TEST_RABBITMQCTL)")
    ctl = " ".join(RABBITMQCTL)
    names = [p.name for p in migration_policies(cfg.broker)]
    try:
        migrated = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "dispatcher",
                "migrate-queues",
                "--apply",
                "--rabbitmqctl",
                ctl,
                "--config",
                str(toml),
            ],
            capture_output=True,
            timeout=300,
        )
        assert migrated.returncode == 0, migrated.stderr
        assert migrated.stdout.decode().count("policy ") == len(names)
        listing = await _ctl("list_queues", "-q", "--no-table-headers", "name", "policy")
        policy_of = dict(line.split("\t")[:2] for line in listing.splitlines() if "\t" in line)
        for name in _old_arguments(cfg):
            wanted = [
                p.name for p in migration_policies(cfg.broker) if re.fullmatch(p.pattern, name)
            ]
            assert policy_of.get(name, "") == (wanted[0] if wanted else ""), name

        # The dead letters now survive any number of reads, in order.
        order = [f"old{i}" for i in range(3)]
        for _ in range(30):
            assert [dl.record.id for dl in await tool.list()] == order
        if queue_type == "quorum":
            # And a message that crashes every try is dead-lettered at the bound, on 3.x too.
            async with Publisher(cfg) as pub:
                await pub.publish(event_body(event_id="loops"))
            tries = 0
            while await hand_back(cfg.broker.queue, 1):
                tries += 1
                assert tries <= WORK_DELIVERY_LIMIT + 1
            letters = await wait_for_dead_letters(cfg, 4)
            assert letters[-1].record.reason.startswith("broker_delivery_limit")
        async with running(cfg), Publisher(cfg) as pub:  # and it still starts and delivers
            await pub.publish(event_body(event_id="after"))
            assert await wait_until(lambda: rec.count == 2)
    finally:
        for name in names:
            with contextlib.suppress(AssertionError):
                await _ctl("clear_policy", "-p", "/", name)
