"""Event validation and id derivation (pure)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.decisions.events import InvalidEvent, derive_event_id, parse_event
from tests.support.harness import SEED_EVENT, event_body


def test_seed_event_parses_and_keeps_its_bytes() -> None:
    event = parse_event(SEED_EVENT)
    assert event.type == "Message.Bounced"
    assert event.recipient == "invalid@example.com"
    assert event.body is SEED_EVENT
    assert event.id == derive_event_id(SEED_EVENT)


def test_id_precedence() -> None:
    body = event_body(event_id="body-id")
    assert parse_event(body).id == "body-id"
    # The body's id wins over message_id: AMQP clients stamp a random message_id on publish.
    assert parse_event(body, message_id="prop-id").id == "body-id"
    assert parse_event(event_body(), message_id="prop-id").id == "prop-id"
    assert derive_event_id(b"x") == derive_event_id(b"x") != derive_event_id(b"y")


def test_account_is_read_and_optional() -> None:
    assert parse_event(event_body(account="acme-1.eu_west")).account == "acme-1.eu_west"
    assert parse_event(event_body(account="a" * 64)).account == "a" * 64
    assert parse_event(event_body()).account is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is empty"),
        (b"{", "not valid UTF-8 JSON"),
        (b'"str"', "top level is a JSON string"),
        (b"[]", "top level is a JSON array"),
        (b"null", "top level is a JSON null"),
        (b'{"event": 1}', '"event" is missing or not a string'),
        (b'{"event": "Message.Nope"}', "unknown event type"),
        (b'{"event": "Message.Delivered", "data": {}}', '"timestamp" is missing'),
        (
            b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z", "data": []}',
            '"data" is missing or not an object',
        ),
        (event_body(recipient="nobody"), '"data.recipient"'),
        (event_body(bounce_type="Soft"), '"data.bounce_type" must be one of'),
        (
            b'{"event": "Message.Bounced", "timestamp": "2026-03-12T09:14:02Z", "data": '
            b'{"recipient": "a@b.co", "bounce_type": "HardBounce", "diagnostic_code": 550}}',
            '"data.diagnostic_code" must be a string',
        ),
        (
            b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z", "data": {}, '
            b'"id": "a b"}',
            '"id" must be',
        ),
        (b'{"event": "Message.Delivered", "x": "\xed\xa0\x80"}', "not valid UTF-8 JSON"),
        (
            b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z", "data": {}, '
            b'"account": "acme corp"}',
            "\"account\" must be 1-64 characters of A-Z a-z 0-9 . _ -, got 'acme corp'",
        ),
        (
            b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z", "data": {}, '
            b'"account": ""}',
            '"account" must be 1-64',
        ),
        (
            b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z", "data": {}, '
            b'"account": 7}',
            '"account" must be 1-64 .* got a JSON number',
        ),
        (event_body(account="a" * 65), '"account" must be 1-64'),
    ],
)
def test_invalid_events_have_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(body)


def test_size_limit() -> None:
    body = event_body()
    with pytest.raises(InvalidEvent, match="over the 64-byte limit"):
        parse_event(body, max_bytes=64)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_another_exception(body: bytes) -> None:
    try:
        parse_event(body)
    except InvalidEvent as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["event", "timestamp", "data", "id", "x"]), json_values))
def test_arbitrary_objects_are_valid_or_refused_with_one_line(doc: dict) -> None:
    body = orjson.dumps(doc)
    try:
        event = parse_event(body)
    except InvalidEvent as exc:
        assert "\n" not in str(exc)
    else:
        assert event.body == body and event.type == doc["event"]
