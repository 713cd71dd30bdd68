"""The load test's smoke scenario end to end, and its accounting rules as a table.

The smoke run starts the real receivers, the bare baseline and the dispatcher as processes
against the real broker: a few hundred events, with retries (a receiver failing 10%), dead
letters (410s and invalid events) and token verification. Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.accounting import DeadRecord, SubscriberSpec, account
from loadtest.generator import Published

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_smoke_scenario_accounts_for_every_event(tmp_path: Path) -> None:
    report, png = tmp_path / "smoke.json", tmp_path / "smoke.png"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "run", "--scenario", "smoke", "--quiet",
         "--json", str(report), "--plot", str(png), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert png.stat().st_size > 10_000

    assert doc["ok"] is True
    assert doc["lost"] == 0
    for key in ("scenario", "command", "machine", "checks", "phases", "duplicates"):
        assert key in doc
    assert [p["consumer"] for p in doc["phases"]] == ["baseline", "dispatcher"]
    for phase in doc["phases"]:
        assert phase["settled"] is True
        acc = phase["accounting"]
        assert acc["lost"] == 0
        assert acc["published"] > 0
        assert acc["delivered"] + acc["dead_lettered"] == (
            acc["expected_deliveries"] + acc["invalid_published"])
        assert set(phase["latency_ms"]) >= {"p50", "p90", "p99", "max", "count"}
        assert phase["throughput"]["deliveries_per_s"] > 0
        assert set(phase["process"]) >= {"cpu_percent", "cpu_seconds_window", "peak_rss_mib",
                                         "cpu_ms_per_1k_deliveries"}
        assert phase["process"]["peak_rss_mib"] > 0
        assert phase["timeline"]
        assert phase["per_subscriber"]
        for sub in phase["per_subscriber"].values():
            assert {"received", "unique", "duplicates", "deliveries_per_s"} <= set(sub)
    dispatcher = doc["phases"][1]
    assert dispatcher["accounting"]["dead_lettered"] > 0  # 410s and invalid events
    reasons = set(dispatcher["accounting"]["dead_letter_reasons"])
    assert {"invalid_event", "endpoint_gone"} <= reasons
    assert sum(s["verify_failures"] for s in dispatcher["per_subscriber"].values()) == 0
    assert all(c["ok"] is not False for c in doc["checks"]), doc["checks"]


def _pub(event_id: str, event_type: str = "Message.Bounced", valid: bool = True) -> Published:
    return Published(event_id, event_type, 0.0, valid)


SUBS = [SubscriberSpec("all", ("*",)), SubscriberSpec("bounces", ("Message.Bounced",))]


@pytest.mark.parametrize(
    ("published", "received", "dead", "expect"),
    [
        # Delivered everywhere it is owed; a Delivered event is owed to "all" only.
        ([_pub("a"), _pub("b", "Message.Delivered")], [["a", "b"], ["a"]], [],
         {"expected_deliveries": 3, "delivered": 3, "lost": 0}),
        # A missing delivery is lost unless a dead letter for that subscriber pays for it.
        ([_pub("a")], [["a"], []], [], {"lost": 1, "lost_sample": ["a -> bounces"]}),
        ([_pub("a")], [["a"], []], [DeadRecord("a", "bounces", "endpoint_gone: 410 Gone")],
         {"lost": 0, "dead_lettered": 1, "dead_letter_reasons": {"endpoint_gone": 1}}),
        # A dead letter for another subscriber does not pay.
        ([_pub("a")], [[], ["a"]], [DeadRecord("a", "bounces", "attempts_exhausted")],
         {"lost": 1}),
        # An invalid event is paid only by a dead letter without a subscriber.
        ([_pub("x", valid=False)], [[], []], [DeadRecord("x", None, "invalid_event: bad")],
         {"lost": 0, "invalid_published": 1, "expected_deliveries": 0}),
        ([_pub("x", valid=False)], [[], []], [], {"lost": 1}),
        # Duplicates are counted, receipts nobody owes are unexpected.
        ([_pub("a", "Message.Delivered")], [["a", "a", "zzz"], ["a"]], [],
         {"duplicates": 1, "unexpected": 2, "lost": 0}),
    ],
)
def test_accounting_rules(published: list[Published], received: list[list[str]],
                          dead: list[DeadRecord], expect: dict[str, object]) -> None:
    got = account(published, SUBS, received, dead).as_dict()
    assert {k: got[k] for k in expect} == expect
