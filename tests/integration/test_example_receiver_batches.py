"""The example receiver takes batches: a real Dispatcher (real RabbitMQ) delivers batches to it
over loopback, and each event's effect lands in SQLite or PostgreSQL exactly once, however often
a batch, or an event inside another batch, arrives again. A batch that cannot be applied whole
is refused whole."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from dispatcher.config import Config
from dispatcher.decisions.batching import batch_body
from dispatcher.decisions.events import derive_event_id
from example_receiver import ReceiverSettings, SettingsError, create_app
from example_receiver.events import BatchError, derived_event_id, parse_batch, split_array
from example_receiver.settings import parse_size
from signing import KeyRing, TokenMinter
from tests.support.harness import Publisher, event_body, running, settle, wait_until
from tests.support.ports import free_port
from tests.support.receiver_helpers import ISSUER, SUBJECT, Sender, bound_socket, jwks_server, serve
from tests.support.receiver_recipes import ServerProcess, recipe_env

PG_DSN = os.environ.get("RECEIVER_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PATH = "/webhooks/email"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCS = PROJECT_ROOT / "docs" / "receivers.md"
_BATCH_RECIPE = re.compile(
    r"<!-- batch-recipe: (?P<name>[\w.]+) -->\s*```python\n(?P<code>.*?)```", re.DOTALL
)

pytestmark = pytest.mark.timeout(120)


def new_batch_id() -> str:
    return "bat_" + uuid.uuid4().hex[:24]


# -- the two databases, read the same way -----------------------------------------------------

_ORDERED = {
    "users": "SELECT * FROM users ORDER BY email",
    "soft_bounce_log": "SELECT * FROM soft_bounce_log ORDER BY email, at, webhook_id",
    "processed_webhooks": "SELECT * FROM processed_webhooks ORDER BY webhook_id",
}

Snapshot = dict[str, list[tuple[Any, ...]]]


@dataclass
class Db:
    """One receiver database: a SQLite file, or a fresh PostgreSQL schema."""

    db_url: str
    schema: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return {"db_url": self.db_url, "db_schema": self.schema}

    async def rows(self, query: str) -> list[tuple[Any, ...]]:
        if self.schema is None:
            conn = sqlite3.connect(self.db_url.removeprefix("sqlite:///"))
            try:
                return [tuple(r) for r in conn.execute(query).fetchall()]
            finally:
                conn.close()
        pg = await asyncpg.connect(PG_DSN, server_settings={"search_path": self.schema})
        try:
            return [tuple(r) for r in await pg.fetch(query)]
        finally:
            await pg.close()

    async def execute(self, statement: str) -> None:
        if self.schema is None:
            conn = sqlite3.connect(self.db_url.removeprefix("sqlite:///"))
            try:
                conn.execute(statement)
                conn.commit()
            finally:
                conn.close()
            return
        pg = await asyncpg.connect(PG_DSN, server_settings={"search_path": self.schema})
        try:
            await pg.execute(statement)
        finally:
            await pg.close()

    async def snapshot(self) -> Snapshot:
        """Every row of every table in a fixed order: equal snapshots, unchanged database."""
        return {table: await self.rows(query) for table, query in _ORDERED.items()}

    async def processed(self) -> dict[str, str | None]:
        """webhook/event id -> the action recorded for it."""
        return {
            r[0]: r[1] for r in await self.rows("SELECT webhook_id, action FROM processed_webhooks")
        }

    async def users(self) -> dict[str, tuple[bool, int, bool, str | None]]:
        """email -> (email_valid, soft_bounces, unsubscribed, invalid_reason)."""
        rows = await self.rows(
            "SELECT email, email_valid, soft_bounces, unsubscribed, invalid_reason FROM users"
        )
        return {r[0]: (bool(r[1]), int(r[2]), bool(r[3]), r[4]) for r in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    if request.param == "sqlite":
        yield Db(f"sqlite:///{tmp_path / 'receiver.sqlite3'}")
        return
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL not reachable at {PG_DSN}: {exc} (start it; these tests need it)")
    schema = f"receiver_batch_{uuid.uuid4().hex[:12]}"
    try:
        yield Db(PG_DSN, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


# -- a receiver, fed by a dispatcher or by hand -----------------------------------------------


@dataclass
class Tap:
    """Records each request the receiver answered: (headers, body, status)."""

    seen: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        response = await handler(request)
        self.seen.append((dict(request.headers), body, response.status))
        return response

    def batches(self) -> list[tuple[dict[str, str], bytes]]:
        """The batches answered 2xx."""
        return [(h, b) for h, b, status in self.seen if "webhook-batch-size" in h and status < 300]

    def events_delivered(self) -> int:
        return sum(int(h["webhook-batch-size"]) for h, _ in self.batches())


@dataclass
class Rig:
    url: str
    db: Db
    tap: Tap
    minter: TokenMinter
    session: aiohttp.ClientSession
    publisher: Publisher | None = None

    def headers(
        self, webhook_id: str, body: bytes, *, size: int | None = None, account: str | None = None
    ) -> dict[str, str]:
        """Headers as the dispatcher sends them, with a fresh token; a batch when `size`."""
        token = self.minter.mint(
            audience=self.url, webhook_id=webhook_id, body=body, account=account
        )
        headers = Sender(self.session, self.url).headers(webhook_id, body, token=token)
        if size is not None:
            headers["webhook-batch-size"] = str(size)
        return headers

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        async with self.session.post(self.url, data=body, headers=headers) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else None)

    async def post_batch(
        self,
        events: list[bytes],
        batch_id: str | None = None,
        *,
        size: int | None = None,
        account: str | None = None,
    ) -> tuple[int, Any]:
        body = batch_body(events)
        batch_id = batch_id or new_batch_id()
        size = len(events) if size is None else size
        return await self.post(body, self.headers(batch_id, body, size=size, account=account))


async def _serve_receiver(
    stack: AsyncExitStack, sock: Any, url: str, db: Db, tap: Tap, **settings: Any
) -> None:
    app = create_app(
        ReceiverSettings(
            port=sock.getsockname()[1], audience=url, path=PATH, **db.settings, **settings
        )
    )
    app.middlewares.append(tap.middleware)
    await stack.enter_async_context(serve(app, sock))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def receiver(
    db: Db, tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """An example receiver trusting a key ring of the test's own (no dispatcher): for batches
    crafted by hand. Keyword arguments go to its settings."""
    keyring = KeyRing.load(tmp_path / "keys", "EdDSA")
    minter = TokenMinter(keyring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=300)
    async with AsyncExitStack() as stack:
        jwks_url = await stack.enter_async_context(jwks_server(keyring))

        async def start(**settings: Any) -> Rig:
            sock = bound_socket()
            url = f"http://127.0.0.1:{sock.getsockname()[1]}{PATH}"
            tap = Tap()
            await _serve_receiver(
                stack, sock, url, db, tap, jwks_url=jwks_url, issuer=ISSUER, **settings
            )
            return Rig(url, db, tap, minter, session)

        yield start


@pytest.fixture
async def dispatched(
    db: Db, make: Callable[..., Config], session: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """A running Dispatcher whose one subscriber is batched and is the example receiver, which
    takes its keys from the dispatcher's JWKS."""
    async with AsyncExitStack() as stack:

        async def start(
            *, max_events: int = 10, subscriber_account: str | None = None, **settings: Any
        ) -> Rig:
            sock = bound_socket()
            url = f"http://127.0.0.1:{sock.getsockname()[1]}{PATH}"
            subscriber: dict[str, Any] = {
                "id": "app",
                "url": url,
                "batch": {"max_events": max_events, "max_wait": "200ms"},
            }
            if subscriber_account is not None:
                subscriber["account"] = subscriber_account
            cfg = make([subscriber])
            disp = await stack.enter_async_context(running(cfg))
            assert disp.ops is not None
            tap = Tap()
            await _serve_receiver(
                stack,
                sock,
                url,
                db,
                tap,
                jwks_url=f"http://127.0.0.1:{disp.ops.port}/.well-known/jwks.json",
                issuer=cfg.signing.issuer,
                **settings,
            )
            publisher = await stack.enter_async_context(Publisher(cfg))
            minter = TokenMinter(
                disp.keyring, issuer=cfg.signing.issuer, subject=SUBJECT, ttl_seconds=300
            )
            return Rig(url, db, tap, minter, session, publisher)

        yield start


