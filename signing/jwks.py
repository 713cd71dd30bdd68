"""The sender's public keys (JWKS): parsing, each key pinned to one algorithm, and the cache rules.

The algorithm of a key comes from its type and curve, never from a token: OKP/Ed25519 is EdDSA,
EC/P-256 is ES256 and RSA (2048 to 8192 bits) is RS256; other keys, and keys whose members are
not canonical unpadded base64url, are ignored. `JwksCache` decides when to fetch and what to
answer, without doing any I/O: the async client (`jwks_client`) and the sync one (`jwks_sync`)
share it, so both follow the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import VerificationError
from .jose import PublicKey, b64url_decode

__all__ = ["MAX_JWKS_BYTES", "JwksCache", "PinnedKey", "PublicKey", "parse_jwks", "valid_kid"]

_KID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d{1,9})\s*(?:,|$)", re.IGNORECASE)
MAX_JWKS_BYTES = 1 << 20
_RSA_BITS = (2048, 8192)


@dataclass(frozen=True)
class PinnedKey:
    """A public key and the only algorithm it may verify."""

    kid: str
    alg: str
    key: PublicKey


def valid_kid(kid: object) -> TypeGuard[str]:
    """A kid we are willing to look up: a short base64url-alphabet string."""
    return isinstance(kid, str) and _KID.fullmatch(kid) is not None


def _member(jwk: Mapping[str, Any], name: str, size: int) -> bytes | None:
    """A base64url member of exactly `size` bytes (or, size < 0, of at most -size bytes)."""
    value = jwk.get(name)
    limit = abs(size)
    if not isinstance(value, str) or not value or len(value) > 2 * limit:
        return None
    raw = b64url_decode(value)
    if raw is None:
        return None
    if size < 0:
        return raw if len(raw) <= limit else None
    return raw if len(raw) == size else None


def _rsa_key(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey | None:
    n_raw = _member(jwk, "n", -(_RSA_BITS[1] // 8))
    e_raw = _member(jwk, "e", -8)
    if n_raw is None or e_raw is None:
        return None
    n, e = int.from_bytes(n_raw, "big"), int.from_bytes(e_raw, "big")
    if not _RSA_BITS[0] <= n.bit_length() <= _RSA_BITS[1] or e < 3 or e % 2 == 0:
        return None
    return rsa.RSAPublicNumbers(e, n).public_key()


def _parse_jwk(jwk: Mapping[str, Any]) -> PinnedKey | None:
    kid = jwk.get("kid")
    if not valid_kid(kid) or jwk.get("use", "sig") != "sig":
        return None
    kty, crv = jwk.get("kty"), jwk.get("crv")
    key: PublicKey | None
    try:
        if kty == "OKP" and crv == "Ed25519":
            alg = "EdDSA"
            x = _member(jwk, "x", 32)
            key = None if x is None else Ed25519PublicKey.from_public_bytes(x)
        elif kty == "EC" and crv == "P-256":
            alg = "ES256"
            x, y = _member(jwk, "x", 32), _member(jwk, "y", 32)
            if x is None or y is None:
                return None
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            key = numbers.public_key()  # rejects points not on the curve
        elif kty == "RSA":
            alg = "RS256"
            key = _rsa_key(jwk)
        else:
            return None
    except ValueError:
        return None
    # A key that claims another algorithm than its type implies is not to be trusted at all.
    if key is None or jwk.get("alg", alg) != alg:
        return None
    return PinnedKey(kid, alg, key)


def parse_jwks(document: object) -> dict[str, PinnedKey]:
    """The usable signing keys of a JWKS document by kid; raises ValueError if it is not a JWKS."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, PinnedKey] = {}
    for jwk in document["keys"]:
        if isinstance(jwk, Mapping) and (pinned := _parse_jwk(jwk)) is not None:
            keys.setdefault(pinned.kid, pinned)
    return keys


def max_age(cache_control: str | None) -> float | None:
    """The max-age of a Cache-Control header (0 for no-store/no-cache), None if it has none."""
    if not cache_control:
        return None
    if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class JwksCache:
    """What a JWKS client knows and when it may fetch again; no I/O, the caller fetches.

    Rules: the document is cached for `cache_ttl` seconds, or less if the response's
    Cache-Control max-age says so (never less than `min_refetch_interval`). An unknown kid
    triggers a refetch, at most once per `min_refetch_interval`. A failed fetch is not retried
    for `min_refetch_interval`, and the keys already known stay in use meanwhile.

    A client calls `fresh(kid, now)`; on None, under its lock, `should_fetch(kid, now)`, and if
    so `begin(kid, now)`, fetches, and reports `fetched(...)` or `failed(...)`; then `lookup(kid)`.
    """

    def __init__(self, *, cache_ttl: float, min_refetch_interval: float) -> None:
        self.cache_ttl = cache_ttl
        self.min_refetch = min_refetch_interval
        self._keys: dict[str, PinnedKey] = {}
        self._expires_at = float("-inf")
        self._retry_at = float("-inf")
        self._refetch_at = float("-inf")
        self._loaded = False

    @classmethod
    def static(cls, document: Mapping[str, Any]) -> JwksCache:
        """A cache holding a fixed document forever (raises ValueError if it is not a JWKS)."""
        cache = cls(cache_ttl=float("inf"), min_refetch_interval=float("inf"))
        cache._keys = parse_jwks(document)
        cache._expires_at = float("inf")
        cache._loaded = True
        return cache

    def fresh(self, kid: str, now: float) -> PinnedKey | None:
        """The key, if it is known and the cache has not expired (the lock-free fast path)."""
        key = self._keys.get(kid)
        return key if key is not None and now < self._expires_at else None

    def should_fetch(self, kid: str, now: float) -> bool:
        if now < self._retry_at:  # a fetch failed recently
            return False
        if now >= self._expires_at:  # nothing cached yet, or the cache is stale
            return True
        return kid not in self._keys and now >= self._refetch_at  # unknown kid, not too often

    def begin(self, kid: str, now: float) -> bool:
        """A fetch starts now; True if it is for a kid the cache does not know."""
        unknown = kid not in self._keys
        if unknown and now < self._expires_at:
            self._refetch_at = now + self.min_refetch
        return unknown

    def fetched(self, keys: dict[str, PinnedKey], ttl: float | None, now: float) -> None:
        """A fetch succeeded with `keys` and the response's max-age (None: not given)."""
        ttl = self.cache_ttl if ttl is None else min(ttl, self.cache_ttl)
        self._keys = keys
        self._loaded = True
        self._expires_at = now + max(ttl, self.min_refetch)

    def failed(self, error: VerificationError, *, unknown: bool, now: float) -> None:
        """A fetch failed; re-raises when the kid it was for is not known (else keeps the keys)."""
        self._retry_at = now + self.min_refetch
        if unknown:
            raise error

    def lookup(self, kid: str) -> PinnedKey:
        """The key for `kid`; raises VerificationError unknown_kid or jwks_unavailable."""
        key = self._keys.get(kid)
        if key is None:
            if not self._loaded:
                raise VerificationError("jwks_unavailable", "no JWKS fetched yet")
            raise VerificationError("unknown_kid", f"no published key with kid {kid}")
        return key

    @staticmethod
    def parse_response(body: bytes) -> dict[str, PinnedKey]:
        """The keys of a fetched JWKS body; raises VerificationError jwks_unavailable."""
        try:
            return parse_jwks(orjson.loads(body))
        except ValueError:
            raise VerificationError("jwks_unavailable", "response is not a JWKS") from None
