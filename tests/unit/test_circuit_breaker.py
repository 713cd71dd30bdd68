"""The breaker's transitions, one table row each."""

from __future__ import annotations

from dispatcher.config import BreakerConfig
from dispatcher.decisions.circuit_breaker import BreakerState, CircuitBreaker, Signal

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


def test_what_each_transition_announces() -> None:
    b = CircuitBreaker(POLICY)
    assert b.success() is None  # healthy: nothing to tell anyone
    assert [b.failure(0), b.failure(0)] == [Signal.FAILED, Signal.FAILED]
    assert b.success() is Signal.RECOVERED and b.success() is None
    assert [b.failure(0) for _ in range(3)] == [Signal.FAILED, Signal.FAILED, Signal.OPENED]
    assert b.failure(1) is None  # a straggler while open
    assert b.ask(10) is None
    assert b.failure(10) is Signal.OPENED  # the probe failed
    assert b.ask(30) is None
    assert b.success() is Signal.CLOSED


def test_only_the_prober_probes_the_others_wait_for_its_verdict() -> None:
    b = CircuitBreaker(POLICY, prober=False)
    for _ in range(3):
        b.failure(0)
    assert b.ask(10) == 10 and b.state is BreakerState.OPEN  # cooldown over, still denied
    assert not b.would_admit(10)
    b.heard(Signal.OPENED, 10, open_for=20, cooldown=20)  # the probe failed elsewhere
    assert b.state is BreakerState.OPEN and (b.open_until, b.cooldown) == (30, 20)
    b.heard(Signal.CLOSED, 31)
    assert b.state is BreakerState.CLOSED and b.cooldown == 10 and b.ask(31) is None


def test_what_it_hears_from_other_processes() -> None:
    changes = []
    b = CircuitBreaker(POLICY, on_change=lambda o, n, why: changes.append((n, why)))
    b.heard(Signal.FAILED, 0)
    b.heard(Signal.FAILED, 0)
    b.heard(Signal.RECOVERED, 0)
    assert b.failures == 0 and b.state is BreakerState.CLOSED
    for _ in range(3):
        b.heard(Signal.FAILED, 1)
    assert b.state is BreakerState.OPEN and b.open_until == 11
    b.heard(Signal.OPENED, 2, open_for=5)  # an earlier end does not shorten it
    assert b.open_until == 11
    b.heard(Signal.CLOSED, 3)
    b.heard(Signal.OPENED, 4, open_for=10, cooldown=80)  # cooldowns stay within the policy
    assert (b.state, b.open_until, b.cooldown) == (BreakerState.OPEN, 14, 40)
    assert [n for n, _ in changes] == [BreakerState.OPEN, BreakerState.CLOSED, BreakerState.OPEN]
    assert "across processes" in changes[0][1]


def test_digest_and_restore_carry_a_breaker_to_a_joining_process() -> None:
    b = CircuitBreaker(POLICY)
    assert b.digest(0) is None
    b.failure(0)
    assert b.digest(0) == (1, None, 10)
    b.failure(0)
    b.failure(0)
    assert b.digest(4) == (3, 6, 10)
    joining = CircuitBreaker(POLICY)
    joining.restore(2, None, 10, 0)
    assert joining.failures == 2 and joining.state is BreakerState.CLOSED
    joining.restore(3, 6, 10, 4)
    assert joining.state is BreakerState.OPEN and joining.open_until == 10
