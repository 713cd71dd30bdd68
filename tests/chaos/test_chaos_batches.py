"""Batches under kill -9: a dispatcher killed while batches are open or in flight loses nothing.

Every event is owed to the batched subscriber (receipts count each member of a 2xx batch by its
event id) and to an unbatched one; after repeated kills each owed delivery must have been
received or dead-lettered.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos_endpoints import EndpointServer
from chaos_events import make_events
from chaos_ledger import Ledger, record
from chaos_process import (
    DispatcherProcess,
    await_settled,
    background,
    depths,
    kill_repeatedly,
)
from chaos_scale import pick, rng

from tests.support.harness import Publisher

pytestmark = pytest.mark.chaos

PREFETCH = 64
BATCH = 25


@pytest.mark.timeout(pick(150, 1800))
async def test_kill_9_mid_batch_loses_nothing(chaos_config, tmp_path: Path) -> None:
    n_events, kills = pick(2000, 20000), pick(3, 15)
    random = rng("kill-9-batches")
    async with EndpointServer() as server:
        server.add("bulk")
        server.add("single")
        subs = [
            {
                "id": "bulk",
                "url": server.endpoints["bulk"].url,
                "events": ["*"],
                "batch": {"max_events": BATCH, "max_wait": "200ms"},
            },
            {"id": "single", "url": server.endpoints["single"].url, "events": ["*"]},
        ]
        doc, cfg = chaos_config(subs, broker={"prefetch": PREFETCH})
        events = make_events(n_events, "kb", random)
        ledger = Ledger(f"kill -9 with batches of {BATCH}, {n_events} events")
        for event_id, _, _ in events:
            ledger.expect(event_id, ["bulk", "single"])

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
    # Each kill can repeat at most what it held: the prefetch window, to both subscribers.
    tally.holds(max_duplicates=kills * PREFETCH * 2)
