"""Minting agent tokens: the short-lived JWT that rides on every webhook POST.

This is on the delivery hot path, so the compact JWS is assembled by hand (PyJWT's `jwt.encode`
costs about twice as much): the encoded header is cached per key, the claims are serialised with
orjson, and the only real work per token is one signature. Tokens are ordinary JWS and verify with
any JOSE library given the published JWKS.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .jose import b64url_encode
from .keys import KeyRing, SigningKey

__all__ = ["TOKEN_TYPE", "TokenMinter", "body_sha256"]

TOKEN_TYPE = "webhook+jwt"

# The `fast` extra: libsodium's Ed25519, about a third less CPU per token than OpenSSL's.
_sodium_sign: Callable[[bytes, bytes], bytes] | None
try:
    from nacl.bindings import crypto_sign

    _sodium_sign = crypto_sign
except ImportError:  # pragma: no cover - a test hides it instead
    _sodium_sign = None


def body_sha256(body: bytes) -> str:
    """base64url (no padding) of SHA-256 over the exact body bytes, as in the body_sha256 claim."""
    return b64url_encode(hashlib.sha256(body).digest())


class TokenMinter:
    """Mints agent tokens with the key ring's current signing key for each algorithm.

    Keys are resolved at most once per second (of `now`) and algorithm, so a rotation or a reload
    of the ring is picked up within a second without a lookup per token; the encoded header and
    the bound signing method are cached per key.
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
        self._resolved: dict[str | None, _Signer] = {}  # algorithm (None: default) -> signer
        self._signers: dict[str, _Signer] = {}  # kid -> signer, kept across resolutions
        self._last_kid: str | None = None

    def _resolve(self, algorithm: str | None, now: float, second: int) -> _Signer:
        if second != self._resolved_for:
            self._resolved.clear()
            self._resolved_for = second
        key = self._keyring.signing_key(now, algorithm)
        signer = self._signers.get(key.kid)
        if signer is None or signer.key != key:
            signer = _Signer.for_key(key)
            if len(self._signers) > 64:  # rotations over a long life: keep only recent keys
                self._signers.clear()
            self._signers[key.kid] = signer
        self._resolved[algorithm] = signer
        return signer

    @property
    def current_kid(self) -> str | None:
        """The kid of the key that signed the last token, if any."""
        return self._last_kid

    def mint(
        self,
        *,
        audience: str,
        webhook_id: str,
        body: bytes,
        now: int | None = None,
        algorithm: str | None = None,
        account: str | None = None,
    ) -> str:
        """A signed token for one delivery attempt of `body` to `audience` (the subscriber url).

        `algorithm` picks the key (None: the ring's default algorithm); `account` adds the
        `account` claim.
        """
        t = time.time() if now is None else now
        iat = int(t)
        signer = self._resolved.get(algorithm) if iat == self._resolved_for else None
        if signer is None:
            signer = self._resolve(algorithm, t, iat)
        claims = {
            "iss": self._issuer,
            "sub": self._subject,
            "aud": audience,
            "iat": iat,
            "exp": iat + self._ttl,
            "jti": b64url_encode(os.urandom(12)),
            "scope": self._scope,
            "webhook_id": webhook_id,
            "body_sha256": body_sha256(body),
        }
        if account is not None:
            claims["account"] = account
        signing_input = f"{signer.header}.{b64url_encode(orjson.dumps(claims))}"
        signature = b64url_encode(signer.sign(signing_input.encode("ascii")))
        self._last_kid = signer.key.kid
        return f"{signing_input}.{signature}"


@dataclass(frozen=True)
class _Signer:
    """One key's encoded JOSE header and signing method."""

    key: SigningKey
    header: str
    sign: Callable[[bytes], bytes]

    @classmethod
    def for_key(cls, key: SigningKey) -> _Signer:
        header = {"alg": key.alg, "kid": key.kid, "typ": TOKEN_TYPE}
        private = key.private_key
        sign: Callable[[bytes], bytes] = key.sign
        if isinstance(private, Ed25519PrivateKey):
            # Ed25519 signatures are already in JWS form, and deterministic: libsodium and
            # OpenSSL give the same 64 bytes for the same key and input.
            sign = _ed25519_signer(private) if _sodium_sign is not None else private.sign
        return cls(key, b64url_encode(orjson.dumps(header)), sign)


def _ed25519_signer(private: Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    """Signs with libsodium: its secret key is the 32-byte seed followed by the public key, and
    `crypto_sign` returns the signature followed by the message."""
    assert _sodium_sign is not None
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    secret = seed + public
    sodium_sign = _sodium_sign

    def sign(data: bytes) -> bytes:
        return sodium_sign(data, secret)[:64]

    return sign
