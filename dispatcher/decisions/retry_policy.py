"""What happens to a delivery after an attempt: a pure function of attempt, outcome and policy.

No I/O and no clock: the caller passes ``now`` and a random source, so every rule is testable
with a table. The rules:

* ``delivered``  -- a 2xx. Done.
* ``gone``       -- a 410. The endpoint asked never to be called again: dead-letter
  ``endpoint_gone`` at once.
* ``blocked``    -- the destination resolved to an address the SSRF guard refuses:
  dead-letter ``blocked_destination`` at once (retrying cannot make it safe).
* ``failed``     -- any other status, a timeout, a connection error, a redirect: retry after
  ``schedule[attempt - 1]`` (+/- jitter), or at least Retry-After when the endpoint sent one,
  until the schedule is used up (``attempts_exhausted``) or the delivery would outlive
  ``max_age`` (``max_age_exceeded``).

A delivery that was not attempted at all (the endpoint's lane is full, its breaker is open, its
rate limit is reached) has no outcome: `deferred` parks it in the subscriber's own queue without
spending an attempt, until the subscriber can take it; bounded by ``max_age`` alone.

And before an attempt: a delivery that comes back (from the delay tiers or its parking queue)
older than ``max_age`` is dead-lettered ``max_age_exceeded`` without being attempted.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from dispatcher.config import RetryConfig
from dispatcher.names import MAX_DELAY_MS

__all__ = [
    "MAX_DELAY",
    "DeadLetter",
    "Decision",
    "Delivered",
    "Outcome",
    "OutcomeKind",
    "Park",
    "Retry",
    "decide",
    "deferred",
    "expired",
    "jittered",
]

# The longest single delay the broker's delay tiers can hold (about 74.5 hours).
MAX_DELAY = MAX_DELAY_MS / 1000.0


class OutcomeKind(enum.Enum):
    DELIVERED = "delivered"
    GONE = "gone"
    BLOCKED = "blocked"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt produced, in the project's own terms."""

    kind: OutcomeKind
    status: int | None = None  # the HTTP status, when a response came back
    error: str | None = None  # one line: "timeout after 10s", "connection refused", ...
    retry_after: float | None = None  # seconds, from Retry-After on a 429/503

    @property
    def label(self) -> str:
        """A short, low-cardinality name for metrics and logs."""
        if self.kind is OutcomeKind.FAILED:
            if self.status is not None:
                return f"http_{self.status // 100}xx"
            return (self.error or "error").split(" ", 1)[0].rstrip(":")
        return str(self.kind.value)


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float  # seconds before the next attempt
    next_attempt: int  # the attempt number the retry will carry


@dataclass(frozen=True, slots=True)
class Park:
    """Wait in the subscriber's parking queue; the attempt that was due is still due (the
    delivery keeps its attempt number: nothing to carry here)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


Decision = Delivered | Retry | Park | DeadLetter

# Outcome kinds that end the delivery at once, with the dead-letter reason (None = success).
_TERMINAL: dict[OutcomeKind, str | None] = {
    OutcomeKind.DELIVERED: None,
    OutcomeKind.GONE: "endpoint_gone",
    OutcomeKind.BLOCKED: "blocked_destination",
}


def jittered(delay: float, jitter: float, rng: random.Random | None = None) -> float:
    """``delay`` moved by a uniform fraction in [-jitter, +jitter]."""
    if jitter <= 0:
        return delay
    r = (rng or random).uniform(-jitter, jitter)
    return delay * (1.0 + r)


def decide(
    *,
    attempt: int,
    outcome: Outcome,
    first_attempt_at: float,
    now: float,
    policy: RetryConfig,
    rng: random.Random | None = None,
) -> Delivered | Retry | DeadLetter:
    """Decide the next step for one (event, subscriber) delivery after an attempt.

    ``attempt`` is the 1-based number of the attempt that produced ``outcome``.
    """
    if outcome.kind in _TERMINAL:
        reason = _TERMINAL[outcome.kind]
        return Delivered() if reason is None else DeadLetter(reason)

    # FAILED
    age = max(0.0, now - first_attempt_at)
    if attempt >= policy.max_attempts:
        return DeadLetter("attempts_exhausted")
    delay = jittered(policy.schedule[attempt - 1], policy.jitter, rng)
    if outcome.retry_after is not None:
        delay = max(delay, outcome.retry_after)
    if delay > MAX_DELAY or age + delay > policy.max_age:
        return DeadLetter("max_age_exceeded")
    return Retry(delay=delay, next_attempt=attempt + 1)


def deferred(*, first_attempt_at: float, now: float, policy: RetryConfig) -> Park | DeadLetter:
    """A delivery its lane turned away, not attempted: park it (the attempt that was due stays
    due), unless it is already older than ``max_age``."""
    if expired(first_attempt_at=first_attempt_at, now=now, policy=policy):
        return DeadLetter("max_age_exceeded")
    return Park()


def expired(*, first_attempt_at: float, now: float, policy: RetryConfig) -> bool:
    """Is a delivery that came back for an attempt too old to make it?"""
    return now - first_attempt_at > policy.max_age
