"""One load-test run: its receivers, and phases that each start a consumer, publish, and settle.

A `Run` owns what lives for the whole command: a run id, a temporary directory (config, signing
keys), the receivers process, and a fixed loopback port for the dispatcher's ops endpoints (so
receivers know the JWKS url before the dispatcher starts). A phase (`PhaseSpec`) gets fresh
broker names, declares its topology before publishing (so a backlog published before the
consumer starts is kept), runs the dispatcher or the baseline as a child process under a
CPU/memory sampler, and ends when every owed delivery arrived, or when nothing moves any more
and the consumer holds nothing. Then it reads the dead-letter queue, collects the receivers'
records, deletes its queues and exchanges, and summarises (`PhaseResult`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aio_pika

from dispatcher.config import Config, parse_config
from dispatcher.topology import declare, declare_parking, delete, parking_queue, tier_queue_names
from loadtest.accounting import Accounting, DeadRecord, SubscriberSpec, account
from loadtest.gcstats import read_dir
from loadtest.generator import EventMix, Generator
from loadtest.monitor import MachineSampler, MiB, TreeSampler, find_broker_pid
from loadtest.processes import (
    Child,
    DispatcherProcess,
    ReceiversProcess,
    free_port,
    start_baseline,
    to_toml,
)
from loadtest.profiling import Profiler, summarize
from loadtest.stats import latency, throughput, timeline

__all__ = ["PhaseResult", "PhaseSpec", "Run", "RunOptions"]

ISSUER = "https://mail.example.com"
DISPATCHER = "dispatcher"
BASELINE = "baseline"


@dataclass(frozen=True)
class RunOptions:
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    out_dir: Path = Path("loadtest/out")
    endpoints: int = 3
    keep_tmp: bool = False
    quiet: bool = False
    source: str | None = None  # run every dispatcher phase from this checkout


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    consumer: str = DISPATCHER  # or BASELINE
    events: int = 10_000
    subscribers: int = 1
    patterns: tuple[tuple[str, ...], ...] = ()  # per subscriber; default "*"
    behaviours: tuple[dict[str, Any], ...] = ()  # per subscriber (see receivers.Behaviour)
    rate: float | None = None  # events/s; None = as fast as confirms allow
    duration: float | None = None  # with a rate: publish for this long instead of `events`
    preload: bool = False  # publish everything before the consumer starts
    verify: bool = True  # receivers verify agent tokens (dispatcher phases only)
    workers: int = 1
    prefetch: int = 256
    max_in_flight: int = 64
    sub_timeout: str = "10s"
    retry_schedule: tuple[str, ...] = ("200ms", "500ms", "1s", "2s", "5s")
    invalid_fraction: float = 0.0
    heal: tuple[int, ...] = ()  # endpoints healed once every other endpoint got its share
    focus: tuple[int, ...] = ()  # endpoints whose throughput is the headline (default all)
    sample_interval: float = 0.5
    profile: bool = False
    settle_timeout: float = 120.0  # after publishing: give up waiting after this long
    seed: int = 1
    source: str | None = None  # run the dispatcher from this checkout instead (A/B runs)

    def subscriber_specs(self) -> list[SubscriberSpec]:
        return [SubscriberSpec(f"sub{i}", self.patterns[i] if i < len(self.patterns) else ("*",))
                for i in range(self.subscribers)]

    @property
    def event_count(self) -> int:
        if self.rate and self.duration:
            return int(self.rate * self.duration)
        return self.events


@dataclass
class PhaseResult:
    spec: PhaseSpec
    queue: str
    t0: float  # unix seconds when the phase started publishing or consuming, whichever first
    consumer_started: float
    publish: dict[str, Any]
    throughput: dict[str, Any]
    focus_throughput: dict[str, Any]
    latency_ms: dict[str, Any]
    per_subscriber: dict[str, dict[str, Any]]
    accounting: Accounting
    process: dict[str, Any]
    others_cpu_percent: dict[str, float]
    timeline: list[dict[str, Any]]
    rss_timeline: list[tuple[float, float]]
    settled: bool
    healed_at: float | None = None
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    dispatcher_counters: dict[str, float] = field(default_factory=dict)

    @property
    def deliveries_per_s(self) -> float:
        return float(self.throughput.get("deliveries_per_s") or 0.0)

    @property
    def focus_per_s(self) -> float:
        return float(self.focus_throughput.get("deliveries_per_s") or 0.0)

    def as_dict(self) -> dict[str, Any]:
        spec = asdict(self.spec)
        return {
            "name": self.spec.name,
            "consumer": self.spec.consumer,
            "spec": spec,
            "queue": self.queue,
            "publish": self.publish,
            "throughput": self.throughput,
            "focus_throughput": self.focus_throughput,
            "latency_ms": self.latency_ms,
            "per_subscriber": self.per_subscriber,
            "accounting": self.accounting.as_dict(),
            "process": self.process,
            "others_cpu_percent": self.others_cpu_percent,
            "settled": self.settled,
            "healed_after_s": (None if self.healed_at is None
                               else round(self.healed_at - self.t0, 3)),
            "profile": self.profile,
            "notes": self.notes,
            "dispatcher_counters": self.dispatcher_counters,
            "timeline": self.timeline,
            "rss_timeline_mib": [[round(t, 2), round(r, 2)] for t, r in self.rss_timeline],
        }


class _Progress:
    """One status line per second on stderr (rewritten in place on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        if self._quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < (1.0 if self._tty else 2.0):
            return
        self._last = now
        if self._tty:
            sys.stderr.write("\r\x1b[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self, text: str) -> None:
        if self._quiet:
            return
        if self._tty:
            sys.stderr.write("\r\x1b[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class Run:
    """Everything one `python -m loadtest run` shares between its phases."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.run_id = secrets.token_hex(3)
        self.out_dir = options.out_dir.resolve()  # children run in other directories
        self.tmp = Path(tempfile.mkdtemp(prefix=f"loadtest-{self.run_id}-"))
        self.keys_dir = self.tmp / "keys"
        self.http_port = free_port()
        self.receivers: ReceiversProcess | None = None
        self.broker_pid = find_broker_pid()
        self._phase_no = 0
        self.name_prefix = ""  # prepended to phase names (the "all" scenario)
        self.progress = _Progress(options.quiet)
        self.log_dir = self.out_dir / f"logs-{self.run_id}"

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/.well-known/jwks.json"

    async def __aenter__(self) -> Run:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.receivers = await ReceiversProcess.start(self.options.endpoints,
                                                      self.log_dir / "receivers.log")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.receivers is not None:
            await self.receivers.close()
        if not self.options.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- configuration -----------------------------------------------------------------------

    def dispatcher_doc(self, spec: PhaseSpec, prefix: str, urls: Sequence[str]) -> dict[str, Any]:
        subs = spec.subscriber_specs()
        return {
            "allow_private_networks": True,
            "broker": {"url": self.options.broker_url, "exchange": f"{prefix}.events",
                       "queue": f"{prefix}.dispatch", "binding_keys": ["Message.#"],
                       "prefetch": spec.prefetch, "queue_type": "classic"},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "signing": {"issuer": ISSUER, "keys_dir": str(self.keys_dir), "algorithm": "EdDSA",
                        "token_ttl": "5m"},
            "retry": {"schedule": list(spec.retry_schedule), "jitter": 0.1, "max_age": "1h"},
            "dispatcher": {"workers": spec.workers, "log_level": "warning", "log_format": "json",
                           "drain_timeout": "10s"},
            "subscribers": [
                {"id": s.id, "url": url, "events": list(s.events), "auth": "jwt",
                 "timeout": spec.sub_timeout, "max_in_flight": spec.max_in_flight}
                for s, url in zip(subs, urls, strict=False)
            ],
        }

    # --- one phase ---------------------------------------------------------------------------

    async def phase(self, spec: PhaseSpec) -> PhaseResult:
        assert self.receivers is not None
        if self.name_prefix:
            spec = replace(spec, name=self.name_prefix + spec.name)
        if spec.source is None and self.options.source:
            spec = replace(spec, source=self.options.source)
        if spec.subscribers > len(self.receivers.urls):
            raise ValueError(f"{spec.name}: {spec.subscribers} subscribers, "
                             f"only {len(self.receivers.urls)} receivers")
        self._phase_no += 1
        prefix = f"lt-{self.run_id}-{self._phase_no}"
        urls = self.receivers.urls[: spec.subscribers]
        doc = self.dispatcher_doc(spec, prefix, urls)
        config = parse_config(doc, env={}, source="<loadtest>")
        try:
            return await _PhaseRun(self, spec, config, doc, urls).run()
        finally:
            await _cleanup(config, spec.consumer)


async def _cleanup(config: Config, consumer: str) -> None:
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(config.broker.url)
        async with connection:
            channel = await connection.channel()
            if consumer == DISPATCHER:
                await delete(channel, config.broker, [s.id for s in config.subscribers])
            else:
                await channel.queue_delete(config.broker.queue)
                await channel.exchange_delete(config.broker.exchange)


class _PhaseRun:
    def __init__(self, run: Run, spec: PhaseSpec, config: Config, doc: dict[str, Any],
                 urls: Sequence[str]) -> None:
        self.owner = run
        self.spec = spec
        self.config = config
        self.doc = doc
        self.urls = urls
        self.subs = spec.subscriber_specs()
        assert run.receivers is not None
        self.receivers = run.receivers
        self.mix = EventMix(seed=spec.seed, invalid_fraction=spec.invalid_fraction)
        self.generator = Generator(config.broker.url, config.broker.exchange,
                                   prefix=f"{config.broker.queue}", mix=self.mix)
        self.consumer: DispatcherProcess | Child | None = None
        self.sampler: TreeSampler | None = None
        self.others: dict[str, TreeSampler] = {}
        self.publish_done = False
        self.healed_at: float | None = None
        self.notes: list[str] = []
        self.counters: dict[str, float] = {}
        self.gc_dir: Path | None = None
        self.receivers_gc: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"[{self.spec.name}]"

    async def _declare(self) -> None:
        connection = await aio_pika.connect(self.config.broker.url)
        async with connection:
            channel = await connection.channel()
            if self.spec.consumer == DISPATCHER:
                await declare(channel, self.config.broker)
                for sub in self.config.subscribers:
                    await declare_parking(channel, self.config.broker, sub.id)
            else:
                exchange = await channel.declare_exchange(
                    self.config.broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
                queue = await channel.declare_queue(
                    self.config.broker.queue, durable=True,
                    arguments={"x-queue-type": "classic"})
                await queue.bind(exchange, routing_key="Message.#")

    async def _start_consumer(self) -> float:
        spec, run = self.spec, self.owner
        log = run.log_dir / f"{run._phase_no:02d}-{spec.name}.log"
        self.gc_dir = run.log_dir / f"{run._phase_no:02d}-{spec.name}-gc"
        self.gc_dir.mkdir(exist_ok=True)
        if spec.consumer == DISPATCHER:
            path = run.tmp / f"{spec.name}.toml"
            path.write_text(to_toml(self.doc), encoding="utf-8")
            disp = await DispatcherProcess.start(
                path, run.http_port, spec.workers, log,
                source=Path(spec.source) if spec.source else None, gc_dir=self.gc_dir)
            self.consumer, pid = disp, disp.child.pid
        else:
            child = await start_baseline(self.config.broker.url, self.config.broker.queue,
                                         spec.prefetch, self.urls, log, gc_dir=self.gc_dir)
            self.consumer, pid = child, child.pid
        started = time.time()
        self.sampler = TreeSampler(pid, children=True, interval=spec.sample_interval)
        self.sampler.start()
        return started

    def _start_others(self) -> None:
        assert self.receivers is not None
        pids = {"receivers": self.receivers.child.pid, "generator+runner": os.getpid()}
        if self.owner.broker_pid is not None:
            pids["rabbitmq"] = self.owner.broker_pid
        for name, pid in pids.items():
            s = TreeSampler(pid, children=False, interval=1.0)
            s.start()
            self.others[name] = s
        machine = MachineSampler(interval=1.0)
        machine.start()
        self.others["whole machine"] = machine

    async def _consumer_idle(self, channel: aio_pika.abc.AbstractChannel) -> bool:
        names = [self.config.broker.queue]
        if self.spec.consumer == DISPATCHER:
            names += self._dispatcher_queues()
            assert isinstance(self.consumer, DispatcherProcess)
            held = await self.consumer.held()
            if held is None or held > 0:
                return False
        for name in names:
            q = await channel.declare_queue(name, passive=True)
            if q.declaration_result.message_count:
                return False
        return True

    async def run(self) -> PhaseResult:
        spec = self.spec
        await self.receivers.phase(
            verify=spec.verify and spec.consumer == DISPATCHER, jwks_url=self.owner.jwks_url,
            issuer=ISSUER, behaviours=list(spec.behaviours))
        await self._declare()
        self._start_others()
        t0 = time.time()
        profiler: Profiler | None = None
        consumer_started = t0
        async with self.generator as gen:
            try:
                if spec.preload:
                    await self._publish(gen, show=True)
                    consumer_started = await self._start_consumer()
                else:
                    consumer_started = await self._start_consumer()
                    t0 = time.time()
                if spec.profile:
                    assert self.sampler is not None
                    raw = self.owner.out_dir / f"profile-{self.owner.run_id}-{spec.name}.txt"
                    profiler = Profiler(self.sampler.pid, raw)
                    await profiler.start()
                publishing = None if spec.preload else asyncio.create_task(self._publish(gen))
                settled = await self._wait(publishing)
            finally:
                if profiler is not None:
                    await profiler.stop()
                for s in self.others.values():
                    await s.stop()
                if self.sampler is not None:
                    await self.sampler.stop()
                if isinstance(self.consumer, DispatcherProcess):
                    self.counters = await self.consumer.counters()
                if self.consumer is not None:
                    code = await self.consumer.close() if isinstance(
                        self.consumer, DispatcherProcess) else await self.consumer.stop()
                    if code != 0:
                        self.notes.append(f"{spec.consumer} exited with {code}")
        dead = await self._dead_letters() if spec.consumer == DISPATCHER else []
        pending = [] if settled else await self._pending()
        received = await self.receivers.records()
        records: list[dict[str, Any]] = received["endpoints"]
        self.receivers_gc = received.get("gc")
        return self._summarise(t0, consumer_started, records, dead, pending, settled, profiler)

    async def _publish(self, gen: Generator, show: bool = False) -> None:
        spec = self.spec
        count = spec.event_count
        task = asyncio.create_task(gen.run(count, rate=spec.rate))
        while not task.done():
            if show:
                self.owner.progress.show(
                    f"{self.label} preloading {gen.stats.confirmed}/{count} events "
                    f"({gen.stats.confirmed / max(time.time() - gen.stats.started, 1e-3):.0f}/s)")
            await asyncio.wait({task}, timeout=0.5)
        await task
        self.publish_done = True

    def _owed(self) -> list[int]:
        owed = [0] * len(self.subs)
        for event in self.generator.published:
            if event.valid:
                for i, sub in enumerate(self.subs):
                    if sub.wants(event.type):
                        owed[i] += 1
        return owed

    async def _wait(self, publishing: asyncio.Task[None] | None) -> bool:
        spec = self.spec
        owed: list[int] | None = None
        quiet_since = time.monotonic()
        last_sig: tuple[int, ...] = ()
        last_count, last_t = 0, time.monotonic()
        rate = 0.0
        deadline: float | None = None
        connection = await aio_pika.connect(self.config.broker.url)
        try:
            channel = await connection.channel()
            while True:
                if publishing is not None and publishing.done():
                    await publishing  # re-raise a publishing failure
                    publishing = None
                child = (self.consumer.child if isinstance(self.consumer, DispatcherProcess)
                         else self.consumer)
                if child is not None and not child.running:
                    self.notes.append(f"{spec.consumer} exited early with "
                                      f"{child.proc.returncode}")
                    if publishing is not None:
                        publishing.cancel()
                    return False
                if self.publish_done and owed is None:
                    owed = self._owed()
                    deadline = time.monotonic() + spec.settle_timeout
                stats = await self.receivers.stats()
                stats = stats[: len(self.subs)]
                unique = [s["unique"] for s in stats]
                received = sum(s["received"] for s in stats)
                sig = tuple(s["received"] + s["failures"] + s["verify_failures"] for s in stats)
                now = time.monotonic()
                if sig != last_sig:
                    last_sig, quiet_since = sig, now
                if now - last_t >= 1.0:
                    rate = (received - last_count) / (now - last_t)
                    last_count, last_t = received, now
                self._show(received, owed, rate, stats)
                if owed is not None:
                    if all(u >= o for u, o in zip(unique, owed, strict=True)):
                        return True
                    if spec.heal and self.healed_at is None and all(
                        unique[i] >= owed[i] for i in range(len(owed)) if i not in spec.heal
                    ):
                        for i in spec.heal:
                            await self.receivers.behaviour(i, {})
                        self.healed_at = time.time()
                    if now - quiet_since > 1.5 and await self._consumer_idle(channel):
                        # Nothing moves and nothing is held: the rest is in the dead letters.
                        await asyncio.sleep(0.5)
                        if await self._consumer_idle(channel):
                            return True
                    if deadline is not None and now > deadline:
                        self.notes.append(f"gave up waiting after {spec.settle_timeout:g}s")
                        return False
                await asyncio.sleep(0.25)
        finally:
            await connection.close()

    def _show(self, received: int, owed: list[int] | None, rate: float,
              stats: list[dict[str, Any]]) -> None:
        gen = self.generator
        s = self.sampler.samples[-1] if self.sampler and self.sampler.samples else None
        cpu = ""
        if self.sampler is not None and len(self.sampler.samples) >= 2:
            a, b = self.sampler.samples[-2], self.sampler.samples[-1]
            cpu = f" cpu {100 * (b.cpu - a.cpu) / max(b.t - a.t, 1e-3):.0f}%"
        target = sum(owed) if owed is not None else "?"
        failed = sum(x["failures"] + x["verify_failures"] for x in stats)
        self.owner.progress.show(
            f"{self.label} published {gen.stats.confirmed}/{self.spec.event_count} "
            f"delivered {received}/{target} ({rate:.0f}/s) failed {failed}"
            f"{cpu} rss {(s.rss / MiB if s else 0):.0f}MiB")

    def _dispatcher_queues(self) -> list[str]:
        """Where the dispatcher keeps deliveries that wait: retry tiers and parking queues."""
        q = self.config.broker.queue
        return tier_queue_names(q) + [parking_queue(q, s.id) for s in self.config.subscribers]

    async def _dead_letters(self) -> list[DeadRecord]:
        from dispatcher.dead_letters import DeadLetterTool

        letters = await DeadLetterTool(self.config, progress=None).list()
        return [DeadRecord(dl.record.event_id, dl.record.subscriber, dl.record.reason)
                for dl in letters]

    async def _pending(self) -> list[DeadRecord]:
        """Deliveries still waiting in the work queue or the retry tiers (the consumer has
        stopped, so nothing is held): read without acknowledging, handed back on close."""
        from dispatcher.records import H_SUBSCRIBER

        names = [self.config.broker.queue]
        if self.spec.consumer == DISPATCHER:
            names += self._dispatcher_queues()
        found: list[DeadRecord] = []
        connection = await aio_pika.connect(self.config.broker.url)
        async with connection:
            channel = await connection.channel()
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                for _ in range(queue.declaration_result.message_count or 0):
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    raw = (message.headers or {}).get(H_SUBSCRIBER)
                    sub = raw.decode() if isinstance(raw, bytes) else (
                        raw if isinstance(raw, str) else None)
                    found.append(DeadRecord(message.message_id, sub, f"pending: {name}"))
        if found:
            self.notes.append(f"{len(found)} deliveries still pending in the broker")
        return found

    # --- summary -----------------------------------------------------------------------------

    def _summarise(self, t0: float, consumer_started: float, records: list[dict[str, Any]],
                   dead: list[DeadRecord], pending: list[DeadRecord], settled: bool,
                   profiler: Profiler | None) -> PhaseResult:
        spec = self.spec
        records = records[: len(self.subs)]
        acc = account(self.generator.published, self.subs, [r["ids"] for r in records], dead,
                      pending=pending)
        all_pub = [p for r in records for p in r["published"]]
        all_arr = [a for r in records for a in r["arrived"]]
        thr = throughput(all_arr)
        focus = spec.focus or tuple(range(len(records)))
        focus_arr = [a for i in focus for a in records[i]["arrived"]]
        fthr = throughput(focus_arr)
        lat = latency(all_pub, all_arr)
        per_sub = {}
        for sub, r in zip(self.subs, records, strict=True):
            t = throughput(r["arrived"])
            per_sub[sub.id] = {
                "received": r["received"], "unique": r["unique"], "duplicates": r["duplicates"],
                "failed_answers": r["failures"], "verify_failures": r["verify_failures"],
                "verify_reasons": r["reasons"], "deliveries_per_s": round(t.per_second, 1),
                "behaviour": r["behaviour"],
                "latency_ms": latency(r["published"], r["arrived"]).as_dict(),
            }
        assert self.sampler is not None
        w0, w1 = (thr.first, thr.last) if thr.window > 0 else (consumer_started, time.time())
        cpu = self.sampler.cpu_between(w0, w1)
        span = max(w1 - w0, 1e-9)
        process = {
            "kind": spec.consumer,
            "workers": spec.workers,
            "cpu_seconds_window": round(cpu, 3),
            "cpu_percent": round(100 * cpu / span, 1),
            "cpu_ms_per_1k_deliveries": round(1e6 * cpu / thr.deliveries, 1)
            if thr.deliveries else None,
            "system_cpu_share": round(self.sampler.cpu_between(w0, w1, system=True) / cpu, 3)
            if cpu else None,
            "cpu_seconds_total": round(self.sampler.cpu_total, 3),
            "peak_rss_mib": round(self.sampler.peak_rss / MiB, 1),
            "peak_rss_sampled_mib": round(self.sampler.peak_rss_sampled / MiB, 1),
            "gc": read_dir(self.gc_dir) if self.gc_dir is not None else None,
            "receivers_gc": self.receivers_gc,
        }
        others = {name: round(100 * s.cpu_between(w0, w1) / span, 1)
                  for name, s in self.others.items()}
        ours = sum(v for k, v in others.items() if k != "whole machine")
        consumer_cpu = 100 * cpu / span
        others["not this test"] = round(max(0.0, others["whole machine"] - ours
                                            - consumer_cpu), 1)
        gen = self.generator.stats
        publish = {"confirmed": gen.confirmed, "refused": gen.refused,
                   "events_per_s": round(gen.rate, 1),
                   "seconds": round(gen.finished - gen.started, 3), "target_rate": spec.rate}
        rss = [(s.t - t0, s.rss / MiB) for s in self.sampler.samples]
        profile = None
        if profiler is not None and profiler.output.exists():
            profile = {"raw": str(profiler.output), **summarize(profiler.output)}
            if thr.deliveries:
                # Busy samples per delivery, in ms of wall time at the sampling rate.
                profile["busy_ms_per_1k_deliveries"] = round(
                    1e6 * profile["samples"] / profiler.rate / thr.deliveries, 1)
        result = PhaseResult(
            spec=spec, queue=self.config.broker.queue, t0=t0, consumer_started=consumer_started,
            publish=publish, throughput=thr.as_dict(), focus_throughput=fthr.as_dict(),
            latency_ms=lat.as_dict(), per_subscriber=per_sub, accounting=acc, process=process,
            others_cpu_percent=others, timeline=timeline(all_pub, all_arr, t0), rss_timeline=rss,
            settled=settled, healed_at=self.healed_at, profile=profile, notes=self.notes,
            dispatcher_counters=self.counters)
        self.owner.progress.done(
            f"{self.label} {thr.deliveries} deliveries, {thr.per_second:.0f}/s; "
            f"p50 {lat.p50:.1f} ms p99 {lat.p99:.1f} ms; lost {acc.lost}; "
            f"cpu {process['cpu_percent']}% peak rss {process['peak_rss_mib']} MiB")
        return result

