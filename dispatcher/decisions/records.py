"""What travels with a message besides its body: the dispatcher's own headers, written and read
back (their names are in dispatcher.names).

RabbitMQ ignores re-published ``x-death`` headers since 4.0, so the attempt count and the
first-attempt time travel in headers of our own. A retry names its one subscriber; a dead
letter carries the record that ``dispatcher dlq`` shows.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.names import (
    H_ACCOUNT,
    H_ATTEMPT,
    H_DEAD_AT,
    H_DEAD_ID,
    H_DEATH,
    H_DEFERRALS,
    H_EVENT_ID,
    H_EVENT_TYPE,
    H_FIRST_ATTEMPT,
    H_FIRST_DEATH_QUEUE,
    H_FIRST_DEATH_REASON,
    H_LAST_ERROR,
    H_LAST_STATUS,
    H_PUBLISHED_AT,
    H_REASON,
    H_SUBSCRIBER,
)

__all__ = [
    "DeadLetterRecord",
    "Delivery",
    "iso_time",
    "published_at",
]


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO 8601 in UTC, to the millisecond (a dead letter's time)."""
    at = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def published_at(headers: Mapping[str, Any], timestamp: dt.datetime | None) -> float | None:
    """When the event was published (unix seconds), from our header or the AMQP timestamp."""
    value = headers.get(H_PUBLISHED_AT)
    if value is not None and not isinstance(value, bool):
        try:
            seconds = float(value) / 1000.0
        except (TypeError, ValueError, OverflowError):
            seconds = math.nan
        if _plausible(seconds):
            return seconds
    if isinstance(timestamp, dt.datetime):
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=dt.UTC)
        try:
            seconds = timestamp.timestamp()
        except (OverflowError, OSError, ValueError):
            return None
        return seconds if _plausible(seconds) else None
    return None


def _plausible(seconds: float) -> bool:
    """A publish time between 2000 and 2200: anything else is garbage, not a timestamp."""
    return math.isfinite(seconds) and 946684800.0 <= seconds <= 7258118400.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One (event, subscriber) delivery's progress, as carried in retry headers."""

    subscriber: str
    attempt: int  # the attempt now due
    first_attempt_at: float  # unix seconds
    deferrals: int = 0
    last_status: int | None = None
    last_error: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any], now: float) -> Delivery | None:
        sub = _str(headers.get(H_SUBSCRIBER))
        if not sub:
            return None
        first_ms = _int(headers.get(H_FIRST_ATTEMPT), 0)
        status = _int(headers.get(H_LAST_STATUS), 0)
        return cls(
            subscriber=sub,
            attempt=max(1, _int(headers.get(H_ATTEMPT), 1)),
            first_attempt_at=first_ms / 1000.0 if first_ms > 0 else now,
            deferrals=max(0, _int(headers.get(H_DEFERRALS), 0)),
            last_status=status or None,
            last_error=_str(headers.get(H_LAST_ERROR)),
        )

    def headers(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            H_SUBSCRIBER: self.subscriber,
            H_ATTEMPT: self.attempt,
            H_FIRST_ATTEMPT: int(self.first_attempt_at * 1000),
            H_DEFERRALS: self.deferrals,
        }
        if self.last_status is not None:
            out[H_LAST_STATUS] = self.last_status
        if self.last_error:
            out[H_LAST_ERROR] = self.last_error[:500]
        return out


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """The contract's dead-letter fields, read back from a message in ``<queue>.dead``."""

    id: str
    event_id: str | None
    event: str | None
    subscriber: str | None
    account: str | None
    attempts: int
    reason: str
    last_status: int | None
    last_error: str | None
    dead_lettered_at: str | None

    @classmethod
    def from_message(
        cls, headers: Mapping[str, Any], message_id: str | None, fallback_id: str
    ) -> DeadLetterRecord:
        reason = _str(headers.get(H_REASON))
        if reason is None:
            reason = _broker_reason(headers)
        attempt = _int(headers.get(H_ATTEMPT), 0)
        status = _int(headers.get(H_LAST_STATUS), 0)
        ours = H_DEAD_ID in headers
        # AMQP message ids are always set by aiormq, invented if need be: on our own dead
        # letters the event id is our header, present only when the event had one.
        event_id = _str(headers.get(H_EVENT_ID)) if ours else message_id
        return cls(
            id=_str(headers.get(H_DEAD_ID)) or fallback_id,
            event_id=event_id,
            event=_str(headers.get(H_EVENT_TYPE)),
            subscriber=_str(headers.get(H_SUBSCRIBER)),
            account=_str(headers.get(H_ACCOUNT)),
            attempts=attempt,
            reason=reason,
            last_status=status or None,
            last_error=_str(headers.get(H_LAST_ERROR)),
            dead_lettered_at=_str(headers.get(H_DEAD_AT)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "event": self.event,
            "subscriber": self.subscriber,
            "account": self.account,
            "attempts": self.attempts,
            "reason": self.reason,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "dead_lettered_at": self.dead_lettered_at,
        }


_BROKER_REASONS = {
    # No count: x-delivery-count on a dead letter changes with every read of it.
    "delivery_limit": "delivered until the queue's delivery limit, never settled: the "
    "dispatcher crashed or lost its channel on every try",
    "rejected": "rejected by a consumer without requeue",
    "expired": "expired (message TTL)",
    "maxlen": "the queue was full (max-length)",
}


def _broker_reason(headers: Mapping[str, Any]) -> str:
    """A dead letter the broker wrote (delivery limit, reject): ``broker_<reason>: <what that
    means>``, from x-first-death-reason or x-death."""
    first = _str(headers.get(H_FIRST_DEATH_REASON))
    deaths = headers.get(H_DEATH)
    death = deaths[0] if isinstance(deaths, list) and deaths else None
    if not first and isinstance(death, Mapping):
        first = _str(death.get("reason"))
    if not first:
        return "unknown"
    queue = _str(headers.get(H_FIRST_DEATH_QUEUE))
    if not queue and isinstance(death, Mapping):
        queue = _str(death.get("queue"))
    explained = _BROKER_REASONS.get(first, "")
    parts = [p for p in (explained, f"in {queue}" if queue else "") if p]
    return f"broker_{first}: {', '.join(parts)}" if parts else f"broker_{first}"
