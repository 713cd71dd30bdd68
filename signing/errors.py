"""The one exception a receiver sees when a webhook does not verify."""

from __future__ import annotations

__all__ = ["REASONS", "VerificationError"]

# Every reason a verification can fail with. Stable: receivers may log, count or branch on them.
REASONS = frozenset(
    {
        "missing_token",
        "malformed_token",
        "bad_type",
        "algorithm_not_allowed",
        "algorithm_mismatch",
        "unknown_kid",
        "bad_signature",
        "expired",
        "lifetime_too_long",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "wrong_account",
        "missing_claim",
        "bad_scope",
        "webhook_id_mismatch",
        "body_mismatch",
        "replayed",
        "jwks_unavailable",
        "missing_header",
        "bad_timestamp",
        "timestamp_out_of_tolerance",
        "no_credentials",
    }
)


class VerificationError(Exception):
    """A webhook failed verification; `reason` is a stable snake_case code from `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = " ".join(detail.split())[:200]
        super().__init__(f"{reason}: {self.detail}" if self.detail else reason)
