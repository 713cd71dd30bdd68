"""Forged webhooks against a running example receiver: every attack on the agent token and on
the HMAC signature, plus replays of genuine traffic an attacker captured.

Each attack returns the (headers, body) to POST. Forged bodies name a ``victim-...`` address
that no genuine event mentions, so any change they made would show in the database. Some
attacks are signed with the dispatcher's real key (an insider's view: the claims are what
must stop them); the rest use only what an outsider has (public keys, captured requests).
Every request carries ``x-chaos-attack`` so the receiver-side tap can tell it from genuine
traffic; the receiver itself ignores the header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization

from signing import KeyRing, sign_hmac
from tests.support.receiver_helpers import claims_for, craft_token
from tests.support.receiver_helpers import event_body as receiver_event

__all__ = ["Captured", "Target", "hmac_attacks", "jwt_attacks"]

Request = tuple[dict[str, str], bytes]
Captured = tuple[dict[str, str], bytes]  # a genuine request seen on the wire


@dataclass
class Target:
    url: str  # the receiver's webhook URL (the audience)
    keyring: KeyRing  # the dispatcher's real keys (for insider-signed attacks)
    scratch: Path  # where attacker keys are made
    secret: bytes = b""  # the receiver's HMAC secret (insider-signed HMAC attacks)
    captured: list[Captured] = field(default_factory=list)  # genuine requests to this receiver
    elsewhere: list[Captured] = field(default_factory=list)  # genuine requests to another one


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _victim(name: str) -> tuple[bytes, str]:
    slug = "".join(c if c.isalnum() else "-" for c in name)[:40]
    return receiver_event(recipient=f"victim-{slug}@example.com"), f"evt_forged_{uuid.uuid4().hex}"


def _jwt_headers(token: str | None, webhook_id: str, *, auth: str | None = None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(time.time())),
        "x-chaos-attack": "1",
    }
    if auth is not None:
        headers["Authorization"] = auth
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _header(t: Target, **overrides: Any) -> dict[str, Any]:
    key = t.keyring.signing_key()
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "webhook+jwt"}
    for name, value in overrides.items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    return header


def _claims(t: Target, webhook_id: str, body: bytes, **overrides: Any) -> dict[str, Any]:
    claims = claims_for(t.url, webhook_id, body)
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _signed(
    t: Target,
    name: str,
    *,
    header: dict[str, Any] | None = None,
    key: Any = "real",
    **claim_overrides: Any,
) -> Request:
    body, webhook_id = _victim(name)
    signer = t.keyring.signing_key() if key == "real" else key
    token = craft_token(
        signer, header or _header(t), _claims(t, webhook_id, body, **claim_overrides)
    )
    return _jwt_headers(token, webhook_id), body


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _attacker_ring(t: Target, name: str, algorithm: str = "EdDSA") -> KeyRing:
    return KeyRing.load(t.scratch / f"attacker-{name}", algorithm)


def _genuine(t: Target, pool: list[Captured] | None = None) -> Captured:
    pool = t.captured if pool is None else pool
    assert pool, "no genuine request captured yet"
    headers, body = pool[0]
    return {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")} | {
        "x-chaos-attack": "1"
    }, body


def _token_of(headers: dict[str, str]) -> str:
    auth = next(v for k, v in headers.items() if k.lower() == "authorization")
    return auth.split(" ", 1)[1]


def _with_token(headers: dict[str, str], token: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    out["Authorization"] = f"Bearer {token}"
    return out


def _set(headers: dict[str, str], name: str, value: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() != name.lower()}
    out[name] = value
    return out


# --- the agent token --------------------------------------------------------------------------


def jwt_attacks(t: Target) -> dict[str, Callable[[], Request]]:
    now = int(time.time())

    def no_token() -> Request:
        body, wid = _victim("no token")
        return _jwt_headers(None, wid), body

    def basic_auth() -> Request:
        body, wid = _victim("basic")
        return _jwt_headers(None, wid, auth="Basic dXNlcjpwYXNz"), body

    def raw(token: str, name: str) -> Callable[[], Request]:
        def build() -> Request:
            body, wid = _victim(name)
            return _jwt_headers(token, wid), body

        return build

    def alg_none() -> Request:
        body, wid = _victim("alg none")
        token = craft_token(None, _header(t, alg="none"), _claims(t, wid, body))
        return _jwt_headers(token, wid), body

    def hs256(material: str) -> Callable[[], Request]:
        def build() -> Request:
            body, wid = _victim(f"hs256 {material}")
            public = t.keyring.signing_key().private_key.public_key()
            secret = (
                public.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                if material == "pem"
                else t.keyring.signing_key().public_jwk()["x"].encode()
            )
            token = _hs256(_header(t, alg="HS256"), _claims(t, wid, body), secret)
            return _jwt_headers(token, wid), body

        return build

    def es256_claimed() -> Request:
        es_key = _attacker_ring(t, "es256", "ES256").signing_key()
        return _signed(t, "es256 claimed", header=_header(t, alg="ES256"), key=es_key)

    def other_key(same_kid: bool) -> Callable[[], Request]:
        def build() -> Request:
            ring = _attacker_ring(t, "same" if same_kid else "own")
            key = ring.signing_key()
            header = (
                _header(t) if same_kid else {"alg": key.alg, "kid": key.kid, "typ": "webhook+jwt"}
            )
            return _signed(t, f"other key {same_kid}", header=header, key=key)

        return build

    def captured_token_with(
        name: str, edit: Callable[[str, bytes, str], str]
    ) -> Callable[[], Request]:
        """A genuine captured token, edited; sent with a victim body and a fresh id."""

        def build() -> Request:
            headers, _ = _genuine(t)
            body, wid = _victim(name)
            token = edit(_token_of(headers), body, wid)
            return _with_token(_set(headers, "webhook-id", wid), token), body

        return build

    def tampered_claims(token: str, body: bytes, wid: str) -> str:
        header, _, signature = token.split(".")
        payload = _b64(orjson.dumps(_claims(t, wid, body, exp=now + 86_400)))
        return f"{header}.{payload}.{signature}"

    def stripped(token: str, body: bytes, wid: str) -> str:
        header = token.split(".")[0]
        return f"{header}.{_b64(orjson.dumps(_claims(t, wid, body)))}."

    def replay(
        name: str, edit: Callable[[dict[str, str], bytes], Request]
    ) -> Callable[[], Request]:
        def build() -> Request:
            headers, body = _genuine(t)
            return edit(headers, body)

        return build

    def spare_bits(token: str) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        return token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]

    def other_audience() -> Request:
        headers, body = _genuine(t, t.elsewhere)  # a real token, minted for another subscriber
        return headers, body

    return {
        "missing token": no_token,
        "basic auth instead of bearer": basic_auth,
        "empty bearer": raw("", "empty bearer"),
        "one segment": raw("abc", "one segment"),
        "garbage segments": raw("a.b.c", "garbage"),
        "alg none": alg_none,
        "HS256 keyed with the public key PEM": hs256("pem"),
        "HS256 keyed with the public x": hs256("x"),
        "ES256 claimed for an EdDSA key": es256_claimed,
        "token from another key": other_key(False),
        "another key under our kid": other_key(True),
        "captured token, claims tampered": captured_token_with("tampered", tampered_claims),
        "captured token, signature stripped": captured_token_with("stripped", stripped),
        "expired (really signed)": lambda: _signed(t, "expired", iat=now - 900, exp=now - 600),
        "issued in the future (really signed)": lambda: _signed(
            t, "future", iat=now + 600, exp=now + 900, nbf=now + 600
        ),
        "wrong audience (really signed)": lambda: _signed(t, "aud", aud="https://other.example/"),
        "wrong issuer (really signed)": lambda: _signed(t, "iss", iss="https://evil.example"),
        "wrong scope (really signed)": lambda: _signed(t, "scope", scope="admin"),
        "typ JWT (really signed)": lambda: _signed(t, "typ", header=_header(t, typ="JWT")),
        "typ missing (really signed)": lambda: _signed(t, "notyp", header=_header(t, typ=None)),
        "no body_sha256 (really signed)": lambda: _signed(t, "nohash", body_sha256=None),
        "no jti (really signed)": lambda: _signed(t, "nojti", jti=None),
        "no exp (really signed)": lambda: _signed(t, "noexp", exp=None),
        "kid with path characters": lambda: _signed(
            t, "kid path", header=_header(t, kid="../../etc/passwd")
        ),
        "unsupported crit (really signed)": lambda: _signed(
            t, "crit", header=_header(t, crit=["b64"], b64=False)
        ),
        "token for one body, sent with another": lambda: _body_swap(t),
        "token for one webhook-id, sent with another": lambda: _id_swap(t),
        "replay: exact": replay("exact", lambda h, b: (h, b)),
        "replay: body swapped": replay("body", lambda h, b: (h, _victim("replay body")[0])),
        "replay: webhook-id swapped": replay(
            "id", lambda h, b: (_set(h, "webhook-id", _victim("x")[1]), b)
        ),
        "replay: padding added": replay(
            "pad", lambda h, b: (_with_token(h, _token_of(h) + "=="), b)
        ),
        "replay: spare signature bits set": replay(
            "bits", lambda h, b: (_with_token(h, spare_bits(_token_of(h))), b)
        ),
        "replay: token of another subscriber": other_audience,
    }


def _body_swap(t: Target) -> Request:
    headers, _ = _signed(t, "signed body")
    return headers, _victim("sent body")[0]


def _id_swap(t: Target) -> Request:
    headers, body = _signed(t, "id swap")
    return _set(headers, "webhook-id", _victim("other id")[1]), body


# --- the HMAC signature -----------------------------------------------------------------------


def hmac_attacks(t: Target) -> dict[str, Callable[[], Request]]:
    def signed(
        name: str,
        *,
        secret: bytes | None = None,
        ts_shift: int = 0,
        signed_body: bytes | None = None,
        signed_id: str | None = None,
        signature: str | None = None,
        timestamp: str | None = None,
    ) -> Callable[[], Request]:
        def build() -> Request:
            body, wid = _victim(name)
            ts = int(time.time()) + ts_shift
            sig = (
                signature
                if signature is not None
                else sign_hmac(
                    [secret if secret is not None else t.secret],
                    signed_id or wid,
                    ts,
                    signed_body if signed_body is not None else body,
                )
            )
            headers = {
                "Content-Type": "application/json",
                "webhook-id": wid,
                "webhook-timestamp": timestamp or str(ts),
                "webhook-signature": sig,
                "x-chaos-attack": "1",
            }
            return headers, body

        return build

    def missing() -> Request:
        headers, body = signed("missing")()
        del headers["webhook-signature"]
        return headers, body

    def token_instead() -> Request:
        headers, body = missing()
        headers["Authorization"] = (
            f"Bearer {craft_token(t.keyring.signing_key(), _header(t), _claims(t, headers['webhook-id'], body))}"  # noqa: E501
        )
        return headers, body

    def replay(
        edit: Callable[[dict[str, str], bytes], Request], pool: str = "captured"
    ) -> Callable[[], Request]:
        def build() -> Request:
            headers, body = _genuine(t, t.captured if pool == "captured" else t.elsewhere)
            return edit(headers, body)

        return build

    return {
        "signature missing": missing,
        "agent token instead of a signature": token_instead,
        "wrong secret": signed("wrong secret", secret=b"x" * 32),
        "signature of another body": signed("other body", signed_body=b'{"event":"x"}'),
        "signature of another webhook-id": signed("other id", signed_id="evt_other"),
        "stale timestamp (really signed)": signed("stale", ts_shift=-3600),
        "future timestamp (really signed)": signed("future", ts_shift=3600),
        "timestamp not a number": signed("ts text", timestamp="yesterday"),
        "garbage signature": signed("garbage", signature="v1,not-base64!!"),
        "unknown scheme": signed("scheme", signature="v2,AAAA"),
        "empty signature": signed("empty", signature=""),
        "replay: exact": replay(lambda h, b: (h, b)),
        "replay: body swapped": replay(lambda h, b: (h, _victim("hmac replay")[0])),
        "replay: webhook-id swapped": replay(
            lambda h, b: (_set(h, "webhook-id", _victim("y")[1]), b)
        ),
        "replay: signature of another subscriber": replay(lambda h, b: (h, b), "elsewhere"),
    }
