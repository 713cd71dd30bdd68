"""Prometheus metrics (prometheus-client), one registry per process.

Under ``dispatcher run --workers N`` each worker writes to ``PROMETHEUS_MULTIPROC_DIR`` and the
supervisor serves the merged view; the names and labels are the same either way.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["Metrics", "render_metrics"]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800,
    3600, 21600, 86400,
)
_MINT_BUCKETS = (20e-6, 35e-6, 50e-6, 75e-6, 100e-6, 200e-6, 500e-6, 1e-3, 5e-3)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """Every metric the dispatcher exports; created once per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = reg
        live = "livesum" if _multiprocess() else "all"
        self.deliveries = Counter(
            "dispatcher_deliveries_total",
            "Delivery attempts by subscriber and outcome (delivered, gone, blocked, http_5xx, "
            "timeout, connection, redirect, ...).",
            ["subscriber", "outcome"], registry=reg)
        self.delivered = Counter(
            "dispatcher_delivered_total", "Events delivered (2xx), by subscriber.",
            ["subscriber"], registry=reg)
        self.events = Counter(
            "dispatcher_events_total", "Messages consumed from the work queue, by kind "
            "(event, retry, invalid).", ["kind"], registry=reg)
        self.retries = Counter(
            "dispatcher_retries_scheduled_total",
            "Deliveries handed to the durable retry path, by subscriber and why "
            "(failed, breaker_open, lane_full, rate_limited).",
            ["subscriber", "why"], registry=reg)
        self.dead_letters = Counter(
            "dispatcher_dead_letters_total", "Dead letters written, by reason.",
            ["reason"], registry=reg)
        self.end_to_end = Histogram(
            "dispatcher_delivery_latency_seconds",
            "From the event's publish time (when known) to the subscriber's 2xx.",
            ["subscriber"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.request_time = Histogram(
            "dispatcher_request_duration_seconds", "HTTP request time of one attempt.",
            ["subscriber"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.mint_time = Histogram(
            "dispatcher_token_mint_seconds", "Time to mint one agent token.",
            buckets=_MINT_BUCKETS, registry=reg)
        self.in_flight = Gauge(
            "dispatcher_in_flight", "Requests in flight per subscriber.", ["subscriber"],
            registry=reg, multiprocess_mode=live)
        self.breaker_state = Gauge(
            "dispatcher_breaker_state", "Circuit breaker per subscriber: 0 closed, 1 half-open, "
            "2 open.", ["subscriber"], registry=reg, multiprocess_mode="livemax")
        self.prefetch_used = Gauge(
            "dispatcher_prefetch_in_use", "Unacknowledged messages held by the consumer.",
            registry=reg, multiprocess_mode=live)
        self.prefetch_limit = Gauge(
            "dispatcher_prefetch_limit", "The consumer's prefetch window.", registry=reg,
            multiprocess_mode="livemax")
        self.queue_depth = Gauge(
            "dispatcher_queue_depth", "Messages ready in the work, retry and dead-letter queues.",
            ["queue"], registry=reg, multiprocess_mode="livemax")
        self.ready = Gauge(
            "dispatcher_ready", "1 while connected to the broker and consuming.", registry=reg,
            multiprocess_mode=live)


def render_metrics(metrics: Metrics | None) -> bytes:
    """The text exposition: the merged multiprocess view when workers write to a shared dir."""
    if _multiprocess():
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
        return generate_latest(reg)
    assert metrics is not None
    return generate_latest(metrics.registry)
