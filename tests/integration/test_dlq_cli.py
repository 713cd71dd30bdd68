"""`dispatcher dlq ...` through the real command line, on a real dead-letter queue: filters,
accounts, ``--config`` after the command, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import aio_pika
import orjson
import psutil
import pytest
from aiohttp import web

from dispatcher.broker.topology import declare
from dispatcher.decisions.records import Delivery
from dispatcher.names import H_ACCOUNT, H_DEAD_AT, H_DEAD_ID, H_EVENT_ID, H_EVENT_TYPE, H_REASON
from tests.support.harness import (
    Names,
    Publisher,
    ReceiverServer,
    cleanup_topology,
    config_doc,
    dead_letters,
    event_body,
    make_config,
    running,
    wait_for_dead_letters,
    wait_until,
)
from tests.support.toml_files import write_toml


def dlq(toml, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "--config", str(toml), "dlq", *args],
        capture_output=True,
        timeout=60,
        input=stdin,
    )


async def cli(toml, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(dlq, toml, *args)


async def test_list_show_export_replay_purge(make, receivers: ReceiverServer, tmp_path) -> None:
    healed = False

    async def down_until_healed(_, __, ___) -> web.Response:
        return web.Response(status=200 if healed else 500)

    rec = receivers.add("acme", down_until_healed)
    other = receivers.add("other")
    toml = tmp_path / "d.toml"
    cfg = make(
        [{"id": "acme", "url": rec.url}, {"id": "other", "url": other.url}],
        toml=toml,
        retry={"schedule": ["20ms"]},
    )
    async with running(cfg), Publisher(cfg) as pub:
        for i in range(4):
            await pub.publish(event_body(n=i, event_id=f"ev{i}"))
        await wait_for_dead_letters(cfg, 4)
        assert await wait_until(lambda: other.count == 4)

        listed = await cli(toml, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        records = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert sorted(r["event_id"] for r in records) == ["ev0", "ev1", "ev2", "ev3"]
        assert set(records[0]) == {
            "id",
            "event_id",
            "event",
            "subscriber",
            "account",
            "attempts",
            "reason",
            "last_status",
            "last_error",
            "dead_lettered_at",
        }
        assert {
            (r["subscriber"], r["attempts"], r["reason"], r["last_status"]) for r in records
        } == {("acme", 2, "attempts_exhausted", 500)}

        # Listing hands every dead letter back, in order.
        again = await cli(toml, "list", "--json")
        assert [orjson.loads(x)["id"] for x in again.stdout.splitlines()] == [
            r["id"] for r in records
        ]
        limited = await cli(toml, "list", "--limit", "2")
        assert limited.returncode == 0 and b"2 dead letters" in limited.stdout

        shown = await cli(toml, "show", records[1]["id"])
        assert shown.returncode == 0
        detail = orjson.loads(shown.stdout)
        n = int(records[1]["event_id"].removeprefix("ev"))
        assert detail["body"] == event_body(n=n, event_id=f"ev{n}").decode()
        missing = await cli(toml, "show", "no-such-id")
        assert missing.returncode == 1 and missing.stderr.count(b"\n") == 1

        exported = tmp_path / "dead.jsonl"
        result = await cli(toml, "export", str(exported))
        assert result.returncode == 0
        lines = [orjson.loads(x) for x in exported.read_bytes().splitlines()]
        assert [x["id"] for x in lines] == [r["id"] for r in records]
        assert len(await dead_letters(cfg)) == 4

        healed = True
        one = await cli(toml, "replay", records[0]["id"])
        assert one.returncode == 0, one.stderr
        assert await wait_until(lambda: rec.count == 1)
        assert rec.ids() == [records[0]["event_id"]]
        assert len(await dead_letters(cfg)) == 3

        rest = await cli(toml, "replay", "--all", "--subscriber", "acme")
        assert rest.returncode == 0 and b"replayed 3" in rest.stdout
        assert await wait_until(lambda: rec.count == 4)
        assert sorted(rec.ids()) == ["ev0", "ev1", "ev2", "ev3"]
        assert other.count == 4  # a replay targets only the dead letter's subscriber
        assert await dead_letters(cfg) == []

        healed = False
        await pub.publish(event_body(n=9, event_id="ev9"))
        await wait_for_dead_letters(cfg, 1)

    refused = await cli(toml, "purge")
    assert refused.returncode == 2 and b"without --yes" in refused.stderr
    assert len(await dead_letters(cfg)) == 1
    purged = await cli(toml, "purge", "--yes")
    assert purged.returncode == 0 and b"purged 1" in purged.stdout
    assert await dead_letters(cfg) == []


async def test_replay_of_unknown_ids_and_bad_usage(make, receivers, tmp_path) -> None:
    rec = receivers.add("r")
    toml = tmp_path / "d.toml"
    make([{"id": "r", "url": rec.url}], toml=toml)
    async with running(make([{"id": "r", "url": rec.url}])):
        pass  # declares the topology
    nothing = await cli(toml, "replay", "nope")
    assert nothing.returncode == 1 and b"not found: nope" in nothing.stderr
    both = await cli(toml, "replay", "x", "--all")
    assert both.returncode == 2
    empty = await cli(toml, "list")
    assert empty.returncode == 0 and b"no dead letters" in empty.stdout


# --- filters, accounts, --config after the command, streaming -------------------------------

# (id, subscriber, account, reason): what the pipeline writes on its dead letters.
LETTERS = [
    ("d0", "acme", "a1", "attempts_exhausted"),
    ("d1", "acme", "a2", "endpoint_gone"),
    ("d2", None, "a1", "invalid_event: not JSON"),
    ("d3", "beta", None, "attempts_exhausted"),
    ("d4", "acme", "a1", "invalid_event: missing data.recipient"),
]


async def put_dead_letters(cfg, letters, *, body: bytes | None = None) -> None:
    """Dead letters as the pipeline writes them, straight into the dead-letter exchange; the
    body is the event, unless given."""
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, cfg.broker)
        exchange = await channel.get_exchange(f"{cfg.broker.queue}.dead", ensure=False)
        pending = []
        for dead_id, sub, account, reason in letters:
            headers = {
                H_DEAD_ID: dead_id,
                H_REASON: reason,
                H_EVENT_ID: f"ev-{dead_id}",
                H_EVENT_TYPE: "Message.Bounced",
                H_DEAD_AT: "2026-12-01T08:00:00.000Z",
            }
            if sub:
                headers.update(Delivery(sub, 3, time.time(), last_status=500).headers())
            if account:
                headers[H_ACCOUNT] = account
            message = aio_pika.Message(
                body or event_body(event_id=f"ev-{dead_id}"),
                headers=headers,
                message_id=f"ev-{dead_id}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            pending.append(exchange.publish(message, routing_key=""))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)


def ids(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line)["id"] for line in result.stdout.splitlines()]


def after(toml, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``dispatcher dlq ARGS --config TOML``: the config given after the command."""
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "dlq", *args, "--config", str(toml)],
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_filters_pick_dead_letters_and_a_filtered_purge_keeps_the_rest_in_order(
    make, receivers: ReceiverServer, tmp_path, queue_type: str
) -> None:
    rec = receivers.add("acme")
    toml = tmp_path / "d.toml"
    cfg = make([{"id": "acme", "url": rec.url}], toml=toml, broker={"queue_type": queue_type})
    await put_dead_letters(cfg, LETTERS)

    async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(after, toml, *args)

    listed = await run("list", "--json")
    records = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in records] == ["d0", "d1", "d2", "d3", "d4"]
    assert list(records[0]) == [
        "id",
        "event_id",
        "event",
        "subscriber",
        "account",
        "attempts",
        "reason",
        "last_status",
        "last_error",
        "dead_lettered_at",
    ]
    assert [(r["subscriber"], r["account"]) for r in records] == [
        ("acme", "a1"),
        ("acme", "a2"),
        (None, "a1"),
        ("beta", None),
        ("acme", "a1"),
    ]
    assert ids(await run("list", "--json", "--subscriber", "acme")) == ["d0", "d1", "d4"]
    assert ids(await run("list", "--json", "--account", "a1")) == ["d0", "d2", "d4"]
    assert ids(await run("list", "--json", "--reason", "invalid_event")) == ["d2", "d4"]
    assert ids(
        await run(
            "list", "--json", "--subscriber", "acme", "--account", "a1", "--reason", "attempts"
        )
    ) == ["d0"]
    assert ids(await run("list", "--json", "--account", "a1", "--limit", "2")) == ["d0", "d2"]
    text = await run("list", "--account", "a2")
    assert text.returncode == 0
    header, row, total = text.stdout.decode().splitlines()
    assert header.split() == [
        "id",
        "event",
        "subscriber",
        "account",
        "attempts",
        "reason",
        "last_status",
        "dead_lettered_at",
    ]
    assert row.split()[:4] == ["d1", "Message.Bounced", "acme", "a2"]
    assert total == "1 dead letters"

    exported = tmp_path / "a1.jsonl"
    result = await run("export", str(exported), "--account", "a1")
    assert result.returncode == 0 and b"exported 3" in result.stdout
    lines = [orjson.loads(x) for x in exported.read_bytes().splitlines()]
    assert [(x["id"], x["account"], x["body"]) for x in lines] == [
        (i, "a1", event_body(event_id=f"ev-{i}").decode()) for i in ("d0", "d2", "d4")
    ]

    refused = await run("purge", "--reason", "invalid_event")
    assert refused.returncode == 2
    assert b"refusing to delete 2 dead letters matching the filters" in refused.stderr
    purged = await run("purge", "--yes", "--reason", "invalid_event")
    assert purged.returncode == 0 and b"purged 2 dead letters" in purged.stdout
    assert ids(await run("list", "--json")) == ["d0", "d1", "d3"]

    async with running(cfg):
        # beta is not configured: kept; d1 is a2's, the only one replayed.
        replayed = await run("replay", "--all", "--account", "a2")
        assert replayed.returncode == 0 and b"replayed 1 dead letters" in replayed.stdout
        assert await wait_until(lambda: rec.count == 1)
        assert rec.ids() == ["ev-d1"]
        kept = await run("replay", "--all", "--subscriber", "beta")
        assert b"replayed 0" in kept.stdout and b"kept 1" in kept.stderr
    assert ids(await run("list", "--json")) == ["d0", "d3"]
    purged = await run("purge", "--yes")
    assert b"purged 2" in purged.stdout


