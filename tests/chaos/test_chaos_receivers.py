"""Subscribers that misbehave: each delivery ends the way the contract says, and a healthy
subscriber of the same events gets each of them exactly once.

One dispatcher serves one subscriber per fault plus a healthy control; every event is owed to
all of them. Per fault the table says how the deliveries must end:

    fault                              ends as            record
    down for a while, then up          delivered          -
    500 always                         dead letter        attempts_exhausted, last_status 500
    500 twice, then 200                delivered          (3 attempts)
    429 + Retry-After: 1, then 200     delivered          next attempt >= 1 s later
    503 + Retry-After: 1, then 200     delivered          next attempt >= 1 s later
    410 Gone                           dead letter        endpoint_gone, 1 attempt, no retry
    hangs past the timeout             dead letter        attempts_exhausted, "timeout..."
    hangs once, then answers           delivered          (2 attempts)
    resets the connection              dead letter        attempts_exhausted, "connection..."
    resets twice, then answers         delivered          (3 attempts)
    answers byte by byte, in time      delivered          (1 attempt)
    answers byte by byte, too slowly   dead letter        attempts_exhausted, "timeout..."
    enormous 200 body                  delivered          the body is not downloaded
    enormous 500 body                  dead letter        attempts_exhausted, short last_error
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from chaos_endpoints import (
    Behaviour,
    Endpoint,
    EndpointServer,
    abort_connection,
    drip,
    enormous,
    hang,
    respond,
)
from chaos_ledger import Ledger, record
from chaos_process import await_settled
from chaos_scale import pick

from tests.support.harness import Publisher, dead_letters, event_body, running

pytestmark = pytest.mark.chaos

# Request timeouts: short where the fault is about time (hangs, drips), generous elsewhere so
# a busy event loop (receivers and dispatcher share it) never turns an answer into a timeout.
SHORT, LONG = "500ms", "5s"
SCHEDULE = ["100ms", "200ms", "400ms", "800ms", "1500ms"]  # 6 attempts over 3 s
ATTEMPTS = len(SCHEDULE) + 1
DOWN_FOR = pick(1.0, 1.5)  # well inside the schedule: the subscriber must get everything
HUGE = pick(50, 200) * 1024 * 1024
CAP = 64 * 1024  # [dispatcher].max_response_bytes (the default)


@dataclass
class Fault:
    name: str
    behaviour: Behaviour | None
    ends: str  # "delivered" or a dead-letter reason
    attempts: int | None = None  # exact attempts per event at the endpoint, when fixed
    at_least: bool = False  # ... or at least that many (a timeout may strike once more)
    status: int | None = None  # the dead letter's last_status
    error: str | None = None  # the dead letter's last_error prefix
    check: Callable[[Endpoint, list[str]], list[str]] | None = None  # extra checks
    down: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def _retry_after_respected(endpoint: Endpoint, ids: list[str]) -> list[str]:
    problems = []
    for event_id in ids:
        hits = sorted(endpoint.hits_for(event_id), key=lambda h: h.arrived)
        if len(hits) < 2:
            problems.append(f"{event_id}: {len(hits)} attempts, expected a second one")
            continue
        gap = hits[1].arrived - hits[0].answered
        if gap < 1.0 - 0.01:
            problems.append(f"{event_id}: next attempt {gap:.3f}s after Retry-After: 1")
    return problems


def _body_not_downloaded(endpoint: Endpoint, ids: list[str]) -> list[str]:
    # What the server managed to write: the dispatcher's cap plus socket buffers, never the
    # whole body (which would be len(ids) x HUGE or more).
    per_attempt = endpoint.bytes_sent / max(1, endpoint.requests)
    limit = 16 * 1024 * 1024
    if per_attempt > limit:
        return [f"{per_attempt / 2**20:.1f} MiB written per attempt: the body was downloaded"]
    return []


FAULTS = [
    Fault("down for a while", None, "delivered", down=True),
    Fault(
        "500 always",
        respond(500, body=b"internal error"),
        "attempts_exhausted",
        attempts=ATTEMPTS,
        status=500,
        error="http 500",
    ),
    Fault("500 twice, then 200", respond(500, times=2), "delivered", attempts=3),
    Fault(
        "429 + Retry-After",
        respond(429, headers={"Retry-After": "1"}, times=1),
        "delivered",
        attempts=2,
        check=_retry_after_respected,
    ),
    Fault(
        "503 + Retry-After",
        respond(503, headers={"Retry-After": "1"}, times=1),
        "delivered",
        attempts=2,
        check=_retry_after_respected,
    ),
    Fault("410 Gone", respond(410), "endpoint_gone", attempts=1, status=410),
    Fault(
        "hangs past the timeout",
        hang(),
        "attempts_exhausted",
        attempts=ATTEMPTS,
        error="timeout",
        options={"timeout": SHORT},
    ),
    Fault(
        "hangs once",
        hang(times=1),
        "delivered",
        attempts=2,
        at_least=True,
        options={"timeout": SHORT},
    ),
    Fault(
        "resets the connection",
        abort_connection(),
        "attempts_exhausted",
        attempts=ATTEMPTS,
        error="connection",
    ),
    Fault("resets twice", abort_connection(times=2), "delivered", attempts=3),
    Fault("byte by byte, in time", drip(20, 0.02), "delivered", attempts=1),
    Fault(
        "byte by byte, too slow",
        drip(10_000, 0.05),
        "attempts_exhausted",
        attempts=ATTEMPTS,
        error="timeout",
        options={"timeout": SHORT},
    ),
    Fault("enormous 200 body", enormous(HUGE), "delivered", attempts=1, check=_body_not_downloaded),
    Fault(
        "enormous 500 body",
        enormous(HUGE, status=500),
        "attempts_exhausted",
        attempts=ATTEMPTS,
        status=500,
        error="http 500",
        check=_body_not_downloaded,
    ),
]


def _sub_id(fault: Fault) -> str:
    return "".join(c if c.isalnum() else "-" for c in fault.name.lower()).strip("-")[:60]


@pytest.mark.timeout(pick(90, 600))
async def test_receiver_faults_each_end_as_the_contract_says(make) -> None:
    n_events = pick(12, 150)
    ids = [f"rx-{i:04d}" for i in range(n_events)]
    async with EndpointServer() as server, EndpointServer(down=True) as down_server:
        control = server.add("control")
        endpoints: dict[str, Endpoint] = {}
        subscribers: list[dict[str, Any]] = [{"id": "control", "url": control.url}]
        for fault in FAULTS:
            host = down_server if fault.down else server
            endpoint = host.add(_sub_id(fault), fault.behaviour)
            endpoints[fault.name] = endpoint
            subscribers.append(
                {"id": _sub_id(fault), "url": endpoint.url, "timeout": LONG, **fault.options}
            )
        # The breaker would let one probe at a time through to a dead endpoint: right for
        # production, but here it only stretches each fault's schedule. Keep it out of the way.
        cfg = make(
            subscribers,
            retry={"schedule": SCHEDULE, "jitter": 0.0},
            breaker={"failure_threshold": 10_000},
        )
        ledgers = {f.name: Ledger(f"receiver: {f.name}") for f in FAULTS}
        everything = Ledger("receiver faults (all subscribers)")
        for fault in FAULTS:
            ledgers[fault.name].fault(fault.name)
        for event_id in ids:
            everything.expect(event_id, [s["id"] for s in subscribers])
            for fault in FAULTS:
                ledgers[fault.name].expect(event_id, [_sub_id(fault)])

        def receipts() -> dict[str, list[str]]:
            return {**server.receipts(), **down_server.receipts()}

        # The in-process dispatcher logs through structlog: keep it off the terminal, and check it.
        with structlog.testing.capture_logs() as logs:
            async with running(cfg), Publisher(cfg) as pub:
                await _publish_and_settle(pub, ids, down_server, everything, receipts, cfg)

    # Accounting per fault, then the contract's ending for each.
    letters = await dead_letters(cfg)
    problems: list[str] = []
    for fault in FAULTS:
        sub = _sub_id(fault)
        endpoint = endpoints[fault.name]
        mine = [d for d in letters if d.record.subscriber == sub]
        tally = record(ledgers[fault.name].account({sub: endpoint.receipts}, mine))
        try:
            tally.holds(max_duplicates=0)
        except AssertionError as exc:
            problems.append(str(exc))
        problems += [f"{fault.name}: {p}" for p in _ending(fault, endpoint, mine, ids)]
    failures = [e for e in logs if e.get("event") == "message_failed"]
    if failures:
        problems.append(f"{len(failures)} messages broke the pipeline, e.g. {failures[0]}")
    control_ids = sorted(control.receipts)
    if control_ids != ids:
        problems.append(
            f"control subscriber got {len(control_ids)} receipts for "
            f"{len(set(control_ids))} events, expected each of {len(ids)} once"
        )
    assert not problems, "\n".join(problems)


async def _publish_and_settle(
    pub: Publisher,
    ids: list[str],
    down_server: EndpointServer,
    everything: Ledger,
    receipts: Any,
    cfg: Any,
) -> None:
    await pub.publish_many(
        [event_body("Message.Bounced", n=i, event_id=event_id) for i, event_id in enumerate(ids)]
    )
    await asyncio.sleep(DOWN_FOR)
    await down_server.up()
    await await_settled(everything, receipts, cfg, timeout=pick(60, 300))


def _attempts_ok(fault: Fault, n: int) -> bool:
    assert fault.attempts is not None
    return n >= fault.attempts if fault.at_least else n == fault.attempts


def _ending(fault: Fault, endpoint: Endpoint, letters: list[Any], ids: list[str]) -> list[str]:
    problems: list[str] = []
    if fault.ends == "delivered":
        if letters:
            problems.append(f"{len(letters)} dead letters, e.g. {letters[0].record}")
    else:
        for letter in letters:
            rec = letter.record
            if rec.reason != fault.ends:
                problems.append(f"{rec.event_id}: reason {rec.reason!r}, expected {fault.ends!r}")
            if fault.status is not None and rec.last_status != fault.status:
                problems.append(f"{rec.event_id}: last_status {rec.last_status}")
            if fault.error is not None and not (rec.last_error or "").startswith(fault.error):
                problems.append(f"{rec.event_id}: last_error {rec.last_error!r}")
            if rec.last_error is not None and len(rec.last_error) > 500:
                problems.append(f"{rec.event_id}: last_error is {len(rec.last_error)} chars")
            if fault.attempts is not None and not _attempts_ok(fault, rec.attempts):
                problems.append(f"{rec.event_id}: record says {rec.attempts} attempts")
        if endpoint.receipts:
            problems.append(f"{len(endpoint.receipts)} receipts for a fault that never accepts")
    if fault.attempts is not None:
        wrong = {
            i: endpoint.attempts[i] for i in ids if not _attempts_ok(fault, endpoint.attempts[i])
        }
        if wrong:
            problems.append(
                f"attempts per event should be {'>= ' * fault.at_least}"
                f"{fault.attempts}: "
                f"{dict(list(wrong.items())[:5])}"
            )
    if fault.check is not None:
        problems += fault.check(endpoint, ids)
    return problems[:10]
