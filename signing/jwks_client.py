"""Fetching and caching the sender's public keys (JWKS), each pinned to one algorithm.

The algorithm of a key comes from its type and curve, never from a token: OKP/Ed25519 is EdDSA and
EC/P-256 is ES256; other keys are ignored. Only the configured URL is fetched; `jku`, `x5u` and
redirects are never followed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import VerificationError

__all__ = ["JwksClient", "PinnedKey", "parse_jwks"]

_KID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d{1,9})\s*(?:,|$)", re.IGNORECASE)
_MAX_JWKS_BYTES = 1 << 20
_MAX_CACHE_TTL = 86_400.0


@dataclass(frozen=True)
class PinnedKey:
    """A public key and the only algorithm it may verify."""

    kid: str
    alg: str
    key: Ed25519PublicKey | ec.EllipticCurvePublicKey


def valid_kid(kid: object) -> TypeGuard[str]:
    """A kid we are willing to look up: a short base64url-alphabet string."""
    return isinstance(kid, str) and _KID.fullmatch(kid) is not None


def _b64url_decode(value: object, size: int) -> bytes | None:
    if not isinstance(value, str) or len(value) > 2 * size:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def _parse_jwk(jwk: Mapping[str, Any]) -> PinnedKey | None:
    kid = jwk.get("kid")
    if not valid_kid(kid) or jwk.get("use", "sig") != "sig":
        return None
    kty, crv = jwk.get("kty"), jwk.get("crv")
    try:
        if kty == "OKP" and crv == "Ed25519":
            alg = "EdDSA"
            x = _b64url_decode(jwk.get("x"), 32)
            if x is None:
                return None
            key: Ed25519PublicKey | ec.EllipticCurvePublicKey = Ed25519PublicKey.from_public_bytes(
                x
            )
        elif kty == "EC" and crv == "P-256":
            alg = "ES256"
            x, y = _b64url_decode(jwk.get("x"), 32), _b64url_decode(jwk.get("y"), 32)
            if x is None or y is None:
                return None
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            key = numbers.public_key()  # rejects points not on the curve
        else:
            return None
    except ValueError:
        return None
    # A key that claims another algorithm than its type implies is not to be trusted at all.
    if jwk.get("alg", alg) != alg:
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


def _max_age(cache_control: str | None) -> float | None:
    if not cache_control:
        return None
    if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class JwksClient:
    """Keys from a JWKS URL (or a static document), cached and refetched sparingly.

    The document is cached for `cache_ttl` seconds, or less if the response's Cache-Control
    max-age says so. An unknown kid triggers a refetch, at most once per `min_refetch_interval`.
    If a fetch fails, the keys already known stay in use.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        jwks: Mapping[str, Any] | None = None,
        session: aiohttp.ClientSession | None = None,
        cache_ttl: float = 300.0,
        min_refetch_interval: float = 10.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (url is None) == (jwks is None):
            raise ValueError("give exactly one of url and jwks")
        self._url = url
        self._session = session
        self._owns_session = session is None
        self._cache_ttl = cache_ttl
        self._min_refetch = min_refetch_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._keys: dict[str, PinnedKey] = {}
        self._expires_at = float("-inf")
        self._retry_at = float("-inf")
        self._refetch_at = float("-inf")
        self._loaded = False
        self.fetches = 0  # fetch attempts so far
        if jwks is not None:
            self._keys = parse_jwks(jwks)
            self._expires_at = float("inf")
            self._loaded = True

    async def get(self, kid: str) -> PinnedKey:
        """The key for `kid`; raises VerificationError unknown_kid or jwks_unavailable."""
        if self._url is None:
            return self._lookup(kid)
        key = self._keys.get(kid)
        if key is not None and self._clock() < self._expires_at:
            return key
        async with self._lock:
            now = self._clock()
            if self._should_fetch(kid, now):
                await self._refresh(kid, now)
        return self._lookup(kid)

    def _should_fetch(self, kid: str, now: float) -> bool:
        if now < self._retry_at:  # a fetch failed recently
            return False
        if now >= self._expires_at:  # nothing cached yet, or the cache is stale
            return True
        return kid not in self._keys and now >= self._refetch_at  # unknown kid, not too often

    def _lookup(self, kid: str) -> PinnedKey:
        key = self._keys.get(kid)
        if key is None:
            if not self._loaded:
                raise VerificationError("jwks_unavailable", "no JWKS fetched yet")
            raise VerificationError("unknown_kid", f"no published key with kid {kid}")
        return key

    async def _refresh(self, kid: str, now: float) -> None:
        unknown = kid not in self._keys
        if unknown and now < self._expires_at:
            self._refetch_at = now + self._min_refetch
        self.fetches += 1
        try:
            keys, ttl = await self._fetch()
        except VerificationError:
            self._retry_at = now + self._min_refetch
            if unknown:
                raise
            return  # keep using the keys we have until a refetch succeeds
        self._keys = keys
        self._loaded = True
        self._expires_at = now + ttl

    async def _fetch(self) -> tuple[dict[str, PinnedKey], float]:
        assert self._url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(
                self._url, allow_redirects=False, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    raise VerificationError("jwks_unavailable", f"JWKS status {response.status}")
                body = await _read_limited(response)
                ttl = _max_age(response.headers.get("Cache-Control"))
            keys = parse_jwks(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise VerificationError("jwks_unavailable", type(exc).__name__) from None
        except ValueError:
            raise VerificationError("jwks_unavailable", "response is not a JWKS") from None
        ttl = self._cache_ttl if ttl is None else min(ttl, self._cache_ttl)
        return keys, max(ttl, self._min_refetch)

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    if (response.content_length or 0) > _MAX_JWKS_BYTES:
        raise VerificationError("jwks_unavailable", "JWKS response too large")
    chunks = []
    size = 0
    async for chunk in response.content.iter_chunked(65_536):
        size += len(chunk)
        if size > _MAX_JWKS_BYTES:
            raise VerificationError("jwks_unavailable", "JWKS response too large")
        chunks.append(chunk)
    return b"".join(chunks)
