"""What a phase is asked to do (`PhaseSpec`) and what it measured (`PhaseResult`): plain data.

`runner.py` runs a phase, `summary.py` turns what it gathered into a `PhaseResult`,
`scenarios.py` decides which phases a run is made of and `targets.py` checks the results
against the targets; they all share these two records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.accounting import Accounting, SubscriberSpec
from loadtest.accounts import AccountLayout

__all__ = ["BASELINE", "DISPATCHER", "PhaseResult", "PhaseSpec"]

DISPATCHER = "dispatcher"
BASELINE = "baseline"


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    consumer: str = DISPATCHER  # or BASELINE
    events: int = 10_000
    subscribers: int = 1
    patterns: tuple[tuple[str, ...], ...] = ()  # per subscriber; default "*"
    behaviours: tuple[dict[str, Any], ...] = ()  # per subscriber (see receivers.Behaviour)
    rate: float | None = None  # events/s; None = as fast as confirms allow
    duration: float | None = None  # with a rate: publish for this long instead of `events`
    preload: bool = False  # publish everything before the consumer starts
    verify: bool = True  # receivers verify agent tokens (dispatcher phases only)
    workers: int = 1
    prefetch: int = 256
    max_in_flight: int = 64
    sub_timeout: str = "10s"
    retry_schedule: tuple[str, ...] = ("200ms", "500ms", "1s", "2s", "5s")
    invalid_fraction: float = 0.0
    heal: tuple[int, ...] = ()  # endpoints healed once every other endpoint got its share
    focus: tuple[int, ...] = ()  # endpoints whose throughput is the headline (default all)
    sample_interval: float = 0.5
    profile: bool = False
    settle_timeout: float = 120.0  # after publishing: give up waiting after this long
    seed: int = 1
    source: str | None = None  # run the dispatcher from this checkout instead (A/B runs)
    batch: dict[str, Any] | None = None  # every subscriber's `batch` table (contract section 8)
    # Subscribers by account in included files, on path endpoints (`subscribers` is then
    # ignored): see accounts.py.
    accounts: AccountLayout | None = None
    reload_after: float | None = None  # seconds into publishing: append a file, SIGHUP, probe
    census: bool = False  # broker queues/consumers and /metrics size at ready and at the end

    def subscriber_specs(self) -> list[SubscriberSpec]:
        return [
            SubscriberSpec(f"sub{i}", self.patterns[i] if i < len(self.patterns) else ("*",))
            for i in range(self.subscribers)
        ]

    @property
    def subscriber_count(self) -> int:
        return self.accounts.subscribers if self.accounts else self.subscribers

    @property
    def event_count(self) -> int:
        if self.rate and self.duration:
            return int(self.rate * self.duration)
        return self.events


@dataclass
class PhaseResult:
    spec: PhaseSpec
    queue: str
    t0: float  # unix seconds when the phase started publishing or consuming, whichever first
    consumer_started: float
    publish: dict[str, Any]
    throughput: dict[str, Any]
    focus_throughput: dict[str, Any]
    latency_ms: dict[str, Any]
    per_subscriber: dict[str, dict[str, Any]]
    accounting: Accounting
    process: dict[str, Any]
    others_cpu_percent: dict[str, float]
    timeline: list[dict[str, Any]]
    rss_timeline: list[tuple[float, float]]
    settled: bool
    healed_at: float | None = None
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    dispatcher_counters: dict[str, float] = field(default_factory=dict)
    startup_s: float | None = None  # dispatcher: process start until /readyz answered 200
    metrics_bytes: dict[str, int | None] = field(default_factory=dict)  # "ready", "end"
    broker: list[dict[str, Any]] = field(default_factory=list)  # Census.as_dict() samples
    reload: dict[str, Any] | None = None  # accounts.reload_effect() and the SIGHUP's context
    account_endpoints: dict[str, Any] | None = None  # the receivers' path endpoints, summed

    @property
    def deliveries_per_s(self) -> float:
        return float(self.throughput.get("deliveries_per_s") or 0.0)

    @property
    def focus_per_s(self) -> float:
        return float(self.focus_throughput.get("deliveries_per_s") or 0.0)

    def as_dict(self) -> dict[str, Any]:
        spec = asdict(self.spec)
        spec["subscribers"] = self.spec.subscriber_count
        return {
            "name": self.spec.name,
            "consumer": self.spec.consumer,
            "spec": spec,
            "queue": self.queue,
            "publish": self.publish,
            "throughput": self.throughput,
            "focus_throughput": self.focus_throughput,
            "latency_ms": self.latency_ms,
            "per_subscriber": self.per_subscriber,
            "accounting": self.accounting.as_dict(),
            "process": self.process,
            "others_cpu_percent": self.others_cpu_percent,
            "settled": self.settled,
            "healed_after_s": (
                None if self.healed_at is None else round(self.healed_at - self.t0, 3)
            ),
            "profile": self.profile,
            "notes": self.notes,
            "dispatcher_counters": self.dispatcher_counters,
            "startup_s": None if self.startup_s is None else round(self.startup_s, 3),
            "metrics_bytes": self.metrics_bytes,
            "broker": self.broker,
            "reload": self.reload,
            "account_endpoints": self.account_endpoints,
            "timeline": self.timeline,
            "rss_timeline_mib": [[round(t, 2), round(r, 2)] for t, r in self.rss_timeline],
        }
