"""Sampling profiles of the process under load with py-spy, and a summary of where time goes.

``py-spy record --format raw --function`` writes collapsed stacks (``frame;frame;... count``);
the summary counts, per function, the samples where it is on top of the stack (self time) and
the samples where it is anywhere on the stack (inclusive time), and the self time per package
(dispatcher, signing, aiohttp, aio-pika/aiormq, asyncio, ...). Idle time in the event loop's
poll is not sampled (py-spy skips idle threads by default), so shares are shares of busy CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Profiler", "py_spy", "summarize"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
_PACKAGES = (
    ("dispatcher/", "dispatcher"),
    ("signing/", "signing"),
    ("loadtest/", "loadtest"),
    ("aiohttp/", "aiohttp"),
    ("aio_pika/", "aio-pika"),
    ("aiormq/", "aiormq"),
    ("pamqp/", "pamqp"),
    ("prometheus_client/", "prometheus_client"),
    ("structlog/", "structlog"),
    ("cryptography/", "cryptography"),
    ("multidict/", "multidict"),
    ("yarl/", "yarl"),
    ("asyncio/", "asyncio"),
    ("uvloop/", "uvloop"),
)


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` attached to a running pid (and its children) until `stop`."""

    def __init__(
        self, pid: int, output: Path, *, rate: int = 100, subprocesses: bool = True
    ) -> None:
        self.pid = pid
        self.output = output
        self.rate = rate
        self.subprocesses = subprocesses
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        args = [
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--function",
            "--nonblocking",
            "--output",
            str(self.output),
        ]
        if self.subprocesses:
            args.append("--subprocesses")
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _package(file: str) -> str:
    # py-spy names files relative to their sys.path entry: "dispatcher/process/pipeline.py".
    if file.startswith("asyncio/runners.py"):
        return "event loop (uvloop, native)"
    for needle, name in _PACKAGES:
        if file.startswith(needle) or f"/{needle}" in file:
            return name
    if "site-packages" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0]
    if (
        "python3" in file
        or file.startswith("<")
        or "/" not in file
        or file.split("/")[0]
        in ("asyncio", "contextlib.py", "concurrent", "json", "email", "logging")
    ):
        return "stdlib"
    return "other"


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and self share per package."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if _FRAME.match(f)]
        if not frames:
            continue
        leaf = frames[-1]
        self_time[leaf] += count
        m = _FRAME.match(leaf)
        packages[_package(m.group("file") if m else "")] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"frame": k, "samples": v, "share": round(v / total, 4) if total else 0.0}
            for k, v in counter.most_common(n)
        ]

    ours = Counter({k: v for k, v in inclusive.items() if "(dispatcher/" in k or "(signing/" in k})
    return {
        "samples": total,
        "self": share(self_time, top),
        "inclusive_dispatcher_signing": share(ours, top),
        "packages_self": share(packages, 20),
    }
