"""The example subscriber end to end: real aiohttp servers on loopback, real signing keys and
verifier, real SQLite and PostgreSQL. Plus the pure rules as tables."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from example_receiver import ReceiverSettings, SettingsError, create_app
from example_receiver.events import (
    BouncePolicy,
    DeliveryEvent,
    EventError,
    Plan,
    UserState,
    parse_event,
    plan,
    soft_bounce_limit_reached,
)
from example_receiver.settings import DatabaseUrl, parse_duration, parse_listen
from signing import KeyRing, TokenMinter, parse_secrets
from tests.support.receiver_helpers import (
    ISSUER,
    SUBJECT,
    Sender,
    bound_socket,
    claims_for,
    craft_token,
    event_body,
    jwks_server,
    new_webhook_id,
    serve,
    sqlite_snapshot,
    sqlite_user,
)

PG_DSN = os.environ.get("RECEIVER_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PATH = "/webhooks/email"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 12, 9, 14, 2, tzinfo=UTC)


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing.load(tmp_path / "keys", "EdDSA")


@pytest.fixture
def minter(keyring: KeyRing) -> TokenMinter:
    return TokenMinter(keyring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=300)


@pytest.fixture
async def jwks_url(keyring: KeyRing) -> AsyncIterator[str]:
    async with jwks_server(keyring) as url:
        yield url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@dataclass
class Receiver:
    url: str  # the webhook URL, also the token audience
    base: str
    settings: ReceiverSettings
    sender: Sender

    @property
    def db_path(self) -> Path:
        return Path(self.settings.database.target)


StartReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def start_receiver(
    tmp_path: Path, jwks_url: str, minter: TokenMinter, session: aiohttp.ClientSession
) -> AsyncIterator[StartReceiver]:
    """Start a receiver on a fresh loopback port; keyword arguments override its settings."""
    async with AsyncExitStack() as stack:

        async def start(*, jwt: bool = True, **overrides: Any) -> Receiver:
            sock = bound_socket()
            base = f"http://127.0.0.1:{sock.getsockname()[1]}"
            path = overrides.get("path", PATH)
            values: dict[str, Any] = {
                "db_url": f"sqlite:///{tmp_path / f'receiver-{uuid.uuid4().hex[:8]}.sqlite3'}",
                "port": sock.getsockname()[1],
                "path": path,
                "jwks_url": jwks_url if jwt else None,
                "audience": f"{base}{path}" if jwt else None,
                "issuer": ISSUER if jwt else None,
            }
            values.update(overrides)
            settings = ReceiverSettings(**values)
            await stack.enter_async_context(serve(create_app(settings), sock))
            url = f"{base}{settings.path}"
            secrets = [raw for s in settings.hmac_secrets for raw in parse_secrets(s)]
            sender = Sender(session, url, minter if jwt else None, secrets)
            return Receiver(url, base, settings, sender)

        yield start


@pytest.fixture
async def receiver(start_receiver: StartReceiver) -> Receiver:
    return await start_receiver()


# -- the self-healing rules, over HTTP and SQLite ---------------------------------------------


async def test_hard_bounce_invalidates_only_after_the_answer(receiver: Receiver) -> None:
    status, answer = await receiver.sender.post(event_body())
    assert status == 200
    assert answer == {"status": "processed", "action": "invalidated", "reason": "hard_bounce"}
    user = sqlite_user(receiver.db_path, "invalid@example.com")
    assert user is not None
    assert user["email_valid"] == 0
    assert user["invalid_reason"] == "hard_bounce"
    assert user["invalidated_at"] is not None


async def test_complaint_invalidates(receiver: Receiver) -> None:
    body = event_body("Message.Complained", "angry@example.com", bounce_type=None)
    status, answer = await receiver.sender.post(body)
    assert (status, answer["action"], answer["reason"]) == (200, "invalidated", "complaint")
    user = sqlite_user(receiver.db_path, "angry@example.com")
    assert user is not None and user["email_valid"] == 0 and user["invalid_reason"] == "complaint"


async def test_unsubscribe_is_recorded_but_keeps_the_address_valid(receiver: Receiver) -> None:
    body = event_body("Message.Unsubscribed", "bye@example.com", bounce_type=None)
    status, answer = await receiver.sender.post(body)
    assert (status, answer["action"]) == (200, "unsubscribed")
    user = sqlite_user(receiver.db_path, "bye@example.com")
    assert user is not None
    assert (user["email_valid"], user["unsubscribed"], user["invalid_reason"]) == (1, 1, None)


async def test_recipient_is_lowercased(receiver: Receiver) -> None:
    status, _ = await receiver.sender.post(event_body(recipient="  Mixed.Case@Example.COM "))
    assert status == 200
    assert sqlite_user(receiver.db_path, "mixed.case@example.com") is not None
    assert sqlite_snapshot(receiver.db_path)["users"][0][0] == "mixed.case@example.com"


async def test_three_soft_bounces_within_the_window_invalidate(receiver: Receiver) -> None:
    days = [NOW - timedelta(days=5), NOW - timedelta(days=3)]
    for at in days:
        body = event_body(
            recipient="full@example.com", bounce_type="SoftBounce", timestamp=_iso(at)
        )
        status, answer = await receiver.sender.post(body)
        assert (status, answer["action"]) == (200, "soft_bounce_logged")
    user = sqlite_user(receiver.db_path, "full@example.com")
    assert user is not None and (user["email_valid"], user["soft_bounces"]) == (1, 2)

    body = event_body(recipient="full@example.com", bounce_type="SoftBounce", timestamp=_iso(NOW))
    status, answer = await receiver.sender.post(body)
    assert (status, answer["action"], answer["reason"]) == (200, "invalidated", "soft_bounce_limit")
    user = sqlite_user(receiver.db_path, "full@example.com")
    assert user is not None and (user["email_valid"], user["soft_bounces"]) == (0, 3)
    assert user["invalid_reason"] == "soft_bounce_limit"


async def test_soft_bounces_spread_beyond_the_window_keep_the_address(receiver: Receiver) -> None:
    for days_ago in (30, 20, 10, 0):  # four soft bounces, never three within 7 days
        at = NOW - timedelta(days=days_ago)
        body = event_body(
            recipient="slow@example.com", bounce_type="SoftBounce", timestamp=_iso(at)
        )
        status, answer = await receiver.sender.post(body)
        assert (status, answer["action"]) == (200, "soft_bounce_logged")
    user = sqlite_user(receiver.db_path, "slow@example.com")
    assert user is not None and (user["email_valid"], user["soft_bounces"]) == (1, 4)


async def test_soft_bounce_limit_and_window_are_settings(start_receiver: StartReceiver) -> None:
    receiver = await start_receiver(soft_bounce_limit=2, soft_bounce_window=timedelta(hours=1))
    first = event_body(recipient="s@example.com", bounce_type="SoftBounce", timestamp=_iso(NOW))
    later = NOW + timedelta(minutes=30)
    second = event_body(recipient="s@example.com", bounce_type="SoftBounce", timestamp=_iso(later))
    assert (await receiver.sender.post(first))[1]["action"] == "soft_bounce_logged"
    assert (await receiver.sender.post(second))[1]["action"] == "invalidated"


async def test_blocked_and_undetermined_are_recorded_only(receiver: Receiver) -> None:
    for kind in ("Blocked", "Undetermined"):
        status, answer = await receiver.sender.post(event_body(bounce_type=kind))
        assert (status, answer["action"]) == (200, "recorded")
    snapshot = sqlite_snapshot(receiver.db_path)
    assert snapshot["users"] == [] and snapshot["soft_bounce_log"] == []
    assert sorted(row[3] for row in snapshot["processed_webhooks"]) == ["recorded", "recorded"]


async def test_unhandled_event_types_are_accepted_with_204(receiver: Receiver) -> None:
    webhook_id = new_webhook_id()
    body = event_body("Message.Delivered", bounce_type=None)
    status, answer = await receiver.sender.post(body, webhook_id)
    assert (status, answer) == (204, None)
    status, answer = await receiver.sender.post(b'{"event": "Something.New"}')
    assert (status, answer) == (204, None)
    snapshot = sqlite_snapshot(receiver.db_path)
    assert snapshot["users"] == []
    assert {row[0]: row[3] for row in snapshot["processed_webhooks"]}[webhook_id] == "ignored"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"event": 7}', b'{"event": "Message.Bounced", "data": {}}'],
    ids=["not-json", "not-object", "event-not-string", "bounce-without-recipient"],
)
async def test_malformed_body_with_a_valid_signature_is_400(
    receiver: Receiver, body: bytes
) -> None:
    status, answer = await receiver.sender.post(body)
    assert status == 400 and answer["error"] == "invalid_event"
    assert sqlite_snapshot(receiver.db_path) == {
        "users": [],
        "soft_bounce_log": [],
        "processed_webhooks": [],
    }


# -- idempotency ------------------------------------------------------------------------------


async def test_same_webhook_id_again_changes_nothing_and_answers_200(receiver: Receiver) -> None:
    webhook_id = new_webhook_id()
    body = event_body(bounce_type="SoftBounce")
    assert (await receiver.sender.post(body, webhook_id))[0] == 200
    before = sqlite_snapshot(receiver.db_path)
    for _ in range(2):  # each retry carries a fresh token (a new jti) for the same webhook-id
        status, answer = await receiver.sender.post(body, webhook_id)
        assert status == 200
        assert answer == {"status": "duplicate", "webhook_id": webhook_id}
    assert sqlite_snapshot(receiver.db_path) == before
    assert before["soft_bounce_log"][0][0] == "invalid@example.com"
    assert len(before["soft_bounce_log"]) == 1


async def test_concurrent_duplicates_are_applied_once(receiver: Receiver) -> None:
    webhook_id = new_webhook_id()
    body = event_body(bounce_type="SoftBounce")
    results = await asyncio.gather(*(receiver.sender.post(body, webhook_id) for _ in range(8)))
    assert [status for status, _ in results] == [200] * 8
    statuses = sorted(answer["status"] for _, answer in results)
    assert statuses == ["duplicate"] * 7 + ["processed"]
    user = sqlite_user(receiver.db_path, "invalid@example.com")
    assert user is not None and user["soft_bounces"] == 1


# -- no 2xx without a commit ------------------------------------------------------------------


async def test_a_failed_write_answers_503_and_rolls_back_the_claim(receiver: Receiver) -> None:
    assert (await receiver.sender.post(event_body(recipient="first@example.com")))[0] == 200
    conn = sqlite3.connect(receiver.db_path)
    conn.execute("ALTER TABLE users RENAME TO users_elsewhere")  # the next write will fail
    conn.commit()
    conn.close()
    webhook_id = new_webhook_id()
    status, answer = await receiver.sender.post(event_body(), webhook_id)
    assert (status, answer) == (503, {"error": "storage_unavailable"})
    conn = sqlite3.connect(receiver.db_path)
    processed = [row[0] for row in conn.execute("SELECT webhook_id FROM processed_webhooks")]
    conn.close()
    assert webhook_id not in processed  # so the sender's retry will be applied, not skipped


# -- forged webhooks never touch the database -------------------------------------------------

Forged = tuple[bytes, dict[str, str]]  # a body and the headers sent with it
Forgery = Callable[[Receiver, KeyRing, Path], Awaitable[Forged]]


async def _other_key(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    other = KeyRing.load(tmp / "attacker-keys", "EdDSA")
    forger = TokenMinter(other, issuer=ISSUER, subject=SUBJECT, ttl_seconds=300)
    body, webhook_id = event_body(), new_webhook_id()
    token = forger.mint(audience=receiver.url, webhook_id=webhook_id, body=body)
    return body, receiver.sender.headers(webhook_id, body, token=token)


async def _other_key_same_kid(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    other = KeyRing.load(tmp / "attacker-keys", "EdDSA").signing_key()
    real_kid = keyring.signing_key().kid
    body, webhook_id = event_body(), new_webhook_id()
    header = {"alg": "EdDSA", "kid": real_kid, "typ": "webhook+jwt"}
    token = craft_token(other, header, claims_for(receiver.url, webhook_id, body))
    return body, receiver.sender.headers(webhook_id, body, token=token)


async def _tampered_body(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    signed = event_body(recipient="someone@example.com", bounce_type="SoftBounce")
    webhook_id = new_webhook_id()
    headers = receiver.sender.headers(webhook_id, signed)
    return event_body(recipient="victim@example.com"), headers


def _crafted(**overrides: Any) -> Forgery:
    async def forge(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
        key = keyring.signing_key()
        body, webhook_id = event_body(), new_webhook_id()
        header = {"alg": key.alg, "kid": key.kid, "typ": "webhook+jwt"}
        token = craft_token(key, header, claims_for(receiver.url, webhook_id, body, **overrides))
        return body, receiver.sender.headers(webhook_id, body, token=token)

    return forge


async def _minted_for(receiver: Receiver, minter: TokenMinter) -> Forged:
    body, webhook_id = event_body(), new_webhook_id()
    token = minter.mint(audience=receiver.url, webhook_id=webhook_id, body=body)
    return body, receiver.sender.headers(webhook_id, body, token=token)


async def _wrong_audience(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    minter = TokenMinter(keyring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=300)
    body, webhook_id = event_body(), new_webhook_id()
    token = minter.mint(audience="https://other.example/hook", webhook_id=webhook_id, body=body)
    return body, receiver.sender.headers(webhook_id, body, token=token)


async def _wrong_issuer(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    minter = TokenMinter(keyring, issuer="https://evil.example", subject=SUBJECT, ttl_seconds=300)
    return await _minted_for(receiver, minter)


async def _alg_none(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    body, webhook_id = event_body(), new_webhook_id()
    header = {"alg": "none", "kid": keyring.signing_key().kid, "typ": "webhook+jwt"}
    token = craft_token(None, header, claims_for(receiver.url, webhook_id, body))
    return body, receiver.sender.headers(webhook_id, body, token=token)


async def _no_token(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    body, webhook_id = event_body(), new_webhook_id()
    headers = receiver.sender.headers(webhook_id, body)
    del headers["Authorization"]
    return body, headers


async def _other_webhook_id(receiver: Receiver, keyring: KeyRing, tmp: Path) -> Forged:
    body = event_body()
    headers = receiver.sender.headers(new_webhook_id(), body)
    headers["webhook-id"] = new_webhook_id()  # a token for one event, reused for another
    return body, headers


FORGERIES: dict[str, tuple[Forgery, str]] = {
    "token-from-another-key": (_other_key, "unknown_kid"),
    "another-key-posing-as-ours": (_other_key_same_kid, "bad_signature"),
    "tampered-body": (_tampered_body, "body_mismatch"),
    "expired": (_crafted(iat=int(time.time()) - 900, exp=int(time.time()) - 600), "expired"),
    "wrong-audience": (_wrong_audience, "wrong_audience"),
    "wrong-issuer": (_wrong_issuer, "wrong_issuer"),
    "wrong-scope": (_crafted(scope="webhooks:read"), "bad_scope"),
    "alg-none": (_alg_none, "algorithm_not_allowed"),
    "missing-token": (_no_token, "missing_token"),
    "webhook-id-swapped": (_other_webhook_id, "webhook_id_mismatch"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_forged_webhooks_are_refused_and_change_nothing(
    receiver: Receiver, keyring: KeyRing, tmp_path: Path, name: str
) -> None:
    # a legitimate row first, so "unchanged" is checked against a non-empty database
    assert (await receiver.sender.post(event_body(recipient="real@example.com")))[0] == 200
    before = sqlite_snapshot(receiver.db_path)
    forge, reason = FORGERIES[name]
    body, headers = await forge(receiver, keyring, tmp_path)
    status, answer = await receiver.sender.post(body, headers=headers)
    assert (status, answer) == (401, {"error": reason})
    assert sqlite_snapshot(receiver.db_path) == before


async def test_a_replayed_token_is_refused_and_changes_nothing(receiver: Receiver) -> None:
    body, webhook_id = event_body(bounce_type="SoftBounce"), new_webhook_id()
    headers = receiver.sender.headers(webhook_id, body)
    assert (await receiver.sender.post(body, headers=headers))[0] == 200
    before = sqlite_snapshot(receiver.db_path)
    status, answer = await receiver.sender.post(body, headers=headers)
    assert (status, answer) == (401, {"error": "replayed"})
    assert sqlite_snapshot(receiver.db_path) == before


async def test_stats_count_received_verified_rejected_invalidated(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    await receiver.sender.post(event_body())
    await receiver.sender.post(event_body(), token="not.a.token")
    headers = receiver.sender.headers(new_webhook_id(), event_body())
    del headers["Authorization"]
    await receiver.sender.post(event_body(), headers=headers)
    async with session.get(f"{receiver.base}/stats") as resp:
        assert resp.status == 200
        stats = await resp.json()
    assert stats["received"] == 3
    assert stats["verified"] == 1
    assert stats["rejected"] == {"malformed_token": 1, "missing_token": 1}
    assert stats["invalidated"] == 1
    assert stats["invalid_addresses"] == 1
    async with session.get(f"{receiver.base}/healthz") as resp:
        assert resp.status == 200


async def test_custom_path(start_receiver: StartReceiver) -> None:
    receiver = await start_receiver(path="/hooks/mail")
    assert receiver.url.endswith("/hooks/mail")
    assert (await receiver.sender.post(event_body()))[0] == 200


# -- HMAC-only ------------------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


async def test_hmac_only_receiver_applies_signed_webhooks(start_receiver: StartReceiver) -> None:
    receiver = await start_receiver(jwt=False, hmac_secrets=(SECRET,))
    status, answer = await receiver.sender.post(event_body())
    assert (status, answer["action"]) == (200, "invalidated")
    user = sqlite_user(receiver.db_path, "invalid@example.com")
    assert user is not None and user["email_valid"] == 0


async def test_hmac_only_receiver_refuses_a_wrong_secret(start_receiver: StartReceiver) -> None:
    receiver = await start_receiver(jwt=False, hmac_secrets=(SECRET,))
    forger = Sender(receiver.sender.session, receiver.url, hmac_secrets=[b"x" * 32])
    status, answer = await forger.post(event_body())
    assert (status, answer) == (401, {"error": "bad_signature"})
    assert sqlite_snapshot(receiver.db_path)["users"] == []


async def test_jwt_plus_hmac_requires_both(start_receiver: StartReceiver) -> None:
    receiver = await start_receiver(hmac_secrets=(SECRET,))
    assert (await receiver.sender.post(event_body(recipient="a@example.com")))[0] == 200
    jwt_only = Sender(receiver.sender.session, receiver.url, receiver.sender.minter)
    status, answer = await jwt_only.post(event_body(recipient="b@example.com"))
    assert (status, answer) == (401, {"error": "missing_header"})
    assert sqlite_user(receiver.db_path, "b@example.com") is None


# -- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh schema in the `test` database, dropped afterwards."""
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL not reachable at {PG_DSN}: {exc} (start it; these tests need it)")
    schema = f"receiver_test_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _pg_rows(schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def test_postgres_hard_bounce_flow(start_receiver: StartReceiver, pg_schema: str) -> None:
    receiver = await start_receiver(db_url=PG_DSN, db_schema=pg_schema)
    webhook_id = new_webhook_id()
    status, answer = await receiver.sender.post(event_body(recipient="PG@Example.com"), webhook_id)
    assert (status, answer["action"]) == (200, "invalidated")
    [user] = await _pg_rows(pg_schema, "SELECT * FROM users")
    assert user["email"] == "pg@example.com"
    assert user["email_valid"] is False
    assert user["invalid_reason"] == "hard_bounce"
    assert user["invalidated_at"] is not None
    [processed] = await _pg_rows(pg_schema, "SELECT * FROM processed_webhooks")
    assert (processed["webhook_id"], processed["action"]) == (webhook_id, "invalidated")

    status, answer = await receiver.sender.post(event_body(recipient="pg@example.com"), webhook_id)
    assert (status, answer["status"]) == (200, "duplicate")
    assert await _pg_rows(pg_schema, "SELECT * FROM users") == [user]


