"""The subscriber's database: SQLite (default) or PostgreSQL, same tables, same rules.

Each webhook is applied in one transaction: claim its id in processed_webhooks (a second
delivery of the same id finds it claimed and changes nothing), read the recipient's row,
ask `events.plan` what to do, write the plan, commit. Only then does the handler answer 2xx.
A batch is applied the same way, every member in one transaction: each member claims its event
id, so a member seen before (alone or in another batch) is skipped, and a batch that fails
anywhere leaves nothing behind. Backend errors are translated here into `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .events import (
    BatchMember,
    BouncePolicy,
    DeliveryEvent,
    Plan,
    UserState,
    event_time,
    plan,
    rule_for,
)
from .settings import ReceiverSettings

__all__ = ["Applied", "PostgresStore", "SqliteStore", "Store", "StoreUnavailable", "open_store"]

_T = TypeVar("_T")


class StoreUnavailable(RuntimeError):
    """The database could not be reached or refused the write; the webhook was not applied."""


@dataclass(frozen=True)
class Applied:
    webhook_id: str
    duplicate: bool  # the id was already processed; nothing was written
    plan: Plan | None  # what was written (None for a duplicate)


class Store(Protocol):
    async def apply(self, webhook_id: str, event: DeliveryEvent, now: datetime) -> Applied: ...

    async def apply_batch(self, members: Sequence[BatchMember], now: datetime) -> list[Applied]: ...

    async def invalid_user_count(self) -> int: ...

    async def close(self) -> None: ...


@asynccontextmanager
async def open_store(settings: ReceiverSettings) -> AsyncIterator[Store]:
    policy = BouncePolicy(settings.soft_bounce_limit, settings.soft_bounce_window)
    database = settings.database
    store: Store
    if database.kind == "sqlite":
        store = await SqliteStore.open(Path(database.target), policy)
    else:
        store = await PostgresStore.open(database.target, policy, schema=settings.db_schema)
    try:
        yield store
    finally:
        await store.close()


# --- SQLite -------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    email          TEXT PRIMARY KEY,
    email_valid    BOOLEAN NOT NULL DEFAULT 1,
    soft_bounces   INTEGER NOT NULL DEFAULT 0,
    unsubscribed   BOOLEAN NOT NULL DEFAULT 0,
    invalidated_at TEXT,
    invalid_reason TEXT
);
CREATE TABLE IF NOT EXISTS soft_bounce_log (
    email      TEXT NOT NULL,
    at         TEXT NOT NULL,
    webhook_id TEXT
);
CREATE INDEX IF NOT EXISTS soft_bounce_log_email_at ON soft_bounce_log (email, at);
CREATE TABLE IF NOT EXISTS processed_webhooks (
    webhook_id   TEXT PRIMARY KEY,
    event        TEXT NOT NULL,
    recipient    TEXT,
    action       TEXT,
    processed_at TEXT NOT NULL
);
"""


