"""The in-memory replay cache: remembers ids until they expire, within a bounded size."""

from __future__ import annotations

import pytest

from signing import MemoryReplayCache


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_second_sighting_is_a_replay_until_expiry() -> None:
    clock = _Clock()
    cache = MemoryReplayCache(clock=clock)
    assert not await cache.seen("a", 1010)
    assert await cache.seen("a", 1010)
    clock.now = 1009.9
    assert await cache.seen("a", 1010)
    clock.now = 1010
    assert not await cache.seen("a", 1020)
    assert len(cache) == 1


async def test_size_is_bounded_expired_first_then_soonest_expiry() -> None:
    clock = _Clock()
    cache = MemoryReplayCache(max_size=3, clock=clock)
    assert not await cache.seen("short", 1001)
    assert not await cache.seen("long", 2000)
    assert not await cache.seen("mid", 1500)
    clock.now = 1002  # "short" expired: dropped before anything live is evicted
    assert not await cache.seen("new", 1800)
    assert len(cache) == 3
    assert await cache.seen("long", 2000)
    assert not await cache.seen("newer", 1900)  # full: "mid" (soonest expiry) goes
    assert len(cache) == 3
    assert not await cache.seen("mid", 1500)


async def test_many_ids_stay_within_the_bound() -> None:
    cache = MemoryReplayCache(max_size=100)
    for i in range(1000):
        await cache.seen(f"jti-{i}", 10**10 + i)
    assert len(cache) == 100
    assert await cache.seen("jti-999", 10**10 + 999)


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryReplayCache(max_size=0)
