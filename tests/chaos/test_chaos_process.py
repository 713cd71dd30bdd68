"""The dispatcher process dies or is told to stop while events flow: nothing is lost.

The dispatcher runs as a real process (``python -m dispatcher run --workers 1``); receivers and
the publisher live in the test process. Every published event is owed to each matching
subscriber; at the end each owed delivery must have been received or dead-lettered.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from chaos_endpoints import EndpointServer, flaky, latency
from chaos_events import make_events, owed_to
from chaos_ledger import Ledger, record
from chaos_process import (
    DispatcherProcess,
    await_settled,
    background,
    depths,
    kill_repeatedly,
)
from chaos_scale import pick, rng

from tests.support.harness import Publisher, wait_until

pytestmark = pytest.mark.chaos

SUBSCRIBERS = [
    {"id": "everything", "events": ["*"]},
    {"id": "complaints", "events": ["Message.Bounced", "Message.Complained"]},
    {"id": "flaky", "events": ["Message.*"]},  # 5 % of answers are 500: retries in the tiers
]
PREFETCH = 64


def _subscribers(server: EndpointServer) -> list[dict[str, object]]:
    return [
        {**s, "url": server.endpoints[str(s["id"])].url, "max_in_flight": 32} for s in SUBSCRIBERS
    ]


def _receipt_count(server: EndpointServer) -> int:
    return sum(len(e.receipts) for e in server.endpoints.values())


@pytest.mark.timeout(pick(150, 3600))
async def test_kill_9_repeatedly_loses_nothing(chaos_config, tmp_path: Path) -> None:
    n_events, kills = pick(3000, 30000), pick(3, 25)
    random = rng("kill-9")
    async with EndpointServer() as server:
        server.add("everything")
        server.add("complaints")
        server.add("flaky", flaky(0.05, random))
        subs = _subscribers(server)
        doc, cfg = chaos_config(subs, broker={"prefetch": PREFETCH})
        events = make_events(n_events, "k9", random)
        ledger = Ledger(f"kill -9 during {n_events} events")
        for event_id, kind, _ in events:
            ledger.expect(event_id, owed_to(kind, subs))

        async with DispatcherProcess(doc, tmp_path) as proc, Publisher(cfg) as pub:
            await proc.start()
            async with background(pub.publish_many([b for *_, b in events])) as publishing:
                await kill_repeatedly(proc, server, ledger, kills, random)
                await publishing
            tally = await await_settled(ledger, server.receipts, cfg, timeout=pick(60, 600))
            code = await proc.terminate()
            left = await depths(cfg)

    record(tally)
    assert code == 0, proc.log_tail()
    assert (left["work"], left["retry"], left["parked"]) == (0, 0, 0), left
    # Each kill can repeat at most the messages it held (the prefetch window), each to at
    # most every subscriber.
    tally.holds(max_duplicates=kills * PREFETCH * len(SUBSCRIBERS))


@pytest.mark.timeout(pick(120, 1800))
async def test_sigterm_under_load_drains_exits_0_and_loses_nothing(
    chaos_config, tmp_path: Path
) -> None:
    n_events, stops = pick(2000, 20000), pick(1, 8)
    random = rng("sigterm")
    async with EndpointServer() as server:
        # Answers take 5-40 ms, so a few hundred deliveries are in flight when SIGTERM lands.
        server.add("everything", latency(0.005, 0.04, random))
        server.add("complaints", latency(0.005, 0.04, random))
        server.add("flaky", flaky(0.05, random))
        subs = _subscribers(server)
        drain = 10.0
        doc, cfg = chaos_config(
            subs,
            broker={"prefetch": PREFETCH},
            dispatcher={"drain_timeout": f"{drain:g}s", "log_level": "info"},
        )
        events = make_events(n_events, "term", random)
        ledger = Ledger(f"SIGTERM under load, {n_events} events")
        for event_id, kind, _ in events:
            ledger.expect(event_id, owed_to(kind, subs))

        exits: list[tuple[int, float]] = []
        in_flight: list[int] = []
        async with DispatcherProcess(doc, tmp_path) as proc, Publisher(cfg) as pub:
            await proc.start()
            async with background(pub.publish_many([b for *_, b in events])) as publishing:
                for k in range(1, stops + 1):
                    target = ledger.due * (k - 1 + random.uniform(0.3, 1.0)) / (stops + 1)
                    assert await wait_until(
                        lambda t=target: _receipt_count(server) >= t, timeout=pick(60, 300)
                    ), proc.log_tail()
                    # Under load: deliveries still owed, some of them in flight right now.
                    assert ledger.outstanding(server.receipts()) > 0
                    in_flight.append(sum(e.in_flight for e in server.endpoints.values()))
                    started = time.monotonic()
                    code = await proc.terminate(timeout=drain + 15)
                    exits.append((code, time.monotonic() - started))
                    ledger.fault("SIGTERM")
                    await proc.start()
                await publishing
            tally = await await_settled(ledger, server.receipts, cfg, timeout=pick(60, 600))
            exits.append((await proc.terminate(timeout=drain + 15), 0.0))
            left = await depths(cfg)
            handed_back = sum(
                int(e.get("handed_back", 0))
                for e in proc.log_events()
                if e.get("event") == "drained"
            )

    record(tally)
    print(
        f"\nSIGTERM: requests in flight {in_flight}, drained in "
        f"{[round(took, 2) for _, took in exits[:-1]]}s, handed back {handed_back}"
    )
    assert [code for code, _ in exits] == [0] * len(exits), proc.log_tail()
    assert all(took < drain + 10 for _, took in exits), exits
    assert (left["work"], left["retry"], left["parked"]) == (0, 0, 0), left
    # A drained stop settles what it holds: only messages handed back at the drain deadline
    # may come again (to each of their subscribers).
    tally.holds(max_duplicates=handed_back * len(SUBSCRIBERS))