def _iso(at: datetime) -> str:
    """Fixed-width UTC text, so SQLite orders and compares it as time."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


class SqliteStore:
    """One connection, used from worker threads one call at a time (guarded by a lock)."""

    def __init__(self, conn: sqlite3.Connection, policy: BouncePolicy) -> None:
        self._conn = conn
        self._policy = policy
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path, policy: BouncePolicy) -> SqliteStore:
        try:
            conn = await asyncio.to_thread(cls._connect, path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open sqlite database {str(path)!r}: {exc}") from exc
        return cls(conn, policy)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a 2xx means the row survives a crash
            conn.executescript(_SQLITE_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def apply(self, webhook_id: str, event: DeliveryEvent, now: datetime) -> Applied:
        return await self._call(self._apply, webhook_id, event, now)

    async def apply_batch(self, members: Sequence[BatchMember], now: datetime) -> list[Applied]:
        return await self._call(self._apply_batch, members, now)

    async def invalid_user_count(self) -> int:
        return await self._call(self._invalid_user_count)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await asyncio.to_thread(fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _close(self) -> None:
        with self._lock:
            self._conn.close()

    def _invalid_user_count(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT count(*) FROM users WHERE NOT email_valid").fetchone()
        return int(row[0])

    def _apply(self, webhook_id: str, event: DeliveryEvent, now: datetime) -> Applied:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = self._apply_in_transaction(conn, webhook_id, event, now)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    def _apply_batch(self, members: Sequence[BatchMember], now: datetime) -> list[Applied]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = [
                    self._apply_in_transaction(conn, m.event_id, m.event, now) for m in members
                ]
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return results

    def _apply_in_transaction(
        self, conn: sqlite3.Connection, webhook_id: str, event: DeliveryEvent, now: datetime
    ) -> Applied:
        claimed = conn.execute(
            "INSERT INTO processed_webhooks (webhook_id, event, recipient, processed_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (webhook_id) DO NOTHING",
            (webhook_id, event.event, event.recipient, _iso(now)),
        ).rowcount
        if claimed == 0:
            return Applied(webhook_id, duplicate=True, plan=None)
        state = UserState()
        email = event.recipient
        if rule_for(event).effect.touches_user and email is not None:
            conn.execute(
                "INSERT INTO users (email) VALUES (?) ON CONFLICT (email) DO NOTHING", (email,)
            )
            (valid,) = conn.execute(
                "SELECT email_valid FROM users WHERE email = ?", (email,)
            ).fetchone()
            at = event_time(event, now)
            rows = conn.execute(
                "SELECT at FROM soft_bounce_log WHERE email = ? AND at BETWEEN ? AND ?",
                (email, _iso(at - self._policy.window), _iso(at + self._policy.window)),
            ).fetchall()
            state = UserState(bool(valid), [datetime.fromisoformat(r[0]) for r in rows])
        decided = plan(event, state, now=now, policy=self._policy)
        if email is not None and decided.soft_bounce_at is not None:
            conn.execute(
                "INSERT INTO soft_bounce_log (email, at, webhook_id) VALUES (?, ?, ?)",
                (email, _iso(decided.soft_bounce_at), webhook_id),
            )
            conn.execute(
                "UPDATE users SET soft_bounces = soft_bounces + 1 WHERE email = ?", (email,)
            )
        if email is not None and decided.unsubscribe:
            conn.execute("UPDATE users SET unsubscribed = 1 WHERE email = ?", (email,))
        if email is not None and decided.invalidates:
            conn.execute(
                "UPDATE users SET email_valid = 0, invalidated_at = ?, invalid_reason = ?"
                " WHERE email = ?",
                (_iso(now), decided.reason, email),
            )
        conn.execute(
            "UPDATE processed_webhooks SET action = ? WHERE webhook_id = ?",
            (decided.action, webhook_id),
        )
        return Applied(webhook_id, duplicate=False, plan=decided)


# --- PostgreSQL -----------------------------------------------------------------------------

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    email          text PRIMARY KEY,
    email_valid    boolean NOT NULL DEFAULT true,
    soft_bounces   integer NOT NULL DEFAULT 0,
    unsubscribed   boolean NOT NULL DEFAULT false,
    invalidated_at timestamptz,
    invalid_reason text
);
CREATE TABLE IF NOT EXISTS soft_bounce_log (
    email      text NOT NULL,
    at         timestamptz NOT NULL,
    webhook_id text
);
CREATE INDEX IF NOT EXISTS soft_bounce_log_email_at ON soft_bounce_log (email, at);
CREATE TABLE IF NOT EXISTS processed_webhooks (
    webhook_id   text PRIMARY KEY,
    event        text NOT NULL,
    recipient    text,
    action       text,
    processed_at timestamptz NOT NULL
);
"""


