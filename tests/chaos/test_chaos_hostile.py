"""Hostile input on the queue: the dispatcher never crashes, dead-letters every bad message
with a reason, and delivers every good one byte for byte.

The fuzzed stream comes from hypothesis (see `chaos_hostile`): malformed JSON, wrong types,
huge fields, deep nesting, invalid UTF-8, unusable ids, missing and junk properties, mixed with
valid events that are odd in every allowed way. It is drawn once per run (seeded: CHAOS_SEED
repeats it) and published raw to the exchange of one running dispatcher process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from chaos_amqp import RawPublisher
from chaos_endpoints import EndpointServer
from chaos_events import owed_to
from chaos_hostile import Hostile, draw_batch
from chaos_ledger import Ledger, record
from chaos_process import PROJECT_ROOT, DispatcherProcess, await_settled
from chaos_scale import SEED, pick
from pamqp import commands

from dispatcher.config import Config
from dispatcher.decisions.events import derive_event_id
from tests.support.harness import dead_letters, event_body, wait_until

pytestmark = pytest.mark.chaos

SUBSCRIBERS = [
    {"id": "everything", "events": ["*"]},
    {"id": "bounces", "events": ["Message.Bounced"]},
]


async def _publish_raw(config: Config, messages: list[Hostile]) -> None:
    """Publish exactly these bytes and properties, confirmed: no library fills anything in
    (aio-pika would add a random message_id to every message that has none)."""
    async with RawPublisher() as pub:
        for m in messages:
            await pub.publish(config.broker.exchange, m.routing_key, m.body, _properties(m))
        await pub.confirmed()


def _properties(m: Hostile) -> commands.Basic.Properties:
    props: dict[str, Any] = {"content_type": "application/json", "delivery_mode": 2}
    props.update(m.props)
    return commands.Basic.Properties(**{k: v for k, v in props.items() if v is not None})


def _subscribers(server: EndpointServer) -> list[dict[str, object]]:
    return [{**s, "url": server.endpoints[str(s["id"])].url} for s in SUBSCRIBERS]


@pytest.mark.timeout(pick(120, 1200))
async def test_fuzzed_hostile_stream_is_dead_lettered_and_good_events_delivered(
    chaos_config, tmp_path: Path
) -> None:
    batch = draw_batch(pick(60, 700), SEED)
    async with EndpointServer() as server:
        server.add("everything", keep_headers=True)
        server.add("bounces", keep_headers=True)
        subs = _subscribers(server)
        doc, cfg = chaos_config(subs, broker={"prefetch": 64})
        bad = [m for m in batch if not m.good]
        ledger = Ledger(f"hostile input: {len(bad)} bad + {len(batch) - len(bad)} good")
        ledger.fault("hypothesis stream")
        by_id: dict[str, Hostile] = {}
        for m in batch:
            if m.good:
                assert m.event_id is not None and m.event_type is not None
                ledger.expect(m.event_id, owed_to(m.event_type, subs))
                by_id[m.event_id] = m
            else:
                ledger.expect_invalid(m.body)

        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            await _publish_raw(cfg, batch)
            tally = await await_settled(ledger, server.receipts, cfg, timeout=pick(60, 300))
            alive = proc.alive
            ready = await proc.readyz()
            code = await proc.terminate()
            logged = proc.log_events()

    record(tally)
    letters = await dead_letters(cfg)
    problems: list[str] = []
    if not alive or ready != 200 or code != 0:
        problems.append(f"dispatcher alive={alive} readyz={ready} exit={code}")
    failures = [e for e in logged if e.get("event") == "message_failed"]
    if failures:
        problems.append(f"{len(failures)} messages broke the pipeline, e.g. {failures[0]}")
    for letter in letters:
        if not letter.record.reason.startswith("invalid_event: "):
            problems.append(
                f"dead letter with reason {letter.record.reason!r} for body {letter.body[:80]!r}"
            )
    for name, endpoint in server.endpoints.items():
        for headers, body in zip(endpoint.headers, endpoint.bodies, strict=True):
            sent = by_id.get(headers.get("webhook-id", ""))
            if sent is not None and body != sent.body:
                problems.append(f"{name}: {sent.kind} body changed in transit")
    lost = {by_id[i].kind for i, _ in tally.missing if i in by_id}
    if lost:
        problems.append(f"good events not delivered: {sorted(lost)[:10]}")
    print(f"\nhostile stream: {dict(sorted(Counter(m.kind.split('/')[0] for m in batch).items()))}")
    assert not problems, "\n".join(problems[:20]) + f"\n({tally.summary()})"
    tally.holds(max_duplicates=0)


# --- found by the fuzzed stream, pinned down ------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_non_numeric_published_at_header_does_not_break_a_valid_event(
    chaos_config, tmp_path: Path
) -> None:
    """``x-published-at`` is an optional header a delivery node may send (unix ms). A value
    of the wrong type must not stop a valid event: delivered once to each subscriber, no dead
    letter."""
    async with EndpointServer() as server:
        server.add("everything")
        server.add("bounces")
        subs = _subscribers(server)
        doc, cfg = chaos_config(subs)
        ledger = Ledger("hostile header: x-published-at not a number")
        values: list[Any] = ["yesterday", bytearray(b"\x00\x01"), [1, 2], {"ms": 1}, True, None]
        batch = []
        for i, value in enumerate(values):
            body = event_body("Message.Bounced", n=i, event_id=f"pub-at-{i}")
            batch.append(
                Hostile(
                    "good:published_at",
                    body,
                    True,
                    f"pub-at-{i}",
                    "Message.Bounced",
                    props={"headers": {"x-published-at": value}},
                )
            )
            ledger.expect(f"pub-at-{i}", owed_to("Message.Bounced", subs))
        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            await _publish_raw(cfg, batch)
            tally = await await_settled(ledger, server.receipts, cfg, timeout=20)
            await proc.terminate()
    record(tally)
    letters = await dead_letters(cfg)
    assert not letters, [(d.record.event_id, d.record.reason) for d in letters]
    tally.holds(max_duplicates=0)


@pytest.mark.timeout(60)
async def test_dispatcher_headers_on_a_published_event_do_not_redirect_it(
    chaos_config, tmp_path: Path
) -> None:
    """An event published to the events exchange is a new event, whatever headers it carries:
    the dispatcher's own retry headers (``x-dispatch-subscriber``, ``x-dispatch-attempt``) on it
    must not narrow it to one subscriber, mark it as a late attempt, or dead-letter it."""
    async with EndpointServer() as server:
        server.add("everything")
        server.add("bounces")
        subs = _subscribers(server)
        doc, cfg = chaos_config(subs)
        ledger = Ledger("hostile header: forged x-dispatch-* on ingest")
        forged: list[dict[str, Any]] = [
            {"x-dispatch-subscriber": "bounces"},
            {"x-dispatch-subscriber": "everything", "x-dispatch-attempt": 99},
            {"x-dispatch-subscriber": "no-such-subscriber"},
            {"x-dispatch-subscriber": "bounces", "x-dispatch-first-attempt": 1},
        ]
        batch = []
        for i, headers in enumerate(forged):
            body = event_body("Message.Bounced", n=i, event_id=f"forged-{i}")
            batch.append(
                Hostile(
                    "good:forged_headers",
                    body,
                    True,
                    f"forged-{i}",
                    "Message.Bounced",
                    props={"headers": headers},
                )
            )
            ledger.expect(f"forged-{i}", owed_to("Message.Bounced", subs))
        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            await _publish_raw(cfg, batch)
            tally = await await_settled(ledger, server.receipts, cfg, timeout=10)
            await proc.terminate()
    record(tally)
    letters = await dead_letters(cfg)
    assert not letters, [(d.record.event_id, d.record.subscriber, d.record.reason) for d in letters]
    tally.holds(max_duplicates=0)


@pytest.mark.timeout(60)
async def test_a_mistyped_bounce_type_is_dead_lettered_as_invalid(
    chaos_config, tmp_path: Path
) -> None:
    """``data.bounce_type`` of any type other than one of the four strings is an invalid
    event: dead-lettered ``invalid_event: ...`` on the first try, never delivered, never a
    pipeline failure (an array or object must not reach a set lookup)."""
    async with EndpointServer() as server:
        server.add("everything")
        server.add("bounces")
        subs = _subscribers(server)
        doc, cfg = chaos_config(subs)
        ledger = Ledger("hostile body: bounce_type an array or object")
        batch = []
        for i, value in enumerate([["HardBounce"], {"kind": "HardBounce"}, 7, None, True]):
            body = event_body("Message.Bounced", n=i, event_id=f"bt-{i}").replace(
                b'"bounce_type":"HardBounce"', b'"bounce_type":' + orjson.dumps(value)
            )
            batch.append(Hostile("bad:wrong_type:data.bounce_type", body, False))
            ledger.expect_invalid(body)
        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            await _publish_raw(cfg, batch)
            tally = await await_settled(ledger, server.receipts, cfg, timeout=20)
            await proc.terminate()
            failures = [e for e in proc.log_events() if e.get("event") == "message_failed"]
    record(tally)
    letters = await dead_letters(cfg)
    assert not failures, failures[0].get("error")
    assert sorted(d.record.reason.split(":")[0] for d in letters) == ["invalid_event"] * 5, [
        d.record.reason for d in letters
    ]
    tally.holds(max_duplicates=0)


@pytest.mark.timeout(60)
async def test_an_event_published_twice_without_an_id_keeps_its_id(
    chaos_config, tmp_path: Path
) -> None:
    """A delivery node that republishes after a lost confirm (at-least-once publishing) must
    produce the same event id, so subscribers can drop the duplicate: with no ``id`` in the
    body the contract derives it from the body. Published twice with ``dispatcher publish``."""
    async with EndpointServer() as server:
        server.add("everything")
        server.add("bounces")
        subs = _subscribers(server)
        doc, _ = chaos_config(subs)
        body = event_body("Message.Complained", n=1)  # no "id"
        events = tmp_path / "event.json"
        events.write_bytes(body)
        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            for _ in range(2):
                code, text = await _cli_publish(proc.config_path, events)
                assert code == 0, text
            everything = server.endpoints["everything"]
            assert await wait_until(lambda: len(everything.receipts) >= 2, timeout=15)
            await proc.terminate()
    ids = everything.receipts
    assert ids[0] == ids[1], f"one event, two ids: {ids} (a subscriber cannot dedupe)"


async def _cli_publish(config: Path, path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "--config",
        str(config),
        "publish",
        str(path),
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.timeout(60)
async def test_a_dead_letter_of_a_message_without_an_id_does_not_invent_one(
    chaos_config, tmp_path: Path
) -> None:
    """`dlq list` shows each dead letter's ``event_id``. For a message that carried no usable
    id (not JSON, so no body id either) there is none to show: the record must not present a
    made-up id that matches nothing the delivery node sent."""
    async with EndpointServer() as server:
        server.add("everything")
        server.add("bounces")
        doc, cfg = chaos_config(_subscribers(server))
        ledger = Ledger("hostile body: no id at all")
        body = b"not json, and no message_id property"
        ledger.expect_invalid(body)
        async with DispatcherProcess(doc, tmp_path) as proc:
            await proc.start()
            await _publish_raw(cfg, [Hostile("bad:not_json", body, False)])
            tally = await await_settled(ledger, server.receipts, cfg, timeout=20)
            await proc.terminate()
    record(tally)
    [letter] = await dead_letters(cfg)
    assert letter.record.reason.startswith("invalid_event: ")
    assert letter.record.event_id in (None, derive_event_id(body)), (
        f"dead letter shows event_id {letter.record.event_id!r}: an id nobody sent"
    )
