"""Prometheus metrics (prometheus-client): what the dispatcher exports, and how it is rendered.

One `Metrics` per process, in its own registry. Under ``dispatcher run --workers N`` the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts the workers, so every worker's
values live in memory-mapped files there; the supervisor serves the merged view
(`render_metrics(None)`), with the same names and labels as a single process. How each gauge
merges across workers is its ``multiprocess_mode``:

    gauge                        mode             merged value
    dispatcher_in_flight         livesum          requests in flight, all live workers
    dispatcher_prefetch_in_use   livesum          unacked messages held, all live workers
    dispatcher_prefetch_limit    livesum          total prefetch window of the live workers
    dispatcher_ready             livesum          workers connected and consuming
    dispatcher_breaker_state     livemax          the worst breaker of any live worker
    dispatcher_queue_depth       livemostrecent   the newest sample of any live worker
    dispatcher_cluster_members   livemax          processes on the queue, the largest view
    dispatcher_cluster_holding   livesum          workers holding their shares of the limits

``live*`` modes drop a worker's values once the supervisor calls `mark_process_dead` for it.
Counters and histograms of a dead worker stay in the sum, so totals never go backwards when a
worker is restarted.

A provider runs tens of thousands of subscribers, so per-subscriber series exist only where they
carry information: a subscriber's series appear with its first delivery attempt (or its first
breaker change) and are removed once it has been idle for ``IDLE_SERIES`` with a closed breaker,
or when a reload removes it. Histograms carry no subscriber label. Before any traffic the
exposition holds no per-subscriber series at all, whatever the subscriber count.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from dispatcher.clock import SYSTEM_CLOCK, Clock

__all__ = ["IDLE_SERIES", "MULTIPROC_ENV", "Metrics", "live_gauge_sum", "render_metrics"]

IDLE_SERIES = 900.0  # seconds without an attempt before a subscriber's series are removed

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    1800,
    3600,
    21600,
    86400,
)
_MINT_BUCKETS = (20e-6, 35e-6, 50e-6, 75e-6, 100e-6, 200e-6, 500e-6, 1e-3, 5e-3)


# What a worker exports: (type, attribute, name, help, labels, and a gauge's multiprocess mode
# or a histogram's buckets). The types are what the attributes below say.
_METRICS: tuple[tuple[type, str, str, str, tuple[str, ...], Any], ...] = (
    (
        Counter,
        "events",
        "dispatcher_events_total",
        "Messages consumed, by kind (event, retry, parked, invalid).",
        ("kind",),
        None,
    ),
    (
        Counter,
        "attempts",
        "dispatcher_attempts_total",
        (
            "HTTP delivery attempts, by subscriber and outcome (delivered, gone, blocked, "
            "http_3xx, http_4xx, http_5xx, timeout, connection, dns, protocol)."
        ),
        ("subscriber", "outcome"),
        None,
    ),
    (
        Counter,
        "deliveries",
        "dispatcher_deliveries_total",
        (
            "Deliveries (one event to one subscriber) that ended, by subscriber and outcome "
            "(delivered, dead_lettered)."
        ),
        ("subscriber", "outcome"),
        None,
    ),
    (
        Counter,
        "retries",
        "dispatcher_retries_scheduled_total",
        "Failed attempts whose retry was scheduled in the delay tiers, by subscriber.",
        ("subscriber",),
        None,
    ),
    (
        Counter,
        "parked",
        "dispatcher_parked_total",
        (
            "Deliveries parked, not attempted, in the subscriber's own parking queue, by "
            "subscriber and why (breaker_open, lane_full, rate_limited)."
        ),
        ("subscriber", "why"),
        None,
    ),
    (
        Counter,
        "dead_letters",
        "dispatcher_dead_letters_total",
        (
            "Dead letters written, by reason (attempts_exhausted, max_age_exceeded, "
            "endpoint_gone, blocked_destination, subscriber_removed, invalid_event)."
        ),
        ("reason",),
        None,
    ),
    (
        Histogram,
        "end_to_end",
        "dispatcher_delivery_latency_seconds",
        ("From the event's publish time (when known) to the subscriber's 2xx, all subscribers."),
        (),
        _LATENCY_BUCKETS,
    ),
    (
        Histogram,
        "request_time",
        "dispatcher_request_duration_seconds",
        "HTTP request time of one attempt, whatever its outcome, all subscribers.",
        (),
        _LATENCY_BUCKETS,
    ),
    (
        Histogram,
        "confirm_time",
        "dispatcher_broker_confirm_seconds",
        (
            "From publishing a retry, parked delivery or dead letter to the broker's "
            "confirm, by kind (retry, park, dead_letter)."
        ),
        ("kind",),
        _LATENCY_BUCKETS,
    ),
    (
        Histogram,
        "mint_time",
        "dispatcher_token_mint_seconds",
        "Time to mint one agent token.",
        (),
        _MINT_BUCKETS,
    ),
    (
        Gauge,
        "in_flight",
        "dispatcher_in_flight",
        "HTTP requests in flight, by subscriber.",
        ("subscriber",),
        "livesum",
    ),
    (
        Gauge,
        "breaker_state",
        "dispatcher_breaker_state",
        "Circuit breaker per subscriber: 0 closed, 1 half-open, 2 open.",
        ("subscriber",),
        "livemax",
    ),
    (
        Gauge,
        "prefetch_used",
        "dispatcher_prefetch_in_use",
        ("Messages taken from the work and parking queues and not yet acked or handed back."),
        (),
        "livesum",
    ),
    (
        Gauge,
        "prefetch_limit",
        "dispatcher_prefetch_limit",
        "The consumer's prefetch window ([broker].prefetch).",
        (),
        "livesum",
    ),
    (
        Gauge,
        "queue_depth",
        "dispatcher_queue_depth",
        (
            "Messages ready in the work queue, the retry tiers (summed), the parking queues "
            "(summed) and the dead-letter queue, as last sampled."
        ),
        ("queue",),
        "livemostrecent",
    ),
    (
        Gauge,
        "ready",
        "dispatcher_ready",
        "1 while connected to the broker and consuming (summed over workers).",
        (),
        "livesum",
    ),
    (
        Gauge,
        "cluster_members",
        "dispatcher_cluster_members",
        (
            "Dispatcher processes (workers of every instance) on this queue, as this one "
            "sees them; the subscribers' limits are split between them."
        ),
        (),
        "livemax",
    ),
    (
        Gauge,
        "cluster_holding",
        "dispatcher_cluster_holding",
        (
            "1 while this process holds its shares of the subscribers' limits; 0 while it "
            "joins or is cut off from the others (summed over workers)."
        ),
        (),
        "livesum",
    ),
    (
        Counter,
        "cluster_view_changes",
        "dispatcher_cluster_view_changes_total",
        "Times this process's view of the cluster changed (a process joined or left).",
        (),
        None,
    ),
    (
        Counter,
        "cluster_messages",
        "dispatcher_cluster_messages_total",
        (
            "Control messages sent, by kind (heartbeat, bye, state, parked, and the "
            "breaker's failed, recovered, opened, closed)."
        ),
        ("kind",),
        None,
    ),
)


def _multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """Every metric a worker exports; created once per process (or per `Dispatcher` in tests)."""

    events: Counter
    attempts: Counter
    deliveries: Counter
    retries: Counter
    parked: Counter
    dead_letters: Counter
    end_to_end: Histogram
    request_time: Histogram
    confirm_time: Histogram
    mint_time: Histogram
    in_flight: Gauge
    breaker_state: Gauge
    prefetch_used: Gauge
    prefetch_limit: Gauge
    queue_depth: Gauge
    ready: Gauge
    cluster_members: Gauge
    cluster_holding: Gauge
    cluster_view_changes: Counter
    cluster_messages: Counter

    def __init__(
        self, registry: CollectorRegistry | None = None, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        reg = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = reg
        self.monotonic = clock.monotonic  # when a subscriber's series were last used
        self._per_subscriber: dict[str, SubscriberMetrics] = {}
        for kind, attr, name, doc, labels, extra in _METRICS:
            if kind is Counter:
                metric: Counter | Gauge | Histogram = Counter(name, doc, labels, registry=reg)
            elif kind is Gauge:
                metric = Gauge(name, doc, labels, registry=reg, multiprocess_mode=extra)
            else:
                metric = Histogram(name, doc, labels, registry=reg, buckets=extra)
            setattr(self, attr, metric)

    def observe_confirm(self, kind: str, seconds: float) -> None:
        self.confirm_time.labels(kind).observe(seconds)

    def for_subscriber(self, sub_id: str) -> SubscriberMetrics:
        """One subscriber's labelled children, resolved once (labels() is not free)."""
        found = self._per_subscriber.get(sub_id)
        if found is None:
            found = self._per_subscriber[sub_id] = SubscriberMetrics(self, sub_id)
        return found

    def breaker_changed(self, sub_id: str, state: int) -> None:
        m = self.for_subscriber(sub_id)
        m.breaker_now = state
        m.breaker.set(state)

    def retain_subscribers(self, ids: Iterable[str]) -> None:
        """A reload: remove the series of subscribers that are gone."""
        keep = set(ids)
        for sub_id in [s for s in self._per_subscriber if s not in keep]:
            self._remove(sub_id)

    def prune_idle(self, now: float | None = None, idle: float = IDLE_SERIES) -> int:
        """Remove the series of subscribers idle for ``idle`` seconds with a closed breaker."""
        now = self.monotonic() if now is None else now
        gone = [
            sub_id
            for sub_id, m in self._per_subscriber.items()
            if now - m.last_used >= idle and m.in_flight_now == 0 and m.breaker_now == 0
        ]
        for sub_id in gone:
            self._remove(sub_id)
        return len(gone)

    def _remove(self, sub_id: str) -> None:
        self._per_subscriber.pop(sub_id, None)
        for metric in (
            self.attempts,
            self.deliveries,
            self.retries,
            self.parked,
            self.in_flight,
            self.breaker_state,
        ):
            for labels in [k for k in metric._metrics if k[0] == sub_id]:
                metric.remove(*labels)


