"""`dispatcher dlq ...` through the real command line, on a real dead-letter queue."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
from aiohttp import web
from harness import (
    Publisher,
    ReceiverServer,
    dead_letters,
    event_body,
    running,
    wait_for_dead_letters,
    wait_until,
)


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