async def test_postgres_soft_bounces_and_concurrent_duplicates(
    start_receiver: StartReceiver, pg_schema: str
) -> None:
    receiver = await start_receiver(db_url=PG_DSN, db_schema=pg_schema)
    for days_ago in (2, 1):
        body = event_body(
            recipient="soft@example.com",
            bounce_type="SoftBounce",
            timestamp=_iso(NOW - timedelta(days=days_ago)),
        )
        assert (await receiver.sender.post(body))[1]["action"] == "soft_bounce_logged"
    third_id = new_webhook_id()
    third = event_body(recipient="soft@example.com", bounce_type="SoftBounce", timestamp=_iso(NOW))
    results = await asyncio.gather(*(receiver.sender.post(third, third_id) for _ in range(6)))
    answers = sorted(answer.get("action", answer["status"]) for _, answer in results)
    assert answers == ["duplicate"] * 5 + ["invalidated"]
    [user] = await _pg_rows(pg_schema, "SELECT * FROM users")
    assert (user["email_valid"], user["soft_bounces"]) == (False, 3)
    assert user["invalid_reason"] == "soft_bounce_limit"


async def test_postgres_failed_write_answers_503_and_keeps_nothing(
    start_receiver: StartReceiver, pg_schema: str
) -> None:
    receiver = await start_receiver(db_url=PG_DSN, db_schema=pg_schema)
    await _pg_rows(pg_schema, "DROP TABLE soft_bounce_log")
    webhook_id = new_webhook_id()
    status, answer = await receiver.sender.post(event_body(bounce_type="SoftBounce"), webhook_id)
    assert (status, answer) == (503, {"error": "storage_unavailable"})
    assert await _pg_rows(pg_schema, "SELECT * FROM processed_webhooks") == []
    assert await _pg_rows(pg_schema, "SELECT * FROM users") == []