async def _watched_listing(toml) -> tuple[int, int, float, float]:
    """Run ``dlq list --json``; return (lines, peak RSS, seconds to the first line, seconds
    to the last)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "dlq",
        "list",
        "--json",
        "--config",
        str(toml),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        limit=1 << 20,
    )
    assert proc.stdout is not None
    watched = psutil.Process(proc.pid)
    peak, count, first_at = 0, 0, 0.0
    while await asyncio.wait_for(proc.stdout.readline(), 60):
        count += 1
        if count == 1:
            first_at = time.monotonic() - started
        if count % 100 == 1:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_info().rss)
    last_at = time.monotonic() - started
    assert await proc.wait() == 0
    return count, peak, first_at, last_at


async def test_list_streams_its_output_in_constant_memory(make, names, keys_dir, tmp_path) -> None:
    """Records are written as they are read: the first line comes long before the last, and
    the process is no bigger for 2500 dead letters than for 10."""
    small_toml, big_toml = tmp_path / "small.toml", tmp_path / "big.toml"
    small = make([], toml=small_toml, broker={"queue_type": "classic"})
    await put_dead_letters(
        small, [(f"s{i}", "acme", "a1", "attempts_exhausted") for i in range(10)], body=b"x" * 8192
    )
    other = Names(prefix=names.prefix + "-big")
    write_toml(big_toml, config_doc(other, keys_dir, [], broker={"queue_type": "classic"}))
    big = make_config(other, keys_dir, [], broker={"queue_type": "classic"})
    n = 2500
    try:
        await put_dead_letters(
            big,
            [(f"m{i:05}", "acme", "a1", "attempts_exhausted") for i in range(n)],
            body=b"x" * 8192,
        )
        count, small_peak, _, _ = await _watched_listing(small_toml)
        assert count == 10
        count, big_peak, first_at, last_at = await _watched_listing(big_toml)
        assert count == n
    finally:
        await cleanup_topology(big)
    # Gathered, 2500 dead letters with 8 KiB bodies would take over 20 MiB more.
    assert big_peak - small_peak < 8 * 1024 * 1024, (small_peak, big_peak)
    assert last_at - first_at > 0.4 * last_at, "the records came all at once, at the end"