class SubscriberMetrics:
    """The hot-path children of one subscriber's series."""

    __slots__ = (
        "_attempts",
        "_breaker",
        "_metrics",
        "_sub",
        "breaker_now",
        "delivered",
        "end_to_end",
        "in_flight",
        "in_flight_now",
        "last_used",
        "request_time",
    )

    def __init__(self, metrics: Metrics, sub_id: str) -> None:
        self._metrics, self._sub = metrics, sub_id
        self.in_flight = metrics.in_flight.labels(sub_id)
        self.request_time = metrics.request_time
        self.end_to_end = metrics.end_to_end
        self.delivered = metrics.deliveries.labels(sub_id, "delivered")
        self._attempts: dict[str, Counter] = {}
        self._breaker: Gauge | None = None
        self.last_used = metrics.monotonic()
        self.in_flight_now = 0  # the one count of requests in flight; the gauge shows it
        self.breaker_now = 0

    @property
    def breaker(self) -> Gauge:
        if self._breaker is None:
            self._breaker = self._metrics.breaker_state.labels(self._sub)
        return self._breaker

    def started(self) -> None:
        self.in_flight_now += 1
        self.in_flight.set(self.in_flight_now)
        self.last_used = self._metrics.monotonic()

    def finished(self) -> None:
        self.in_flight_now -= 1
        self.in_flight.set(self.in_flight_now)

    def attempt(self, outcome: str) -> Counter:
        child = self._attempts.get(outcome)
        if child is None:
            child = self._attempts[outcome] = self._metrics.attempts.labels(self._sub, outcome)
        return child


