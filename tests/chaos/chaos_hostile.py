"""Hostile input for the work queue, generated with hypothesis: bodies and AMQP properties.

Each generated `Hostile` message knows what the contract says must become of it: a *bad* one
(not JSON, not an object, a missing or mistyped field, invalid UTF-8, too big, too deep, an
unusable id) must be dead-lettered with ``invalid_event: <why>``; a *good* one (any valid event,
however odd its extra fields, spacing, size or properties) must reach every matching
subscriber byte for byte. Hypothesis draws *specs*; `render` turns a spec into bytes with a
sequence number, so every body in a batch is unique and its id is known.

    batch = draw_batch(examples=60, seed=1234)   # a few hundred messages
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from dispatcher.decisions.events import derive_event_id

__all__ = ["MAX_EVENT_BYTES", "Hostile", "draw_batch"]

MAX_EVENT_BYTES = 256 * 1024  # [broker].max_event_bytes, the default
KNOWN = [
    "Message.Bounced",
    "Message.Deferred",
    "Message.Delivered",
    "Message.Complained",
    "Message.Unsubscribed",
]
BOUNCE_TYPES = ["HardBounce", "SoftBounce", "Blocked", "Undetermined"]


@dataclass
class Hostile:
    kind: str  # what makes it hostile, e.g. "wrong_type:data" or "good:huge_field"
    body: bytes
    good: bool
    event_id: str | None = None  # good ones: the id the contract gives it
    event_type: str | None = None  # good ones: the body's event type
    routing_key: str = "Message.Bounced"
    props: dict[str, Any] = field(default_factory=dict)  # AMQP properties to set


# --- building blocks ----------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Printable ASCII without spaces: what the contract accepts as an event id.
id_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
# Header values AMQP can carry (as pamqp encodes them: floats are 32-bit, byte arrays are
# bytearray); junk for a delivery node to send.
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(width=32, allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.binary(max_size=30).map(bytearray)
    | st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 1, 1)),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _not(kind: type | tuple[type, ...]) -> st.SearchStrategy[Any]:
    return json_values.filter(lambda v: not isinstance(v, kind))


@st.composite
def _base_event(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event document as a spec (filled in by `render`)."""
    kind = draw(st.sampled_from(KNOWN))
    data: dict[str, Any] = {"messageid": draw(st.text(max_size=20))}
    if kind == "Message.Bounced":
        data["bounce_type"] = draw(st.sampled_from(BOUNCE_TYPES))
        code = draw(st.sampled_from(["absent", "null", "text"]))
        if code == "null":
            data["diagnostic_code"] = None
        elif code == "text":
            data["diagnostic_code"] = draw(st.text(max_size=80))
    recipient = kind == "Message.Bounced" or draw(st.booleans())
    extras = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=10).filter(
                lambda k: k not in ("id", "event", "timestamp", "data")
            ),
            json_values,
            max_size=3,
        )
    )
    data.update(
        draw(
            st.dictionaries(
                st.text(min_size=1, max_size=10).filter(
                    lambda k: k not in ("recipient", "bounce_type", "diagnostic_code")
                ),
                json_values,
                max_size=3,
            )
        )
    )
    return {
        "event": kind,
        "timestamp": "2026-03-12T09:14:02Z",
        "data": data,
        "_recipient": recipient,
        "_extras": extras,
    }


# --- good messages ------------------------------------------------------------------------------


@st.composite
def good_spec(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(_base_event())
    spec["_good"] = draw(
        st.sampled_from(["plain", "unicode", "huge_field", "deep", "spacing", "ascii_escapes"])
    )
    spec["_id_mode"] = draw(st.sampled_from(["message_id", "body_id", "both", "derived"]))
    spec["_message_id"] = draw(st.text(id_chars, min_size=1, max_size=40))
    spec["_unicode"] = draw(st.text(min_size=1, max_size=40))
    spec["_size"] = draw(st.integers(1_000, MAX_EVENT_BYTES - 8_000))
    spec["_depth"] = draw(st.integers(1, 200))
    spec["_props"] = draw(good_props())
    return spec


@st.composite
def good_props(draw: st.DrawFn) -> dict[str, Any]:
    """Properties that must not matter: missing, odd, or junk headers of every type."""
    props: dict[str, Any] = {}
    choice = draw(
        st.sampled_from(
            [
                "missing",
                "content_type",
                "transient",
                "junk_headers",
                "published_at",
                "timestamp",
                "expected",
            ]
        )
    )
    if choice == "missing":
        props.update(content_type=None, headers={}, timestamp=None)
    elif choice == "content_type":
        props["content_type"] = draw(
            st.sampled_from(
                ["text/plain", "application/xml", "", "application/json; charset=latin-1"]
            )
        )
        props["content_encoding"] = draw(st.sampled_from(["gzip", "", "identity"]))
    elif choice == "transient":
        props["delivery_mode"] = 1
    elif choice == "junk_headers":
        props["headers"] = draw(
            st.dictionaries(
                st.text(min_size=1, max_size=12).filter(lambda k: not k.startswith("x-")),
                header_values,
                min_size=1,
                max_size=4,
            )
        )
    elif choice == "published_at":
        # The optional publish time (unix ms) as a careless or hostile node might send it.
        props["headers"] = {"x-published-at": draw(header_values)}
    elif choice == "timestamp":
        props["timestamp"] = draw(
            st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 1, 1))
        )
    return props