async def test_postgres_forgery_changes_nothing(
    start_receiver: StartReceiver, pg_schema: str
) -> None:
    receiver = await start_receiver(db_url=PG_DSN, db_schema=pg_schema)
    status, answer = await receiver.sender.post(event_body(), token="a.b.c")
    assert (status, answer) == (401, {"error": "malformed_token"})
    assert await _pg_rows(pg_schema, "SELECT * FROM processed_webhooks") == []


# -- pure rules -------------------------------------------------------------------------------

POLICY = BouncePolicy(limit=3, window=timedelta(days=7))
D = timedelta(days=1)


def _event(event: str, bounce_type: str | None = None, at: datetime = NOW) -> DeliveryEvent:
    return DeliveryEvent(event, "a@example.com", bounce_type, at)


@pytest.mark.parametrize(
    ("event", "state", "expected"),
    [
        (
            _event("Message.Bounced", "HardBounce"),
            UserState(),
            Plan("invalidated", "hard_bounce", upsert_user=True),
        ),
        (
            _event("Message.Bounced", "HardBounce"),
            UserState(email_valid=False),
            Plan("already_invalid", upsert_user=True),
        ),
        (
            _event("Message.Complained"),
            UserState(),
            Plan("invalidated", "complaint", upsert_user=True),
        ),
        (
            _event("Message.Unsubscribed"),
            UserState(),
            Plan("unsubscribed", upsert_user=True, unsubscribe=True),
        ),
        (
            _event("Message.Bounced", "SoftBounce"),
            UserState(soft_bounce_times=[NOW - 2 * D]),
            Plan("soft_bounce_logged", upsert_user=True, soft_bounce_at=NOW),
        ),
        (
            _event("Message.Bounced", "SoftBounce"),
            UserState(soft_bounce_times=[NOW - 6 * D, NOW - 2 * D]),
            Plan("invalidated", "soft_bounce_limit", upsert_user=True, soft_bounce_at=NOW),
        ),
        (
            _event("Message.Bounced", "SoftBounce"),
            UserState(email_valid=False, soft_bounce_times=[NOW - D, NOW - 2 * D]),
            Plan("soft_bounce_logged", upsert_user=True, soft_bounce_at=NOW),
        ),
        (_event("Message.Bounced", "Blocked"), UserState(), Plan("recorded")),
        (_event("Message.Bounced", "Undetermined"), UserState(), Plan("recorded")),
        (_event("Message.Bounced", "Novel"), UserState(), Plan("recorded")),
        (_event("Message.Delivered"), UserState(), Plan("ignored")),
        (_event("Message.Deferred"), UserState(), Plan("ignored")),
        (_event("Other.Thing"), UserState(), Plan("ignored")),
    ],
)
def test_plan_table(event: DeliveryEvent, state: UserState, expected: Plan) -> None:
    assert plan(event, state, now=NOW, policy=POLICY) == expected