def render_metrics(metrics: Metrics | None, *extra: Collector) -> bytes:
    """The text exposition: the merged view of every worker when ``PROMETHEUS_MULTIPROC_DIR``
    is set (``metrics`` is then ignored), else ``metrics``' own registry."""
    path = _multiprocess_dir()
    if path:
        reg = CollectorRegistry()
        reg.register(_WorkerValues(path))
    else:
        assert metrics is not None, "render_metrics(None) needs PROMETHEUS_MULTIPROC_DIR"
        reg = metrics.registry
        if extra:
            merged = CollectorRegistry()
            merged.register(reg)
            reg = merged
    for collector in extra:
        reg.register(collector)
    return generate_latest(reg)


def live_gauge_sum(name: str) -> float:
    """Sum of a ``livesum`` gauge over the live workers (multiprocess mode only)."""
    path = _multiprocess_dir()
    if not path:
        return 0.0
    files = _worker_files(path, "gauge_livesum_*.db")
    total = 0.0
    for family in multiprocess.MultiProcessCollector.merge(files, accumulate=False):  # type: ignore[no-untyped-call]
        if family.name == name:
            total += sum(s.value for s in family.samples)
    return total


# A worker's value file holds a 4-byte length first; prometheus_client creates it empty and
# sizes it a moment later, and reading it in that moment fails (struct.error).
_FILE_HEADER = 8


def _worker_files(path: str, pattern: str = "*.db") -> list[str]:
    """The workers' value files, less any a worker is creating right now (still empty) or
    a dead worker's that was just removed."""
    files = []
    for name in glob.glob(os.path.join(path, pattern)):
        try:
            if os.path.getsize(name) >= _FILE_HEADER:
                files.append(name)
        except FileNotFoundError:
            continue
    return files


class _WorkerValues(Collector):
    """Every worker's values, merged (prometheus_client's multiprocess collector, reading only
    the files that are ready to be read)."""

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            _worker_files(self._path), accumulate=True
        )
        return merged
