"""Valid events for the load the faults strike, and which subscribers each one is owed to."""

from __future__ import annotations

import random
from collections.abc import Sequence

from tests.support.harness import event_body

__all__ = ["EVENT_TYPES", "Event", "make_events", "owed_to"]

# Weighted like real traffic: mostly bounces and deliveries.
EVENT_TYPES: tuple[tuple[str, int], ...] = (
    ("Message.Bounced", 40),
    ("Message.Delivered", 20),
    ("Message.Deferred", 15),
    ("Message.Complained", 15),
    ("Message.Unsubscribed", 10),
)

Event = tuple[str, str, bytes]  # (event id, event type, body)


def make_events(n: int, prefix: str, rng: random.Random) -> list[Event]:
    kinds = [k for k, _ in EVENT_TYPES]
    weights = [w for _, w in EVENT_TYPES]
    out = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        event_id = f"{prefix}-{i:06d}"
        bounce = rng.choice(["HardBounce", "SoftBounce", "Blocked", "Undetermined"])
        out.append((event_id, kind, event_body(kind, n=i, event_id=event_id, bounce_type=bounce)))
    return out


def _matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


def owed_to(event_type: str, subscribers: Sequence[dict[str, object]]) -> list[str]:
    """The ids of the subscribers whose ``events`` patterns match (the contract's rule,
    written again here so the test does not trust the dispatcher's routing)."""
    out = []
    for sub in subscribers:
        patterns = sub.get("events", ["*"])
        assert isinstance(patterns, list)
        if any(_matches(str(p), event_type) for p in patterns):
            out.append(str(sub["id"]))
    return out