def _events(prefix: str) -> tuple[list[bytes], dict[str, str]]:
    """40 events of every kind the receiver handles, and the action each must end with."""
    events: dict[str, bytes] = {}
    for i in range(30):
        events[f"{prefix}-hard-{i}"] = event_body(
            n=i, event_id=f"{prefix}-hard-{i}", recipient=f"user{i}@example.com"
        )
    for i in range(3):  # three soft bounces within the 7-day window: the address goes
        events[f"{prefix}-soft-{i}"] = event_body(
            n=100 + i,
            event_id=f"{prefix}-soft-{i}",
            recipient="soft@example.com",
            bounce_type="SoftBounce",
        )
    events[f"{prefix}-unsub"] = event_body(
        "Message.Unsubscribed", event_id=f"{prefix}-unsub", recipient="bye@example.com"
    )
    for i in range(4):
        events[f"{prefix}-delivered-{i}"] = event_body(
            "Message.Delivered", n=200 + i, event_id=f"{prefix}-delivered-{i}"
        )
    # Two events without an id: the dispatcher (and the receiver) derive it from their bytes.
    blocked = event_body(n=300, recipient="blocked@example.com", bounce_type="Blocked")
    delivered = event_body("Message.Delivered", n=301)
    events[derive_event_id(blocked)] = blocked
    events[derive_event_id(delivered)] = delivered

    def action(event_id: str) -> str:
        if "-hard-" in event_id:
            return "invalidated"
        if "-soft-" in event_id:
            return "soft_bounce"  # two logged, one invalidated, in whichever order they arrive
        if event_id.endswith("-unsub"):
            return "unsubscribed"
        if "-delivered-" in event_id or event_id == derive_event_id(delivered):
            return "ignored"
        return "recorded"

    return list(events.values()), {event_id: action(event_id) for event_id in events}


