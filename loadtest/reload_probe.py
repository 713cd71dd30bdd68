"""A reload while traffic flows: append one more subscriber file, SIGHUP, probe until it holds.

Probe events name the new accounts in turn, one every 100 ms, published next to the phase's own
traffic (they are not part of its accounting: before the reload takes effect nobody is owed
them). The receivers are asked every few probes which of them reached the new accounts'
endpoints; probing stops once the last `PROBES_AFTER` probes old enough to have arrived all
did (or after `PROBE_FOR` seconds), and `accounts.reload_effect` judges every probe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.accounts import AccountLayout, Probe, reload_effect, write_files
from loadtest.generator import Generator
from loadtest.processes import DispatcherProcess, ReceiversProcess

__all__ = ["PROBES_AFTER", "PROBE_EVERY", "PROBE_FOR", "reload_and_probe"]

PROBE_EVERY = 0.1  # seconds between probes
PROBE_FOR = 30.0  # give up probing after this long
PROBES_AFTER = 10  # probes in a row that must arrive before probing stops
_SETTLE = 5.0  # then wait this long at most for the last probes


async def reload_and_probe(
    *,
    after: float,
    layout: AccountLayout,
    ports: Sequence[int],
    config_dir: Path,
    keys: Mapping[str, Any],
    dispatcher: DispatcherProcess,
    generator: Generator,
    receivers: ReceiversProcess,
    id_prefix: str,
) -> dict[str, Any]:
    """``after`` seconds into the generator's publishing: write the next file (every table
    completed with ``keys``), SIGHUP, probe. Returns `reload_effect` with its context."""
    while not generator.stats.started:
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, generator.stats.started + after - time.time()))
    name, tables = layout.extra_file(ports)
    write_files(config_dir, {name: tables}, keys)
    accounts = sorted({t["account"] for t in tables})
    sighup_at = time.time()
    dispatcher.reload()
    probes: list[Probe] = []
    arrivals: dict[str, dict[str, float]] = {}  # path -> probe id -> first arrival
    next_at = time.monotonic()
    while time.time() - sighup_at < PROBE_FOR:
        account = accounts[len(probes) % len(accounts)]
        sent = await generator.publish_one(f"{id_prefix}-probe-{len(probes) + 1}", account=account)
        if sent is not None:
            probes.append(Probe(sent.id, account, sent.published_ms / 1000))
            for n in range(layout.endpoints):
                arrivals.setdefault(f"/a/{account}/{n}", {})
        if len(probes) % 3 == 0:
            arrivals = await _arrivals(receivers, arrivals)
            # Judge only probes old enough to have arrived if the reload is done.
            old = [p for p in probes if p.published < time.time() - 1.0]
            if _tail_delivered(old, arrivals, layout.endpoints) >= PROBES_AFTER:
                break
        next_at += PROBE_EVERY
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    effect: dict[str, Any] = {}
    deadline = time.time() + _SETTLE
    while time.time() < deadline:
        arrivals = await _arrivals(receivers, arrivals)
        effect = reload_effect(sighup_at, probes, arrivals, layout.endpoints)
        if effect["delivered"] == effect["probes"]:
            break
        await asyncio.sleep(0.25)
    return {
        **effect,
        "file": name,
        "subscribers_added": len(tables),
        "accounts_added": len(accounts),
        "sighup_after_s": round(sighup_at - generator.stats.started, 3),
    }


async def _arrivals(
    receivers: ReceiversProcess, arrivals: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    found = await receivers.lookup(list(arrivals))
    out = {path: dict(seen) for path, seen in arrivals.items()}
    for path, rec in found.items():
        seen = out.setdefault(path, {})
        for event_id, t in zip(rec["ids"], rec["arrived"], strict=True):
            seen.setdefault(event_id, t)
    return out


def _tail_delivered(
    probes: Sequence[Probe], arrivals: Mapping[str, Mapping[str, float]], endpoints: int
) -> int:
    """How many of the latest probes in a row reached every endpoint of their account."""
    n = 0
    for p in sorted(probes, key=lambda p: p.published, reverse=True):
        if all(p.id in arrivals.get(f"/a/{p.account}/{i}", {}) for i in range(endpoints)):
            n += 1
        else:
            break
    return n
