"""The broker link breaks while events flow: the dispatcher reconnects, resumes, loses nothing,
and /readyz says when it cannot work.

The dispatcher (a real process) reaches RabbitMQ through a `TcpProxy` that resets, refuses and
stalls the link; the publisher and the test's own checks talk to RabbitMQ directly. A full
broker restart (``rabbitmqctl stop_app`` / ``start_app``) runs only when this run may own the
broker, and always starts the broker again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from random import Random

import pytest
from chaos_broker import broker_not_ours, broker_stopped, restart_allowed
from chaos_endpoints import EndpointServer, latency
from chaos_events import make_events, owed_to
from chaos_ledger import Ledger, record
from chaos_process import DispatcherProcess, await_settled, background, depths
from chaos_scale import pick, rng

from tests.support.harness import BROKER_HOST, BROKER_PORT, Publisher, broker_url, wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.chaos

PREFETCH = 64
SUBSCRIBERS = [
    {"id": "everything", "events": ["*"]},
    {"id": "bounces", "events": ["Message.Bounced"]},
]
# Reconnect fast (aio-pika waits 5 s by default) and notice a silent link within seconds.
LINK_OPTIONS = "?reconnect_interval=0.3&heartbeat=2"


async def _publish_paced(pub: Publisher, bodies: list[bytes], rate: float) -> None:
    """Publish at about ``rate`` events/s, so the events keep flowing while faults strike."""
    chunk = max(1, int(rate / 10))
    started = time.monotonic()
    for i in range(0, len(bodies), chunk):
        await pub.publish_many(bodies[i : i + chunk])
        ahead = (i + chunk) / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def _await_readyz(proc: DispatcherProcess, status: int, timeout: float) -> float:
    """Seconds until /readyz answers ``status``; fails the test after ``timeout``."""
    started = time.monotonic()
    ok = await _poll(lambda: proc.readyz(), status, timeout)
    assert ok, f"/readyz never answered {status} within {timeout}s:\n{proc.log_tail()}"
    return time.monotonic() - started


async def _poll(probe, want: int, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe() == want:
            return True
        await asyncio.sleep(0.05)
    return False


_FAULT_NAMES = {"cut": "link cut", "refuse": "link cut + refused", "stall": "link stalled"}


async def _inflict(
    fault: str, proc: DispatcherProcess, proxy: TcpProxy, random: Random
) -> list[str]:
    """One fault on the link; returns what /readyz did, for refusals."""
    if fault == "stall":
        # Bytes stop moving; the heartbeat (2 s) notices when the stall is long enough.
        proxy.stall = True
        await asyncio.sleep(random.uniform(*pick((0.5, 1.5), (2.0, 12.0))))
        proxy.stall = False
        return []
    if fault == "refuse":
        proxy.refuse = True
        await proxy.cut()
        took = await _await_readyz(proc, 503, 10)
        await asyncio.sleep(random.uniform(0.5, 1.5))
        proxy.refuse = False
        back = await _await_readyz(proc, 200, 20)
        return [f"503 after {took:.2f}s, 200 {back:.2f}s after restore"]
    await proxy.cut()
    return []


def _subscribers(server: EndpointServer) -> list[dict[str, object]]:
    return [{**s, "url": server.endpoints[str(s["id"])].url} for s in SUBSCRIBERS]


@pytest.mark.timeout(pick(120, 1800))
async def test_broker_link_cut_and_stalled_repeatedly(chaos_config, tmp_path: Path) -> None:
    n_events, cuts, refusals, stalls = pick(1500, 15000), pick(3, 15), pick(1, 4), pick(1, 3)
    random = rng("link")
    rate = pick(300.0, 400.0)
    readiness: list[str] = []
    async with EndpointServer() as server, TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        server.add("everything", latency(0.0, 0.01, random))
        server.add("bounces")
        subs = _subscribers(server)
        doc, cfg = chaos_config(
            subs,
            broker_url=broker_url(port=proxy.port, query=LINK_OPTIONS),
            broker={"prefetch": PREFETCH},
            dispatcher={"log_level": "info"},
        )
        events = make_events(n_events, "link", random)
        ledger = Ledger(f"broker link cut/stalled, {n_events} events")
        for event_id, kind, _ in events:
            ledger.expect(event_id, owed_to(kind, subs))

        faults = ["cut"] * (cuts - refusals) + ["refuse"] * refusals + ["stall"] * stalls
        random.shuffle(faults)
        spacing = n_events / rate / (len(faults) + 1)
        async with DispatcherProcess(doc, tmp_path) as proc, Publisher(cfg) as pub:
            await proc.start()  # first: it declares the queue the events are routed to
            bodies = [body for *_, body in events]
            async with background(_publish_paced(pub, bodies, rate)) as publishing:
                for fault in faults:
                    await asyncio.sleep(spacing * random.uniform(0.5, 1.0))
                    readiness += await _inflict(fault, proc, proxy, random)
                    ledger.fault(_FAULT_NAMES[fault])
                    await _await_readyz(proc, 200, 30)
                await publishing
            tally = await await_settled(ledger, server.receipts, cfg, timeout=pick(60, 600))
            assert await proc.readyz() == 200
            code = await proc.terminate()
            left = await depths(cfg)

    record(tally)
    print(f"\nreadiness during refused links: {readiness}")
    assert code == 0, proc.log_tail()
    assert (left["work"], left["retry"], left["parked"]) == (0, 0, 0), left
    assert proxy.connections >= 1 + cuts, "the dispatcher did not reconnect after every cut"
    tally.holds(max_duplicates=len(faults) * PREFETCH * len(SUBSCRIBERS))


@pytest.mark.timeout(pick(120, 900))
async def test_broker_restart_loses_nothing(chaos_config, tmp_path: Path) -> None:
    why_not = restart_allowed() or await broker_not_ours()
    if why_not:
        pytest.skip(why_not)
    n_events, restarts = pick(1000, 6000), pick(1, 3)
    random = rng("restart")
    async with EndpointServer() as server:
        server.add("everything", latency(0.002, 0.02, random))
        server.add("bounces")
        subs = _subscribers(server)
        doc, cfg = chaos_config(
            subs, broker_url=broker_url(query=LINK_OPTIONS), broker={"prefetch": PREFETCH}
        )
        events = make_events(n_events, "restart", random)
        ledger = Ledger(f"broker restart (stop_app/start_app), {n_events} events")
        for event_id, kind, _ in events:
            ledger.expect(event_id, owed_to(kind, subs))
        bodies = [body for *_, body in events]
        batches = [bodies[i :: restarts + 1] for i in range(restarts + 1)]

        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            for batch in batches[:-1]:
                # Publish a batch (the publisher's link dies with the broker, so one per batch),
                # let part of it through, then restart the broker under the dispatcher.
                # The goal is counted before publishing: a fast dispatcher may deliver the whole
                # batch before publish_many returns.
                goal = sum(len(e.receipts) for e in server.endpoints.values()) + len(batch) // 3
                async with Publisher(cfg) as pub:
                    await pub.publish_many(batch)
                assert await wait_until(
                    lambda g=goal: sum(len(e.receipts) for e in server.endpoints.values()) > g,
                    timeout=30,
                )
                foreign = await broker_not_ours()
                if foreign:
                    pytest.skip(f"not restarting a broker others use: {foreign}")
                async with broker_stopped():
                    ledger.fault("broker restart")
                    await _await_readyz(proc, 503, 15)
                    await asyncio.sleep(random.uniform(0.2, 1.0))
                await _await_readyz(proc, 200, 60)
            async with Publisher(cfg) as pub:
                await pub.publish_many(batches[-1])
            tally = await await_settled(ledger, server.receipts, cfg, timeout=pick(60, 300))
            code = await proc.terminate()
            left = await depths(cfg)

    record(tally)
    assert code == 0, proc.log_tail()
    assert (left["work"], left["retry"], left["parked"]) == (0, 0, 0), left
    tally.holds(max_duplicates=restarts * PREFETCH * len(SUBSCRIBERS))
