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
from chaos_process import DispatcherProcess, await_settled, background, depths
from chaos_scale import pick, rng
from harness import Publisher, wait_until

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
            {"id": "bulk", "url": server.endpoints["bulk"].url, "events": ["*"],
             "batch": {"max_events": BATCH, "max_wait": "200ms"}},
            {"id": "single", "url": server.endpoints["single"].url, "events": ["*"]},
        ]
        doc, cfg = chaos_config(subs, broker={"prefetch": PREFETCH})
        events = make_events(n_events, "kb", random)
        ledger = Ledger(f"kill -9 with batches of {BATCH}, {n_events} events")
        for event_id, _, _ in events:
            ledger.expect(event_id, ["bulk", "single"])

        def received() -> int:
            return sum(len(e.receipts) for e in server.endpoints.values())

        async with DispatcherProcess(doc, tmp_path) as proc, Publisher(cfg) as pub:
            await proc.start()
            async with background(pub.publish_many([b for *_, b in events])) as publishing:
                for k in range(1, kills + 1):
                    target = ledger.due * (k - 1 + random.uniform(0.3, 1.0)) / (kills + 1)
                    assert await wait_until(lambda t=target: received() >= t,
                                            timeout=pick(60, 300)), proc.log_tail()
                    await proc.kill()
                    ledger.fault("kill -9")
                    await proc.start()
                await publishing
            tally = await await_settled(ledger, server.receipts, cfg, timeout=pick(60, 600))
            code = await proc.terminate()
            left = await depths(cfg)

    record(tally)
    assert code == 0, proc.log_tail()
    assert (left["work"], left["retry"], left["parked"]) == (0, 0, 0), left
    # Each kill can repeat at most what it held: the prefetch window, to both subscribers.
    tally.holds(max_duplicates=kills * PREFETCH * 2)
