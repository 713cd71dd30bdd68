"""What a delivery event means for the subscriber's database, decided without I/O.

`parse_event` turns the verified body into a `DeliveryEvent`; `RULES` says which effect each
event type has; `plan` combines the effect with the recipient's current row into the `Plan`
that a store writes. Stores only read state and write plans, so every rule lives here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

__all__ = [
    "RULES",
    "BouncePolicy",
    "DeliveryEvent",
    "Effect",
    "EventError",
    "Plan",
    "Rule",
    "UserState",
    "event_time",
    "parse_event",
    "plan",
    "rule_for",
    "soft_bounce_limit_reached",
]


class EventError(ValueError):
    """The body passed verification but is not a usable event (answered with 400)."""


class Effect(enum.Enum):
    INVALIDATE = "invalidate"  # email_valid = false with the rule's reason
    SOFT_BOUNCE = "soft_bounce"  # log it; invalidate once the limit is reached in the window
    UNSUBSCRIBE = "unsubscribe"  # unsubscribed = true, the address stays valid
    RECORD = "record"  # only remembered in processed_webhooks
    IGNORE = "ignore"  # not an event this receiver handles: accepted with 204

    @property
    def touches_user(self) -> bool:
        return self in (Effect.INVALIDATE, Effect.SOFT_BOUNCE, Effect.UNSUBSCRIBE)


@dataclass(frozen=True)
class Rule:
    effect: Effect
    reason: str | None = None


# (event type, bounce_type) -> rule. bounce_type is None for every event but Message.Bounced.
# A Message.Bounced with an unknown bounce_type is recorded; any other event type is ignored.
RULES: dict[tuple[str, str | None], Rule] = {
    ("Message.Bounced", "HardBounce"): Rule(Effect.INVALIDATE, "hard_bounce"),
    ("Message.Bounced", "SoftBounce"): Rule(Effect.SOFT_BOUNCE),
    ("Message.Bounced", "Blocked"): Rule(Effect.RECORD),
    ("Message.Bounced", "Undetermined"): Rule(Effect.RECORD),
    ("Message.Complained", None): Rule(Effect.INVALIDATE, "complaint"),
    ("Message.Unsubscribed", None): Rule(Effect.UNSUBSCRIBE),
}
_RECORD = Rule(Effect.RECORD)
_IGNORE = Rule(Effect.IGNORE)
_EVENTS_WITH_RECIPIENT = frozenset(event for event, _ in RULES)


@dataclass(frozen=True)
class DeliveryEvent:
    event: str
    recipient: str | None  # lowercased
    bounce_type: str | None
    occurred_at: datetime | None  # the body's "timestamp", UTC; None if absent or unreadable


def parse_event(body: bytes) -> DeliveryEvent:
    """Parse a verified body. Raises `EventError` when it cannot be acted on."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EventError("body is not a JSON object")
    event = doc.get("event")
    if not isinstance(event, str) or not event:
        raise EventError("event is missing or not a string")
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise EventError("data is not an object")
    recipient = data.get("recipient")
    bounce_type = data.get("bounce_type")
    if event in _EVENTS_WITH_RECIPIENT:
        if not isinstance(recipient, str) or "@" not in recipient:
            raise EventError("data.recipient is missing or not an email address")
        if event == "Message.Bounced" and not isinstance(bounce_type, str):
            raise EventError("data.bounce_type is missing or not a string")
    return DeliveryEvent(
        event=event,
        recipient=recipient.strip().lower() if isinstance(recipient, str) else None,
        bounce_type=bounce_type if event == "Message.Bounced" else None,
        occurred_at=_parse_timestamp(doc.get("timestamp")),
    )


def _parse_timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def rule_for(event: DeliveryEvent) -> Rule:
    rule = RULES.get((event.event, event.bounce_type))
    if rule is not None:
        return rule
    return _RECORD if event.event == "Message.Bounced" else _IGNORE


@dataclass(frozen=True)
class BouncePolicy:
    """Soft bounces invalidate an address once `limit` of them fall within `window`."""

    limit: int = 3
    window: timedelta = timedelta(days=7)


@dataclass(frozen=True)
class UserState:
    """The recipient's row as read inside the transaction (defaults when it does not exist)."""

    email_valid: bool = True
    # soft bounces already logged within one window either side of the new event's time
    soft_bounce_times: Sequence[datetime] = ()


@dataclass(frozen=True)
class Plan:
    """What a store writes for one event, beside claiming its webhook id."""

    # invalidated | already_invalid | unsubscribed | soft_bounce_logged | recorded | ignored
    action: str
    reason: str | None = None  # why the address was invalidated (with action "invalidated")
    upsert_user: bool = False
    unsubscribe: bool = False
    soft_bounce_at: datetime | None = None  # insert into soft_bounce_log, soft_bounces += 1

    @property
    def invalidates(self) -> bool:
        return self.action == "invalidated"


def soft_bounce_limit_reached(
    times: Sequence[datetime], new: datetime, limit: int, window: timedelta
) -> bool:
    """True if some window of length `window` holding `new` holds at least `limit` soft bounces."""
    ordered = sorted([*times, new])
    for start in ordered:
        if start > new:
            break
        if start < new - window:
            continue
        inside = sum(1 for t in ordered if start <= t <= start + window)
        if inside >= limit:
            return True
    return False


def plan(event: DeliveryEvent, state: UserState, *, now: datetime, policy: BouncePolicy) -> Plan:
    rule = rule_for(event)
    if rule.effect is Effect.IGNORE:
        return Plan("ignored")
    if rule.effect is Effect.RECORD:
        return Plan("recorded")
    if rule.effect is Effect.UNSUBSCRIBE:
        return Plan("unsubscribed", upsert_user=True, unsubscribe=True)
    if rule.effect is Effect.INVALIDATE:
        if not state.email_valid:
            return Plan("already_invalid", upsert_user=True)
        return Plan("invalidated", reason=rule.reason, upsert_user=True)
    at = event_time(event, now)
    reached = soft_bounce_limit_reached(state.soft_bounce_times, at, policy.limit, policy.window)
    if reached and state.email_valid:
        return Plan("invalidated", "soft_bounce_limit", upsert_user=True, soft_bounce_at=at)
    return Plan("soft_bounce_logged", upsert_user=True, soft_bounce_at=at)


def event_time(event: DeliveryEvent, now: datetime) -> datetime:
    """When the event happened: its timestamp, never later than `now`."""
    if event.occurred_at is None or event.occurred_at > now:
        return now
    return event.occurred_at
