"""SIGHUP reloads subscribers in a running daemon without losing in-flight work."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.harness import (
    Publisher,
    ReceiverServer,
    config_doc,
    event_body,
    slow,
    wait_ready,
    wait_until,
)
from tests.support.ports import free_port
from tests.support.toml_files import write_toml


async def test_sighup_adds_changes_and_refuses_bad_config(
    make, names, keys_dir, tmp_path, receivers: ReceiverServer
) -> None:
    a = receivers.add("a", slow(0.05))
    b = receivers.add("b")
    port = free_port()
    toml = tmp_path / "d.toml"
    one = [{"id": "a", "url": a.url, "max_in_flight": 8}]
    cfg = make(
        one, toml=toml, http={"listen": f"127.0.0.1:{port}"}, dispatcher={"log_level": "info"}
    )
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(toml), "run", "--workers", "1"],
            stderr=log,
            env=dict(os.environ),
        )
    try:
        assert await wait_ready(port)
        async with Publisher(cfg) as pub:
            first = [event_body(n=i, event_id=f"x{i}") for i in range(200)]
            sending = asyncio.create_task(pub.publish_many(first, batch=20))
            assert await wait_until(lambda: a.count >= 20)
            # Add b while a's deliveries are in flight.
            write_toml(
                toml,
                config_doc(
                    names,
                    keys_dir,
                    [*one, {"id": "b", "url": b.url}],
                    http={"listen": f"127.0.0.1:{port}"},
                    dispatcher={"log_level": "info"},
                ),
            )
            proc.send_signal(signal.SIGHUP)
            await sending
            assert await wait_until(lambda: b"reloaded" in log_path.read_bytes(), timeout=10)
            after = [event_body(n=i, event_id=f"y{i}") for i in range(50)]
            await pub.publish_many(after)
            assert await wait_until(lambda: len({*a.ids()}) == 250 and b.count >= 50, timeout=30)

            # A broken config is refused; the running one stays.
            toml.write_text(toml.read_text().replace('id = "b"', 'id = "b"\ncolour = "red"'))
            proc.send_signal(signal.SIGHUP)
            assert await wait_until(lambda: b"reload_refused" in log_path.read_bytes(), timeout=10)
            await pub.publish(event_body(event_id="z1"))
            assert await wait_until(lambda: "z1" in a.ids() and "z1" in b.ids(), timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert sorted(set(a.ids())) == sorted(
        [f"x{i}" for i in range(200)] + [f"y{i}" for i in range(50)] + ["z1"]
    )
    assert {f"y{i}" for i in range(50)} <= set(b.ids())
    refused = [line for line in log_path.read_bytes().splitlines() if b"reload_refused" in line]
    assert b"subscribers[1].colour: unknown key" in refused[0]


def _events(log_path: Path, name: str) -> list[bytes]:
    pattern = re.compile(rb'"event": ?"' + name.encode() + rb'"')
    return [line for line in log_path.read_bytes().splitlines() if pattern.search(line)]


async def test_sighup_reads_included_files_again_added_broken_and_deleted(
    make, names, keys_dir, tmp_path, receivers: ReceiverServer
) -> None:
    """The reload path through the included-file cache, in a real daemon on the real broker:
    a new file takes effect, a mistake in it is refused naming file and key (the subscribers
    read before stay), and a deleted file's subscribers are gone."""
    a = receivers.add("a")
    b = receivers.add("b")
    included = tmp_path / "subs.d"
    included.mkdir()
    (included / "a.toml").write_text(f'[[subscribers]]\nid = "a"\nurl = "{a.url}"\n')
    port = free_port()
    toml = tmp_path / "d.toml"
    cfg = make(
        [],
        toml=toml,
        include=[str(included / "*.toml")],
        http={"listen": f"127.0.0.1:{port}"},
        dispatcher={"log_level": "info"},
    )
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(toml), "run", "--workers", "1"],
            stderr=log,
            env=dict(os.environ),
        )

    async def reload() -> None:
        done = len(_events(log_path, "reloaded")) + len(_events(log_path, "reload_refused"))
        proc.send_signal(signal.SIGHUP)
        assert await wait_until(
            lambda: (
                len(_events(log_path, "reloaded")) + len(_events(log_path, "reload_refused")) > done
            ),
            timeout=10,
        )

    try:
        assert await wait_ready(port)
        async with Publisher(cfg) as pub:
            await pub.publish(event_body(event_id="e1"))
            assert await wait_until(lambda: "e1" in a.ids())

            (included / "b.toml").write_text(f'[[subscribers]]\nid = "b"\nurl = "{b.url}"\n')
            await reload()
            await pub.publish(event_body(event_id="e2"))
            assert await wait_until(lambda: "e2" in a.ids() and "e2" in b.ids())

            (included / "b.toml").write_text(
                f'[[subscribers]]\nid = "b"\nurl = "{b.url}"\ncolour = "red"\n'
            )
            await reload()
            await pub.publish(event_body(event_id="e3"))
            assert await wait_until(lambda: "e3" in a.ids() and "e3" in b.ids())

            (included / "b.toml").unlink()
            await reload()
            await pub.publish(event_body(event_id="e4"))
            assert await wait_until(lambda: "e4" in a.ids())
            await pub.publish(event_body(event_id="e5"))
            assert await wait_until(lambda: "e5" in a.ids())
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert sorted(set(a.ids())) == ["e1", "e2", "e3", "e4", "e5"]
    assert sorted(set(b.ids())) == ["e2", "e3"]
    refused = _events(log_path, "reload_refused")
    assert len(refused) == 1
    assert f"{included / 'b.toml'}: subscribers[0].colour: unknown key".encode() in refused[0]
    assert [
        b'"subscribers": 2' in line or b'"subscribers":2' in line
        for line in _events(log_path, "reloaded")
    ] == [True, False]
    assert len(_events(log_path, "reload_took")) == 2
