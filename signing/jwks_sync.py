"""Fetching the sender's JWKS with the standard library, for `WebhookVerifier.verify_sync`.

Same rules as the async client (`JwksCache`): cached for the response's max-age (at most
`cache_ttl`), an unknown kid refetches at most once per `min_refetch_interval`, failures keep the
known keys. Thread-safe: WSGI servers call the verifier from many threads; one fetches, the
others wait for its answer. Redirects are never followed, and only http(s) URLs are fetched.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import VerificationError
from .jwks import MAX_JWKS_BYTES, JwksCache, PinnedKey, max_age

__all__ = ["SyncJwksClient"]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow nothing: the redirect surfaces as an HTTPError (3xx), closed like any other."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class SyncJwksClient:
    """Keys from a JWKS URL, fetched with urllib and cached by `JwksCache`'s rules."""

    def __init__(
        self,
        url: str,
        *,
        cache_ttl: float = 300.0,
        min_refetch_interval: float = 10.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"jwks_url must be http(s): {url!r}")
        self._url = url
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._cache = JwksCache(cache_ttl=cache_ttl, min_refetch_interval=min_refetch_interval)
        self._opener = urllib.request.build_opener(_NoRedirects())
        self.fetches = 0  # fetch attempts so far

    def get(self, kid: str) -> PinnedKey:
        """The key for `kid`; raises VerificationError unknown_kid or jwks_unavailable."""
        cache = self._cache
        key = cache.fresh(kid, self._clock())
        if key is not None:
            return key
        with self._lock:
            now = self._clock()
            if cache.should_fetch(kid, now):
                unknown = cache.begin(kid, now)
                self.fetches += 1
                try:
                    keys, ttl = self._fetch()
                except VerificationError as exc:
                    cache.failed(exc, unknown=unknown, now=now)
                else:
                    cache.fetched(keys, ttl, now)
        return cache.lookup(kid)

    def _fetch(self) -> tuple[dict[str, PinnedKey], float | None]:
        request = urllib.request.Request(self._url, headers={"Accept": "application/json"})
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                if response.status != 200:
                    raise VerificationError("jwks_unavailable", f"JWKS status {response.status}")
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                    raise VerificationError("jwks_unavailable", "JWKS response too large")
                body = response.read(MAX_JWKS_BYTES + 1)
                ttl = max_age(response.headers.get("Cache-Control"))
        except urllib.error.HTTPError as exc:
            exc.close()
            raise VerificationError("jwks_unavailable", f"JWKS status {exc.code}") from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, resets, bad responses
            raise VerificationError("jwks_unavailable", type(exc).__name__) from None
        if len(body) > MAX_JWKS_BYTES:
            raise VerificationError("jwks_unavailable", "JWKS response too large")
        return JwksCache.parse_response(body), ttl
