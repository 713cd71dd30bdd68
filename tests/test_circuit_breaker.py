"""The breaker's transitions, one table row each."""

from __future__ import annotations

from dispatcher.circuit_breaker import BreakerState, CircuitBreaker
from dispatcher.config import BreakerConfig

POLICY = BreakerConfig(failure_threshold=3, cooldown=10, max_cooldown=40)


def test_opens_after_threshold_then_probes_and_closes() -> None:
    changes = []
    b = CircuitBreaker(POLICY, on_change=lambda o, n, why: changes.append((o, n)))
    for _ in range(2):
        b.failure(0)
    assert b.state is BreakerState.CLOSED and b.ask(0) is None
    b.failure(1)
    assert b.state is BreakerState.OPEN
    assert b.ask(5) == 6  # stay away until t=11
    assert b.ask(11) is None and b.state is BreakerState.HALF_OPEN  # this caller probes
    assert b.ask(11) == 10  # only one probe at a time
    b.success()
    assert b.state is BreakerState.CLOSED and b.ask(12) is None
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    b = CircuitBreaker(POLICY)
    for _ in range(3):
        b.failure(0)
    now = 10.0
    for expected in (20, 40, 40):
        assert b.ask(now) is None
        b.failure(now)
        assert b.state is BreakerState.OPEN and b.ask(now) == expected
        now += expected


def test_success_resets_the_count_and_a_cancelled_probe_frees_the_slot() -> None:
    b = CircuitBreaker(POLICY)
    b.failure(0)
    b.failure(0)
    b.success()
    b.failure(0)
    b.failure(0)
    assert b.state is BreakerState.CLOSED
    b.failure(0)
    assert b.ask(10) is None
    b.release_probe()
    assert b.ask(10) is None  # another caller may probe now


def test_would_admit_answers_like_ask_without_moving_the_state() -> None:
    b = CircuitBreaker(POLICY)
    assert b.would_admit(0)  # closed
    for _ in range(3):
        b.failure(0)
    # open: only once the cooldown is over, and asking does not start a probe
    assert (b.would_admit(9.9), b.would_admit(10)) == (False, True)
    assert b.state is BreakerState.OPEN
    assert b.ask(10) is None and b.state is BreakerState.HALF_OPEN
    assert not b.would_admit(10)  # the probe is out
    b.release_probe()
    assert b.would_admit(10) and b.state is BreakerState.HALF_OPEN