# --- bad messages -------------------------------------------------------------------------------

_BAD = [
    "not_json",
    "truncated",
    "not_object",
    "missing",
    "wrong_type",
    "unknown_type",
    "invalid_utf8",
    "oversize",
    "too_deep",
    "bad_message_id",
    "bad_body_id",
    "bad_recipient",
    "empty",
]


@st.composite
def bad_spec(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(_base_event())
    kind = draw(st.sampled_from(_BAD))
    spec["_bad"] = kind
    if kind == "not_json":
        spec["_bytes"] = draw(st.binary(min_size=1, max_size=200))
    elif kind == "truncated":
        spec["_cut"] = draw(st.floats(0.01, 0.99))
    elif kind == "not_object":
        spec["_value"] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif kind == "missing":
        fields = ["event", "timestamp", "data"]
        if spec["event"] == "Message.Bounced":
            fields += ["data.recipient", "data.bounce_type"]
        spec["_field"] = draw(st.sampled_from(fields))
    elif kind == "wrong_type":
        choices: dict[str, st.SearchStrategy[Any]] = {
            "event": _not(str),
            "timestamp": _not(str),
            "data": _not(dict),
            "id": _not(str),
        }
        if spec["event"] == "Message.Bounced":
            choices.update(
                {
                    "data.recipient": _not(str),
                    "data.bounce_type": json_values.filter(lambda v: v not in BOUNCE_TYPES),
                    "data.diagnostic_code": _not((str, type(None))),
                }
            )
        name = draw(st.sampled_from(sorted(choices)))
        spec["_field"], spec["_value"] = name, draw(choices[name])
    elif kind == "unknown_type":
        spec["_value"] = draw(st.text(max_size=40).filter(lambda t: t not in KNOWN))
    elif kind == "invalid_utf8":
        spec["_bytes"] = draw(
            st.sampled_from(
                [
                    b"\xff",
                    b"\xfe\xff",
                    b"\xc3\x28",
                    b"\xa0\xa1",
                    b"\xe2\x28\xa1",
                    b"\xf0\x28\x8c\x28",
                    b"\xc0\xaf",
                    b"\xed\xa0\x80",
                    b"\xf8\x88\x80\x80\x80",
                    b"\x80",
                ]
            )
        )
    elif kind == "oversize":
        spec["_size"] = draw(st.integers(MAX_EVENT_BYTES + 1, 4 * MAX_EVENT_BYTES))
    elif kind == "too_deep":
        spec["_depth"] = draw(st.integers(1_100, 20_000))
    elif kind == "bad_message_id":
        spec["_value"] = draw(
            st.one_of(
                st.text(id_chars, min_size=129, max_size=200),
                st.text(id_chars, max_size=20).map(lambda t: f"{t} with spaces"),
                st.text(min_size=1, max_size=30).filter(lambda t: not t.isascii()),
                st.sampled_from(["tab\there", "new\nline", "nul\x00byte"]),
            )
        )
    elif kind == "bad_body_id":
        spec["_value"] = draw(
            st.one_of(
                st.text(id_chars, min_size=129, max_size=300),
                st.text(id_chars, max_size=20).map(lambda t: f"{t} x"),
                st.just(""),
            )
        )
    elif kind == "bad_recipient":
        spec["event"] = "Message.Bounced"
        spec["data"].setdefault("bounce_type", "HardBounce")
        spec["_value"] = draw(st.text(max_size=40).filter(lambda t: "@" not in t))
    return spec


# --- rendering ----------------------------------------------------------------------------------


def _doc(spec: dict[str, Any], n: int) -> dict[str, Any]:
    data = dict(spec["data"])
    data["chaos_seq"] = n  # unique body, so a derived id is unique too
    if spec.get("_recipient") or spec["event"] == "Message.Bounced":
        data["recipient"] = f"user{n}@example.com"
    doc = {"event": spec["event"], "timestamp": spec["timestamp"], "data": data}
    doc.update(spec.get("_extras", {}))
    return doc


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    target = doc
    for p in parents:
        target = target[p]
    target[last] = value


def _drop(doc: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    target = doc
    for p in parents:
        target = target[p]
    target.pop(last, None)


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def _deep_bytes(doc: dict[str, Any], depth: int) -> bytes:
    # Built as text: neither orjson nor json will serialize nesting this deep.
    body = orjson.dumps(doc)
    return body[:-1] + b', "deep": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


def render_good(spec: dict[str, Any], n: int) -> Hostile:
    doc = _doc(spec, n)
    how = spec["_good"]
    body: bytes
    if how == "unicode":
        doc["data"]["note"] = spec["_unicode"]
        doc["ünïcødé ✉"] = spec["_unicode"]
        body = orjson.dumps(doc)
    elif how == "huge_field":
        doc["data"]["padding"] = "p" * (spec["_size"] - len(orjson.dumps(doc)) - 64)
        body = orjson.dumps(doc)
    elif how == "deep":
        doc["data"]["deep"] = _nested(spec["_depth"])
        body = orjson.dumps(doc)
    elif how == "spacing":
        body = json.dumps(doc, indent=2).replace("\n", "\r\n").encode()
    elif how == "ascii_escapes":
        doc["data"]["note"] = spec["_unicode"]
        body = json.dumps(doc, ensure_ascii=True).encode()
    else:
        body = orjson.dumps(doc)
    props = dict(spec["_props"])
    mode = spec["_id_mode"]
    event_id: str
    if mode in ("body_id", "both"):
        doc["id"] = f"body-{n}"
        body = body.rstrip()[:-1].rstrip() + b', "id": "' + doc["id"].encode() + b'"}'
    if mode == "both":  # the body's id wins over message_id (clients stamp random ones)
        props["message_id"] = f"{spec['_message_id']}-{n}"
        event_id = doc["id"]
    elif mode == "message_id":
        props["message_id"] = f"{spec['_message_id']}-{n}"
        event_id = props["message_id"]
    elif mode == "body_id":
        props["message_id"] = None
        event_id = doc["id"]
    else:
        props["message_id"] = None
        event_id = derive_event_id(body)
    assert len(body) <= MAX_EVENT_BYTES, len(body)
    return Hostile(
        f"good:{how}/{mode}/{_props_kind(props)}",
        body,
        True,
        event_id,
        spec["event"],
        routing_key=spec["event"],
        props=props,
    )


def _props_kind(props: dict[str, Any]) -> str:
    names = sorted(k for k, v in props.items() if k != "message_id" or v)
    return "+".join(names) or "default"


def render_bad(spec: dict[str, Any], n: int) -> Hostile:
    kind = spec["_bad"]
    doc = _doc(spec, n)
    props: dict[str, Any] = {"message_id": None}
    label = kind
    if kind == "not_json":
        body = spec["_bytes"]
    elif kind == "empty":
        body = b""
    elif kind == "truncated":
        full = orjson.dumps(doc)
        body = full[: max(1, min(len(full) - 1, int(len(full) * spec["_cut"])))]
    elif kind == "not_object":
        body = orjson.dumps(spec["_value"])
    elif kind == "missing":
        _drop(doc, spec["_field"])
        label = f"missing:{spec['_field']}"
        body = orjson.dumps(doc)
    elif kind == "wrong_type":
        _set(doc, spec["_field"], spec["_value"])
        label = f"wrong_type:{spec['_field']}"
        body = orjson.dumps(doc)
    elif kind == "unknown_type":
        doc["event"] = spec["_value"]
        body = orjson.dumps(doc)
    elif kind == "invalid_utf8":
        marker = f"user{n}@".encode()
        body = orjson.dumps(doc).replace(b'"timestamp"', b'"time' + spec["_bytes"] + b'"')
        body = body.replace(marker, marker[:-1] + spec["_bytes"] + b"@")
    elif kind == "oversize":
        doc["data"]["padding"] = "p" * spec["_size"]
        body = orjson.dumps(doc)
    elif kind == "too_deep":
        body = _deep_bytes(doc, spec["_depth"])
    elif kind == "bad_message_id":
        body = orjson.dumps(doc)
        props["message_id"] = spec["_value"]
    elif kind == "bad_body_id":
        doc["id"] = spec["_value"]
        body = orjson.dumps(doc)
    elif kind == "bad_recipient":
        doc["data"]["recipient"] = spec["_value"]
        body = orjson.dumps(doc)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return Hostile(f"bad:{label}", body, False, props=props)


def draw_batch(examples: int, seed: int) -> list[Hostile]:
    """``examples`` hypothesis examples of 1-8 messages each (about 70 % bad), rendered."""
    specs: list[tuple[bool, dict[str, Any]]] = []
    message = st.one_of(bad_spec().map(lambda s: (False, s)), good_spec().map(lambda s: (True, s)))
    weighted = st.one_of(message, bad_spec().map(lambda s: (False, s)))

    @fixed_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(weighted, min_size=1, max_size=8))
    def collect(batch: list[tuple[bool, dict[str, Any]]]) -> None:
        specs.extend(batch)

    collect()
    return [
        render_good(spec, n) if good else render_bad(spec, n)
        for n, (good, spec) in enumerate(specs)
    ]
