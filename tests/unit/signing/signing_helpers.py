"""Constants and token builders shared by the signing tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from signing import KeyRing, SigningKey, TokenMinter

ISSUER = "https://mail.example.com"
SUBJECT = "agent:webhook-dispatcher"
AUDIENCE = "https://subscriber.example.net/hooks/bounces"
BODY = b'{"event":"Message.Bounced","data":{"recipient":"nobody@example.org"}}'
WEBHOOK_ID = "evt_0001"


def make_minter(ring: KeyRing, **overrides: Any) -> TokenMinter:
    options: dict[str, Any] = {"issuer": ISSUER, "subject": SUBJECT, "ttl_seconds": 300}
    options.update(overrides)
    return TokenMinter(ring, **options)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims_for(**overrides: Any) -> dict[str, Any]:
    """The claims TokenMinter would produce now, with overrides (None removes a claim)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": b64url(os.urandom(12)),
        "scope": "webhooks:deliver",
        "webhook_id": WEBHOOK_ID,
        "body_sha256": b64url(hashlib.sha256(BODY).digest()),
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def craft_token(
    header: dict[str, Any], claims: dict[str, Any], *, key: SigningKey | None = None
) -> str:
    """A compact JWS with any header and claims, signed with `key` (empty signature if None)."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    signature = b"" if key is None else key.sign(signing_input.encode())
    return f"{signing_input}.{b64url(signature)}"


def hs256_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def headers_for(token: str | None, webhook_id: str = WEBHOOK_ID) -> dict[str, str]:
    headers = {"webhook-id": webhook_id, "content-type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def ring_header(ring: KeyRing, **overrides: Any) -> dict[str, Any]:
    key = ring.signing_key()
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "webhook+jwt"}
    header.update(overrides)
    return header


@dataclass
class JwksServer:
    """Serves `document` at `url` and counts the requests it gets."""

    url: str = ""
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    requests: int = 0
