"""Inbound events: validation and event-id derivation, without I/O.

`parse_event` turns the raw bytes a delivery node published into an `Event` or raises
`InvalidEvent` with a one-line reason; the reason becomes ``invalid_event: <reason>`` on the
dead letter. The body is never re-serialized: subscribers receive exactly the published bytes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "ACCOUNT_PATTERN",
    "BOUNCE_TYPES",
    "KNOWN_EVENT_TYPES",
    "Event",
    "InvalidEvent",
    "derive_event_id",
    "parse_event",
]

KNOWN_EVENT_TYPES: tuple[str, ...] = (
    "Message.Bounced",
    "Message.Deferred",
    "Message.Delivered",
    "Message.Complained",
    "Message.Unsubscribed",
)
BOUNCE_TYPES = frozenset({"HardBounce", "SoftBounce", "Blocked", "Undetermined"})

_KNOWN = frozenset(KNOWN_EVENT_TYPES)
# Deliberately plain: one @, a dot in the domain, no spaces or control characters.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+$")
_EVENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: a safe header value
ACCOUNT_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAX_ID = 128


class InvalidEvent(ValueError):
    """The message is not an event this dispatcher can deliver; ``str()`` is the reason."""


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    body: bytes
    recipient: str | None = None
    account: str | None = None  # the sending account (the provider's customer), if any
    doc: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # parsed body


def derive_event_id(body: bytes) -> str:
    """A stable id for a body that carries none, so a redelivered message keeps its id."""
    return "evt_" + hashlib.blake2b(body, digest_size=16).hexdigest()


def _check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not _EVENT_ID.match(value):
        raise InvalidEvent(f"{where} must be 1-{_MAX_ID} printable ASCII characters")
    return value


def parse_event(
    body: bytes, *, message_id: str | None = None, max_bytes: int = 256 * 1024
) -> Event:
    """Validate a published body; return the `Event` or raise `InvalidEvent`."""
    if len(body) > max_bytes:
        raise InvalidEvent(f"body is {len(body)} bytes, over the {max_bytes}-byte limit")
    if not body:
        raise InvalidEvent("body is empty")
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson also refuses invalid UTF-8 and lone surrogates here.
        raise InvalidEvent(f"not valid UTF-8 JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise InvalidEvent(f"top level is a JSON {_kind(doc)}, not an object")

    event_type = doc.get("event")
    if not isinstance(event_type, str):
        raise InvalidEvent('"event" is missing or not a string')
    if event_type not in _KNOWN:
        raise InvalidEvent(f"unknown event type {event_type[:64]!r}")
    timestamp = doc.get("timestamp")
    if not isinstance(timestamp, str) or not 10 <= len(timestamp) <= 40:
        raise InvalidEvent('"timestamp" is missing or not an ISO 8601 string')
    data = doc.get("data")
    if not isinstance(data, dict):
        raise InvalidEvent('"data" is missing or not an object')

    recipient = data.get("recipient")
    required = event_type == "Message.Bounced" or recipient is not None
    if required and not (
        isinstance(recipient, str) and _EMAIL.match(recipient) and len(recipient) <= 320
    ):
        raise InvalidEvent('"data.recipient" is missing or not an email address')
    if event_type == "Message.Bounced":
        bounce_type = data.get("bounce_type")
        if not isinstance(bounce_type, str) or bounce_type not in BOUNCE_TYPES:
            raise InvalidEvent(
                '"data.bounce_type" must be one of HardBounce, SoftBounce, Blocked, Undetermined'
            )
        code = data.get("diagnostic_code")
        if code is not None and not isinstance(code, str):
            raise InvalidEvent('"data.diagnostic_code" must be a string')

    account = doc.get("account")
    if account is not None and not (isinstance(account, str) and ACCOUNT_PATTERN.match(account)):
        shown = repr(account[:80]) if isinstance(account, str) else f"a JSON {_kind(account)}"
        raise InvalidEvent(f'"account" must be 1-64 characters of A-Z a-z 0-9 . _ -, got {shown}')

    # The body's id wins: common AMQP clients stamp a random message_id on every publish.
    if "id" in doc:
        event_id = _check_id(doc["id"], '"id"')
    elif message_id:
        event_id = _check_id(message_id, "message_id property")
    else:
        event_id = derive_event_id(body)
    return Event(
        id=event_id, type=event_type, body=body, recipient=recipient, account=account, doc=doc
    )


def _kind(doc: object) -> str:
    if isinstance(doc, dict):
        return "object"
    if isinstance(doc, list):
        return "array"
    if isinstance(doc, str):
        return "string"
    if isinstance(doc, bool):
        return "boolean"
    if doc is None:
        return "null"
    return "number"
