"""Fan-out decision: which subscribers receive an event type. Pure and precomputed.

Patterns are exact names (``Message.Bounced``), a family (``Message.*``) or everything (``*``).
The table is built once per config, so the hot path is one dict lookup per event.
"""

from __future__ import annotations

from collections.abc import Iterable

from dispatcher.config import SubscriberConfig
from dispatcher.events import KNOWN_EVENT_TYPES

__all__ = ["RoutingTable", "pattern_matches"]


def pattern_matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


class RoutingTable:
    """Maps each known event type to the subscribers (in config order) that want it."""

    __slots__ = ("_table",)

    def __init__(self, subscribers: Iterable[SubscriberConfig]) -> None:
        subs = tuple(subscribers)
        self._table: dict[str, tuple[SubscriberConfig, ...]] = {
            event_type: tuple(
                s for s in subs if any(pattern_matches(p, event_type) for p in s.events)
            )
            for event_type in KNOWN_EVENT_TYPES
        }

    def targets(self, event_type: str) -> tuple[SubscriberConfig, ...]:
        return self._table.get(event_type, ())
