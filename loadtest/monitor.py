"""CPU and memory of a process tree, sampled in the background (psutil).

A `TreeSampler` follows one process and, optionally, its children (``dispatcher run --workers N``
is a supervisor with N workers). Each sample is (time, CPU seconds so far, RSS); CPU over any
window is interpolated between samples, so the window can be chosen after the run (from the first
to the last delivery). Peak memory is the kernel's high-water mark (``VmHWM``) where available,
which catches peaks between samples, and the sampled maximum otherwise.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from dataclasses import dataclass, field

import psutil  # type: ignore[import-untyped]

__all__ = ["MachineSampler", "Sample", "TreeSampler", "find_broker_pid"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # unix seconds
    cpu: float  # CPU seconds (user + system) of the tree so far
    rss: int  # bytes, summed over the tree
    system: float = 0.0  # the system (kernel) part of ``cpu``


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class TreeSampler:
    pid: int
    children: bool = True
    interval: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _hwm: dict[int, int] = field(default_factory=dict)
    _rss_max: dict[int, int] = field(default_factory=dict)  # sampled maximum per pid
    max_processes: int = 0  # most processes seen in the tree at once
    _cpu_done: dict[int, float] = field(default_factory=dict)  # last CPU seen per pid
    _sys_done: dict[int, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def _procs(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return []
        procs = [root]
        if self.children:
            with contextlib.suppress(psutil.Error):
                procs += root.children(recursive=True)
        return procs

    def sample(self) -> Sample | None:
        procs = self._procs()
        if not procs:
            return None
        rss = 0
        alive = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    own = proc.memory_info().rss
                self._cpu_done[proc.pid] = times.user + times.system
                self._sys_done[proc.pid] = times.system
            except psutil.Error:
                continue
            rss += own
            alive += 1
            self._rss_max[proc.pid] = max(own, self._rss_max.get(proc.pid, 0))
            hwm = _hwm(proc.pid)
            if hwm is not None:
                self._hwm[proc.pid] = max(hwm, self._hwm.get(proc.pid, 0))
        self.max_processes = max(self.max_processes, alive)
        # CPU of a worker that exited stays counted (its last sample).
        s = Sample(time.time(), sum(self._cpu_done.values()), rss, sum(self._sys_done.values()))
        self.samples.append(s)
        return s

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self.sample()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- summaries -------------------------------------------------------------------------

    def cpu_at(self, t: float, *, system: bool = False) -> float:
        s = self.samples
        if not s:
            return 0.0

        def value(x: Sample) -> float:
            return x.system if system else x.cpu

        times = [x.t for x in s]
        i = bisect.bisect_left(times, t)
        if i <= 0:
            return value(s[0])
        if i >= len(s):
            return value(s[-1])
        a, b = s[i - 1], s[i]
        frac = (t - a.t) / (b.t - a.t) if b.t > a.t else 0.0
        return value(a) + frac * (value(b) - value(a))

    def cpu_between(self, t0: float, t1: float, *, system: bool = False) -> float:
        return max(0.0, self.cpu_at(t1, system=system) - self.cpu_at(t0, system=system))

    @property
    def cpu_total(self) -> float:
        return self.samples[-1].cpu if self.samples else 0.0

    @property
    def peak_rss(self) -> int:
        """The high-water mark: the kernel's VmHWM summed over the tree, else the sampled max."""
        sampled = max((s.rss for s in self.samples), default=0)
        return max(sum(self._hwm.values()), sampled) if self._hwm else sampled

    @property
    def peak_rss_sampled(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    def peak_rss_by_pid(self) -> dict[int, int]:
        """Each process's own peak (VmHWM, else its sampled maximum); the root is `pid`."""
        return {p: max(self._hwm.get(p, 0), r) for p, r in self._rss_max.items()}


def find_broker_pid() -> int | None:
    """The local RabbitMQ node (beam.smp), to show its share of the CPU; None if not visible."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            name = proc.info["name"] or ""
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if name.startswith("beam") and "rabbit" in cmd:
            return int(proc.pid)
    return None


@dataclass
class MachineSampler(TreeSampler):
    """The whole machine's busy CPU seconds (all cores), to show how loaded the box was."""

    pid: int = 0
    children: bool = False

    def sample(self) -> Sample | None:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        s = Sample(time.time(), busy, 0)
        self.samples.append(s)
        return s
