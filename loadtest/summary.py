"""A phase's summary: what the runner gathered in, a `PhaseResult` out. No I/O.

`runner.py` starts the processes, publishes and collects; everything it then works out from
what it collected is here: the records of account endpoints in subscriber order, whether a
phase received all it is owed (or may heal its failing endpoints), the figures of the
`PhaseResult` and the line printed when a phase ends. The targets these figures are checked
against are in `targets.py`.

Throughput and latency come from the receivers' records, CPU and memory from the samplers
(over the window from the first to the last receipt), accounting from what was published, what
arrived, the dead letters and what was still pending. With more than `GROUP_ABOVE` subscribers
(the accounts scenario) the per-subscriber table is summed per endpoint slot (``*.0``,
``*.1``: every account's first and second endpoint) instead of listing each one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtest.accounting import DeadRecord, SubscriberSpec, account
from loadtest.generator import Published, PublishStats
from loadtest.monitor import MiB, TreeSampler
from loadtest.phases import DISPATCHER, PhaseResult, PhaseSpec
from loadtest.stats import latency, throughput, timeline

__all__ = [
    "GROUP_ABOVE",
    "PhaseData",
    "all_received",
    "empty_record",
    "heal_due",
    "records_by_path",
    "result_line",
    "summarise",
]

GROUP_ABOVE = 16


def empty_record() -> dict[str, Any]:
    """What an endpoint that received nothing reports (the receivers list only paths they saw)."""
    return {
        "ids": [],
        "published": [],
        "arrived": [],
        "received": 0,
        "unique": 0,
        "duplicates": 0,
        "failures": 0,
        "verify_failures": 0,
        "reasons": {},
        "behaviour": {},
        "requests": 0,
        "batched": 0,
    }


@dataclass
class PhaseData:
    """Everything a phase gathered, for `summarise`."""

    spec: PhaseSpec
    queue: str
    subscribers: Sequence[SubscriberSpec]
    published: Sequence[Published]
    records: Sequence[dict[str, Any]]  # per subscriber, in the order of `subscribers`
    dead: Sequence[DeadRecord]
    pending: Sequence[DeadRecord]
    settled: bool
    t0: float
    consumer_started: float
    ended: float
    sampler: TreeSampler
    others: dict[str, TreeSampler]
    publish_stats: PublishStats
    gc: dict[str, Any] | None = None
    receivers_gc: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None  # profiling.summarize() plus "raw" and "rate"
    healed_at: float | None = None
    notes: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    startup_s: float | None = None
    metrics_bytes: dict[str, int | None] = field(default_factory=dict)
    broker: list[dict[str, Any]] = field(default_factory=list)
    reload: dict[str, Any] | None = None
    account_endpoints: dict[str, Any] | None = None


def records_by_path(
    paths: Mapping[str, dict[str, Any]], urls: Sequence[str]
) -> list[dict[str, Any]]:
    """The receivers' records of account endpoints, in the order of the subscribers' urls;
    an endpoint nothing reached gets an `empty_record()`."""
    records = (paths.get(urlsplit(url).path) for url in urls)
    return [empty_record() if r is None else r for r in records]


def all_received(unique: Sequence[int], owed: Sequence[int]) -> bool:
    """Every subscriber (or the account endpoints summed) received what it is owed."""
    return all(u >= o for u, o in zip(unique, owed, strict=True))


def heal_due(unique: Sequence[int], owed: Sequence[int], heal: Sequence[int]) -> bool:
    """Time to heal the endpoints in ``heal``: every other endpoint received its share."""
    return bool(heal) and all(unique[i] >= owed[i] for i in range(len(owed)) if i not in heal)


def result_line(result: PhaseResult) -> str:
    """The one line printed when a phase ends."""
    thr, lat, proc = result.throughput, result.latency_ms, result.process
    return (
        f"{thr['deliveries']} deliveries, {thr['deliveries_per_s']:.0f}/s; "
        f"p50 {lat['p50'] or 0:.1f} ms p99 {lat['p99'] or 0:.1f} ms; "
        f"lost {result.accounting.lost}; "
        f"cpu {proc['cpu_percent']}% peak rss {proc['peak_rss_mib']} MiB"
    )


def _group(sub_id: str, many: bool) -> str:
    return f"*.{sub_id.rsplit('.', 1)[-1]}" if many else sub_id


def per_subscriber(
    subs: Sequence[SubscriberSpec], records: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    many = len(subs) > GROUP_ABOVE
    groups: dict[str, list[dict[str, Any]]] = {}
    for sub, r in zip(subs, records, strict=True):
        groups.setdefault(_group(sub.id, many), []).append(r)
    out = {}
    for key, rs in groups.items():
        arrived = [a for r in rs for a in r["arrived"]]
        published = [p for r in rs for p in r["published"]]
        reasons: dict[str, int] = {}
        for r in rs:
            for reason, n in r.get("reasons", {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        row = {
            "received": sum(r["received"] for r in rs),
            "unique": sum(r["unique"] for r in rs),
            "duplicates": sum(r["duplicates"] for r in rs),
            "failed_answers": sum(r["failures"] for r in rs),
            "verify_failures": sum(r["verify_failures"] for r in rs),
            "verify_reasons": reasons,
            "requests": sum(r.get("requests", 0) for r in rs),
            "batched": sum(r.get("batched", 0) for r in rs),
            "deliveries_per_s": round(throughput(arrived).per_second, 1),
            "behaviour": rs[0]["behaviour"],
            "latency_ms": latency(published, arrived).as_dict(),
        }
        if many:
            row["subscribers"] = len(rs)
            row["subscribers_reached"] = sum(1 for r in rs if r["received"])
        out[key] = row
    return out


def process_figures(
    spec: PhaseSpec, sampler: TreeSampler, w0: float, w1: float, deliveries: int
) -> dict[str, Any]:
    cpu = sampler.cpu_between(w0, w1)
    span = max(w1 - w0, 1e-9)
    by_pid = sampler.peak_rss_by_pid()
    # One worker runs in the dispatcher process itself; N workers under a supervisor.
    workers = {
        p: r
        for p, r in by_pid.items()
        if spec.consumer != DISPATCHER or spec.workers == 1 or p != sampler.pid
    }
    return {
        "kind": spec.consumer,
        "workers": spec.workers,
        "processes": sampler.max_processes,
        "cpu_seconds_window": round(cpu, 3),
        "cpu_percent": round(100 * cpu / span, 1),
        "cpu_ms_per_1k_deliveries": round(1e6 * cpu / deliveries, 1) if deliveries else None,
        "system_cpu_share": round(sampler.cpu_between(w0, w1, system=True) / cpu, 3)
        if cpu
        else None,
        "cpu_seconds_total": round(sampler.cpu_total, 3),
        "peak_rss_mib": round(sampler.peak_rss / MiB, 1),
        "peak_rss_sampled_mib": round(sampler.peak_rss_sampled / MiB, 1),
        "peak_rss_per_worker_mib": round(max(workers.values(), default=0) / MiB, 1),
        "peak_rss_by_pid_mib": {str(p): round(r / MiB, 1) for p, r in sorted(by_pid.items())},
    }


def summarise(d: PhaseData) -> PhaseResult:
    spec = d.spec
    records = list(d.records[: len(d.subscribers)])
    acc = account(
        d.published, d.subscribers, [r["ids"] for r in records], d.dead, pending=d.pending
    )
    all_pub = [p for r in records for p in r["published"]]
    all_arr = [a for r in records for a in r["arrived"]]
    thr = throughput(all_arr)
    focus = spec.focus or tuple(range(len(records)))
    fthr = throughput([a for i in focus for a in records[i]["arrived"]])
    lat = latency(all_pub, all_arr)
    w0, w1 = (thr.first, thr.last) if thr.window > 0 else (d.consumer_started, d.ended)
    process = process_figures(spec, d.sampler, w0, w1, thr.deliveries)
    process["gc"] = d.gc
    process["receivers_gc"] = d.receivers_gc
    span = max(w1 - w0, 1e-9)
    others = {name: round(100 * s.cpu_between(w0, w1) / span, 1) for name, s in d.others.items()}
    ours = sum(v for k, v in others.items() if k != "whole machine")
    others["not this test"] = round(
        max(0.0, others.get("whole machine", 0.0) - ours - process["cpu_percent"]), 1
    )
    gen = d.publish_stats
    publish = {
        "confirmed": gen.confirmed,
        "refused": gen.refused,
        "events_per_s": round(gen.rate, 1),
        "seconds": round(gen.finished - gen.started, 3),
        "target_rate": spec.rate,
    }
    profile = None
    if d.profile is not None:
        profile = {k: v for k, v in d.profile.items() if k != "rate"}
        if thr.deliveries and d.profile.get("rate"):
            # Busy samples per delivery, in ms of wall time at the sampling rate.
            profile["busy_ms_per_1k_deliveries"] = round(
                1e6 * d.profile["samples"] / d.profile["rate"] / thr.deliveries, 1
            )
    return PhaseResult(
        spec=spec,
        queue=d.queue,
        t0=d.t0,
        consumer_started=d.consumer_started,
        publish=publish,
        throughput=thr.as_dict(),
        focus_throughput=fthr.as_dict(),
        latency_ms=lat.as_dict(),
        per_subscriber=per_subscriber(d.subscribers, records),
        accounting=acc,
        process=process,
        others_cpu_percent=others,
        timeline=timeline(all_pub, all_arr, d.t0),
        rss_timeline=[(s.t - d.t0, s.rss / MiB) for s in d.sampler.samples],
        settled=d.settled,
        healed_at=d.healed_at,
        profile=profile,
        notes=d.notes,
        dispatcher_counters=d.counters,
        startup_s=d.startup_s,
        metrics_bytes=d.metrics_bytes,
        broker=d.broker,
        reload=d.reload,
        account_endpoints=d.account_endpoints,
    )
