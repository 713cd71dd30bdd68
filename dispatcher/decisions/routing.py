"""Fan-out decision: which subscribers receive an event. Pure and precomputed.

An event goes to a subscriber when three things hold, checked in this order:

    account   the subscriber's ``account`` is the event's account, or ``"*"``; a subscriber
              without one gets only events without one (a customer's events, with its
              recipients' addresses, never reach another customer)
    events    one of its patterns matches the type: an exact name (``Message.Bounced``), a
              family (``Message.*``) or everything (``*``)
    filter    every filter path holds one of its strings (for a list, any element does)

The table indexes subscribers by account once per config; the (account, event type) answer is
computed on first use and kept, so what an event costs depends on the subscribers that want
it, never on the thousands of other customers' endpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dispatcher.config import ALL_ACCOUNTS, SubscriberConfig

__all__ = ["RoutingTable", "filter_passes", "pattern_matches"]

# (account, event type) answers kept per table; beyond this the cache starts over (a bound on
# memory when events name far more accounts than a config has).
_CACHE_LIMIT = 200_000
_MISSING = object()


def pattern_matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


def filter_passes(
    rules: tuple[tuple[tuple[str, ...], frozenset[str]], ...], doc: Mapping[str, Any]
) -> bool:
    """AND across paths, OR within one; a list value passes when any element does; a missing
    field or a value that is not a string (or a list of strings) does not pass."""
    for path, accepted in rules:
        value: Any = doc
        for part in path:
            value = value.get(part, _MISSING) if isinstance(value, Mapping) else _MISSING
            if value is _MISSING:
                return False
        if isinstance(value, str):
            if value not in accepted:
                return False
        elif isinstance(value, list):
            if not any(isinstance(v, str) and v in accepted for v in value):
                return False
        else:
            return False
    return True


class RoutingTable:
    """Subscribers by account, with each (account, event type) answer cached."""

    __slots__ = ("_by_account", "_cache", "_everyone", "_order")

    def __init__(self, subscribers: Iterable[SubscriberConfig]) -> None:
        subs = tuple(subscribers)
        self._order = {s.id: i for i, s in enumerate(subs)}
        self._everyone = tuple(s for s in subs if s.account == ALL_ACCOUNTS)
        by_account: dict[str | None, list[SubscriberConfig]] = {}
        for s in subs:
            if s.account != ALL_ACCOUNTS:
                by_account.setdefault(s.account, []).append(s)
        self._by_account = {k: tuple(v) for k, v in by_account.items()}
        self._cache: dict[tuple[str | None, str], tuple[SubscriberConfig, ...]] = {}

    def candidates(self, account: str | None, event_type: str) -> tuple[SubscriberConfig, ...]:
        """The subscribers whose account and event patterns take this event (filters aside)."""
        key = (account, event_type)
        found = self._cache.get(key)
        if found is None:
            own = self._by_account.get(account, ())
            pool = own + self._everyone if own and self._everyone else own or self._everyone
            found = tuple(
                sorted(
                    (s for s in pool if any(pattern_matches(p, event_type) for p in s.events)),
                    key=lambda s: self._order[s.id],
                )
            )
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found

    def targets(
        self, account: str | None, event_type: str, doc: Mapping[str, Any]
    ) -> tuple[SubscriberConfig, ...]:
        """Every subscriber that receives this event, in config order."""
        found = self.candidates(account, event_type)
        if any(s.filter for s in found):
            return tuple(s for s in found if not s.filter or filter_passes(s.filter, doc))
        return found

    def wants(self, sub: SubscriberConfig, account: str | None, event_type: str) -> bool:
        """Does ``sub`` (still) take events of this account and type? Filters aside."""
        return any(s is sub for s in self.candidates(account, event_type))