def test_a_future_timestamp_counts_as_now() -> None:
    future = _event("Message.Bounced", "SoftBounce", at=NOW + 3 * D)
    assert plan(future, UserState(), now=NOW, policy=POLICY).soft_bounce_at == NOW


@pytest.mark.parametrize(
    ("earlier", "new", "reached"),
    [
        ([], NOW, False),
        ([NOW - D], NOW, False),
        ([NOW - D, NOW - 2 * D], NOW, True),
        ([NOW - 7 * D, NOW - 2 * D], NOW, True),  # the window's edges are inside it
        ([NOW - 8 * D, NOW - 2 * D], NOW, False),
        ([NOW - 30 * D, NOW - 20 * D, NOW - 10 * D], NOW, False),
        ([NOW + D, NOW + 2 * D], NOW, True),  # a late-arriving older bounce completes a window
        ([NOW - 5 * D, NOW + 5 * D], NOW, False),  # spans 10 days: no 7-day window holds three
    ],
)
def test_soft_bounce_window(earlier: list[datetime], new: datetime, reached: bool) -> None:
    assert soft_bounce_limit_reached(earlier, new, 3, timedelta(days=7)) is reached


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"event":"Message.Bounced","timestamp":"2026-03-12T09:14:02Z",'
            b'"data":{"recipient":"X@Y.org","bounce_type":"HardBounce"}}',
            DeliveryEvent("Message.Bounced", "x@y.org", "HardBounce", NOW),
        ),
        (
            b'{"event":"Message.Complained","timestamp":"yesterday","data":{"recipient":"a@b.c"}}',
            DeliveryEvent("Message.Complained", "a@b.c", None, None),
        ),
        (b'{"event":"Message.Delivered"}', DeliveryEvent("Message.Delivered", None, None, None)),
    ],
)
def test_parse_event(body: bytes, expected: DeliveryEvent) -> None:
    assert parse_event(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"null",
        b'{"data": {}}',
        b'{"event": "Message.Bounced", "data": {"recipient": "a@b.c"}}',
        b'{"event": "Message.Complained", "data": {"recipient": "nobody"}}',
        b'{"event": "Message.Unsubscribed", "data": []}',
    ],
)
def test_parse_event_refuses(body: bytes) -> None:
    with pytest.raises(EventError):
        parse_event(body)


