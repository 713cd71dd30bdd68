"""One load-test run: its receivers, and phases that each start a consumer, publish, and settle.

A `Run` owns what lives for the whole command: a run id, a temporary directory (config, signing
keys), the receivers process, and a fixed loopback port for the dispatcher's ops endpoints (so
receivers know the JWKS url before the dispatcher starts). A phase (`PhaseSpec`) gets fresh
broker names, declares its topology before publishing (so a backlog published before the
consumer starts is kept), runs the dispatcher or the baseline as a child process under a
CPU/memory sampler, and ends when every owed delivery arrived, or when nothing moves any more
and the consumer holds nothing. Then it reads the dead-letter queue, collects the receivers'
records and deletes its queues and exchanges. What it works out from what it gathered (the
settle and heal decisions, the `PhaseResult`, the line printed at the end) is in `summary.py`,
which does no I/O; this module only starts, publishes, waits and collects.

A phase with subscribers by account (``spec.accounts``) writes them to included files, points
them at the receivers' path endpoints, reads the broker's queues through `broker.census` (not
one passive declare per subscriber), and can append a file and SIGHUP the dispatcher while
traffic flows (``spec.reload_after``), probing until the new subscribers receive.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika

from dispatcher.broker.topology import declare, declare_parking, delete
from dispatcher.config import BrokerConfig, ConfigError, parse_config
from dispatcher.names import parking_queue, tier_queue_names
from loadtest.accounting import DeadRecord, Owed, SubscriberSpec
from loadtest.accounts import INCLUDE_DIR, specs_of, write_files
from loadtest.broker import census, delete_prefixed
from loadtest.gcstats import read_dir
from loadtest.generator import EventMix, Generator
from loadtest.monitor import MachineSampler, MiB, TreeSampler, find_broker_pid
from loadtest.phases import BASELINE, DISPATCHER, PhaseResult, PhaseSpec
from loadtest.processes import Child, DispatcherProcess, ReceiversProcess, start_baseline
from loadtest.profiling import Profiler, summarize
from loadtest.reload_probe import reload_and_probe
from loadtest.summary import (
    PhaseData,
    all_received,
    heal_due,
    records_by_path,
    result_line,
    summarise,
)
from tests.support.ports import free_port
from tests.support.toml_files import to_toml

__all__ = ["BASELINE", "DISPATCHER", "PhaseFailed", "PhaseResult", "PhaseSpec", "Run", "RunOptions"]

ISSUER = "https://mail.example.com"


class PhaseFailed(RuntimeError):
    """A phase could not run (the dispatcher refused its config, say): one line for the user."""


@dataclass(frozen=True)
class RunOptions:
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    out_dir: Path = Path("loadtest/out")
    endpoints: int = 3
    keep_tmp: bool = False
    quiet: bool = False
    source: str | None = None  # run every dispatcher phase from this checkout


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

    @property
    def receiver_ports(self) -> list[int]:
        """The receivers' ports: account endpoints (``/a/...``) are spread over them."""
        assert self.receivers is not None
        return [int(urlsplit(u).port or 0) for u in self.receivers.urls]

    async def __aenter__(self) -> Run:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.receivers = await ReceiversProcess.start(
            self.options.endpoints, self.log_dir / "receivers.log"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.receivers is not None:
            await self.receivers.close()
        if not self.options.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- configuration -----------------------------------------------------------------------

    @staticmethod
    def subscriber_keys(spec: PhaseSpec) -> dict[str, Any]:
        """What every subscriber table of the phase has besides id, url, account, events."""
        keys: dict[str, Any] = {
            "auth": "jwt",
            "timeout": spec.sub_timeout,
            "max_in_flight": spec.max_in_flight,
        }
        if spec.batch is not None:
            keys["batch"] = dict(spec.batch)
        return keys

    def dispatcher_doc(
        self,
        spec: PhaseSpec,
        prefix: str,
        urls: Sequence[str],
        subs: Sequence[SubscriberSpec] | None = None,
    ) -> dict[str, Any]:
        """The main config file; subscribers by account go to included files instead."""
        subs = spec.subscriber_specs() if subs is None else subs
        doc: dict[str, Any] = {
            "allow_private_networks": True,
            "broker": {
                "url": self.options.broker_url,
                "exchange": f"{prefix}.events",
                "queue": f"{prefix}.dispatch",
                "binding_keys": ["Message.#"],
                "prefetch": spec.prefetch,
                "queue_type": "classic",
            },
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "signing": {
                "issuer": ISSUER,
                "keys_dir": str(self.keys_dir),
                "algorithm": "EdDSA",
                "token_ttl": "5m",
            },
            "retry": {"schedule": list(spec.retry_schedule), "jitter": 0.1, "max_age": "1h"},
            "dispatcher": {
                "workers": spec.workers,
                "log_level": "warning",
                "log_format": "json",
                "drain_timeout": "10s",
            },
        }
        if spec.accounts is not None:
            doc["include"] = [f"{INCLUDE_DIR}/*.toml"]
        else:
            doc["subscribers"] = [
                {"id": s.id, "url": url, "events": list(s.events), **self.subscriber_keys(spec)}
                for s, url in zip(subs, urls, strict=False)
            ]
        return doc

    # --- one phase ---------------------------------------------------------------------------

    async def phase(self, spec: PhaseSpec) -> PhaseResult:
        assert self.receivers is not None
        if self.name_prefix:
            spec = replace(spec, name=self.name_prefix + spec.name)
        if spec.source is None and self.options.source:
            spec = replace(spec, source=self.options.source)
        tables: list[dict[str, Any]] = []
        if spec.accounts is not None:
            tables = spec.accounts.tables(self.receiver_ports)
            urls: Sequence[str] = [t["url"] for t in tables]
            subs = specs_of(tables)
        else:
            if spec.subscribers > len(self.receivers.urls):
                raise ValueError(
                    f"{spec.name}: {spec.subscribers} subscribers, "
                    f"only {len(self.receivers.urls)} receivers"
                )
            urls = self.receivers.urls[: spec.subscribers]
            subs = spec.subscriber_specs()
        self._phase_no += 1
        prefix = f"lt-{self.run_id}-{self._phase_no}"
        doc = self.dispatcher_doc(spec, prefix, urls, subs)
        # The load test reads only the broker's names from it; the dispatcher itself judges the
        # subscribers (and refuses, in one line, what it does not support yet).
        try:
            broker = parse_config(
                {k: v for k, v in doc.items() if k not in ("include", "subscribers")},
                env={},
                source="<loadtest>",
            ).broker
        except ConfigError as exc:
            raise PhaseFailed(f"{spec.name}: {exc}") from None
        phase = _PhaseRun(self, spec, broker, doc, urls, subs, tables, prefix)
        try:
            return await phase.run()
        finally:
            await _cleanup(broker, spec, [s.id for s in subs], prefix)


async def _cleanup(
    broker: BrokerConfig, spec: PhaseSpec, sub_ids: Sequence[str], prefix: str
) -> None:
    with contextlib.suppress(Exception):
        if spec.accounts is not None and await delete_prefixed(f"{prefix}.", broker.url):
            return
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel()
            if spec.consumer == DISPATCHER:
                await delete(channel, broker, sub_ids)
            else:
                await channel.queue_delete(broker.queue)
                await channel.exchange_delete(broker.exchange)


class _PhaseRun:
    def __init__(
        self,
        run: Run,
        spec: PhaseSpec,
        broker: BrokerConfig,
        doc: dict[str, Any],
        urls: Sequence[str],
        subs: Sequence[SubscriberSpec],
        tables: list[dict[str, Any]],
        prefix: str,
    ) -> None:
        self.owner = run
        self.spec = spec
        self.broker = broker
        self.doc = doc
        self.urls = urls
        self.subs = subs
        self.tables = tables
        self.prefix = prefix
        assert run.receivers is not None
        self.receivers = run.receivers
        accounts = spec.accounts.active_accounts() if spec.accounts else ()
        self.mix = EventMix(
            seed=spec.seed, invalid_fraction=spec.invalid_fraction, accounts=accounts
        )
        self.generator = Generator(broker.url, broker.exchange, prefix=broker.queue, mix=self.mix)
        self.consumer: DispatcherProcess | Child | None = None
        self.sampler: TreeSampler | None = None
        self.others: dict[str, TreeSampler] = {}
        self.publish_done = False
        self.healed_at: float | None = None
        self.notes: list[str] = []
        self.counters: dict[str, float] = {}
        self.gc_dir: Path | None = None
        self.config_dir = run.tmp / spec.name
        self.census: list[dict[str, Any]] = []
        self.census_tasks: list[asyncio.Task[None]] = []
        self._tiers = frozenset(tier_queue_names(broker.queue))
        self.metrics_bytes: dict[str, int | None] = {}
        self.reload_task: asyncio.Task[dict[str, Any]] | None = None

    @property
    def label(self) -> str:
        return f"[{self.spec.name}]"

    @property
    def by_account(self) -> bool:
        return self.spec.accounts is not None

    async def _declare(self) -> None:
        connection = await aio_pika.connect(self.broker.url)
        async with connection:
            channel = await connection.channel()
            if self.spec.consumer == DISPATCHER:
                await declare(channel, self.broker)
                if not self.by_account:  # thousands of them: left to the dispatcher
                    for sub in self.subs:
                        await declare_parking(channel, self.broker, sub.id)
            else:
                exchange = await channel.declare_exchange(
                    self.broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                queue = await channel.declare_queue(
                    self.broker.queue, durable=True, arguments={"x-queue-type": "classic"}
                )
                await queue.bind(exchange, routing_key="Message.#")

    def _write_config(self) -> Path:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        path = self.config_dir / "dispatcher.toml"
        if self.spec.accounts is not None:
            keys = {"events": ["*"], **self.owner.subscriber_keys(self.spec)}
            write_files(self.config_dir, self.spec.accounts.files_of(self.tables), keys)
        path.write_text(to_toml(self.doc), encoding="utf-8")
        return path

    async def _start_consumer(self) -> float:
        spec, run = self.spec, self.owner
        log = run.log_dir / f"{run._phase_no:02d}-{spec.name}.log"
        self.gc_dir = run.log_dir / f"{run._phase_no:02d}-{spec.name}-gc"
        self.gc_dir.mkdir(exist_ok=True)
        if spec.consumer == DISPATCHER:
            try:
                disp = await DispatcherProcess.start(
                    self._write_config(),
                    run.http_port,
                    spec.workers,
                    log,
                    source=Path(spec.source) if spec.source else None,
                    gc_dir=self.gc_dir,
                )
            except RuntimeError as exc:
                raise PhaseFailed(f"{spec.name}: {exc}") from None
            self.consumer, pid = disp, disp.child.pid
        else:
            child = await start_baseline(
                self.broker.url,
                self.broker.queue,
                spec.prefetch,
                self.urls,
                log,
                gc_dir=self.gc_dir,
            )
            self.consumer, pid = child, child.pid
        started = time.time()
        self.sampler = TreeSampler(pid, children=True, interval=spec.sample_interval)
        self.sampler.start()
        return started

    def _start_others(self) -> None:
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

    async def _census(self, when: str) -> None:
        c = await census(f"{self.prefix}.", self.broker.url, self._known_queues())
        self.census.append({"when": when, **c.as_dict()})
        self.census.sort(key=lambda row: row["at"])

    def _census_soon(self, when: str) -> None:
        """Read the broker in the background (rabbitmqctl takes most of a second)."""
        task = asyncio.create_task(self._census(when))
        self.census_tasks.append(task)

    def _known_queues(self) -> list[str]:
        """Where the dispatcher keeps deliveries that wait: retry tiers and parking queues."""
        q = self.broker.queue
        names = [q] if self.spec.consumer != DISPATCHER else [q, *tier_queue_names(q)]
        if self.spec.consumer == DISPATCHER and not self.by_account:
            names += [parking_queue(q, s.id) for s in self.subs]
        return names

    def _holds_deliveries(self, name: str) -> bool:
        """The work queue, a retry tier or a parking queue (not dead letters, not the
        dispatcher's own control queues)."""
        q = self.broker.queue
        return name == q or name in self._tiers or name.startswith(parking_queue(q, ""))

    async def _consumer_idle(self, channel: aio_pika.abc.AbstractChannel) -> bool:
        if self.spec.consumer == DISPATCHER:
            assert isinstance(self.consumer, DispatcherProcess)
            held = await self.consumer.held()
            if held is None or held > 0:
                return False
        if self.by_account:
            c = await census(f"{self.prefix}.", self.broker.url, self._known_queues())
            if c.method != "rabbitmqctl":
                # Parking queues made by the dispatcher cannot be seen: never call it idle.
                if "rabbitmqctl failed" not in " ".join(self.notes):
                    self.notes.append("rabbitmqctl failed: cannot tell the phase is idle")
                return False
            return sum(m for name, (m, _) in c.queues.items() if self._holds_deliveries(name)) == 0
        for name in self._known_queues():
            q = await channel.declare_queue(name, passive=True)
            if q.declaration_result.message_count:
                return False
        return True

    async def run(self) -> PhaseResult:
        spec = self.spec
        await self.receivers.phase(
            verify=spec.verify and spec.consumer == DISPATCHER,
            jwks_url=self.owner.jwks_url,
            issuer=ISSUER,
            behaviours=list(spec.behaviours),
        )
        await self._declare()
        self._start_others()
        t0 = time.time()
        profiler: Profiler | None = None
        consumer_started = t0
        reload: dict[str, Any] | None = None
        async with self.generator as gen:
            try:
                if spec.preload:
                    await self._publish(gen, show=True)
                    consumer_started = await self._start_consumer()
                else:
                    consumer_started = await self._start_consumer()
                if spec.census and isinstance(self.consumer, DispatcherProcess):
                    await self.consumer.metrics()
                    self.metrics_bytes["ready"] = self.consumer.metrics_bytes
                    self._census_soon("ready")
                if not spec.preload:
                    t0 = time.time()
                if spec.profile:
                    assert self.sampler is not None
                    raw = self.owner.out_dir / f"profile-{self.owner.run_id}-{spec.name}.txt"
                    profiler = Profiler(self.sampler.pid, raw)
                    await profiler.start()
                publishing = None if spec.preload else asyncio.create_task(self._publish(gen))
                if spec.reload_after is not None:
                    self.reload_task = asyncio.create_task(self._reload(gen))
                settled = await self._wait(publishing)
                if self.reload_task is not None:
                    reload = await self.reload_task
                if spec.census:
                    self._census_soon("end")
                await asyncio.gather(*self.census_tasks)
            finally:
                for task in self.census_tasks:
                    task.cancel()
                if self.reload_task is not None and not self.reload_task.done():
                    self.reload_task.cancel()
                if profiler is not None:
                    await profiler.stop()
                for s in self.others.values():
                    await s.stop()
                if self.sampler is not None:
                    await self.sampler.stop()
                if isinstance(self.consumer, DispatcherProcess):
                    self.counters = await self.consumer.counters()
                    self.metrics_bytes["end"] = self.consumer.metrics_bytes
                if self.consumer is not None:
                    code = (
                        await self.consumer.close()
                        if isinstance(self.consumer, DispatcherProcess)
                        else await self.consumer.stop()
                    )
                    if code != 0:
                        self.notes.append(f"{spec.consumer} exited with {code}")
        ended = time.time()
        dead = await self._dead_letters() if spec.consumer == DISPATCHER else []
        # By account, whatever the broker still holds after the stop is read too: a phase
        # judged idle from a listing must not count a delivery that was still waiting as lost.
        pending = [] if settled and not self.by_account else await self._pending()
        if settled and pending:
            settled = False
            self.notes.append(
                "the phase looked settled, but the broker still held deliveries "
                "after the stop (counted as pending, not lost)"
            )
        received = await self.receivers.records(paths=self.by_account)
        records: list[dict[str, Any]] = received["endpoints"]
        paths_summary = None
        if self.by_account:
            paths = received.get("paths") or {}
            records = records_by_path(paths, self.urls)
            paths_summary = await self.receivers.path_stats()
        assert self.sampler is not None
        profile = None
        if profiler is not None and profiler.output.exists():
            profile = {
                "raw": str(profiler.output),
                "rate": profiler.rate,
                **summarize(profiler.output),
            }
        result = summarise(
            PhaseData(
                spec=spec,
                queue=self.broker.queue,
                subscribers=self.subs,
                published=self.generator.published,
                records=records,
                dead=dead,
                pending=pending,
                settled=settled,
                t0=t0,
                consumer_started=consumer_started,
                ended=ended,
                sampler=self.sampler,
                others=self.others,
                publish_stats=self.generator.stats,
                gc=read_dir(self.gc_dir) if self.gc_dir is not None else None,
                receivers_gc=received.get("gc"),
                profile=profile,
                healed_at=self.healed_at,
                notes=self.notes,
                counters=self.counters,
                startup_s=(
                    self.consumer.startup_s
                    if isinstance(self.consumer, DispatcherProcess)
                    else None
                ),
                metrics_bytes=self.metrics_bytes,
                broker=self.census,
                reload=reload,
                account_endpoints=paths_summary,
            )
        )
        self.owner.progress.done(f"{self.label} {result_line(result)}")
        return result

    async def _publish(self, gen: Generator, show: bool = False) -> None:
        spec = self.spec
        count = spec.event_count
        task = asyncio.create_task(gen.run(count, rate=spec.rate))
        while not task.done():
            if show:
                self.owner.progress.show(
                    f"{self.label} preloading {gen.stats.confirmed}/{count} events "
                    f"({gen.stats.confirmed / max(time.time() - gen.stats.started, 1e-3):.0f}/s)"
                )
            await asyncio.wait({task}, timeout=0.5)
        await task
        self.publish_done = True

    async def _reload(self, gen: Generator) -> dict[str, Any]:
        spec = self.spec
        assert spec.accounts is not None and spec.reload_after is not None
        assert isinstance(self.consumer, DispatcherProcess)
        effect = await reload_and_probe(
            after=spec.reload_after,
            layout=spec.accounts,
            ports=self.owner.receiver_ports,
            config_dir=self.config_dir,
            keys={"events": ["*"], **Run.subscriber_keys(spec)},
            dispatcher=self.consumer,
            generator=gen,
            receivers=self.receivers,
            id_prefix=self.broker.queue,
        )
        if spec.census:
            self._census_soon("after reload")
        return effect

    # --- settling ------------------------------------------------------------------------------

    async def _progress(self) -> tuple[list[int], int, tuple[int, ...], int]:
        """(unique per subscriber, or own-account unique of all account endpoints summed;
        received; what changes while anything moves; failures)."""
        if self.by_account:
            ps = await self.receivers.path_stats()
            failed = ps["failures"] + ps["verify_failures"]
            return [ps["own_unique"]], ps["received"], (ps["received"] + failed,), failed
        stats = (await self.receivers.stats())[: len(self.subs)]
        failed = sum(x["failures"] + x["verify_failures"] for x in stats)
        sig = tuple(s["received"] + s["failures"] + s["verify_failures"] for s in stats)
        return [s["unique"] for s in stats], sum(s["received"] for s in stats), sig, failed

    def _owed(self) -> list[int]:
        owed = Owed(self.subs).per_subscriber(self.generator.published)
        return [sum(owed)] if self.by_account else owed

    async def _wait(self, publishing: asyncio.Task[None] | None) -> bool:
        spec = self.spec
        owed: list[int] | None = None
        quiet_since = time.monotonic()
        last_sig: tuple[int, ...] = ()
        last_count, last_t = 0, time.monotonic()
        rate = 0.0
        deadline: float | None = None
        connection = await aio_pika.connect(self.broker.url)
        try:
            channel = await connection.channel()
            while True:
                if publishing is not None and publishing.done():
                    await publishing  # re-raise a publishing failure
                    publishing = None
                child = (
                    self.consumer.child
                    if isinstance(self.consumer, DispatcherProcess)
                    else self.consumer
                )
                if child is not None and not child.running:
                    self.notes.append(f"{spec.consumer} exited early with {child.proc.returncode}")
                    if publishing is not None:
                        publishing.cancel()
                    return False
                if self.publish_done and owed is None:
                    owed = self._owed()
                    deadline = time.monotonic() + spec.settle_timeout
                unique, received, sig, failed = await self._progress()
                now = time.monotonic()
                if sig != last_sig:
                    last_sig, quiet_since = sig, now
                if now - last_t >= 1.0:
                    rate = (received - last_count) / (now - last_t)
                    last_count, last_t = received, now
                self._show(received, owed, rate, failed)
                reloading = self.reload_task is not None and not self.reload_task.done()
                if owed is not None and not reloading:
                    if all_received(unique, owed):
                        return True
                    if self.healed_at is None and heal_due(unique, owed, spec.heal):
                        for i in spec.heal:
                            await self.receivers.behaviour(i, {})
                        self.healed_at = time.time()
                    if now - quiet_since > 1.5 and await self._consumer_idle(channel):
                        # Nothing moves and nothing is held: the rest is in the dead letters.
                        await asyncio.sleep(0.5)
                        if await self._consumer_idle(channel):
                            if self.by_account:
                                self.notes.append(
                                    f"settled idle with {sum(unique)} of {sum(owed)} owed "
                                    "deliveries received: nothing moved, nothing held, no "
                                    "delivery queue holds a message"
                                )
                            return True
                    if deadline is not None and now > deadline:
                        self.notes.append(f"gave up waiting after {spec.settle_timeout:g}s")
                        return False
                await asyncio.sleep(0.25)
        finally:
            await connection.close()

    def _show(self, received: int, owed: list[int] | None, rate: float, failed: int) -> None:
        gen = self.generator
        s = self.sampler.samples[-1] if self.sampler and self.sampler.samples else None
        cpu = ""
        if self.sampler is not None and len(self.sampler.samples) >= 2:
            a, b = self.sampler.samples[-2], self.sampler.samples[-1]
            cpu = f" cpu {100 * (b.cpu - a.cpu) / max(b.t - a.t, 1e-3):.0f}%"
        target = sum(owed) if owed is not None else "?"
        self.owner.progress.show(
            f"{self.label} published {gen.stats.confirmed}/{self.spec.event_count} "
            f"delivered {received}/{target} ({rate:.0f}/s) failed {failed}"
            f"{cpu} rss {(s.rss / MiB if s else 0):.0f}MiB"
        )

    async def _dead_letters(self) -> list[DeadRecord]:
        from dispatcher.broker.dead_letters import DeadLetterTool
        from dispatcher.config import Config

        letters = await DeadLetterTool(Config(broker=self.broker), progress=None).list()
        return [
            DeadRecord(dl.record.event_id, dl.record.subscriber, dl.record.reason) for dl in letters
        ]

    async def _pending(self) -> list[DeadRecord]:
        """Deliveries still waiting in the work queue or the retry tiers (the consumer has
        stopped, so nothing is held): read without acknowledging, handed back on close."""
        from dispatcher.names import H_SUBSCRIBER

        if self.by_account:
            c = await census(f"{self.prefix}.", self.broker.url, self._known_queues())
            names = [n for n, (m, _) in c.queues.items() if m and self._holds_deliveries(n)]
        else:
            names = self._known_queues()
        found: list[DeadRecord] = []
        connection = await aio_pika.connect(self.broker.url)
        async with connection:
            channel = await connection.channel()
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                for _ in range(queue.declaration_result.message_count or 0):
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    raw = (message.headers or {}).get(H_SUBSCRIBER)
                    sub = (
                        raw.decode()
                        if isinstance(raw, bytes)
                        else (raw if isinstance(raw, str) else None)
                    )
                    found.append(DeadRecord(message.message_id, sub, f"pending: {name}"))
        if found:
            self.notes.append(f"{len(found)} deliveries still pending in the broker")
        return found
