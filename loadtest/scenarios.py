"""The scenarios: which phases a run is made of, and the targets its figures are checked against.

Ratios are measured inside one run, phases alternating where noise matters (``--rounds``), so a
busy machine slows both sides alike. Each scenario returns its phases and its `Check`s; a check
with ``ok=None`` is informational. The checks every scenario shares, and the figures they are
built from, are in `targets.py` (pure, like `summary.py`).

    custom   one dispatcher phase with the given options (plus the baseline with --baseline)
    compare  bare pipeline vs dispatcher, one subscriber, backlog drained, alternating rounds
    fanout3  dispatcher with three subscribers per event vs one, alternating rounds
    latency  maximum live rate first, then publish-to-receipt latency at half of it
    backlog  100k events published first, then the dispatcher started: peak memory and drain
    soak     a steady rate for 10 minutes, memory sampled every second
    hol      three subscribers, one hanging until its timeout, vs all three healthy
    accounts 50,000 subscribers (25,000 accounts x 2 endpoints, 50 included files), events of
             1,000 accounts, vs one account x 2 endpoints: start-up, isolation, memory,
             broker consumers, /metrics size, throughput, then a SIGHUP adding 1,000 more
             while traffic flows (--subscribers, --active-accounts to scale it down)
    batch    one subscriber batched (100 events or 1 s) vs the same unbatched, alternating
    ab       a dispatcher checkout (--reference PATH, default this one) vs another
             (--candidate PATH), alternating: before/after figures for a change
    all      compare, fanout3, latency, backlog, hol and soak in one run (about 30 minutes)
    smoke    a few hundred events through baseline and dispatcher with retries, gone endpoints
             and invalid events: every check, in well under a minute
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from loadtest.accounts import AccountLayout
from loadtest.monitor import MiB
from loadtest.runner import BASELINE, DISPATCHER, PhaseSpec, Run
from loadtest.targets import (
    Check,
    ScenarioResult,
    integrity,
    most,
    parked_deliveries,
    ratio_of,
    rss_growth,
    workers_check,
)

__all__ = ["SCENARIOS", "Check", "ScenarioOptions", "ScenarioResult"]


@dataclass(frozen=True)
class ScenarioOptions:
    """Command-line overrides; None means the scenario's own default."""

    events: int | None = None
    rate: float | None = None
    duration: float | None = None
    subscribers: int | None = None
    baseline: bool | None = None
    workers: int = 1
    verify: bool | None = None
    rounds: int | None = None
    profile: bool = False
    hang_timeout: str = "10s"
    prefetch: int | None = None
    candidate: str | None = None  # another checkout of the project, for the ab scenario
    reference: str | None = None  # the "before" checkout of the ab scenario (default: this one)
    active_accounts: int | None = None  # accounts the events are spread over (accounts)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _drained(
    o: ScenarioOptions, events: int, *, verify: bool, name: str = "x", **fields: Any
) -> PhaseSpec:
    """A backlog phase: ``events`` (unless --events says otherwise) published before the consumer
    starts, then drained by ``o.workers`` workers. The throughput scenarios' template: they name
    each phase they run from it."""
    return PhaseSpec(
        name,
        events=_pick(o.events, events),
        preload=True,
        workers=o.workers,
        verify=_pick(o.verify, verify),
        **fields,
    )


