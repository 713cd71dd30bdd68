"""`dispatcher run --workers N` as a real process tree (a supervisor and its worker processes),
for the tests that need real processes: started with its output in a log file, its live workers
listed, its readiness waited for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil  # type: ignore[import-untyped]

__all__ = ["live_workers", "ready_within", "start_supervisor"]

ROOT = Path(__file__).resolve().parents[2]


def start_supervisor(config: Path, log: Path, *, workers: int = 2) -> subprocess.Popen[bytes]:
    """``python -m dispatcher --config <config> run --workers <workers>`` from the checkout, both
    of its output streams in ``log``. The test process's own PROMETHEUS_* settings stay out of
    it: the supervisor sets up its workers' metrics itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    command = [sys.executable, "-m", "dispatcher", "--config", str(config)]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*command, "run", "--workers", str(workers)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def live_workers(supervisor: subprocess.Popen[bytes]) -> list[int]:
    """The pids of the supervisor's workers alive now (one killed and not yet reaped is not);
    none once the supervisor is gone."""
    try:
        return [
            child.pid
            for child in psutil.Process(supervisor.pid).children()
            if child.status() != psutil.STATUS_ZOMBIE
        ]
    except psutil.NoSuchProcess:
        return []


async def ready_within(base: str, seconds: float) -> bool:
    """Whether ``<base>/readyz`` answers 200 within ``seconds`` (asked every 0.1 s)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(
                    f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.1)
    return False
