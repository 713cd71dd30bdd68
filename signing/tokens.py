"""Minting agent tokens: the short-lived JWT that rides on every webhook POST.

This is on the delivery hot path, so the compact JWS is assembled by hand (PyJWT's `jwt.encode`
costs about twice as much): the encoded header is cached per key, the claims are serialised with
orjson, and the only real work per token is one signature. Tokens are ordinary JWS and verify with
any JOSE library given the published JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .keys import KeyRing, SigningKey

__all__ = ["TOKEN_TYPE", "TokenMinter", "body_sha256"]

TOKEN_TYPE = "webhook+jwt"

_b64 = base64.urlsafe_b64encode


def body_sha256(body: bytes) -> str:
    """base64url (no padding) of SHA-256 over the exact body bytes, as in the body_sha256 claim."""
    return _b64(hashlib.sha256(body).digest()).rstrip(b"=").decode("ascii")


class TokenMinter:
    """Mints agent tokens with the key ring's current signing key.

    The signing key is resolved at most once per second (of `now`), so a rotation or a reload of
    the ring is picked up within a second without a lookup per token.
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuer: str,
        subject: str,
        ttl_seconds: int,
        scope: str = "webhooks:deliver",
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._keyring = keyring
        self._issuer = issuer
        self._subject = subject
        self._ttl = int(ttl_seconds)
        self._scope = scope
        self._resolved_for: int | None = None
        self._key: SigningKey | None = None
        self._header: bytes = b""
        self._sign: Callable[[bytes], bytes] = _unset_signer

    def _resolve(self, now: float, second: int) -> None:
        key = self._keyring.signing_key(now)
        if key != self._key:
            header = {"alg": key.alg, "kid": key.kid, "typ": TOKEN_TYPE}
            self._header = _b64(orjson.dumps(header)).rstrip(b"=")
            # Ed25519 signatures are already in JWS form; bind the method directly.
            private = key.private_key
            self._sign = private.sign if isinstance(private, Ed25519PrivateKey) else key.sign
            self._key = key
        self._resolved_for = second

    @property
    def current_kid(self) -> str | None:
        """The kid of the key that signed the last token, if any."""
        return None if self._key is None else self._key.kid

    def mint(self, *, audience: str, webhook_id: str, body: bytes, now: int | None = None) -> str:
        """A signed token for one delivery attempt of `body` to `audience` (the subscriber url)."""
        t = time.time() if now is None else now
        iat = int(t)
        if iat != self._resolved_for:
            self._resolve(t, iat)
        claims = {
            "iss": self._issuer,
            "sub": self._subject,
            "aud": audience,
            "iat": iat,
            "exp": iat + self._ttl,
            "jti": _b64(os.urandom(12)).decode("ascii"),
            "scope": self._scope,
            "webhook_id": webhook_id,
            "body_sha256": _b64(hashlib.sha256(body).digest()).rstrip(b"=").decode("ascii"),
        }
        signing_input = self._header + b"." + _b64(orjson.dumps(claims)).rstrip(b"=")
        signature = _b64(self._sign(signing_input)).rstrip(b"=")
        return (signing_input + b"." + signature).decode("ascii")


def _unset_signer(data: bytes) -> bytes:
    raise RuntimeError("no signing key resolved")