# -- settings and command line ----------------------------------------------------------------


def test_settings_parsing() -> None:
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("250ms") == timedelta(milliseconds=250)
    assert parse_duration("12") == timedelta(seconds=12)
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert DatabaseUrl.parse("sqlite:///rel/x.sqlite3") == DatabaseUrl("sqlite", "rel/x.sqlite3")
    assert DatabaseUrl.parse("sqlite:////abs/x.sqlite3") == DatabaseUrl("sqlite", "/abs/x.sqlite3")
    assert DatabaseUrl.parse("postgresql://u:pw@h/db").describe() == "postgresql://u:***@h/db"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # neither JWKS nor HMAC
        {"jwks_url": "http://127.0.0.1:1/jwks"},  # no audience
        {"hmac_secrets": (SECRET,), "db_url": "mysql://x"},
        {"hmac_secrets": (SECRET,), "soft_bounce_limit": 0},
        {"hmac_secrets": (SECRET,), "path": "hooks"},
        {"hmac_secrets": (SECRET,), "db_schema": "s"},  # schema without postgresql
        {"hmac_secrets": ("whsec_!!",)},
    ],
)
def test_settings_refuse(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        ReceiverSettings(**kwargs)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "example_receiver", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=PROJECT_ROOT,
    )


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--listen", "nowhere"], None, "listen"),
        (["--jwks-url", "http://127.0.0.1:1/j", "--db", "mysql://x"], None, "database url"),
        (["--jwks-url", "http://127.0.0.1:1/j", "--soft-bounce-window", "soon"], None, "duration"),
        (["--jwks-url", "http://127.0.0.1:1/j", "--max-body", "huge"], None, "bad size"),
        (["--jwks-url", "http://127.0.0.1:1/j", "--max-body", "512"], None, "max body"),
        (["--hmac-secret-env", "RECEIVER_TEST_UNSET"], None, "RECEIVER_TEST_UNSET"),
        (["--hmac-secret-env", "RECEIVER_TEST_BAD"], {"RECEIVER_TEST_BAD": "whsec_!!"}, "base64"),
        ([], None, "JWKS url or an HMAC secret"),
        (["--no-such-flag"], None, "unrecognized"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    args: list[str], env: dict[str, str] | None, mentions: str
) -> None:
    done = _cli(*args, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("example_receiver: error:") and mentions in lines[0]


async def test_cli_serves_and_logs_one_line_per_webhook(
    tmp_path: Path, jwks_url: str, minter: TokenMinter, session: aiohttp.ClientSession
) -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}{PATH}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "example_receiver",
        "--listen",
        f"127.0.0.1:{port}",
        "--jwks-url",
        jwks_url,
        "--audience",
        url,
        "--issuer",
        ISSUER,
        "--db",
        f"sqlite:///{tmp_path / 'cli.sqlite3'}",
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )
    try:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        status, answer = await Sender(session, url, minter).post(event_body())
        assert (status, answer["action"]) == (200, "invalidated")
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0
    lines = [line for line in stderr.decode().splitlines() if "event_type=" in line]
    assert len(lines) == 1, stderr.decode()
    for fragment in ("Message.Bounced", "invalid@example.com", "invalidated"):
        assert fragment in lines[0]
    user = sqlite_user(tmp_path / "cli.sqlite3", "invalid@example.com")
    assert user is not None and user["email_valid"] == 0
