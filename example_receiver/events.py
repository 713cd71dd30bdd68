"""What a delivery event means for the subscriber's database, decided without I/O.

`parse_event` turns the verified body into a `DeliveryEvent` (`parse_batch` a batch into its
members); `RULES` says which effect each event type has; `plan` combines the effect with the
recipient's current row into the `Plan` that a store writes. Stores only read state and write
plans, so every rule lives here.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

__all__ = [
    "RULES",
    "BatchError",
    "BatchMember",
    "BouncePolicy",
    "DeliveryEvent",
    "Effect",
    "EventError",
    "Plan",
    "Rule",
    "UserState",
    "derived_event_id",
    "event_time",
    "parse_batch",
    "parse_event",
    "plan",
    "rule_for",
    "soft_bounce_limit_reached",
    "split_array",
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
    return _event_from(doc)


def _event_from(doc: object) -> DeliveryEvent:
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


# --- batches -------------------------------------------------------------------------------


class BatchError(EventError):
    """A verified batch that cannot be applied as a whole (answered with 400, nothing written)."""


@dataclass(frozen=True)
class BatchMember:
    event_id: str  # the element's "id", or the id derived from its exact bytes
    event: DeliveryEvent
    account: str | None  # the element's top-level "account"


_MAX_BATCH = 10_000  # the dispatcher's largest max_events
_MAX_EVENT_ID = 128
# A JSON string (escapes included) or one structural character: enough to find the elements of
# an array that is already known to be valid JSON, without decoding it.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


def derived_event_id(event_bytes: bytes) -> str:
    """The id an event whose body has no "id" is delivered under: the hash of its exact bytes
    that the dispatcher's publisher stamps as the message_id
    (dispatcher.decisions.events.derive_event_id, not imported: this package needs nothing of
    the dispatcher)."""
    return "evt_" + hashlib.blake2b(event_bytes, digest_size=16).hexdigest()


def split_array(body: bytes) -> list[bytes]:
    """The exact bytes of each element of `body`, a valid JSON array (whitespace included)."""
    elements: list[bytes] = []
    depth, start = 0, 0
    for token in _JSON_TOKEN.finditer(body):
        char = token.group()
        if char in (b"[", b"{"):
            depth += 1
            if depth == 1:
                start = token.end()
        elif char in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                last = body[start : token.start()]
                if elements or last.strip():
                    elements.append(last)
                break
        elif char == b"," and depth == 1:
            elements.append(body[start : token.start()])
            start = token.end()
    return elements


def parse_batch(body: bytes, size_header: str) -> list[BatchMember]:
    """Parse a verified batch: a JSON array of exactly `webhook-batch-size` event objects.

    Every element must be a usable event (the rules of `parse_event`); one that is not refuses
    the whole batch with a `BatchError` naming it. Each member's id is its top-level "id", or
    for an element without one the id the dispatcher derives from the element's exact bytes.
    """
    size_text = size_header.strip()
    if not size_text.isdigit() or not 1 <= int(size_text) <= _MAX_BATCH:
        raise BatchError(f"webhook-batch-size must be 1 to {_MAX_BATCH}, got {size_header!r}")
    size = int(size_text)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BatchError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise BatchError("a batch body must be a JSON array")
    if len(doc) != size:
        raise BatchError(f"webhook-batch-size is {size} but the array holds {len(doc)} elements")
    raw: list[bytes] | None = None
    members = []
    for index, element in enumerate(doc):
        try:
            event = _event_from(element)
        except EventError as exc:
            raise BatchError(f"element {index}: {exc}") from None
        assert isinstance(element, dict)  # _event_from refuses anything else
        event_id = element.get("id")
        if "id" not in element:
            if raw is None:
                raw = split_array(body)
                if len(raw) != size:  # not the dispatcher's "[e1,e2,...]" after all
                    raise BatchError("cannot find the exact bytes of the array's elements")
            event_id = derived_event_id(raw[index])
        elif not isinstance(event_id, str) or not 1 <= len(event_id) <= _MAX_EVENT_ID:
            raise BatchError(f"element {index}: id must be a string of 1-{_MAX_EVENT_ID} chars")
        account = element.get("account")
        if account is not None and not isinstance(account, str):
            raise BatchError(f"element {index}: account is not a string")
        members.append(BatchMember(event_id, event, account))
    return members


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
