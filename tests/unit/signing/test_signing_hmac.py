"""Standard Webhooks HMAC signatures, checked against the reference implementation."""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from signing import VerificationError, parse_secrets, sign_hmac
from signing.hmac_signature import verify_hmac

BODY = b'{"event":"Message.Bounced","data":{"recipient":"nobody@example.org"}}'
MSG_ID = "evt_2Kx9"


def _secret() -> tuple[str, bytes]:
    raw = os.urandom(24)
    return "whsec_" + base64.b64encode(raw).decode(), raw


def test_parse_secrets() -> None:
    (text1, raw1), (_, raw2) = _secret(), _secret()
    bare = base64.b64encode(raw2).decode().rstrip("=")
    assert parse_secrets(text1) == [raw1]
    assert parse_secrets(f"  {text1}   {bare} ") == [raw1, raw2]


@pytest.mark.parametrize("value", ["", "   ", "whsec_", "whsec_!!!", "not base64 at all?"])
def test_parse_secrets_refuses_bad_values(value: str) -> None:
    with pytest.raises(ValueError):
        parse_secrets(value)


def test_reference_verifies_our_signature() -> None:
    text, raw = _secret()
    timestamp = int(time.time())
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_hmac([raw], MSG_ID, timestamp, BODY),
    }
    assert Webhook(text).verify(BODY, headers) == {
        "event": "Message.Bounced",
        "data": {"recipient": "nobody@example.org"},
    }


def test_we_verify_the_reference_signature() -> None:
    text, raw = _secret()
    timestamp = int(time.time())
    signature = Webhook(text).sign(MSG_ID, datetime.fromtimestamp(timestamp, UTC), BODY.decode())
    assert signature == sign_hmac([raw], MSG_ID, timestamp, BODY)
    verify_hmac(parse_secrets(text), MSG_ID, str(timestamp), signature, BODY)


def test_rotation_with_several_secrets() -> None:
    (old_text, old), (new_text, new), (_, other) = _secret(), _secret(), _secret()
    timestamp = int(time.time())
    signature = sign_hmac([old, new], MSG_ID, timestamp, BODY)
    assert len(signature.split(" ")) == 2
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
    # A receiver that knows either secret accepts it.
    Webhook(old_text).verify(BODY, headers, json_parse=False)
    Webhook(new_text).verify(BODY, headers, json_parse=False)
    verify_hmac([new], MSG_ID, str(timestamp), signature, BODY)
    verify_hmac([other, old], MSG_ID, str(timestamp), signature, BODY)
    with pytest.raises(VerificationError) as caught:
        verify_hmac([other], MSG_ID, str(timestamp), signature, BODY)
    assert caught.value.reason == "bad_signature"
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(other).decode()).verify(BODY, headers, json_parse=False)


NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "signature", "body", "reason"),
    [
        (None, str(NOW), "valid", BODY, "missing_header"),
        (MSG_ID, None, "valid", BODY, "missing_header"),
        (MSG_ID, str(NOW), None, BODY, "missing_header"),
        (MSG_ID, "", "valid", BODY, "missing_header"),
        (MSG_ID, "soon", "valid", BODY, "bad_timestamp"),
        (MSG_ID, "-5", "valid", BODY, "bad_timestamp"),
        (MSG_ID, "1e9", "valid", BODY, "bad_timestamp"),
        (MSG_ID, "١٢٣", "valid", BODY, "bad_timestamp"),
        (MSG_ID, str(NOW - 301), "valid", BODY, "timestamp_out_of_tolerance"),
        (MSG_ID, str(NOW + 301), "valid", BODY, "timestamp_out_of_tolerance"),
        (MSG_ID, str(NOW), "valid", BODY + b" ", "bad_signature"),
        ("evt_other", str(NOW), "valid", BODY, "bad_signature"),
        (MSG_ID, str(NOW), "v2,AAAA", BODY, "bad_signature"),
        (MSG_ID, str(NOW), "v1,***", BODY, "bad_signature"),
        (MSG_ID, str(NOW), "garbage", BODY, "bad_signature"),
    ],
)
def test_rejections(
    msg_id: str | None, timestamp: str | None, signature: str | None, body: bytes, reason: str
) -> None:
    secret = os.urandom(32)
    if signature == "valid":
        signature = sign_hmac([secret], MSG_ID, NOW, BODY)
    with pytest.raises(VerificationError) as caught:
        verify_hmac([secret], msg_id, timestamp, signature, body, now=NOW)
    assert caught.value.reason == reason


def test_accepts_within_tolerance() -> None:
    secret = os.urandom(32)
    signature = sign_hmac([secret], MSG_ID, NOW, BODY)
    verify_hmac([secret], MSG_ID, str(NOW), signature, BODY, now=NOW + 299)
    verify_hmac([secret], MSG_ID, str(NOW), "v1,AAAA " + signature, BODY, now=NOW - 299)
