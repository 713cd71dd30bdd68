"""The retry policy as tables and properties: no broker, no clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.config import RetryConfig
from dispatcher.decisions.retry_policy import (
    DeadLetter,
    Delivered,
    Outcome,
    OutcomeKind,
    Park,
    Retry,
    decide,
    deferred,
    expired,
)
from dispatcher.http.sender import parse_retry_after

POLICY = RetryConfig(schedule=(5, 30, 120), jitter=0.0, max_age=3600)
OK = Outcome(OutcomeKind.DELIVERED, status=200)
E500 = Outcome(OutcomeKind.FAILED, status=500, error="http 500")
TIMEOUT = Outcome(OutcomeKind.FAILED, error="timeout: no response within 10s")
GONE = Outcome(OutcomeKind.GONE, status=410)
BLOCKED = Outcome(OutcomeKind.BLOCKED, error="blocked_destination: x")
THROTTLED = Outcome(OutcomeKind.FAILED, status=429, retry_after=90)


@pytest.mark.parametrize(
    ("attempt", "outcome", "age", "expected"),
    [
        (1, OK, 0, Delivered()),
        (3, OK, 100, Delivered()),
        (1, GONE, 0, DeadLetter("endpoint_gone")),
        (1, BLOCKED, 0, DeadLetter("blocked_destination")),
        (1, E500, 0, Retry(5, 2)),
        (2, TIMEOUT, 5, Retry(30, 3)),
        (3, E500, 35, Retry(120, 4)),
        (4, E500, 155, DeadLetter("attempts_exhausted")),
        (1, THROTTLED, 0, Retry(90, 2)),  # Retry-After beats the 5 s step
        (3, THROTTLED, 0, Retry(120, 4)),  # ... but never shortens it
        (2, E500, 3590, DeadLetter("max_age_exceeded")),
        (
            1,
            Outcome(OutcomeKind.FAILED, status=503, retry_after=7200),
            0,
            DeadLetter("max_age_exceeded"),
        ),
    ],
)
def test_decision_table(attempt, outcome, age, expected) -> None:
    assert (
        decide(
            attempt=attempt,
            outcome=outcome,
            first_attempt_at=1000.0,
            now=1000.0 + age,
            policy=POLICY,
        )
        == expected
    )


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0, Park()),  # parked: the attempt that was due stays due
        (3600, Park()),  # at max_age exactly: still parked
        (3601, DeadLetter("max_age_exceeded")),
    ],
)
def test_a_delivery_the_lane_turned_away_is_parked_until_max_age(age, expected) -> None:
    assert deferred(first_attempt_at=1000.0, now=1000.0 + age, policy=POLICY) == expected


def test_jitter_stays_within_its_band_and_varies() -> None:
    policy = RetryConfig(schedule=(100,), jitter=0.2, max_age=3600)
    rng = random.Random(7)
    delays = [
        decide(attempt=1, outcome=E500, first_attempt_at=0, now=0, policy=policy, rng=rng).delay
        for _ in range(500)
    ]
    assert all(80 <= d <= 120 for d in delays)
    assert max(delays) - min(delays) > 20


schedules = st.lists(st.floats(min_value=0.01, max_value=7200), min_size=0, max_size=10)
outcomes = st.sampled_from([OK, E500, TIMEOUT, GONE, BLOCKED, THROTTLED]) | st.builds(
    lambda s, ra: Outcome(OutcomeKind.FAILED, status=s, retry_after=ra),
    st.sampled_from([429, 503, 500, 404]),
    st.none() | st.floats(min_value=0, max_value=10**5),
)


@settings(max_examples=500, deadline=None)
@given(
    schedule=schedules,
    jitter=st.floats(min_value=0, max_value=0.9),
    max_age=st.floats(min_value=1, max_value=86400),
    attempt=st.integers(1, 12),
    outcome=outcomes,
    age=st.floats(min_value=0, max_value=90000),
    seed=st.integers(),
)
def test_properties(schedule, jitter, max_age, attempt, outcome, age, seed) -> None:
    policy = RetryConfig(schedule=tuple(schedule), jitter=jitter, max_age=max_age)
    decision = decide(
        attempt=attempt,
        outcome=outcome,
        first_attempt_at=0.0,
        now=age,
        policy=policy,
        rng=random.Random(seed),
    )
    if isinstance(decision, Retry):
        # Never past the schedule, never past max_age, never sooner than Retry-After.
        assert decision.next_attempt == attempt + 1 <= policy.max_attempts
        assert age + decision.delay <= max_age
        if outcome.retry_after is not None:
            assert decision.delay >= outcome.retry_after
        base = schedule[attempt - 1]
        assert decision.delay >= base * (1 - jitter) - 1e-9
    elif outcome.kind is OutcomeKind.FAILED:
        assert isinstance(decision, DeadLetter)
        assert decision.reason in ("attempts_exhausted", "max_age_exceeded")


@pytest.mark.parametrize(
    ("age", "too_old"), [(0, False), (3599.9, False), (3600, False), (3600.1, True)]
)
def test_a_delivery_that_comes_back_too_old_is_not_attempted(age, too_old) -> None:
    assert expired(first_attempt_at=50.0, now=50.0 + age, policy=POLICY) is too_old


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Wed, 21 Oct 2015 07:29:30 GMT", 90.0),  # a date: counted from the time it is given
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past: at once
        ("soon", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_a_date(header, seconds) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(header, now) == seconds
