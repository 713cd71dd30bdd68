"""`dispatcher run --workers N`: N worker processes under one supervisor.

Workers are competing consumers of the same queues (RabbitMQ balances between them, as it does
between dispatchers on several machines). The supervisor serves the ops endpoints with the
workers' merged metrics (prometheus-client multiprocess mode), restarts a worker that dies
(with backoff when it keeps dying), and forwards SIGTERM/SIGINT and SIGHUP to every worker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import structlog

from dispatcher.config import Config
from dispatcher.log import configure_logging

__all__ = ["supervise"]

log = structlog.get_logger("dispatcher.supervisor")


def _ready_workers() -> float:
    from prometheus_client import CollectorRegistry, multiprocess

    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    for family in reg.collect():
        if family.name == "dispatcher_ready":
            return sum(s.value for s in family.samples)
    return 0.0


class _Supervisor:
    def __init__(self, config: Config, workers: int, config_path: str | None) -> None:
        self._config = config
        self._n = workers
        self._config_path = config_path
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._restarts: dict[int, list[float]] = {}
        self._stopping = False

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "dispatcher"]
        if self._config_path:
            cmd += ["--config", self._config_path]
        cmd += ["run", "--workers", "1", "--worker-child"]
        env = dict(os.environ, DISPATCHER_WORKER_INDEX=str(index))
        self._procs[index] = subprocess.Popen(cmd, env=env)
        log.info("worker_started", worker=index, pid=self._procs[index].pid)

    def _signal_all(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    async def run(self) -> int:
        from dispatcher.metrics import render_metrics
        from dispatcher.ops_http import OpsServer
        from signing import KeyRing

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        ring = KeyRing.load(self._config.signing.keys_dir, self._config.signing.algorithm)
        cfg = self._config

        def jwks() -> dict[str, object]:
            ring.reload_if_changed()
            return ring.jwks()

        async with OpsServer(cfg.http.host, cfg.http.port,
                             ready=lambda: not stop.is_set() and _ready_workers() >= self._n,
                             metrics=lambda: render_metrics(None), jwks=jwks,
                             jwks_max_age=cfg.signing.jwks_max_age):
            for i in range(self._n):
                self._spawn(i)
            log.info("supervisor_started", workers=self._n, listen=cfg.http.listen)
            while not stop.is_set():
                self._reap()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
                except TimeoutError:
                    pass
            self._stopping = True
            log.info("supervisor_stopping", workers=len(self._procs))
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + cfg.dispatcher.drain_timeout + 15
            codes = []
            for proc in self._procs.values():
                remaining = max(0.1, deadline - time.monotonic())
                try:
                    codes.append(await asyncio.to_thread(proc.wait, remaining))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes.append(await asyncio.to_thread(proc.wait))
        return 0 if all(c == 0 for c in codes) else 1

    def _reap(self) -> None:
        now = time.monotonic()
        for index, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if not getattr(proc, "_marked_dead", False):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                proc._marked_dead = True  # type: ignore[attr-defined]
            history = [t for t in self._restarts.get(index, []) if now - t < 60]
            log.error("worker_exited", worker=index, pid=proc.pid, code=code,
                      restarts_last_minute=len(history))
            if len(history) >= 5:
                # Crash-looping: back off instead of burning the CPU.
                if now - history[-1] < 10:
                    continue
            history.append(now)
            self._restarts[index] = history
            self._spawn(index)


def supervise(config: Config, *, workers: int, config_path: str | None) -> int:
    configure_logging(config.dispatcher.log_level, config.dispatcher.log_format)
    metrics_dir = tempfile.mkdtemp(prefix="dispatcher-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        import uvloop

        return uvloop.run(_Supervisor(config, workers, config_path).run())
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
