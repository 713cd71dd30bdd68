"""Remembering token ids (jti) until their tokens expire, so a captured token cannot be replayed."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["MemoryReplayCache", "ReplayCache", "SyncReplayCache"]


class ReplayCache(Protocol):
    """Storage for seen token ids; back it with Redis or a database to share it between workers."""

    async def seen(self, jti: str, expires_at: float) -> bool:
        """True if `jti` was already recorded; otherwise record it until `expires_at`."""
        ...


class SyncReplayCache(Protocol):
    """The same, for `WebhookVerifier.verify_sync` (WSGI receivers); must be thread-safe."""

    def seen_sync(self, jti: str, expires_at: float) -> bool:
        """True if `jti` was already recorded; otherwise record it until `expires_at`."""
        ...


class MemoryReplayCache:
    """An in-process replay cache with bounded size, for async and sync (threaded) receivers.

    Expired ids are dropped first. When still full, the id closest to expiry is evicted: under a
    flood the oldest tokens lose replay protection rather than memory growing without bound. Only
    protects one process; several workers need a shared cache.
    """

    def __init__(self, max_size: int = 100_000, *, clock: Callable[[], float] = time.time) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._max_size = max_size
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def seen(self, jti: str, expires_at: float) -> bool:
        return self.seen_sync(jti, expires_at)

    def seen_sync(self, jti: str, expires_at: float) -> bool:
        with self._lock:
            self._drop_expired(self._clock())
            if jti in self._expiry:
                return True
            while len(self._expiry) >= self._max_size:
                self._pop()
            self._expiry[jti] = expires_at
            heapq.heappush(self._heap, (expires_at, jti))
            return False

    def _drop_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            self._pop()

    def _pop(self) -> None:
        expires_at, jti = heapq.heappop(self._heap)
        if self._expiry.get(jti) == expires_at:
            del self._expiry[jti]
