"""`dispatcher run --workers N`: N worker processes under one supervisor.

Workers are competing consumers of the same queues: RabbitMQ hands each message to one of
them, exactly as it does between dispatchers on several machines. Nothing is shared between
workers but the broker, the keys directory and the metrics directory.

The supervisor
* sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before it starts any worker, and
  serves /metrics (every worker merged), /readyz (200 while every worker is connected and
  consuming), /healthz and the JWKS on [http].listen; the workers serve nothing;
* restarts a worker that exits, at once the first time, then with a doubling backoff (up to
  30 s) while it keeps dying within seconds of its start;
* forwards SIGHUP (reload subscribers) to every worker, and on SIGTERM or SIGINT sends SIGTERM
  to every worker, waits for them to drain (drain_timeout plus a margin) and exits 0 when
  every one of them exited cleanly.

Workers die with the supervisor (Linux parent-death signal), so a killed supervisor leaves no
orphan consumers behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import Config
from dispatcher.process.metrics import MULTIPROC_ENV

__all__ = ["supervise"]

log = structlog.get_logger("dispatcher.supervisor")

_POLL = 0.25  # seconds between reaping/readiness checks
_QUICK_EXIT = 10.0  # a worker that dies sooner than this after its start counts as crash-looping
_MAX_BACKOFF = 30.0
_STOP_MARGIN = 15.0  # on top of drain_timeout: closing channels and the connection
_CLEAN_EXIT = (0, -signal.SIGTERM, -signal.SIGINT)  # -SIGTERM: stopped before it set handlers
_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Any:
    """libc's prctl, resolved in the parent: the child must not dlopen between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    # Ignore SIGHUP until the worker installs its own handler: a reload forwarded during its
    # start must not kill it. And die with the supervisor, whatever kills it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass
class _Slot:
    """One worker position; its process changes when it is restarted."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    restart_at: float = 0.0


class _SupervisorMetrics(Collector):
    """The supervisor's own series, computed at scrape time (no multiprocess files)."""

    def __init__(self, sup: _Supervisor) -> None:
        self._sup = sup

    def collect(self) -> Iterator[Any]:
        workers = GaugeMetricFamily("dispatcher_workers", "Worker processes configured.")
        workers.add_metric([], self._sup.n)
        alive = GaugeMetricFamily("dispatcher_workers_alive", "Worker processes running.")
        alive.add_metric([], self._sup.alive())
        restarts = CounterMetricFamily(
            "dispatcher_worker_restarts", "Workers restarted after they exited."
        )
        restarts.add_metric([], self._sup.restarts)
        yield from (workers, alive, restarts)


class _Supervisor:
    def __init__(
        self,
        config: Config,
        workers: int,
        config_path: str | None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self.n = workers
        self._config_path = config_path
        self._monotonic = clock.monotonic  # restarts' backoff, the stop deadline
        self._slots = [_Slot(i) for i in range(workers)]
        self._stopping = False
        self._ready_workers = 0.0
        self.restarts = 0

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        cmd = [sys.executable, "-m", "dispatcher"]
        if self._config_path:
            cmd += ["--config", self._config_path]
        cmd += ["run", "--workers", "1", "--worker-child"]
        env = dict(os.environ, DISPATCHER_WORKER_INDEX=str(slot.index))
        slot.proc = subprocess.Popen(cmd, env=env, preexec_fn=_child_setup)
        slot.started_at = self._monotonic()
        log.info("worker_started", worker=slot.index, pid=slot.proc.pid)

    def alive(self) -> int:
        return sum(1 for s in self._slots if s.proc is not None and s.proc.poll() is None)

    def _signal_all(self, sig: int) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(sig)

    def _reap(self) -> None:
        """Notice exited workers, forget their live gauges, and restart them (with backoff)."""
        from prometheus_client import multiprocess

        now = self._monotonic()
        for slot in self._slots:
            proc = slot.proc
            if proc is not None:
                code = proc.poll()
                if code is None:
                    continue
                multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                ran = now - slot.started_at
                slot.quick_exits = slot.quick_exits + 1 if ran < _QUICK_EXIT else 0
                delay = (
                    0.0
                    if slot.quick_exits <= 1
                    else min(_MAX_BACKOFF, 2.0 ** (slot.quick_exits - 2))
                )
                slot.restart_at = now + delay
                slot.proc = None
                log.error(
                    "worker_exited",
                    worker=slot.index,
                    pid=proc.pid,
                    code=code,
                    ran_seconds=round(ran, 1),
                    restart_in=delay,
                )
            if now >= slot.restart_at:
                self.restarts += 1
                self._spawn(slot)

    def _update_readiness(self) -> None:
        from dispatcher.process.metrics import live_gauge_sum

        try:
            self._ready_workers = live_gauge_sum("dispatcher_ready")
        except (OSError, ValueError, struct.error) as exc:  # a file being written or removed
            log.debug("readiness_read_failed", error=str(exc))

    def ready(self) -> bool:
        return not self._stopping and self.alive() == self.n and self._ready_workers >= self.n

    def status(self) -> dict[str, Any]:
        return {"workers": self.n, "alive": self.alive(), "ready": int(self._ready_workers)}

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        from dispatcher.http.ops import OpsServer
        from dispatcher.process.metrics import render_metrics
        from signing import KeyRing

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_hup)
        cfg = self._config
        # Load (and on a first start create) the keys before any worker races to do it.
        ring = KeyRing.load(cfg.signing.keys_dir, cfg.signing.algorithm, algorithms=cfg.algorithms)
        own = _SupervisorMetrics(self)

        def jwks() -> dict[str, Any]:
            try:
                ring.reload_if_changed()
            except Exception as exc:  # keep serving the keys we have
                log.warning("signing_keys_reload_failed", error=str(exc))
            return dict(ring.jwks())

        async with OpsServer(
            cfg.http.host,
            cfg.http.port,
            ready=self.ready,
            metrics=lambda: render_metrics(None, own),
            jwks=jwks,
            jwks_max_age=cfg.signing.jwks_max_age,
            status=self.status,
        ):
            for slot in self._slots:
                self._spawn(slot)
            log.info("supervisor_started", workers=self.n, listen=cfg.http.listen, pid=os.getpid())
            while not stop.is_set():
                self._reap()
                self._update_readiness()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_POLL)
            self._stopping = True
            return await self._shutdown()

    def _forward_hup(self) -> None:
        log.info("reload_forwarded", workers=self.alive())
        self._signal_all(signal.SIGHUP)

    async def _shutdown(self) -> int:
        from prometheus_client import multiprocess

        running = [s.proc for s in self._slots if s.proc is not None and s.proc.poll() is None]
        log.info("supervisor_stopping", workers=len(running))
        self._signal_all(signal.SIGTERM)
        deadline = self._monotonic() + self._config.dispatcher.drain_timeout + _STOP_MARGIN
        clean = True
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, max(0.1, deadline - self._monotonic()))
            if proc.poll() is None:
                log.error("worker_killed", pid=proc.pid, reason="did not stop in time")
                proc.kill()
                proc.wait()
                clean = False
            elif proc.returncode not in _CLEAN_EXIT:
                log.error("worker_failed", pid=proc.pid, code=proc.returncode)
                clean = False
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
        log.info("supervisor_stopped", clean=clean)
        return 0 if clean else 1


def supervise(config: Config, *, workers: int, config_path: str | None) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="dispatcher-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        import uvloop

        return uvloop.run(_Supervisor(config, workers, config_path).run())
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