class PostgresStore:
    """An asyncpg pool; the recipient's row is locked (FOR UPDATE) while a webhook is applied."""

    def __init__(self, pool: Any, policy: BouncePolicy) -> None:
        self._pool = pool
        self._policy = policy

    @classmethod
    async def open(cls, dsn: str, policy: BouncePolicy, *, schema: str | None) -> PostgresStore:
        import asyncpg  # optional dependency: only needed for postgresql:// urls

        server_settings = {"search_path": schema} if schema else None
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=10, server_settings=server_settings
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"cannot connect to postgresql: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                # serialize concurrent first starts: CREATE ... IF NOT EXISTS can race
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('example_receiver'))")
                if schema:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                await conn.execute(_POSTGRES_SCHEMA)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await pool.close()
            raise StoreUnavailable(f"cannot create tables in postgresql: {exc}") from exc
        return cls(pool, policy)

    async def apply(self, webhook_id: str, event: DeliveryEvent, now: datetime) -> Applied:
        import asyncpg

        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._apply_in_transaction(conn, webhook_id, event, now)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc

    async def apply_batch(self, members: Sequence[BatchMember], now: datetime) -> list[Applied]:
        import asyncpg

        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._apply_batch_in_transaction(conn, members, now)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc

    async def invalid_user_count(self) -> int:
        import asyncpg

        try:
            count = await self._pool.fetchval("SELECT count(*) FROM users WHERE NOT email_valid")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"postgresql: {exc}") from exc
        return int(count)

    async def close(self) -> None:
        await self._pool.close()

    async def _apply_in_transaction(
        self, conn: Any, webhook_id: str, event: DeliveryEvent, now: datetime
    ) -> Applied:
        if not await self._claim(conn, webhook_id, event, now):
            return Applied(webhook_id, duplicate=True, plan=None)
        return await self._write(conn, webhook_id, event, now)

    async def _apply_batch_in_transaction(
        self, conn: Any, members: Sequence[BatchMember], now: datetime
    ) -> list[Applied]:
        """Lock every recipient and claim every id in sorted order first, so two batches that
        share recipients or events wait for each other instead of deadlocking; then apply the
        claimed members in the batch's order."""
        emails = sorted(
            {
                m.event.recipient
                for m in members
                if m.event.recipient is not None and rule_for(m.event).effect.touches_user
            }
        )
        if emails:
            await conn.execute(
                "INSERT INTO users (email) SELECT e FROM unnest($1::text[]) AS e ORDER BY e"
                " ON CONFLICT (email) DO NOTHING",
                emails,
            )
            await conn.execute(
                "SELECT 1 FROM users WHERE email = ANY($1::text[]) ORDER BY email FOR UPDATE",
                emails,
            )
        first: dict[str, BatchMember] = {}
        for m in members:
            first.setdefault(m.event_id, m)
        claimed = set()
        for event_id in sorted(first):
            if await self._claim(conn, event_id, first[event_id].event, now):
                claimed.add(event_id)
        results = []
        for m in members:
            if m.event_id in claimed:
                claimed.discard(m.event_id)  # a repeated id inside the batch applies once
                results.append(await self._write(conn, m.event_id, m.event, now))
            else:
                results.append(Applied(m.event_id, duplicate=True, plan=None))
        return results

    async def _claim(self, conn: Any, webhook_id: str, event: DeliveryEvent, now: datetime) -> bool:
        claimed = await conn.fetchval(
            "INSERT INTO processed_webhooks (webhook_id, event, recipient, processed_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (webhook_id) DO NOTHING RETURNING true",
            webhook_id,
            event.event,
            event.recipient,
            now,
        )
        return bool(claimed)

    async def _write(
        self, conn: Any, webhook_id: str, event: DeliveryEvent, now: datetime
    ) -> Applied:
        """Apply one claimed event: read the recipient's row (locked), plan, write."""
        state = UserState()
        email = event.recipient
        if rule_for(event).effect.touches_user and email is not None:
            await conn.execute(
                "INSERT INTO users (email) VALUES ($1) ON CONFLICT (email) DO NOTHING", email
            )
            valid = await conn.fetchval(
                "SELECT email_valid FROM users WHERE email = $1 FOR UPDATE", email
            )
            at = event_time(event, now)
            rows = await conn.fetch(
                "SELECT at FROM soft_bounce_log WHERE email = $1 AND at BETWEEN $2 AND $3",
                email,
                at - self._policy.window,
                at + self._policy.window,
            )
            state = UserState(bool(valid), [r["at"] for r in rows])
        decided = plan(event, state, now=now, policy=self._policy)
        if email is not None and decided.soft_bounce_at is not None:
            await conn.execute(
                "INSERT INTO soft_bounce_log (email, at, webhook_id) VALUES ($1, $2, $3)",
                email,
                decided.soft_bounce_at,
                webhook_id,
            )
            await conn.execute(
                "UPDATE users SET soft_bounces = soft_bounces + 1 WHERE email = $1", email
            )
        if email is not None and decided.unsubscribe:
            await conn.execute("UPDATE users SET unsubscribed = true WHERE email = $1", email)
        if email is not None and decided.invalidates:
            await conn.execute(
                "UPDATE users SET email_valid = false, invalidated_at = $1, invalid_reason = $2"
                " WHERE email = $3",
                now,
                decided.reason,
                email,
            )
        await conn.execute(
            "UPDATE processed_webhooks SET action = $1 WHERE webhook_id = $2",
            decided.action,
            webhook_id,
        )
        return Applied(webhook_id, duplicate=False, plan=decided)
