"""Garbage-collector pauses of a process, to tell GC stalls from other latency outliers.

`GcPauses.install()` hooks `gc.callbacks` and counts, per generation, the collections and the
time they stopped the world. Receivers use it directly; the dispatcher and the baseline get it
through ``loadtest/gcprobe/sitecustomize.py`` (on their PYTHONPATH when the load test starts
them), which writes the figures to ``$LOADTEST_GC_DIR/gc-<pid>.json`` when the process exits.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["GcPauses", "merge", "read_dir"]


class GcPauses:
    def __init__(self) -> None:
        self.reset()
        self._started = 0.0

    def reset(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self.over_10ms = 0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = (time.perf_counter() - self._started) * 1000
        g = int(info.get("generation", 0))
        self.collections[g] += 1
        self.pause_ms[g] += took
        self.max_ms[g] = max(self.max_ms[g], took)
        if took > 10:
            self.over_10ms += 1

    def install(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "pause_ms": [round(x, 1) for x in self.pause_ms],
            "max_pause_ms": round(max(self.max_ms), 2),
            "pauses_over_10ms": self.over_10ms,
        }


def install_probe() -> None:
    """From sitecustomize: record this process's GC pauses into $LOADTEST_GC_DIR at exit."""
    out = os.environ.get("LOADTEST_GC_DIR")
    if not out:
        return
    import atexit

    pauses = GcPauses().install()

    def write() -> None:
        path = Path(out) / f"gc-{os.getpid()}.json"
        path.write_text(json.dumps(pauses.as_dict()), encoding="utf-8")

    atexit.register(write)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Several processes (a supervisor and its workers) summed; the worst pause kept."""
    if not parts:
        return None
    return {
        "processes": len(parts),
        "collections": [sum(p["collections"][g] for p in parts) for g in range(3)],
        "pause_ms": [round(sum(p["pause_ms"][g] for p in parts), 1) for g in range(3)],
        "max_pause_ms": max(p["max_pause_ms"] for p in parts),
        "pauses_over_10ms": sum(p["pauses_over_10ms"] for p in parts),
    }


def read_dir(directory: Path) -> dict[str, Any] | None:
    parts = []
    for path in sorted(directory.glob("gc-*.json")):
        try:
            parts.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return merge(parts)
