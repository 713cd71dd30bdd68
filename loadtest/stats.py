"""Summaries of what the receivers recorded: throughput, latency percentiles, a timeline.

Latency is publish to receipt: the receiver's arrival time minus the ``published_at`` stamp the
generator put in the body (both from the same clock: everything runs on one machine).
Throughput is deliveries per second between the first and the last receipt of a phase, which
leaves out process start-up and the wait for stragglers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Latency", "Throughput", "latency", "throughput", "timeline"]


@dataclass(frozen=True, slots=True)
class Latency:
    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50": _r(self.p50),
            "p90": _r(self.p90),
            "p99": _r(self.p99),
            "max": _r(self.max),
            "mean": _r(self.mean),
        }


@dataclass(frozen=True, slots=True)
class Throughput:
    deliveries: int  # receipts counted
    first: float  # unix seconds of the first receipt (or the given start)
    last: float
    intervals: int  # receipts after the first: what the window's length is divided into

    @property
    def window(self) -> float:
        return self.last - self.first

    @property
    def per_second(self) -> float:
        return self.intervals / self.window if self.window > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "deliveries": self.deliveries,
            "window_s": round(self.window, 3),
            "deliveries_per_s": round(self.per_second, 1),
        }


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def _latencies_ms(published: Sequence[float], arrived: Sequence[float]) -> np.ndarray:
    pub = np.asarray(published, dtype=float)
    arr = np.asarray(arrived, dtype=float) * 1000.0
    lat: np.ndarray = arr - pub
    kept: np.ndarray = lat[~np.isnan(lat)]
    return kept


def latency(published: Sequence[float], arrived: Sequence[float]) -> Latency:
    lat = _latencies_ms(published, arrived)
    if lat.size == 0:
        nan = float("nan")
        return Latency(0, nan, nan, nan, nan, nan)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return Latency(
        int(lat.size), float(p50), float(p90), float(p99), float(lat.max()), float(lat.mean())
    )


def throughput(arrived: Sequence[float], *, start: float | None = None) -> Throughput:
    """Deliveries per second from ``start`` (default: the first receipt) to the last receipt."""
    if not arrived:
        return Throughput(0, 0.0, 0.0, 0)
    first, last = float(min(arrived)), float(max(arrived))
    if start is None:
        # n receipts between the first and the last span n-1 intervals.
        return Throughput(len(arrived), first, last, len(arrived) - 1)
    return Throughput(len(arrived), start, last, len(arrived))


def timeline(
    published: Sequence[float], arrived: Sequence[float], t0: float, bucket: float = 1.0
) -> list[dict[str, Any]]:
    """Per ``bucket`` seconds since ``t0``: deliveries/s and latency p50/p99 (ms)."""
    if not arrived:
        return []
    arr = np.asarray(arrived, dtype=float)
    lat = np.asarray(arrived, dtype=float) * 1000.0 - np.asarray(published, dtype=float)
    idx = np.floor((arr - t0) / bucket).astype(int)
    out = []
    for b in range(int(idx.min()), int(idx.max()) + 1):
        mask = idx == b
        n = int(mask.sum())
        row: dict[str, Any] = {"t": round(b * bucket, 3), "deliveries_per_s": n / bucket}
        sel = lat[mask]
        sel = sel[~np.isnan(sel)]
        if sel.size:
            p50, p99 = np.percentile(sel, [50, 99])
            row.update(p50_ms=round(float(p50), 3), p99_ms=round(float(p99), 3))
        out.append(row)
    return out
