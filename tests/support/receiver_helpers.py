"""Loopback servers, senders and database snapshots for the example receiver's tests."""

from __future__ import annotations

import base64
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from signing import KeyRing, SigningKey, TokenMinter, sign_hmac

ISSUER = "https://mail.example.com"
SUBJECT = "agent:webhook-dispatcher"
TABLES = ("users", "soft_bounce_log", "processed_webhooks")


def bound_socket() -> socket.socket:
    """A socket bound to a free loopback port, so the URL is known before the app exists."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve(app: web.Application, sock: socket.socket) -> AsyncIterator[str]:
    """Run `app` on `sock` (a real server on loopback); yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def jwks_server(keyring: KeyRing) -> AsyncIterator[str]:
    """Serve the key ring's JWKS like the dispatcher does; yields the JWKS URL."""

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(keyring.jwks())

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    async with serve(app, bound_socket()) as base:
        yield f"{base}/.well-known/jwks.json"


def event_body(
    event: str = "Message.Bounced",
    recipient: str = "invalid@example.com",
    bounce_type: str | None = "HardBounce",
    timestamp: str = "2026-03-12T09:14:02Z",
) -> bytes:
    data: dict[str, Any] = {"messageid": "msg12345", "recipient": recipient}
    if bounce_type is not None:
        data["bounce_type"] = bounce_type
        data["diagnostic_code"] = "550 5.1.1 User unknown"
    return orjson.dumps({"event": event, "timestamp": timestamp, "data": data})


def new_webhook_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def craft_token(key: SigningKey | None, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A compact JWS with any header and claims; unsigned (empty signature) when key is None."""
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}".encode()
    signature = b"" if key is None else key.sign(signing_input)
    return f"{signing_input.decode()}.{_b64(signature)}"


def claims_for(audience: str, webhook_id: str, body: bytes, **overrides: Any) -> dict[str, Any]:
    """The claims TokenMinter would put in a token, for hand-crafted variants."""
    import hashlib

    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": audience,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "scope": "webhooks:deliver",
        "webhook_id": webhook_id,
        "body_sha256": _b64(hashlib.sha256(body).digest()),
    }
    claims.update(overrides)
    return claims


@dataclass
class Sender:
    """Posts webhooks to one receiver URL the way the dispatcher does."""

    session: aiohttp.ClientSession
    url: str
    minter: TokenMinter | None = None
    hmac_secrets: list[bytes] = field(default_factory=list)

    def headers(self, webhook_id: str, body: bytes, *, token: str | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "webhook-id": webhook_id}
        ts = int(time.time())
        headers["webhook-timestamp"] = str(ts)
        if token is None and self.minter is not None:
            token = self.minter.mint(audience=self.url, webhook_id=webhook_id, body=body)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if self.hmac_secrets:
            headers["webhook-signature"] = sign_hmac(self.hmac_secrets, webhook_id, ts, body)
        return headers

    async def post(
        self,
        body: bytes,
        webhook_id: str | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """POST and return (status, parsed JSON body or None)."""
        webhook_id = webhook_id or new_webhook_id()
        sent = headers if headers is not None else self.headers(webhook_id, body, token=token)
        async with self.session.post(self.url, data=body, headers=sent) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else None)


def sqlite_snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted: equal snapshots mean an unchanged database."""
    conn = sqlite3.connect(path)
    try:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}
    finally:
        conn.close()


def sqlite_user(path: Path, email: str) -> dict[str, Any] | None:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM users WHERE email = ?", (email,)).fetchone()
        return None if row is None else dict(row)
    finally:
        conn.close()
