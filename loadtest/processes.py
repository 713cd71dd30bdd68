"""The processes a load test starts: receivers, the dispatcher (or the baseline), and their control.

Each is a child process of the runner, started with the same interpreter from the repository root,
stopped with SIGTERM (then SIGKILL after a deadline) by its own pid, never by name. The
dispatcher gets a generated TOML config (unique exchange and queue, keys in a temporary
directory, ops endpoints on a free loopback port).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

__all__ = [
    "REPO_ROOT",
    "Child",
    "DispatcherFailed",
    "DispatcherProcess",
    "ReceiversProcess",
    "start_baseline",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


GC_PROBE = Path(__file__).resolve().parent / "gcprobe"


def _env(source: Path = REPO_ROOT, gc_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(source)] + ([str(GC_PROBE)] if gc_dir is not None else [])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    if gc_dir is not None:
        env["LOADTEST_GC_DIR"] = str(gc_dir)
    env.pop("DISPATCHER_CONFIG", None)
    env.pop("DISPATCHER_BROKER_URL", None)  # the generated config names the broker
    return env


@dataclass
class Child:
    """A child process we started; stopped by its pid only."""

    name: str
    proc: asyncio.subprocess.Process
    log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, grace: float = 20.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
        return self.proc.returncode if self.proc.returncode is not None else -1


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")  # closed by Child.stop


async def _spawn(
    name: str,
    args: Sequence[str],
    log_path: Path | None,
    stdout: int | None = None,
    source: Path = REPO_ROOT,
    gc_dir: Path | None = None,
) -> Child:
    """Start ``python <args>`` in ``source`` (``-m`` puts the working directory first on
    sys.path, so ``source`` decides which copy of the code runs). With ``gc_dir`` the child
    records its garbage-collector pauses there (see gcstats.py)."""
    log = _open_log(log_path) if log_path is not None else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=str(source),
        env=_env(source, gc_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout if stdout is not None else (log or asyncio.subprocess.DEVNULL),
        stderr=log or asyncio.subprocess.DEVNULL,
    )
    return Child(name, proc, log)


async def _first_line(child: Child, wait: float) -> dict[str, Any]:
    assert child.proc.stdout is not None
    try:
        line = await asyncio.wait_for(child.proc.stdout.readline(), wait)
    except TimeoutError:
        line = b""
    if not line:
        await child.stop(2)
        raise RuntimeError(f"{child.name} did not start (see its log)")
    return dict(orjson.loads(line))


# --- receivers ------------------------------------------------------------------------------


class ReceiversProcess:
    """``python -m loadtest.receivers`` and a client for its control API."""

    def __init__(self, child: Child, control: int, urls: list[str]) -> None:
        self.child = child
        self.urls = urls
        self._base = f"http://127.0.0.1:{control}/control"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    @classmethod
    async def start(cls, endpoints: int, log_path: Path, seed: int = 7) -> ReceiversProcess:
        child = await _spawn(
            "receivers",
            ["-m", "loadtest.receivers", "--endpoints", str(endpoints), "--seed", str(seed)],
            log_path,
            stdout=asyncio.subprocess.PIPE,
        )
        hello = await _first_line(child, 30)
        return cls(child, int(hello["control"]), list(hello["endpoints"]))

    async def _post(self, path: str, doc: Mapping[str, Any]) -> None:
        async with self._session.post(f"{self._base}/{path}", data=orjson.dumps(doc)) as r:
            r.raise_for_status()

    async def phase(
        self,
        *,
        verify: bool,
        jwks_url: str | None,
        issuer: str | None,
        behaviours: Sequence[Mapping[str, Any]],
    ) -> None:
        await self._post(
            "phase",
            {
                "verify": verify,
                "jwks_url": jwks_url,
                "issuer": issuer,
                "behaviours": list(behaviours),
            },
        )

    async def behaviour(self, index: int, behaviour: Mapping[str, Any]) -> None:
        await self._post("behaviour", {"index": index, "behaviour": dict(behaviour)})

    async def stats(self) -> list[dict[str, Any]]:
        async with self._session.get(f"{self._base}/stats") as r:
            return list(orjson.loads(await r.read()))

    async def path_stats(self) -> dict[str, Any]:
        """The account endpoints (``/a/<account>/<n>``) summed: received, unique, own_unique,
        cross_account, failures, verify_failures, ... and how many paths were hit."""
        async with self._session.get(f"{self._base}/paths") as r:
            return dict(orjson.loads(await r.read()))

    async def lookup(self, paths: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
        """Ids and arrival times recorded so far at these account endpoints (those hit)."""
        async with self._session.post(
            f"{self._base}/lookup", data=orjson.dumps({"paths": list(paths)})
        ) as r:
            return dict(orjson.loads(await r.read()))

    async def records(self, paths: bool = False) -> dict[str, Any]:
        """``{"endpoints": [per endpoint records], "gc": pauses since the phase began}``, and
        with ``paths`` ``"paths": {path: records}`` for every account endpoint hit."""
        url = f"{self._base}/records" + ("?paths=1" if paths else "")
        async with self._session.get(url) as r:
            return dict(orjson.loads(await r.read()))

    async def close(self) -> None:
        await self._session.close()
        await self.child.stop(10)


# --- the dispatcher -------------------------------------------------------------------------


class DispatcherFailed(RuntimeError):
    """The dispatcher exited before it was ready (a refused config, say), or never got ready."""


def _last_line(path: Path) -> str:
    """The last non-empty line of a log: a refused config is one line on stderr."""
    try:
        lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


class DispatcherProcess:
    """``python -m dispatcher --config <generated> run --workers N``."""

    def __init__(self, child: Child, http_port: int, spawned_at: float) -> None:
        self.child = child
        self.http_port = http_port
        self.spawned_at = spawned_at  # unix seconds, just before the process was started
        self.ready_at: float | None = None  # the first /readyz 200
        self.metrics_bytes: int | None = None  # size of the last /metrics read
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    @property
    def startup_s(self) -> float | None:
        """Process start until /readyz first answered 200."""
        return None if self.ready_at is None else self.ready_at - self.spawned_at

    @classmethod
    async def start(
        cls,
        config_path: Path,
        http_port: int,
        workers: int,
        log_path: Path,
        ready_timeout: float = 60.0,
        source: Path | None = None,
        gc_dir: Path | None = None,
    ) -> DispatcherProcess:
        """``source``: another checkout to run the dispatcher from (A/B runs); default this one."""
        spawned_at = time.time()
        child = await _spawn(
            "dispatcher",
            ["-m", "dispatcher", "--config", str(config_path), "run", "--workers", str(workers)],
            log_path,
            source=source or REPO_ROOT,
            gc_dir=gc_dir,
        )
        self = cls(child, http_port, spawned_at)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if not child.running:
                await self.close()
                raise DispatcherFailed(
                    f"dispatcher exited with {child.proc.returncode}: "
                    f"{_last_line(log_path) or '(no output)'} "
                    f"(log: {log_path})"
                )
            if await self.ready():
                self.ready_at = time.time()
                return self
            await asyncio.sleep(0.05)
        await self.close()
        raise DispatcherFailed(f"dispatcher not ready within {ready_timeout:g}s (log: {log_path})")

    def reload(self) -> None:
        """SIGHUP: reload the subscribers (the supervisor forwards it to every worker)."""
        self.child.proc.send_signal(signal.SIGHUP)

    async def metrics(self, timeout: float = 60.0) -> str | None:
        """The /metrics text (its size kept in `metrics_bytes`); None if it did not answer."""
        try:
            async with self._session.get(
                f"http://127.0.0.1:{self.http_port}/metrics",
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError):
            return None
        self.metrics_bytes = len(body)
        return body.decode("utf-8", "replace")

    async def ready(self) -> bool:
        try:
            async with self._session.get(f"http://127.0.0.1:{self.http_port}/readyz") as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def counters(
        self,
        prefixes: Sequence[str] = (
            "dispatcher_events_total",
            "dispatcher_attempts_total",
            "dispatcher_deliveries_total",
            "dispatcher_retries_scheduled_total",
            "dispatcher_parked_total",
            "dispatcher_dead_letters_total",
            "dispatcher_broker_confirm_seconds",
            "dispatcher_request_duration_seconds",
        ),
    ) -> dict[str, float]:
        """The dispatcher's own counters (Prometheus text), for the phase report."""
        text = await self.metrics()
        if text is None:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith(tuple(prefixes)):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def held(self) -> float | None:
        """Messages the dispatcher holds unacknowledged (its prefetch_in_use gauge)."""
        try:
            async with self._session.get(f"http://127.0.0.1:{self.http_port}/metrics") as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        for line in text.splitlines():
            if line.startswith("dispatcher_prefetch_in_use"):
                return float(line.rsplit(" ", 1)[1])
        return None

    async def close(self, grace: float = 30.0) -> int:
        await self._session.close()
        return await self.child.stop(grace)


async def start_baseline(
    broker_url: str,
    queue: str,
    prefetch: int,
    targets: Sequence[str],
    log_path: Path,
    gc_dir: Path | None = None,
) -> Child:
    args = [
        "-m",
        "loadtest.baseline",
        "--broker-url",
        broker_url,
        "--queue",
        queue,
        "--prefetch",
        str(prefetch),
    ]
    for url in targets:
        args += ["--target", url]
    child = await _spawn("baseline", args, log_path, stdout=asyncio.subprocess.PIPE, gc_dir=gc_dir)
    await _first_line(child, 30)
    return child