def _check_effects(processed: dict[str, str | None], expected: dict[str, str]) -> None:
    assert set(processed) == set(expected)
    soft = sorted(processed[i] or "" for i, a in expected.items() if a == "soft_bounce")
    assert soft == ["invalidated", "soft_bounce_logged", "soft_bounce_logged"]
    assert {i: processed[i] for i, a in expected.items() if a != "soft_bounce"} == {
        i: a for i, a in expected.items() if a != "soft_bounce"
    }


async def _check_users(db: Db) -> None:
    users = await db.users()
    assert len(users) == 32
    assert all(users[f"user{i}@example.com"] == (False, 0, False, "hard_bounce") for i in range(30))
    assert users["soft@example.com"] == (False, 3, False, "soft_bounce_limit")
    assert users["bye@example.com"] == (True, 0, True, None)
    assert len(await db.rows("SELECT * FROM soft_bounce_log")) == 3


# -- end to end: a dispatcher's batches ------------------------------------------------------


async def test_dispatcher_batches_apply_each_event_once_and_replays_change_nothing(
    dispatched: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await dispatched(max_events=10)
    assert rig.publisher is not None
    prefix = uuid.uuid4().hex[:8]
    bodies, expected = _events(prefix)
    await rig.publisher.publish_many(bodies)
    assert await wait_until(lambda: rig.tap.events_delivered() >= len(bodies), timeout=30)

    batches = rig.tap.batches()
    assert len(batches) >= 4 and all(int(h["webhook-batch-size"]) <= 10 for h, _ in batches)
    assert all(h["webhook-id"].startswith("bat_") for h, _ in batches)
    assert rig.tap.events_delivered() == len(bodies)  # every batch answered 2xx the first time
    _check_effects(await rig.db.processed(), expected)
    await _check_users(rig.db)
    before = await rig.db.snapshot()
    assert len(before["processed_webhooks"]) == len(bodies)  # one row per event, none twice

    # The very same request again: its token's jti was seen, so it is refused before anything.
    headers, body = batches[0]
    assert await rig.post(body, headers) == (401, {"error": "replayed"})
    # The same batch with a fresh token, as the dispatcher's retry sends it: all duplicates.
    batch_id, size = headers["webhook-id"], int(headers["webhook-batch-size"])
    status, answer = await rig.post(body, rig.headers(batch_id, body, size=size))
    assert (status, answer["status"], answer["applied"], answer["duplicates"]) == (
        200,
        "duplicate",
        0,
        size,
    )
    assert await rig.db.snapshot() == before

    # Events delivered before arrive again inside the dispatcher's next batches, beside new ones:
    # only the new ones change anything.
    new = event_body(n=999, event_id=f"{prefix}-new", recipient="new@example.com")
    await rig.publisher.publish_many([*bodies[:5], new, *bodies[-2:]])
    assert await wait_until(lambda: rig.tap.events_delivered() >= len(bodies) + size + 8)
    after = await rig.db.snapshot()
    assert len(after["processed_webhooks"]) == len(bodies) + 1
    assert (await rig.db.processed())[f"{prefix}-new"] == "invalidated"
    assert [u for u in after["users"] if u not in before["users"]] == [
        u for u in after["users"] if u[0] == "new@example.com"
    ]
    assert after["soft_bounce_log"] == before["soft_bounce_log"]


async def test_dispatcher_batches_for_an_account_are_applied(
    dispatched: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await dispatched(max_events=4, subscriber_account="acme", account="acme")
    assert rig.publisher is not None
    prefix = uuid.uuid4().hex[:8]
    ids = [f"{prefix}-{i}" for i in range(8)]
    await rig.publisher.publish_many(
        [event_body(n=i, event_id=ids[i], account="acme") for i in range(8)]
    )
    assert await wait_until(lambda: rig.tap.events_delivered() >= 8, timeout=30)
    assert len(rig.tap.batches()) >= 2
    assert set(await rig.db.processed()) == set(ids)


# -- refused whole: nothing of a bad batch is written ----------------------------------------


def _good(prefix: str, n: int = 3) -> list[bytes]:
    return [
        event_body(n=i, event_id=f"{prefix}-{i}", recipient=f"{prefix}-{i}@example.com")
        for i in range(n)
    ]


BAD_BATCHES: dict[str, tuple[Callable[[list[bytes]], tuple[bytes, str]], str]] = {
    "element-not-an-object": (
        lambda good: (batch_body([good[0], b"7", good[2]]), "3"),
        "element 1: body is not a JSON object",
    ),
    "bounce-without-recipient": (
        lambda good: (
            batch_body([good[0], good[1], b'{"id": "x", "event": "Message.Bounced", "data": {}}']),
            "3",
        ),
        "element 2: data.recipient is missing or not an email address",
    ),
    "id-not-a-string": (
        lambda good: (batch_body([good[0], b'{"id": 5, "event": "Message.Delivered"}']), "2"),
        "element 1: id must be a string",
    ),
    "fewer-elements-than-the-header": (
        lambda good: (batch_body(good), "4"),
        "webhook-batch-size is 4 but the array holds 3 elements",
    ),
    "more-elements-than-the-header": (
        lambda good: (batch_body(good), "2"),
        "webhook-batch-size is 2 but the array holds 3 elements",
    ),
    "size-not-a-number": (lambda good: (batch_body(good), "three"), "webhook-batch-size must be"),
    "size-zero": (lambda good: (b"[]", "0"), "webhook-batch-size must be"),
    "not-an-array": (lambda good: (good[0], "1"), "a batch body must be a JSON array"),
    "not-json": (lambda good: (batch_body(good)[:-1], "3"), "body is not JSON"),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
async def test_a_batch_with_a_bad_element_is_refused_whole(
    receiver: Callable[..., Awaitable[Rig]], name: str
) -> None:
    rig = await receiver()
    prefix = uuid.uuid4().hex[:8]
    assert (await rig.post_batch(_good(f"{prefix}-before")))[0] == 200  # a non-empty database
    before = await rig.db.snapshot()
    build, detail = BAD_BATCHES[name]
    body, size = build(_good(prefix))
    batch_id = new_batch_id()
    headers = rig.headers(batch_id, body)
    headers["webhook-batch-size"] = size
    status, answer = await rig.post(body, headers)
    assert (status, answer["error"]) == (400, "invalid_batch"), answer
    assert answer["detail"].startswith(detail), answer
    assert await rig.db.snapshot() == before
    # Nothing of it was claimed either: its good events are applied when they come properly.
    status, answer = await rig.post_batch(_good(prefix))
    assert (status, answer["applied"]) == (200, 3)


async def test_a_batch_that_fails_to_commit_leaves_nothing_and_answers_503(
    receiver: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await receiver()
    assert (await rig.post_batch(_good("before")))[0] == 200  # a non-empty database
    await rig.db.execute("ALTER TABLE soft_bounce_log RENAME TO elsewhere")  # writes will fail
    before = (await rig.db.processed(), await rig.db.users())
    batch = [
        event_body(event_id="a-blocked", bounce_type="Blocked"),  # processed_webhooks only
        event_body(n=1, event_id="a-hard", recipient="hard@example.com"),
        event_body(n=2, event_id="a-soft", recipient="soft@example.com", bounce_type="SoftBounce"),
    ]
    assert await rig.post_batch(batch) == (503, {"error": "storage_unavailable"})
    # The first member was written before the failure, and rolled back with the rest.
    assert (await rig.db.processed(), await rig.db.users()) == before


async def test_an_event_seen_alone_or_twice_in_one_batch_is_applied_once(
    receiver: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await receiver()
    soft = event_body(event_id="s-1", recipient="s@example.com", bounce_type="SoftBounce")
    status, answer = await rig.post(soft, rig.headers("s-1", soft))  # unbatched, webhook-id = id
    assert (status, answer["action"]) == (200, "soft_bounce_logged")
    other = event_body(n=2, event_id="s-2", recipient="s@example.com", bounce_type="SoftBounce")
    status, answer = await rig.post_batch([soft, other, other])
    assert status == 200
    assert answer == {
        "status": "processed",
        "batch_id": answer["batch_id"],
        "events": 3,
        "applied": 1,
        "duplicates": 2,
        "actions": {"soft_bounce_logged": 1},
    }
    assert (await rig.db.users())["s@example.com"] == (True, 2, False, None)
    # An event first seen in a batch is a duplicate when it comes alone.
    status, answer = await rig.post(other, rig.headers("s-2", other))
    assert (status, answer) == (200, {"status": "duplicate", "webhook_id": "s-2"})
    assert (await rig.db.users())["s@example.com"] == (True, 2, False, None)


async def test_events_without_an_id_are_deduplicated_by_their_derived_id(
    receiver: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await receiver()
    plain = b'  {"event": "Message.Bounced", "data": {"recipient": "x@example.com",\n'
    plain += b'"bounce_type": "SoftBounce"}, "timestamp": "2026-03-12T09:14:02Z"}\n'
    status, answer = await rig.post_batch([plain, event_body(event_id="with-id")])
    assert (status, answer["applied"]) == (200, 2)
    assert set(await rig.db.processed()) == {derive_event_id(plain), "with-id"}
    # The same bytes in another batch are the same event; other bytes are another event.
    status, answer = await rig.post_batch([event_body(event_id="other"), plain])
    assert (status, answer["applied"], answer["duplicates"]) == (200, 1, 1)
    assert (await rig.db.users())["x@example.com"] == (True, 1, False, None)


async def test_concurrent_overlapping_batches_apply_each_event_once(
    receiver: Callable[..., Awaitable[Rig]],
) -> None:
    """The same events in opposite orders, at once, several times: no deadlock, no 503, and
    each event applied by exactly one of the batches."""
    rig = await receiver()
    events = [
        event_body(n=i, event_id=f"c-{i}", recipient=f"c{i % 3}@example.com", bounce_type=kind)
        for i, kind in enumerate(["SoftBounce", "HardBounce", "SoftBounce", "Blocked"] * 3)
    ]
    batches = [events, events[::-1], events[4:] + events[:4], events[::2] + events[1::2]]
    results = await asyncio.gather(*(rig.post_batch(b) for b in batches * 2))
    assert [status for status, _ in results] == [200] * len(results), results
    assert sum(answer["applied"] for _, answer in results) == len(events)
    assert len(await rig.db.processed()) == len(events)
    soft_bounces = {email: row[1] for email, row in (await rig.db.users()).items()}
    assert soft_bounces == {"c0@example.com": 2, "c1@example.com": 2, "c2@example.com": 2}


# -- accounts -------------------------------------------------------------------------------


@pytest.mark.parametrize("account_setting", ["acme", None], ids=["--account", "token-claim"])
async def test_a_batch_holding_another_accounts_event_is_refused_with_403(
    receiver: Callable[..., Awaitable[Rig]], account_setting: str | None
) -> None:
    rig = await receiver(account=account_setting)
    mine = [event_body(n=i, event_id=f"m-{i}", account="acme") for i in range(2)]
    assert (await rig.post_batch(mine, account="acme"))[1]["applied"] == 2
    before = await rig.db.snapshot()
    for intruder, found in (
        (event_body(n=9, event_id="t-9", account="globex"), "account 'globex'"),
        (event_body(n=8, event_id="t-8"), "no account"),
    ):
        batch = [event_body(n=5, event_id="m-5", account="acme"), intruder]
        status, answer = await rig.post_batch(batch, account="acme")
        assert (status, answer["error"]) == (403, "account_mismatch")
        assert answer["detail"] == f"element 1 ({intruder_id(intruder)}) has {found}, not 'acme'"
        assert await rig.db.snapshot() == before
    if account_setting is not None:  # and a token for another account never gets that far
        status, answer = await rig.post_batch(mine, account="globex")
        assert (status, answer) == (401, {"error": "wrong_account"})


def intruder_id(body: bytes) -> str:
    return str(orjson.loads(body)["id"])


# -- the parts, without servers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bodies",
    [
        [b'{"event":"a"}', b' {"event": "b", "s": "x,]}\\"["} ', b'\n{"n": [1, {"m": []}]}\n'],
        [b'{"event":"\xc3\xa9t\xc3\xa9"}'],
        [event_body(n=i) for i in range(50)],
    ],
    ids=["whitespace-and-brackets-in-strings", "non-ascii", "fifty"],
)
def test_split_array_finds_each_events_exact_bytes(bodies: list[bytes]) -> None:
    body = batch_body(bodies)
    assert split_array(body) == bodies
    assert [derived_event_id(b) for b in split_array(body)] == [derive_event_id(b) for b in bodies]


def test_parse_batch_takes_ids_and_accounts() -> None:
    body = batch_body([event_body(event_id="e1", account="acme"), event_body(n=2)])
    first, second = parse_batch(body, " 2 ")
    assert (first.event_id, first.account, first.event.recipient) == (
        "e1",
        "acme",
        "user0@example.com",
    )
    assert (second.event_id, second.account) == (derive_event_id(event_body(n=2)), None)
    with pytest.raises(BatchError, match="account is not a string"):
        parse_batch(batch_body([b'{"event": "Message.Delivered", "account": 7}']), "1")


def test_the_receiver_does_not_import_the_dispatcher() -> None:
    code = (
        "import sys, example_receiver, example_receiver.store, example_receiver.__main__;"
        "sys.exit(any(m == 'dispatcher' or m.startswith('dispatcher.') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, timeout=30)
    assert done.returncode == 0


def test_max_body_setting() -> None:
    assert parse_size("1MiB") == 1024 * 1024
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("4096") == 4096
    secret = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    assert ReceiverSettings(hmac_secrets=(secret,), max_body=8 * 1024 * 1024).max_body == 8 << 20
    for bad in (100, 65 * 1024 * 1024):
        with pytest.raises(SettingsError, match="max body"):
            ReceiverSettings(hmac_secrets=(secret,), max_body=bad)
    with pytest.raises(SettingsError, match="bad size"):
        parse_size("lots")


# -- the sketch in docs/receivers.md, exactly as printed ------------------------------------


async def test_the_documented_batch_sketch_applies_each_event_once(
    make: Callable[..., Config], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    [(name, code)] = _BATCH_RECIPE.findall(DOCS.read_text(encoding="utf-8"))
    script = tmp_path / name
    script.write_text(code, encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}{PATH}"
    database = tmp_path / "sketch.sqlite3"
    subscriber = {"id": "sketch", "url": url, "batch": {"max_events": 5, "max_wait": "200ms"}}
    cfg = make([subscriber])

    def applied() -> list[str]:
        conn = sqlite3.connect(database)
        try:
            return sorted(r[0] for r in conn.execute("SELECT id FROM applied"))
        except sqlite3.OperationalError:
            return []  # not created yet
        finally:
            conn.close()

    async with running(cfg) as disp, Publisher(cfg) as pub:
        assert disp.ops is not None
        jwks_url = f"http://127.0.0.1:{disp.ops.port}/.well-known/jwks.json"
        env = recipe_env(jwks_url, url, port, WEBHOOK_DB=str(database))
        argv = [sys.executable, "-W", "error", str(script)]
        async with ServerProcess(argv, port, env, tmp_path) as server:
            prefix = uuid.uuid4().hex[:8]
            bodies = [event_body(n=i, event_id=f"{prefix}-{i}") for i in range(20)]
            bodies += [event_body("Message.Delivered", n=100 + i) for i in range(2)]  # no id
            await pub.publish_many(bodies)
            assert await wait_until(lambda: len(applied()) == 22, timeout=30), server.stderr
            # Old events inside new batches, beside one new event: only that one is added.
            await pub.publish_many([*bodies[:4], event_body(n=50, event_id=f"{prefix}-new")])
            assert await wait_until(lambda: f"{prefix}-new" in applied(), timeout=30)
            await settle(0.5)
            assert len(applied()) == 23
            # A batch that is not what its header says is refused, and adds nothing.
            minter = TokenMinter(
                disp.keyring, issuer=cfg.signing.issuer, subject=SUBJECT, ttl_seconds=300
            )
            rig = Rig(url, Db(f"sqlite:///{database}"), Tap(), minter, session)
            late = event_body(n=60, event_id=f"{prefix}-late")
            status, _ = await rig.post_batch([late], size=2)
            assert status == 400 and len(applied()) == 23
            assert (await rig.post_batch([late, bodies[0]]))[0] == 200
            assert len(applied()) == 24
    assert server.returncode == 0
    assert server.stderr == []
