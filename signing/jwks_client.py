"""Fetching the sender's JWKS with aiohttp (the `aiohttp` extra), for `WebhookVerifier.verify`.

Only the configured URL is fetched; `jku`, `x5u` and redirects are never followed. Each fetch
opens and closes its own HTTP session unless one is given, so nothing is left open between
fetches (they are minutes apart) or at exit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from .errors import VerificationError
from .jwks import MAX_JWKS_BYTES, JwksCache, PinnedKey, max_age, parse_jwks

__all__ = ["JwksClient", "PinnedKey", "parse_jwks"]


class JwksClient:
    """Keys from a JWKS URL (or a static document), cached and refetched by `JwksCache`'s rules."""

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
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._cache = (
            JwksCache.static(jwks)
            if jwks is not None
            else JwksCache(cache_ttl=cache_ttl, min_refetch_interval=min_refetch_interval)
        )
        self.fetches = 0  # fetch attempts so far

    async def get(self, kid: str) -> PinnedKey:
        """The key for `kid`; raises VerificationError unknown_kid or jwks_unavailable."""
        cache = self._cache
        if self._url is None:
            return cache.lookup(kid)
        key = cache.fresh(kid, self._clock())
        if key is not None:
            return key
        async with self._lock:
            now = self._clock()
            if cache.should_fetch(kid, now):
                unknown = cache.begin(kid, now)
                self.fetches += 1
                try:
                    keys, ttl = await self._fetch(self._url)
                except VerificationError as exc:
                    cache.failed(exc, unknown=unknown, now=now)
                else:
                    cache.fetched(keys, ttl, now)
        return cache.lookup(kid)

    async def _fetch(self, url: str) -> tuple[dict[str, PinnedKey], float | None]:
        try:
            if self._session is not None:
                return await self._fetch_with(self._session, url)
            async with aiohttp.ClientSession() as session:
                return await self._fetch_with(session, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise VerificationError("jwks_unavailable", type(exc).__name__) from None

    async def _fetch_with(
        self, session: aiohttp.ClientSession, url: str
    ) -> tuple[dict[str, PinnedKey], float | None]:
        async with session.get(url, allow_redirects=False, timeout=self._timeout) as response:
            if response.status != 200:
                raise VerificationError("jwks_unavailable", f"JWKS status {response.status}")
            body = await _read_limited(response)
            ttl = max_age(response.headers.get("Cache-Control"))
        return JwksCache.parse_response(body), ttl

    async def close(self) -> None:
        """Nothing stays open between fetches; kept so callers can close unconditionally."""


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    if (response.content_length or 0) > MAX_JWKS_BYTES:
        raise VerificationError("jwks_unavailable", "JWKS response too large")
    chunks = []
    size = 0
    async for chunk in response.content.iter_chunked(65_536):
        size += len(chunk)
        if size > MAX_JWKS_BYTES:
            raise VerificationError("jwks_unavailable", "JWKS response too large")
        chunks.append(chunk)
    return b"".join(chunks)
