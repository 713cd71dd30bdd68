"""The load test's pure summary and targets: figures worked out from gathered data, no I/O.

Every phase here is made of hand-built records, samples and publish stats, so the figures
(throughput, latency, CPU over the delivery window, accounting, grouping of many subscribers)
and the checks built on them can be stated exactly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from loadtest import targets
from loadtest.accounting import DeadRecord, SubscriberSpec
from loadtest.generator import Published, PublishStats
from loadtest.monitor import MiB, Sample, TreeSampler
from loadtest.phases import BASELINE, DISPATCHER, PhaseResult, PhaseSpec
from loadtest.summary import (
    GROUP_ABOVE,
    PhaseData,
    all_received,
    empty_record,
    heal_due,
    per_subscriber,
    process_figures,
    records_by_path,
    result_line,
    summarise,
)
from loadtest.targets import Check, ScenarioResult

T0 = 1_000.0  # unix seconds the phase started


def _record(ids: list[str], published_ms: list[float], arrived: list[float], **extra: Any) -> Any:
    rec = empty_record()
    rec.update(
        ids=ids,
        published=published_ms,
        arrived=arrived,
        received=len(ids),
        unique=len(set(ids)),
        duplicates=len(ids) - len(set(ids)),
    )
    rec.update(extra)
    return rec


def _sampler(pid: int, points: list[tuple[float, float, int]], **kw: Any) -> TreeSampler:
    """A sampler that never ran: its samples are (t, cpu seconds, rss bytes)."""
    return TreeSampler(pid, samples=[Sample(t, cpu, rss) for t, cpu, rss in points], **kw)


def _data(**changes: Any) -> PhaseData:
    """Two subscribers, four valid events: sub0 gets all four (one twice), sub1 gets e1 and e2,
    e3 is dead-lettered for sub1 and e4 is lost there; receipts 10 ms after publishing."""
    published = [Published(f"e{i}", "Message.Delivered", (T0 + i) * 1000) for i in range(1, 5)]
    pub_ms = [p.published_ms for p in published]
    arrived = [T0 + i + 0.010 for i in range(1, 5)]
    records = [
        _record(["e1", "e2", "e3", "e4", "e4"], pub_ms + pub_ms[3:], arrived + arrived[3:]),
        _record(["e1", "e2"], pub_ms[:2], arrived[:2], failures=3, behaviour={"fail": 0.5}),
    ]
    sampler = _sampler(
        42,
        [(T0, 0.0, 10 * MiB), (T0 + 2, 0.5, 30 * MiB), (T0 + 6, 1.5, 20 * MiB)],
        max_processes=1,
        _rss_max={42: 30 * MiB},
    )
    machine = _sampler(0, [(T0, 0.0, 0), (T0 + 6, 6.0, 0)])
    receivers = _sampler(7, [(T0, 0.0, 0), (T0 + 6, 0.3, 0)])
    base: dict[str, Any] = dict(
        spec=PhaseSpec("p", subscribers=2),
        queue="q",
        subscribers=[SubscriberSpec("sub0"), SubscriberSpec("sub1")],
        published=published,
        records=records,
        dead=[DeadRecord("e3", "sub1", "gone: 410")],
        pending=[],
        settled=True,
        t0=T0,
        consumer_started=T0,
        ended=T0 + 6,
        sampler=sampler,
        others={"receivers": receivers, "whole machine": machine},
        publish_stats=PublishStats(confirmed=4, started=T0, finished=T0 + 2),
    )
    base.update(changes)
    return PhaseData(**base)


def test_summarise_counts_throughput_latency_and_accounting() -> None:
    r = summarise(_data())
    # Seven receipts between the first (T0+1.01) and the last (T0+4.01): 6 intervals in 3 s.
    assert r.throughput == {"deliveries": 7, "window_s": 3.0, "deliveries_per_s": 2.0}
    assert r.latency_ms["count"] == 7
    assert r.latency_ms["p50"] == pytest.approx(10.0, abs=0.01)
    acc = r.accounting
    assert (acc.expected_deliveries, acc.delivered, acc.dead_lettered, acc.lost) == (8, 6, 1, 1)
    assert acc.duplicates == 1 and acc.lost_sample == ["e4 -> sub1"]
    assert r.publish == {
        "confirmed": 4,
        "refused": 0,
        "events_per_s": 2.0,
        "seconds": 2.0,
        "target_rate": None,
    }
    assert r.settled and r.queue == "q"
    assert r.rss_timeline == [(0.0, 10.0), (2.0, 30.0), (6.0, 20.0)]


def test_cpu_is_measured_over_the_delivery_window_only() -> None:
    r = summarise(_data())
    # Window T0+1.01 .. T0+4.01: CPU interpolated 0.2525 -> 1.0025 s, 0.75 s in 3 s.
    assert r.process["cpu_seconds_window"] == pytest.approx(0.75)
    assert r.process["cpu_percent"] == 25.0
    assert r.process["cpu_ms_per_1k_deliveries"] == pytest.approx(1e6 * 0.75 / 7, abs=0.1)
    assert r.process["cpu_seconds_total"] == 1.5
    assert r.process["peak_rss_mib"] == 30.0
    # The rest of the box: receivers 0.15 s, machine 3 s of the 3 s window.
    assert r.others_cpu_percent["receivers"] == 5.0
    assert r.others_cpu_percent["whole machine"] == 100.0
    assert r.others_cpu_percent["not this test"] == 70.0


def test_without_receipts_the_window_is_the_consumer_s_lifetime() -> None:
    empty = [empty_record(), empty_record()]
    r = summarise(_data(records=empty, consumer_started=T0 + 2))
    assert r.throughput["deliveries"] == 0
    assert r.latency_ms["p50"] is None
    assert r.process["cpu_seconds_window"] == pytest.approx(1.0)  # T0+2 .. T0+6
    assert r.process["cpu_ms_per_1k_deliveries"] is None
    assert r.accounting.lost == 7  # 8 owed, one paid by the dead letter


def test_focus_throughput_counts_only_the_focused_endpoints() -> None:
    r = summarise(_data(spec=PhaseSpec("p", subscribers=2, focus=(1,))))
    assert r.focus_throughput["deliveries"] == 2
    assert r.throughput["deliveries"] == 7


def test_profile_gets_busy_time_per_delivery_and_drops_the_rate() -> None:
    profile = {"raw": "p.txt", "rate": 100, "samples": 70}
    r = summarise(_data(profile=profile))
    assert r.profile == {"raw": "p.txt", "samples": 70, "busy_ms_per_1k_deliveries": 100000.0}


def test_per_subscriber_lists_each_subscriber_with_its_behaviour() -> None:
    rows = summarise(_data()).per_subscriber
    assert list(rows) == ["sub0", "sub1"]
    assert rows["sub0"]["duplicates"] == 1 and rows["sub0"]["unique"] == 4
    assert rows["sub1"]["failed_answers"] == 3 and rows["sub1"]["behaviour"] == {"fail": 0.5}
    assert "subscribers" not in rows["sub0"]


def test_many_subscribers_are_summed_per_endpoint_slot() -> None:
    n = GROUP_ABOVE + 2  # an even number of accounts x 2 endpoints
    subs = [SubscriberSpec(f"acct{i // 2}.{i % 2}") for i in range(n)]
    records = [
        _record(["e1"], [1000.0], [1.001], reasons={"expired": 1}) if i % 4 == 0 else empty_record()
        for i in range(n)
    ]
    rows = per_subscriber(subs, records)
    assert sorted(rows) == ["*.0", "*.1"]
    assert rows["*.0"]["subscribers"] == n // 2
    assert rows["*.0"]["subscribers_reached"] == len(range(0, n, 4))
    assert rows["*.0"]["verify_reasons"] == {"expired": len(range(0, n, 4))}
    assert rows["*.1"]["received"] == 0 and rows["*.1"]["subscribers_reached"] == 0


def test_with_workers_the_supervisor_is_not_a_worker() -> None:
    sampler = _sampler(
        1, [(0.0, 0.0, 0), (1.0, 1.0, 0)], max_processes=3, _rss_max={1: 90 * MiB, 2: 40 * MiB}
    )
    two = process_figures(PhaseSpec("p", workers=2), sampler, 0.0, 1.0, 10)
    assert two["peak_rss_per_worker_mib"] == 40.0
    assert two["peak_rss_by_pid_mib"] == {"1": 90.0, "2": 40.0}
    one = process_figures(PhaseSpec("p", workers=1), sampler, 0.0, 1.0, 10)
    assert one["peak_rss_per_worker_mib"] == 90.0  # one worker runs in the process itself
    base = process_figures(PhaseSpec("p", consumer=BASELINE, workers=2), sampler, 0.0, 1.0, 10)
    assert base["peak_rss_per_worker_mib"] == 90.0


def test_records_by_path_keeps_the_subscribers_order_and_fills_gaps() -> None:
    seen = _record(["e1"], [1.0], [1.0])
    urls = ["http://127.0.0.1:1/a/x/0", "http://127.0.0.1:2/a/y/0"]
    got = records_by_path({"/a/y/0": seen}, urls)
    assert got[1] is seen
    assert got[0] == empty_record()
    got[0]["received"] = 5
    assert empty_record()["received"] == 0  # every gap gets a record of its own


def test_settling_and_healing_decisions() -> None:
    assert all_received([3, 2], [3, 2])
    assert not all_received([3, 1], [3, 2])
    with pytest.raises(ValueError):
        all_received([3], [3, 2])
    assert heal_due([5, 5, 0], [5, 5, 5], (2,))
    assert not heal_due([5, 4, 0], [5, 5, 5], (2,))
    assert not heal_due([5, 5, 5], [5, 5, 5], ())


def test_result_line() -> None:
    line = result_line(summarise(_data()))
    assert line == "7 deliveries, 2/s; p50 10.0 ms p99 10.0 ms; lost 1; cpu 25.0% peak rss 30.0 MiB"


# --- targets ---------------------------------------------------------------------------------


def _checks(*phases: PhaseResult) -> dict[str, Check]:
    res = ScenarioResult(phases=list(phases))
    targets.integrity(res)
    return {c.name: c for c in res.checks}


def test_integrity_fails_a_phase_that_lost_or_did_not_settle() -> None:
    phase = summarise(_data(settled=False, notes=["gave up waiting after 30s"]))
    checks = _checks(phase)
    lost = checks["p: every event accounted for"]
    assert lost.ok is False and lost.value == 1
    assert "1 dead-lettered" in lost.detail and "1 duplicates" in lost.detail
    settled = checks["p: settled before the deadline"]
    assert settled.ok is False and settled.detail == "gave up waiting after 30s"
    assert checks["p: every token verifies"].ok is True


def test_integrity_passes_a_clean_phase_and_sums_verify_reasons() -> None:
    records = [
        _record(["e1", "e2", "e3", "e4"], [0.0] * 4, [T0 + 1, T0 + 2, T0 + 3, T0 + 4]),
        _record(["e1", "e2", "e4"], [0.0] * 3, [T0 + 1, T0 + 2, T0 + 4]),
    ]
    clean = summarise(_data(records=records))
    checks = _checks(clean)
    assert checks["p: every event accounted for"].ok is True
    assert "p: settled before the deadline" not in checks
    records[1].update(verify_failures=2, reasons={"expired": 2})
    bad = summarise(_data(records=records))
    verify = _checks(bad)["p: every token verifies"]
    assert verify.ok is False and verify.value == 2 and verify.detail == "{'expired': 2}"
    baseline = summarise(_data(records=records, spec=PhaseSpec("b", consumer=BASELINE)))
    assert "b: every token verifies" not in _checks(baseline)


def test_workers_check_counts_processes_per_dispatcher_phase() -> None:
    phase = summarise(_data())
    res = ScenarioResult(phases=[phase])
    targets.workers_check(res, 1)
    assert res.checks[-1].ok is True
    targets.workers_check(res, 2)  # a supervisor and two workers were expected: three processes
    assert res.checks[-1].ok is False and res.checks[-1].target == "3 process(es) per phase"
    base = replace(phase, spec=PhaseSpec("b", consumer=BASELINE))
    res = ScenarioResult(phases=[base])
    targets.workers_check(res, 1)
    assert res.checks[-1].ok is False and res.checks[-1].value == 0  # no dispatcher phase


def test_rss_growth_after_warmup() -> None:
    phase = summarise(_data())
    phase.rss_timeline = [(float(t), 50.0 + t / 60) for t in range(0, 601, 10)]
    g = targets.rss_growth(phase, warmup=60.0)
    assert g["slope_mib_per_10min"] == pytest.approx(10.0, abs=0.01)
    assert g["growth_mib"] == pytest.approx((570 - 90) / 60, abs=0.01)
    phase.rss_timeline = [(70.0, 50.0), (80.0, 50.0)]
    too_few = targets.rss_growth(phase, 60.0)
    assert too_few == {"growth_mib": 0.0, "slope_mib_per_10min": 0.0, "samples": 2}


def test_small_figures() -> None:
    assert targets.ratio_of(3.0, 4.0) == 0.75 and targets.ratio_of(3.0, 0.0) == 0.0
    assert targets.most([None, 2.0, 5.0, None]) == 5.0 and targets.most([None]) is None
    phase = summarise(
        _data(
            counters={
                'dispatcher_parked_total{subscriber="sub0",why="lane_full"}': 3.0,
                'dispatcher_parked_total{subscriber="sub1",why="breaker_open"}': 2.0,
                'dispatcher_attempts_total{subscriber="sub0"}': 9.0,
            }
        )
    )
    assert targets.parked_deliveries(phase) == 5.0
    assert phase.spec.consumer == DISPATCHER
    assert Check("c", "t", 1.23456, True).as_dict()["value"] == 1.2346