async def custom(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    subs = _pick(o.subscribers, 1)
    spec = PhaseSpec(
        "dispatcher",
        events=_pick(o.events, 20_000),
        subscribers=subs,
        rate=o.rate,
        duration=o.duration,
        workers=o.workers,
        verify=_pick(o.verify, True),
        profile=o.profile,
    )
    if o.baseline:
        base = await run.phase(replace(spec, name="baseline", consumer=BASELINE, profile=False))
        res.phases.append(base)
    disp = await run.phase(spec)
    res.phases.append(disp)
    if o.baseline:
        r = ratio_of(disp.deliveries_per_s, res.phases[0].deliveries_per_s)
        res.checks.append(
            Check("dispatcher / baseline deliveries/s", ">= 0.8 (aim 1.0)", r, r >= 0.8)
        )
    integrity(res)
    return res


async def compare(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    rounds = _pick(o.rounds, 3)
    spec = _drained(o, 20_000, verify=False)
    base: list[float] = []
    disp: list[float] = []
    for i in range(1, rounds + 1):
        b = await run.phase(
            replace(spec, name=f"baseline-{i}", consumer=BASELINE, profile=o.profile and i == 1)
        )
        d = await run.phase(replace(spec, name=f"dispatcher-{i}", profile=o.profile and i == 1))
        res.phases += [b, d]
        base.append(b.deliveries_per_s)
        disp.append(d.deliveries_per_s)
    per_round = [ratio_of(d, b) for d, b in zip(disp, base, strict=True)]
    ratio = ratio_of(statistics.median(disp), statistics.median(base))
    res.summary = {
        "workers": o.workers,
        "baseline_deliveries_per_s": base,
        "dispatcher_deliveries_per_s": disp,
        "ratio_per_round": [round(r, 3) for r in per_round],
        "ratio_of_medians": round(ratio, 3),
    }
    workers = f"{o.workers} worker" + ("s" if o.workers != 1 else "")
    res.checks.append(
        Check(
            f"dispatcher ({workers}) / bare pipeline, 1 subscriber (median of rounds)",
            ">= 0.8 (aim 1.0)",
            ratio,
            ratio >= 0.8,
            f"{statistics.median(disp):.0f} vs {statistics.median(base):.0f}/s; "
            f"rounds: {', '.join(f'{r:.3f}' for r in per_round)}",
        )
    )
    workers_check(res, o.workers)
    cpu_b = statistics.median(
        p.process["cpu_ms_per_1k_deliveries"] or 0
        for p in res.phases
        if p.spec.consumer == BASELINE
    )
    cpu_d = statistics.median(
        p.process["cpu_ms_per_1k_deliveries"] or 0
        for p in res.phases
        if p.spec.consumer == DISPATCHER
    )
    res.checks.append(
        Check(
            "CPU per delivery, dispatcher / bare pipeline",
            "informational",
            ratio_of(cpu_d, cpu_b),
            None,
            f"{cpu_d:.0f} vs {cpu_b:.0f} CPU ms per 1k deliveries",
        )
    )
    integrity(res)
    return res


async def fanout3(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    rounds = _pick(o.rounds, 2)
    spec = _drained(o, 15_000, verify=True)
    one: list[float] = []
    three: list[float] = []
    for i in range(1, rounds + 1):
        a = await run.phase(replace(spec, name=f"1-subscriber-{i}", subscribers=1))
        b = await run.phase(
            replace(spec, name=f"3-subscribers-{i}", subscribers=3, profile=o.profile and i == 1)
        )
        res.phases += [a, b]
        one.append(a.deliveries_per_s)
        three.append(b.deliveries_per_s)
    if o.baseline:
        res.phases.append(
            await run.phase(
                replace(spec, name="baseline-3-subscribers", consumer=BASELINE, subscribers=3)
            )
        )
    ratio = ratio_of(statistics.median(three), statistics.median(one))
    res.summary = {
        "one_subscriber_deliveries_per_s": one,
        "three_subscribers_deliveries_per_s": three,
        "ratio_of_medians": round(ratio, 3),
    }
    res.checks.append(
        Check(
            "3 subscribers / 1 subscriber deliveries/s (median of rounds)",
            ">= 0.8",
            ratio,
            ratio >= 0.8,
            f"{statistics.median(three):.0f} vs {statistics.median(one):.0f}/s",
        )
    )
    integrity(res)
    return res


async def latency(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    verify = _pick(o.verify, True)
    top = await run.phase(
        PhaseSpec("max-rate", events=_pick(o.events, 20_000), workers=o.workers, verify=verify)
    )
    max_rate = top.deliveries_per_s  # one subscriber: deliveries/s == events/s
    rate = _pick(o.rate, round(max_rate / 2))
    half = await run.phase(
        PhaseSpec(
            "half-rate",
            rate=rate,
            duration=_pick(o.duration, 60),
            workers=o.workers,
            verify=verify,
            profile=o.profile,
        )
    )
    res.phases += [top, half]
    lat = half.latency_ms
    res.summary = {"max_rate": round(max_rate, 1), "half_rate": rate, "latency_ms": lat}
    res.checks.append(
        Check(
            f"p50 publish-to-receipt at {rate:g}/s (max {max_rate:.0f}/s)",
            "< 5 ms",
            lat["p50"],
            lat["p50"] is not None and lat["p50"] < 5,
        )
    )
    res.checks.append(
        Check(
            f"p99 publish-to-receipt at {rate:g}/s",
            "< 25 ms",
            lat["p99"],
            lat["p99"] is not None and lat["p99"] < 25,
        )
    )
    integrity(res)
    return res


async def backlog(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    p = await run.phase(
        _drained(o, 100_000, verify=True, name="backlog", profile=o.profile, settle_timeout=600)
    )
    res.phases.append(p)
    peak = p.process["peak_rss_mib"]
    drain = p.throughput["window_s"]
    res.summary = {
        "peak_rss_mib": peak,
        "drain_seconds": drain,
        "drain_deliveries_per_s": p.deliveries_per_s,
    }
    res.checks.append(
        Check(
            f"peak RSS draining a {p.accounting.published}-event backlog",
            "< 150 MiB",
            peak,
            peak < 150,
            f"drained in {drain:.1f}s at {p.deliveries_per_s:.0f}/s",
        )
    )
    integrity(res)
    return res


async def soak(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    duration = _pick(o.duration, 600)
    p = await run.phase(
        PhaseSpec(
            "soak",
            rate=_pick(o.rate, 500),
            duration=duration,
            workers=o.workers,
            verify=_pick(o.verify, True),
            sample_interval=1.0,
            profile=o.profile,
        )
    )
    res.phases.append(p)
    warmup = min(60.0, duration / 5)
    g = rss_growth(p, warmup)
    res.summary = {"rss": g, "latency_ms": p.latency_ms}
    res.checks.append(
        Check(
            f"RSS growth over {duration:g}s at {p.spec.rate:g}/s (after {warmup:g}s warm-up)",
            "<= 3 MiB",
            g["growth_mib"],
            g["growth_mib"] <= 3.0,
            f"trend {g['slope_mib_per_10min']} MiB per 10 min",
        )
    )
    integrity(res)
    return res


async def hol(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    spec = _drained(
        o,
        30_000,
        verify=True,
        subscribers=3,
        focus=(0, 1),
        sub_timeout=o.hang_timeout,
        settle_timeout=600,
        prefetch=_pick(o.prefetch, 256),
    )
    healthy = await run.phase(replace(spec, name="all-healthy"))
    hung = await run.phase(
        replace(
            spec,
            name="one-hanging",
            behaviours=({}, {}, {"hang": True}),
            heal=(2,),
            profile=o.profile,
        )
    )
    res.phases += [healthy, hung]
    ratio = ratio_of(hung.focus_per_s, healthy.focus_per_s)
    res.summary = {
        "healthy_two_deliveries_per_s": healthy.focus_per_s,
        "with_one_hanging_deliveries_per_s": hung.focus_per_s,
        "ratio": round(ratio, 3),
    }
    res.checks.append(
        Check(
            f"two healthy subscribers' deliveries/s with the third hanging ({o.hang_timeout} "
            "timeout) / all healthy",
            ">= 0.8",
            ratio,
            ratio >= 0.8,
            f"{hung.focus_per_s:.0f} vs {healthy.focus_per_s:.0f}/s",
        )
    )
    integrity(res)
    return res


async def smoke(run: Run, o: ScenarioOptions) -> ScenarioResult:
    res = ScenarioResult()
    events = _pick(o.events, 400)
    patterns = (("*",), ("Message.Bounced", "Message.Complained", "Message.Delivered"))
    base = await run.phase(
        PhaseSpec(
            "baseline",
            consumer=BASELINE,
            events=events,
            rate=400,
            subscribers=2,
            patterns=(("*",), ("*",)),
            verify=False,
            settle_timeout=30,
        )
    )
    disp = await run.phase(
        PhaseSpec(
            "dispatcher",
            events=events,
            rate=400,
            subscribers=2,
            patterns=patterns,
            behaviours=({}, {"fail_fraction": 0.1, "gone_fraction": 0.03}),
            invalid_fraction=0.02,
            verify=_pick(o.verify, True),
            workers=o.workers,
            retry_schedule=("100ms", "200ms", "300ms", "500ms", "1s"),
            settle_timeout=30,
            profile=o.profile,
        )
    )
    res.phases += [base, disp]
    acc = disp.accounting
    res.checks.append(
        Check(
            "dispatcher: dead letters accounted (gone endpoints, invalid events)",
            "> 0",
            acc.dead_lettered,
            acc.dead_lettered > 0,
            str(acc.dead_letter_reasons),
        )
    )
    r = ratio_of(disp.deliveries_per_s, base.deliveries_per_s)
    res.checks.append(
        Check(
            "dispatcher / baseline deliveries/s (rate-limited: not a target)",
            "informational",
            r,
            None,
        )
    )
    integrity(res)
    return res


async def ab(run: Run, o: ScenarioOptions) -> ScenarioResult:
    """This checkout's dispatcher (before) vs another checkout's (after), alternating."""
    if not o.candidate:
        raise SystemExit("the ab scenario needs --candidate PATH (a checkout with the change)")
    res = ScenarioResult()
    rounds = _pick(o.rounds, 3)
    # A backlog drained (throughput), or with --rate a live run (latency, GC pauses).
    spec = PhaseSpec(
        "x",
        events=_pick(o.events, 20_000),
        subscribers=_pick(o.subscribers, 1),
        preload=not o.rate,
        rate=o.rate,
        duration=_pick(o.duration, 30) if o.rate else None,
        workers=o.workers,
        verify=_pick(o.verify, False),
    )
    before: list[float] = []
    after: list[float] = []
    for i in range(1, rounds + 1):
        b = await run.phase(replace(spec, name=f"before-{i}", source=o.reference))
        a = await run.phase(replace(spec, name=f"after-{i}", source=o.candidate))
        res.phases += [b, a]
        before.append(b.deliveries_per_s)
        after.append(a.deliveries_per_s)
    ratio = ratio_of(statistics.median(after), statistics.median(before))
    cpu = {
        k: statistics.median(
            p.process["cpu_ms_per_1k_deliveries"] or 0
            for p in res.phases
            if p.spec.name.startswith(k)
        )
        for k in ("before", "after")
    }
    side = {k: [p for p in res.phases if p.spec.name.startswith(k)] for k in ("before", "after")}
    res.summary = {
        "before_deliveries_per_s": before,
        "after_deliveries_per_s": after,
        "ratio_of_medians": round(ratio, 3),
        "cpu_ms_per_1k": cpu,
        "p99_ms": {k: [p.latency_ms["p99"] for p in v] for k, v in side.items()},
        "gc_max_pause_ms": {
            k: [(p.process.get("gc") or {}).get("max_pause_ms") for p in v] for k, v in side.items()
        },
        "gc_pause_ms_total": {
            k: [sum((p.process.get("gc") or {}).get("pause_ms", [])) for p in v]
            for k, v in side.items()
        },
        "candidate": o.candidate,
        "reference": o.reference or "this checkout",
    }
    res.checks.append(
        Check(
            "after / before deliveries/s (median of rounds)",
            "informational",
            ratio,
            None,
            f"CPU ms per 1k deliveries {cpu['before']:.0f} -> {cpu['after']:.0f}",
        )
    )
    integrity(res)
    return res


async def accounts(run: Run, o: ScenarioOptions) -> ScenarioResult:
    """Issue #13: many accounts' subscribers in included files, each getting only its own."""
    res = ScenarioResult()
    endpoints = 2
    n_accounts = max(1, _pick(o.subscribers, 50_000) // endpoints)
    big = AccountLayout(
        accounts=n_accounts,
        endpoints=endpoints,
        files=min(50, n_accounts),
        active=min(_pick(o.active_accounts, 1_000), n_accounts),
    )
    small = AccountLayout(accounts=1, endpoints=endpoints, files=1, active=1)
    rounds = _pick(o.rounds, 2)
    spec = _drained(o, 20_000, verify=True, census=True, settle_timeout=300, profile=False)
    many = f"{big.subscribers}-subscribers"
    small_rate: list[float] = []
    big_rate: list[float] = []
    for i in range(1, rounds + 1):
        a = await run.phase(
            replace(spec, name=f"2-subscribers-{i}", accounts=small, subscribers=small.subscribers)
        )
        b = await run.phase(
            replace(
                spec,
                name=f"{many}-{i}",
                accounts=big,
                subscribers=big.subscribers,
                profile=o.profile and i == 1,
            )
        )
        res.phases += [a, b]
        small_rate.append(a.deliveries_per_s / endpoints)
        big_rate.append(b.deliveries_per_s / endpoints)
    duration = _pick(o.duration, 30.0)
    live = await run.phase(
        replace(
            spec,
            name=f"{many}-reload",
            accounts=big,
            subscribers=big.subscribers,
            preload=False,
            rate=_pick(o.rate, 300.0),
            duration=duration,
            reload_after=min(10.0, duration / 3),
        )
    )
    res.phases.append(live)
    large = [p for p in res.phases if p.spec.accounts == big]

    startup = most([p.startup_s for p in large])
    res.checks.append(
        Check(
            f"start-up with {big.subscribers} subscribers in {big.files} files "
            "(process start to /readyz 200, slowest phase)",
            "<= 10 s",
            startup,
            startup is not None and startup <= 10,
            "each: "
            + ", ".join(f"{p.startup_s:.2f}" for p in large if p.startup_s is not None)
            + "; 2 subscribers: "
            + ", ".join(
                f"{p.startup_s:.2f}" for p in res.phases if p.spec.accounts == small and p.startup_s
            ),
        )
    )
    rl = live.reload or {}
    effective = rl.get("effective_s")
    lost = live.accounting.lost
    res.checks.append(
        Check(
            f"SIGHUP adding {rl.get('subscribers_added', '?')} subscribers (one more file) takes "
            "effect while traffic flows, nothing lost",
            "<= 3 s, lost == 0",
            effective,
            effective is not None and effective <= 3 and lost == 0,
            f"first probe received after {rl.get('first_delivered_s')} s; every probe published "
            f"from {rl.get('effective_probe_published_s')} s after the SIGHUP on was received "
            "(the difference is the wait behind the traffic); "
            f"{rl.get('delivered')}/{rl.get('probes')} probes received; traffic at "
            f"{live.spec.rate:g}/s: {live.accounting.published} events, lost {lost}",
        )
    )
    rss = most([p.process["peak_rss_per_worker_mib"] for p in large])
    res.checks.append(
        Check(
            f"peak RSS per worker with {big.subscribers} subscribers",
            "<= 300 MiB",
            rss,
            rss is not None and rss <= 300,
            f"{o.workers} worker(s); whole tree up to "
            f"{most([p.process['peak_rss_mib'] for p in large])} MiB",
        )
    )
    censuses = [c for p in large for c in p.broker]
    consumers = most([c["consumers"] for c in censuses])
    queues = most([c["queues"] for c in censuses])
    res.checks.append(
        Check(
            "broker consumers on the phase's queues (most seen)",
            "< 100",
            consumers,
            consumers is not None and consumers < 100,
            f"{queues} queues at most; "
            + "; ".join(
                f"{c['when']}: {c['queues']} queues, {c['consumers']} consumers"
                for c in (censuses[:1] + censuses[-2:])
            )
            + (f" ({censuses[0]['method']})" if censuses else ""),
        )
    )
    sizes = [(p.spec.name, k, v) for p in large for k, v in p.metrics_bytes.items()]
    biggest = most([v for _, _, v in sizes])
    res.checks.append(
        Check(
            "/metrics size (bytes, largest read)",
            "< 2 MiB",
            biggest,
            biggest is not None and biggest < 2 * MiB,
            "; ".join(f"{n} at {k}: {v}" for n, k, v in sizes if v is not None),
        )
    )
    ratio = ratio_of(statistics.median(big_rate), statistics.median(small_rate))
    drained = [p for p in res.phases if p.spec.preload]
    parked = {p.spec.name: int(parked_deliveries(p)) for p in drained}
    res.checks.append(
        Check(
            f"events/s delivered with {big.subscribers} subscribers / with 2 (median of rounds)",
            ">= 0.9",
            ratio,
            ratio >= 0.9,
            f"{statistics.median(big_rate):.0f} vs {statistics.median(small_rate):.0f} events/s; "
            "rounds: "
            + ", ".join(f"{ratio_of(b, a):.3f}" for b, a in zip(big_rate, small_rate, strict=True))
            + "; deliveries parked: "
            + ", ".join(f"{k} {v}" for k, v in parked.items()),
        )
    )
    cross = sum(
        (p.account_endpoints or {}).get("cross_account", 0) + p.accounting.cross_account
        for p in res.phases
    )
    res.checks.append(
        Check(
            "cross-account deliveries (an event at another account's endpoint)",
            "== 0",
            cross,
            cross == 0,
        )
    )
    incomplete = sum(
        p.accounting.published - p.accounting.invalid_published - p.accounting.complete_events
        for p in res.phases
    )
    res.checks.append(
        Check(
            "events that missed one of their account's two endpoints",
            "== 0",
            incomplete,
            incomplete == 0,
        )
    )
    res.summary = {
        "subscribers": big.subscribers,
        "accounts": big.accounts,
        "files": big.files,
        "active_accounts": big.active,
        "workers": o.workers,
        "events_per_s_2_subscribers": small_rate,
        "events_per_s_many": big_rate,
        "throughput_ratio": round(ratio, 3),
        "parked": parked,
        "startup_s": [p.startup_s for p in large],
        "reload": live.reload,
        "peak_rss_per_worker_mib": rss,
        "broker": {p.spec.name: p.broker for p in large},
        "metrics_bytes": {p.spec.name: p.metrics_bytes for p in res.phases},
    }
    workers_check(res, o.workers)
    integrity(res)
    return res


BATCH = {"max_events": 100, "max_wait": "1s"}
# The window for batches of 100 (README, "Batches": at least four full batches).
BATCH_PREFETCH = 1024


async def batch(run: Run, o: ScenarioOptions) -> ScenarioResult:
    """Issue #16: one subscriber batched vs the same subscriber unbatched, alternating.

    Both run with the window the README sizes for batches (four full batches or more:
    ``prefetch = 1024`` for batches of 100); ``--prefetch`` measures another."""
    res = ScenarioResult()
    rounds = _pick(o.rounds, 3)
    spec = _drained(o, 20_000, verify=True, prefetch=_pick(o.prefetch, BATCH_PREFETCH))
    single: list[float] = []
    batched: list[float] = []
    for i in range(1, rounds + 1):
        u = await run.phase(replace(spec, name=f"unbatched-{i}"))
        b = await run.phase(
            replace(spec, name=f"batched-{i}", batch=dict(BATCH), profile=o.profile and i == 1)
        )
        res.phases += [u, b]
        single.append(u.deliveries_per_s)
        batched.append(b.deliveries_per_s)
    ratio = ratio_of(statistics.median(batched), statistics.median(single))
    sizes = []
    for p in res.phases:
        if p.spec.batch is not None:
            s = next(iter(p.per_subscriber.values()))
            sizes.append(round(s["received"] / s["requests"], 1) if s["requests"] else 0.0)
    res.summary = {
        "prefetch": spec.prefetch,
        "unbatched_events_per_s": single,
        "batched_events_per_s": batched,
        "ratio_of_medians": round(ratio, 3),
        "mean_batch_size": sizes,
        "batch": BATCH,
    }
    per_round = ", ".join(f"{ratio_of(b, u):.2f}" for b, u in zip(batched, single, strict=True))
    res.checks.append(
        Check(
            f"events/s to a batched subscriber ({BATCH}) / the same unbatched (median of rounds"
            f", prefetch {spec.prefetch})",
            ">= 5",
            ratio,
            ratio >= 5,
            f"{statistics.median(batched):.0f} vs {statistics.median(single):.0f} events/s; "
            f"rounds: {per_round}"
            f"; events per POST: {sizes}",
        )
    )
    unbatched_in_batches = sum(
        s["batched"] for p in res.phases if p.spec.batch is None for s in p.per_subscriber.values()
    )
    loose = sum(
        s["received"] - s["batched"]
        for p in res.phases
        if p.spec.batch is not None
        for s in p.per_subscriber.values()
    )
    res.checks.append(
        Check(
            "batched phases got every event in a batch, unbatched none",
            "== 0",
            loose + unbatched_in_batches,
            loose + unbatched_in_batches == 0,
            f"{loose} single events to the batched subscriber, "
            f"{unbatched_in_batches} batched events to the unbatched one",
        )
    )
    integrity(res)
    return res


_ALL = ("compare", "fanout3", "latency", "backlog", "hol", "soak")


async def everything(run: Run, o: ScenarioOptions) -> ScenarioResult:
    """Every target scenario in turn, each with its own defaults (sizes are not overridden)."""
    res = ScenarioResult()
    shared = ScenarioOptions(
        workers=o.workers, verify=o.verify, profile=o.profile, hang_timeout=o.hang_timeout
    )
    for name in _ALL:
        run.name_prefix = f"{name}."
        try:
            part = await SCENARIOS[name][0](run, shared)
        finally:
            run.name_prefix = ""
        res.phases += part.phases
        res.checks += [replace(c, name=f"{name}: {c.name}") for c in part.checks]
        res.summary[name] = part.summary
    return res


Scenario = Callable[[Run, ScenarioOptions], Awaitable[ScenarioResult]]
SCENARIOS: dict[str, tuple[Scenario, int]] = {  # name -> (function, receivers needed)
    "custom": (custom, 3),
    "compare": (compare, 1),
    "fanout3": (fanout3, 3),
    "latency": (latency, 1),
    "backlog": (backlog, 1),
    "soak": (soak, 1),
    "hol": (hol, 3),
    "smoke": (smoke, 2),
    "ab": (ab, 3),
    "accounts": (accounts, 4),  # the receivers' ports carry the account endpoints
    "batch": (batch, 1),
    "all": (everything, 3),
}
