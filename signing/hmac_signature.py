"""Standard Webhooks HMAC signatures (the `webhook-signature` header).

The signed content is ``f"{webhook-id}.{webhook-timestamp}."`` followed by the exact body bytes,
HMAC-SHA256 with each secret, sent as space-separated ``v1,<base64>`` entries. Several secrets make
rotation possible: the sender signs with each, the receiver accepts a match on any.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence

from .errors import VerificationError

__all__ = ["SECRET_PREFIX", "parse_secrets", "sign", "verify_hmac"]

SECRET_PREFIX = "whsec_"
_MAX_SIGNATURES = 16  # entries considered per header; bounds work on hostile input
_MAX_TIMESTAMP_DIGITS = 12


def parse_secrets(value: str) -> list[bytes]:
    """Decode a space-separated list of ``whsec_<base64>`` (or bare base64) secrets."""
    secrets = []
    for item in value.split():
        encoded = item.removeprefix(SECRET_PREFIX)
        try:
            secret = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret is not valid base64") from None
        if not secret:
            raise ValueError("webhook secret is empty")
        secrets.append(secret)
    if not secrets:
        raise ValueError("no webhook secret given")
    return secrets


def _digest(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def sign(secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: one ``v1,<base64>`` entry per secret."""
    return " ".join(
        "v1," + base64.b64encode(_digest(s, msg_id, timestamp, body)).decode("ascii")
        for s in secrets
    )


def _parse_timestamp(value: str) -> int:
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > _MAX_TIMESTAMP_DIGITS:
        raise VerificationError("bad_timestamp", "webhook-timestamp is not unix seconds")
    return int(value)


def _candidate_signatures(header: str) -> list[bytes]:
    candidates = []
    for entry in header.split()[:_MAX_SIGNATURES]:
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return candidates


def verify_hmac(
    secrets: Sequence[bytes],
    msg_id: str | None,
    timestamp_header: str | None,
    signature_header: str | None,
    body: bytes,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> None:
    """Check a Standard Webhooks signature; raises VerificationError, returns None when valid."""
    if not msg_id or not timestamp_header or not signature_header:
        raise VerificationError(
            "missing_header", "webhook-id, webhook-timestamp and webhook-signature are required"
        )
    timestamp = _parse_timestamp(timestamp_header)
    t = time.time() if now is None else now
    if abs(t - timestamp) > tolerance:
        raise VerificationError("timestamp_out_of_tolerance", f"{int(t - timestamp)} s off")
    candidates = _candidate_signatures(signature_header)
    matched = False
    for secret in secrets:
        expected = _digest(secret, msg_id, timestamp, body)
        for candidate in candidates:
            # No early exit: the time taken does not depend on which entry matched.
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise VerificationError("bad_signature", "no webhook-signature entry matches")
