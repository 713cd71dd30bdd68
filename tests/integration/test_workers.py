"""`dispatcher run --workers 2` as a real process tree: no loss, a killed worker comes back,
SIGHUP reaches every worker, SIGTERM drains them and the supervisor exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import Publisher, Receiver, ReceiverServer, event_body, wait_until
from tests.support.ports import free_port
from tests.support.process_tree import live_workers, ready_within, start_supervisor


def slowly(seconds: float) -> Callable[..., Any]:
    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=204)

    return behaviour


class Supervised:
    """The supervisor process, its log file and its ops endpoints."""

    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.config, self.log_path, self.base = config, log, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self.proc = start_supervisor(self.config, self.log_path)

    def workers(self) -> set[int]:
        assert self.proc is not None
        return set(live_workers(self.proc))

    async def get(self, path: str) -> tuple[int, bytes]:
        assert self.http is not None
        try:
            async with self.http.get(
                self.base + path, timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return 0, b""

    async def ready_within(self, seconds: float) -> bool:
        return await ready_within(self.base, seconds)

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = await self.get("/metrics")
        assert status == 200
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }

    def log_lines(self) -> list[dict[str, Any]]:
        return [
            orjson.loads(line) for line in self.log_path.read_bytes().splitlines() if line.strip()
        ]


async def test_two_workers_deliver_everything_survive_a_kill_and_stop_cleanly(
    make, receivers: ReceiverServer, tmp_path: Path
) -> None:
    rec = receivers.add("r", slowly(0.002))
    toml = tmp_path / "dispatcher.toml"
    port = free_port()
    cfg = make(
        [{"id": "r", "url": rec.url, "max_in_flight": 32}],
        toml=toml,
        http={"listen": f"127.0.0.1:{port}"},
        broker={"prefetch": 64},
        dispatcher={"log_level": "info", "log_format": "json", "drain_timeout": "5s"},
    )
    sup = Supervised(toml, tmp_path / "dispatcher.log", port)
    async with aiohttp.ClientSession() as http:
        sup.http = http
        sup.start()
        assert sup.proc is not None
        try:
            assert await sup.ready_within(30), sup.log_path.read_text()[-3000:]
            first = sup.workers()
            assert len(first) == 2

            # A run of 500 events; one worker is killed (-9) while it holds messages.
            ids = [f"w-{i}" for i in range(500)]
            async with Publisher(cfg) as pub:
                await pub.publish_many([event_body(n=i, event_id=e) for i, e in enumerate(ids)])
            assert await wait_until(lambda: rec.count >= 100, timeout=20)
            victim = sorted(first)[0]
            os.kill(victim, signal.SIGKILL)

            assert await wait_until(lambda: set(ids) <= set(rec.ids()), timeout=30), (
                f"lost {len(set(ids) - set(rec.ids()))} events"
            )
            # Restarted: a new worker pid, and ready again with both workers.
            assert await wait_until(lambda: len(sup.workers() - first) == 1, timeout=15)
            assert victim not in sup.workers() and len(sup.workers()) == 2
            assert await sup.ready_within(20)

            # More events after the restart, spread over both workers again.
            more = [f"m-{i}" for i in range(100)]
            async with Publisher(cfg) as pub:
                await pub.publish_many([event_body(n=i, event_id=e) for i, e in enumerate(more)])
            assert await wait_until(lambda: set(more) <= set(rec.ids()), timeout=20)

            # Merged metrics: both live workers, the dead one's counts kept.
            m = await sup.metrics()
            delivered = m[
                (
                    "dispatcher_deliveries_total",
                    frozenset({("subscriber", "r"), ("outcome", "delivered")}),
                )
            ]
            # At least once: requests in flight in the killed worker were delivered again.
            assert 600 <= delivered <= rec.count
            assert m[("dispatcher_ready", frozenset())] == 2
            assert m[("dispatcher_prefetch_limit", frozenset())] == 128
            assert m[("dispatcher_workers", frozenset())] == 2
            assert m[("dispatcher_worker_restarts_total", frozenset())] == 1
            assert m[("dispatcher_in_flight", frozenset({("subscriber", "r")}))] == 0

            # SIGHUP reaches both (live) workers.
            workers_now = sup.workers()
            sup.proc.send_signal(signal.SIGHUP)

            def reloaded() -> set[int]:
                return {
                    line.get("worker")
                    for line in sup.log_lines()
                    if line.get("event") == "reloaded"
                }

            assert await wait_until(lambda: reloaded() == {0, 1}, timeout=10), reloaded()
            assert sup.workers() == workers_now

            # SIGTERM: workers drain, the supervisor exits 0, nothing is left running.
            sup.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(sup.proc.wait, 30)
            assert code == 0, sup.log_path.read_text()[-3000:]
            assert not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in workers_now
            )
            events = [line.get("event") for line in sup.log_lines()]
            assert events.count("drained") == 2
            assert "worker_exited" in events and "supervisor_stopped" in events
        finally:
            if sup.proc.poll() is None:
                leftovers = sup.workers()
                sup.proc.kill()
                sup.proc.wait()
                for pid in leftovers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
