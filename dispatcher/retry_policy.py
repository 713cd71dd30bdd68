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
* ``deferred``   -- not attempted at all (the endpoint's lane is full, its breaker is open):
  come back after the given delay without spending an attempt, bounded by ``max_age`` alone.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from dispatcher.config import RetryConfig

__all__ = [
    "MAX_DELAY",
    "DeadLetter",
    "Decision",
    "Delivered",
    "Outcome",
    "OutcomeKind",
    "Retry",
    "decide",
    "defer_delay",
    "jittered",
]

# The longest single delay the broker's delay tiers can hold (2**28 ms, about 74.5 hours).
MAX_DELAY = (2**28 - 1) / 1000.0


class OutcomeKind(enum.Enum):
    DELIVERED = "delivered"
    GONE = "gone"
    BLOCKED = "blocked"
    FAILED = "failed"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt (or non-attempt) produced, in the project's own terms."""

    kind: OutcomeKind
    status: int | None = None  # the HTTP status, when a response came back
    error: str | None = None  # one line: "timeout after 10s", "connection refused", ...
    retry_after: float | None = None  # seconds, from Retry-After on a 429/503
    defer_for: float | None = None  # for DEFERRED: how long to stay away

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
class DeadLetter:
    reason: str


Decision = Delivered | Retry | DeadLetter

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
) -> Decision:
    """Decide the next step for one (event, subscriber) delivery.

    ``attempt`` is the 1-based number of the attempt that produced ``outcome`` (for a
    deferral, the attempt that was due and did not happen).
    """
    if outcome.kind in _TERMINAL:
        reason = _TERMINAL[outcome.kind]
        return Delivered() if reason is None else DeadLetter(reason)

    age = max(0.0, now - first_attempt_at)
    if outcome.kind is OutcomeKind.DEFERRED:
        delay = min(max(outcome.defer_for or policy.overflow_delay, 0.001), MAX_DELAY)
        if age + delay > policy.max_age:
            return DeadLetter("max_age_exceeded")
        return Retry(delay=delay, next_attempt=attempt)

    # FAILED
    if attempt >= policy.max_attempts:
        return DeadLetter("attempts_exhausted")
    delay = jittered(policy.schedule[attempt - 1], policy.jitter, rng)
    if outcome.retry_after is not None:
        delay = max(delay, outcome.retry_after)
    if delay > MAX_DELAY or age + delay > policy.max_age:
        return DeadLetter("max_age_exceeded")
    return Retry(delay=delay, next_attempt=attempt + 1)


# How long a deferred delivery stays away, by why the lane refused it. A full lane backs off
# exponentially with each deferral (so a long outage costs few broker round trips); an open
# breaker or a rate limit already knows when to come back. Jitter spreads the herd.
_DEFER_BACKOFF_CAP = 60.0


def defer_delay(
    why: str,
    suggested: float,
    deferrals: int,
    overflow_delay: float,
    rng: random.Random | None = None,
) -> float:
    backoff = min(overflow_delay * 2 ** min(deferrals, 16), max(_DEFER_BACKOFF_CAP, overflow_delay))
    if why == "lane_full":
        base = backoff
    elif why == "breaker_open":
        # At least the breaker's remaining cooldown, and longer for a delivery already turned
        # away: a long outage then costs each delivery a few trips, not one per cooldown.
        base = max(suggested, backoff)
    else:
        base = max(suggested, 0.001)
    return max(0.001, jittered(base, 0.2, rng) if why != "rate_limited" else base)
