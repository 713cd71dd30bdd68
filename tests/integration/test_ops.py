"""Ops endpoints on a real broker: /metrics after a mixed run, /readyz when the link is cut."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.process.daemon import Dispatcher
from dispatcher.process.metrics import Metrics, render_metrics
from tests.support.harness import (
    BROKER_HOST,
    BROKER_PORT,
    Publisher,
    Receiver,
    ReceiverServer,
    always,
    broker_url,
    event_body,
    wait_until,
)
from tests.support.tcp_proxy import TcpProxy

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(http: aiohttp.ClientSession, disp: Dispatcher) -> Samples:
    assert disp.ops is not None
    async with http.get(f"http://127.0.0.1:{disp.ops.port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


def fail_first_attempt(status: int = 503) -> Callable[..., Any]:
    """Fails the first attempt of each event (by webhook-id), accepts the second."""
    seen: set[str] = set()

    async def behaviour(_: Receiver, request: web.Request, __: int) -> web.StreamResponse:
        wid = request.headers["webhook-id"]
        if wid in seen:
            return web.Response(status=204)
        seen.add(wid)
        return web.Response(status=status)

    return behaviour


async def test_metrics_count_a_run_with_successes_retries_and_dead_letters(
    make, receivers: ReceiverServer
) -> None:
    ok = receivers.add("ok")
    flaky = receivers.add("flaky", fail_first_attempt())
    broken = receivers.add("broken", always(500))
    gone = receivers.add("gone", always(410))
    cfg = make(
        [
            {"id": "ok", "url": ok.url, "events": ["*"]},
            {"id": "flaky", "url": flaky.url, "events": ["Message.Bounced"]},
            {"id": "broken", "url": broken.url, "events": ["Message.Bounced"]},
            {"id": "gone", "url": gone.url, "events": ["Message.Complained"]},
        ],
        retry={"schedule": ["20ms", "40ms"], "jitter": 0.0},
        breaker={"failure_threshold": 100},
    )
    async with (
        Dispatcher(cfg, depth_interval=0.1) as disp,
        Publisher(cfg) as pub,
        aiohttp.ClientSession() as http,
    ):
        for i in range(3):
            await pub.publish(event_body("Message.Bounced", n=i, event_id=f"b{i}"))
        await pub.publish(event_body("Message.Complained", n=9, event_id="c0"))
        await pub.publish(b"not json", routing_key="Message.Bounced")
        assert await wait_until(
            lambda: (
                ok.count == 4 and flaky.count == 3 and broken.attempts == 9 and gone.attempts == 1
            )
        )

        # Settled: every dead letter confirmed, nothing held, a depth sample taken since.
        for _ in range(100):
            samples = await scrape(http, disp)
            if (
                value(samples, "dispatcher_dead_letters_total", reason="attempts_exhausted") == 3
                and value(samples, "dispatcher_prefetch_in_use") == 0
                and value(samples, "dispatcher_queue_depth", queue="dead") == 5
            ):
                break
            await asyncio.sleep(0.05)

    def v(name: str, **labels: str) -> float | None:
        return value(samples, name, **labels)

    # Attempts: every HTTP request, by outcome.
    assert v("dispatcher_attempts_total", subscriber="ok", outcome="delivered") == 4
    assert v("dispatcher_attempts_total", subscriber="flaky", outcome="http_5xx") == 3
    assert v("dispatcher_attempts_total", subscriber="flaky", outcome="delivered") == 3
    assert v("dispatcher_attempts_total", subscriber="broken", outcome="http_5xx") == 9
    assert v("dispatcher_attempts_total", subscriber="gone", outcome="gone") == 1
    # Deliveries: how each (event, subscriber) ended.
    assert v("dispatcher_deliveries_total", subscriber="ok", outcome="delivered") == 4
    assert v("dispatcher_deliveries_total", subscriber="flaky", outcome="delivered") == 3
    assert (v("dispatcher_deliveries_total", subscriber="flaky", outcome="dead_lettered") or 0) == 0
    assert v("dispatcher_deliveries_total", subscriber="broken", outcome="dead_lettered") == 3
    assert (v("dispatcher_deliveries_total", subscriber="broken", outcome="delivered") or 0) == 0
    assert v("dispatcher_deliveries_total", subscriber="gone", outcome="dead_lettered") == 1
    # Retries and dead letters.
    assert v("dispatcher_retries_scheduled_total", subscriber="flaky") == 3
    assert v("dispatcher_retries_scheduled_total", subscriber="broken") == 6
    assert v("dispatcher_retries_scheduled_total", subscriber="ok") is None
    assert v("dispatcher_dead_letters_total", reason="attempts_exhausted") == 3
    assert v("dispatcher_dead_letters_total", reason="endpoint_gone") == 1
    assert v("dispatcher_dead_letters_total", reason="invalid_event") == 1
    assert v("dispatcher_events_total", kind="event") == 4
    assert v("dispatcher_events_total", kind="retry") == 9
    assert v("dispatcher_events_total", kind="invalid") == 1
    # Histograms (all subscribers together): one request time per attempt, one end-to-end
    # latency per 2xx, one mint per (JWT) attempt.
    assert v("dispatcher_request_duration_seconds_count") == 4 + 6 + 9 + 1
    assert v("dispatcher_delivery_latency_seconds_count") == 4 + 3
    assert v("dispatcher_token_mint_seconds_count") == 20
    assert v("dispatcher_request_duration_seconds_bucket", le="+Inf") == 20
    # Gauges back at rest; a breaker's series exists only once it changed.
    for sub in ("ok", "flaky", "broken", "gone"):
        assert v("dispatcher_in_flight", subscriber=sub) == 0
        assert (v("dispatcher_breaker_state", subscriber=sub) or 0) == 0
    assert v("dispatcher_prefetch_in_use") == 0
    assert v("dispatcher_prefetch_limit") == 256
    assert v("dispatcher_ready") == 1
    assert v("dispatcher_queue_depth", queue="work") == 0
    assert v("dispatcher_queue_depth", queue="retry") == 0
    assert v("dispatcher_queue_depth", queue="dead") == 5


def test_every_documented_metric_is_exported() -> None:
    m = Metrics()
    m.for_subscriber("s").started()
    m.breaker_changed("s", 0)
    names = {f.name for f in text_string_to_metric_families(render_metrics(m).decode())}
    documented = {
        "dispatcher_events",
        "dispatcher_attempts",
        "dispatcher_deliveries",
        "dispatcher_retries_scheduled",
        "dispatcher_dead_letters",
        "dispatcher_delivery_latency_seconds",
        "dispatcher_request_duration_seconds",
        "dispatcher_token_mint_seconds",
        "dispatcher_in_flight",
        "dispatcher_breaker_state",
        "dispatcher_prefetch_in_use",
        "dispatcher_prefetch_limit",
        "dispatcher_queue_depth",
        "dispatcher_ready",
    }
    assert documented <= names
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for name in documented:
        assert name in doc, f"{name} is not in docs/operations.md"


async def test_readyz_follows_the_broker_link(make, receivers: ReceiverServer) -> None:
    rec = receivers.add("r")
    cfg = make([{"id": "r", "url": rec.url}])
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        via_proxy = broker_url(port=proxy.port, query="reconnect_interval=0.5")
        proxied = dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, url=via_proxy))
        async with Dispatcher(proxied) as disp, aiohttp.ClientSession() as http:
            assert disp.ops is not None
            base = f"http://127.0.0.1:{disp.ops.port}"
            status: dict[str, int] = {}

            async def probe(path: str) -> int:
                async with http.get(base + path) as resp:
                    status[path] = resp.status
                    return resp.status

            async def becomes(code: int, within: float) -> bool:
                for _ in range(int(within / 0.1)):
                    if await probe("/readyz") == code:
                        return True
                    await asyncio.sleep(0.1)
                return False

            assert await probe("/readyz") == 200
            proxy.refuse = True
            await proxy.cut()
            assert await becomes(503, 5.0), "readyz still 200 with the broker link cut"
            assert await probe("/healthz") == 200
            samples = await scrape(http, disp)
            assert value(samples, "dispatcher_ready") == 0

            proxy.refuse = False
            assert await becomes(200, 15.0), "readyz did not come back after the link did"
            samples = await scrape(http, disp)
            assert value(samples, "dispatcher_ready") == 1

            # Consuming again, not just connected.
            async with Publisher(cfg) as pub:
                await pub.publish(event_body(event_id="after-reconnect"))
            assert await wait_until(lambda: rec.count == 1, timeout=10)
            assert rec.ids() == ["after-reconnect"]
