"""The targets a scenario's figures are checked against, and the figures derived for them.

Pure: a scenario runs its phases (`scenarios.py`, through the runner), then hands the
`PhaseResult`s here. `integrity` is what every scenario checks (nothing lost, every token
verified, every phase settled); the rest are the small computations the scenario-specific
checks share: ratios, the dispatcher's process count, RSS growth after warm-up, parked
deliveries and the largest of a set of optional figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.phases import DISPATCHER, PhaseResult

__all__ = [
    "Check",
    "ScenarioResult",
    "integrity",
    "most",
    "parked_deliveries",
    "ratio_of",
    "rss_growth",
    "workers_check",
]


@dataclass
class Check:
    name: str
    target: str
    value: float | None
    ok: bool | None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "value": None if self.value is None else round(self.value, 4),
            "ok": self.ok,
            "detail": self.detail,
        }


@dataclass
class ScenarioResult:
    phases: list[PhaseResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def ratio_of(a: float, b: float) -> float:
    return a / b if b else 0.0


def integrity(result: ScenarioResult) -> None:
    """Every scenario: nothing lost, every token verified, every phase settled."""
    for p in result.phases:
        acc = p.accounting
        result.checks.append(
            Check(
                f"{p.spec.name}: every event accounted for",
                "lost == 0",
                acc.lost,
                acc.lost == 0,
                f"{acc.published} published ({acc.invalid_published} invalid), "
                f"{acc.expected_deliveries} deliveries owed: {acc.delivered} delivered, "
                f"{acc.dead_lettered} dead-lettered, {acc.pending} still pending in the broker, "
                f"{acc.duplicates} duplicates, "
                f"{acc.unexpected} unexpected",
            )
        )
        if not p.settled:
            result.checks.append(
                Check(
                    f"{p.spec.name}: settled before the deadline",
                    "pending == 0",
                    acc.pending,
                    False,
                    "; ".join(p.notes),
                )
            )
        if p.spec.consumer == DISPATCHER and p.spec.verify:
            bad = sum(s["verify_failures"] for s in p.per_subscriber.values())
            reasons: dict[str, int] = {}
            for s in p.per_subscriber.values():
                for k, v in s["verify_reasons"].items():
                    reasons[k] = reasons.get(k, 0) + v
            result.checks.append(
                Check(
                    f"{p.spec.name}: every token verifies",
                    "verify failures == 0",
                    bad,
                    bad == 0,
                    str(reasons) if reasons else "",
                )
            )


def workers_check(result: ScenarioResult, workers: int) -> None:
    """The dispatcher ran as asked: one process with one worker, else a supervisor and N."""
    want = 1 if workers == 1 else workers + 1
    seen = sorted({p.process["processes"] for p in result.phases if p.spec.consumer == DISPATCHER})
    result.checks.append(
        Check(
            f"dispatcher ran with --workers {workers}",
            f"{want} process(es) per phase",
            max(seen, default=0),
            seen == [want],
            f"processes seen per phase: {seen}"
            + ("" if workers == 1 else " (supervisor + workers)"),
        )
    )


def rss_growth(phase: PhaseResult, warmup: float = 60.0) -> dict[str, float]:
    """RSS growth after warm-up: last minute vs the minute after warm-up, and the trend."""
    pts = [(t, r) for t, r in phase.rss_timeline if t >= warmup]
    if len(pts) < 4:
        return {"growth_mib": 0.0, "slope_mib_per_10min": 0.0, "samples": len(pts)}
    t = np.array([x for x, _ in pts])
    r = np.array([y for _, y in pts])
    end = t.max()
    early = r[t <= warmup + 60]
    late = r[t >= end - 60]
    slope = float(np.polyfit(t, r, 1)[0]) * 600
    return {
        "growth_mib": round(float(np.median(late) - np.median(early)), 2),
        "slope_mib_per_10min": round(slope, 2),
        "samples": len(pts),
        "rss_after_warmup_mib": round(float(np.median(early)), 1),
        "rss_at_end_mib": round(float(np.median(late)), 1),
    }


def parked_deliveries(p: PhaseResult) -> float:
    """Deliveries the dispatcher parked (lane full, breaker open) during the phase."""
    return sum(
        v for k, v in p.dispatcher_counters.items() if k.startswith("dispatcher_parked_total")
    )


def most(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
