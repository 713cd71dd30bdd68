"""The dispatcher as a real process (for kill -9 and SIGTERM), and what the scenarios ask the
broker: queue depths and "is everything settled yet".

    doc = chaos_doc(names, keys_dir, subscribers, retry={...})
    async with DispatcherProcess(doc, tmp_path) as proc:
        await proc.start()          # writes the TOML, spawns, waits for /readyz 200
        proc.kill()                 # SIGKILL, no goodbye
        code = await proc.terminate()   # SIGTERM, returns the exit code
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from dispatcher.broker.topology import queue_depths
from dispatcher.config import Config, parse_config
from tests.support.harness import BROKER_URL, Names, config_doc
from tests.support.ports import free_port
from tests.support.toml_files import to_toml

__all__ = [
    "PROJECT_ROOT",
    "DispatcherProcess",
    "await_settled",
    "background",
    "chaos_doc",
    "depths",
    "free_port",
    "http_status",
    "to_toml",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def background(coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task for the body; cancel it if the body leaves before it is done."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def chaos_doc(
    names: Names,
    keys_dir: str,
    subscribers: list[dict[str, Any]],
    *,
    broker_url: str = BROKER_URL,
    **sections: Any,
) -> dict[str, Any]:
    """A config document like `harness.make_config`'s, as plain data (for TOML or parsing).

    Retries are short and unjittered and the breaker cools down fast, so faults resolve in
    seconds; ``sections`` override or extend each table."""
    defaults: dict[str, Any] = {
        "broker": {"url": broker_url, "prefetch": 64},
        "retry": {"schedule": ["50ms", "100ms", "200ms"]},
        "breaker": {"failure_threshold": 5, "cooldown": "100ms", "max_cooldown": "500ms"},
        "dispatcher": {"drain_timeout": "10s", "log_level": "info"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            defaults[key] = {**defaults[key], **value}
        else:
            defaults[key] = value
    return config_doc(names, keys_dir, subscribers, **defaults)


def config_of(doc: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    return parse_config(doc, dict(env or {}))


# --- the process --------------------------------------------------------------------------------


async def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.get(url) as resp,
        ):
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


class DispatcherProcess:
    """``python -m dispatcher --config <tmp>.toml run --workers 1``, restartable."""

    def __init__(
        self,
        doc: Mapping[str, Any],
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        name: str = "dispatcher",
    ) -> None:
        self.doc = dict(doc)
        self.workdir = workdir
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.env = dict(env or {})
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exit_codes: list[int] = []
        self._log: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def __aenter__(self) -> DispatcherProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.alive:
            await self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> None:
        assert not self.alive, "already running"
        self.port = free_port()
        doc = {**self.doc, "http": {**self.doc.get("http", {}), "listen": f"127.0.0.1:{self.port}"}}
        self.config_path.write_text(to_toml(doc), encoding="utf-8")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")
        }  # nothing may override the file
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __aexit__
        self.starts += 1
        self._log.write(f"\n=== start {self.starts} at {time.time():.3f} ===\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            # -X faulthandler: a SIGABRT (see `wait_ready`) dumps every thread's stack.
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "dispatcher",
            "--config",
            str(self.config_path),
            "run",
            "--workers",
            "1",
            cwd=PROJECT_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        if wait_ready:
            await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(
                    f"{self.name} exited with {self.returncode} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            if await self.readyz() == 200:
                return
            await asyncio.sleep(0.05)
        # Say what state it is stuck in: is the loop alive (healthz), then its stacks.
        healthz = await http_status(f"{self.base}/healthz", timeout=1.0)
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        raise AssertionError(
            f"{self.name} not ready within {timeout}s (/healthz: {healthz}):\n{self.log_tail(80)}"
        )

    async def readyz(self) -> int | None:
        return await http_status(f"{self.base}/readyz", timeout=1.0)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    async def kill(self) -> None:
        """SIGKILL: no drain, no acks, no goodbye."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        code = await self.proc.wait()
        self.exit_codes.append(code)

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL and fail if it takes too long)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s of SIGTERM:\n{self.log_tail()}"
            ) from None
        self.exit_codes.append(code)
        return code

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines the process wrote (other lines are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


# --- the broker's side ----------------------------------------------------------------------


async def depths(config: Config) -> dict[str, int]:
    """Ready messages in the work queue, the retry tiers and parking queues (summed), and the dead
    letters."""
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        return await queue_depths(channel, config.broker, [s.id for s in config.subscribers])


async def await_settled(
    ledger: Any, receipts: Any, config: Config, *, timeout: float, quiet: float = 1.0
) -> Any:
    """Wait until every owed delivery is received or dead-lettered, then until the work queue
    and retry tiers are empty and no receipt has arrived for ``quiet`` seconds (so late
    duplicates are counted too). Returns the ledger's final `Tally`; on timeout, the tally as
    it stands (its `holds` check then says what is missing)."""
    from tests.support.harness import dead_letters

    deadline = time.monotonic() + timeout
    letters: list[Any] = []
    last_read = 0.0
    while True:
        now = time.monotonic()
        current = receipts()
        if ledger.outstanding(current) <= len(letters) + 64 or now - last_read > 3.0:
            letters = await dead_letters(config)
            last_read = time.monotonic()
        tally = ledger.account(current, letters)
        if tally.lost == 0:
            break
        if now > deadline:
            return tally
        await asyncio.sleep(0.2)

    quiet_since: float | None = None
    previous: tuple[int, ...] | None = None
    while time.monotonic() < deadline:
        d = await depths(config)
        count = sum(len(ids) for ids in receipts().values())
        snapshot = (d["work"], d["retry"], d["parked"], d["dead"], count)
        if d["work"] == d["retry"] == d["parked"] == 0 and snapshot == previous:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= quiet:
                break
        else:
            quiet_since = None
        previous = snapshot
        await asyncio.sleep(0.2)
    return ledger.account(receipts(), await dead_letters(config))


async def kill_repeatedly(
    proc: DispatcherProcess, server: Any, ledger: Any, kills: int, random: Any
) -> None:
    """SIGKILL the dispatcher ``kills`` times, spread over the run (each at a random moment
    within its stretch of the owed deliveries), restarting it after each."""
    from chaos_scale import pick

    from tests.support.harness import wait_until

    def received() -> int:
        return sum(len(e.receipts) for e in server.endpoints.values())

    for k in range(1, kills + 1):
        target = ledger.due * (k - 1 + random.uniform(0.3, 1.0)) / (kills + 1)
        assert await wait_until(lambda t=target: received() >= t, timeout=pick(60, 300)), (
            proc.log_tail()
        )
        await proc.kill()
        ledger.fault("kill -9")
        await asyncio.sleep(random.uniform(0, 0.3))
        await proc.start()
