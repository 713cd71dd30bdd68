"""Per-subscriber circuit breaker: a small state machine with the clock passed in.

One breaker per subscriber per process, kept in step across every process on the queue: what
one process sees of the endpoint, it announces (the *signal* column), and the others apply it
(the rows below the line). A healthy endpoint announces nothing.

    state      event                        next state   effect                          signal
    closed     success (failures > 0)       closed       failures := 0                   recovered
    closed     success                      closed       -                               -
    closed     failure (n < threshold)      closed       failures += 1                   failed
    closed     failure (n = threshold)      open         until := now + cooldown         opened
    open       ask, now < until             open         deny for (until - now)
    open       ask, now >= until, prober    half_open    this caller is the probe
    open       ask, now >= until, other     open         deny: the prober's verdict comes
    half_open  ask (probe out)              half_open    deny for the base cooldown
    half_open  success                      closed       cooldown := base                closed
    half_open  failure                      open         cooldown := min(2 * cooldown, max)  opened
    -- heard from another process --
    closed     failed (n < threshold)       closed       failures += 1
    closed     failed (n = threshold)       open         until := now + cooldown
    closed     recovered                    closed       failures := 0
    any        opened (for, cooldown)       open         until := max(until, now + for)
    not closed closed                       closed       cooldown := base, failures := 0

``prober`` says whether this process probes when a cooldown ends: exactly one does (the first
member of the cluster's view, dispatcher/decisions/cluster_shares.py); alone, a process always does.

Deliveries that are denied are not lost: the caller parks them in the subscriber's parking queue,
which is consumed again when the breaker closes (dispatcher/broker/parking.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from dispatcher.config import BreakerConfig

__all__ = ["BreakerState", "CircuitBreaker", "Signal"]


class BreakerState(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Signal(enum.Enum):
    """What a breaker tells the other processes (its value names the control message)."""

    FAILED = "failed"  # one more consecutive failure, still closed
    RECOVERED = "recovered"  # the first success after failures
    OPENED = "opened"  # opened: everyone holds back until the cooldown ends
    CLOSED = "closed"  # the probe succeeded: everyone resumes


@dataclass(slots=True)
class CircuitBreaker:
    policy: BreakerConfig
    on_change: Callable[[BreakerState, BreakerState, str], None] | None = None
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    open_until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False
    prober: bool = True

    def __post_init__(self) -> None:
        self.cooldown = self.policy.cooldown

    def ask(self, now: float) -> float | None:
        """None: go ahead. A number: stay away that many seconds."""
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.OPEN:
            if now < self.open_until:
                return self.open_until - now
            if not self.prober:
                return self.cooldown  # another process probes; its verdict reaches us
            self._move(BreakerState.HALF_OPEN, "cooldown over, probing")
            self.probing = True
            return None
        if self.probing:
            return self.policy.cooldown
        self.probing = True
        return None

    def would_admit(self, now: float) -> bool:
        """Would `ask` let a delivery through now? (It does not change the state.)"""
        if self.state is BreakerState.OPEN:
            return now >= self.open_until and self.prober
        return not (self.state is BreakerState.HALF_OPEN and self.probing)

    def success(self) -> Signal | None:
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown = self.policy.cooldown
            self.probing = False
            self._move(BreakerState.CLOSED, "probe succeeded")
            return Signal.CLOSED
        had, self.failures = self.failures, 0
        return Signal.RECOVERED if had and self.state is BreakerState.CLOSED else None

    def failure(self, now: float) -> Signal | None:
        if self.state is BreakerState.HALF_OPEN:
            self.probing = False
            self.cooldown = min(self.cooldown * 2, self.policy.max_cooldown)
            self.open_until = now + self.cooldown
            self._move(BreakerState.OPEN, f"probe failed, cooling down {self.cooldown:g}s")
            return Signal.OPENED
        if self.state is BreakerState.OPEN:
            return None  # a straggler that started before the breaker opened
        self.failures += 1
        if self.failures >= self.policy.failure_threshold:
            self.open_until = now + self.cooldown
            self._move(
                BreakerState.OPEN,
                f"{self.failures} consecutive failures, cooling down {self.cooldown:g}s",
            )
            return Signal.OPENED
        return Signal.FAILED

    def release_probe(self) -> None:
        """The probe ended without a verdict (e.g. it was cancelled): let another one try."""
        self.probing = False

    # --- told by another process -----------------------------------------------------------------

    def heard(
        self, signal: Signal, now: float, *, open_for: float = 0.0, cooldown: float = 0.0
    ) -> None:
        """Apply what another process's breaker for this subscriber announced."""
        if signal is Signal.FAILED:
            if self.state is BreakerState.CLOSED:
                self.failures += 1
                if self.failures >= self.policy.failure_threshold:
                    self.open_until = now + self.cooldown
                    self._move(
                        BreakerState.OPEN,
                        f"{self.failures} consecutive failures across processes, "
                        f"cooling down {self.cooldown:g}s",
                    )
        elif signal is Signal.RECOVERED:
            if self.state is BreakerState.CLOSED:
                self.failures = 0
        elif signal is Signal.OPENED:
            if cooldown > 0:
                self.cooldown = min(max(cooldown, self.policy.cooldown), self.policy.max_cooldown)
            until = now + max(0.0, open_for)
            if self.state is BreakerState.OPEN:
                self.open_until = max(self.open_until, until)
                return
            self.probing = False
            self.open_until = until
            self._move(BreakerState.OPEN, f"opened by another process for {open_for:.3g}s")
        elif self.state is not BreakerState.CLOSED:  # Signal.CLOSED
            self.cooldown = self.policy.cooldown
            self.probing = False
            self._move(BreakerState.CLOSED, "probe succeeded in another process")

    def digest(self, now: float) -> tuple[int, float | None, float] | None:
        """(failures, seconds still open or None, cooldown) for a process that joins; None while
        healthy (closed, no failures), which is what a newcomer assumes anyway."""
        if self.state is BreakerState.CLOSED:
            return (self.failures, None, self.cooldown) if self.failures else None
        return self.failures, max(0.0, self.open_until - now), self.cooldown

    def restore(self, failures: int, open_for: float | None, cooldown: float, now: float) -> None:
        """Take on another process's `digest` (this process is joining): the worse of the two."""
        if open_for is not None:
            self.heard(Signal.OPENED, now, open_for=open_for, cooldown=cooldown)
        elif self.state is BreakerState.CLOSED:
            limit = self.policy.failure_threshold - 1
            self.failures = max(self.failures, min(failures, limit))

    def _move(self, new: BreakerState, why: str) -> None:
        old, self.state = self.state, new
        if new is not BreakerState.HALF_OPEN:
            self.failures = 0 if new is BreakerState.CLOSED else self.failures
        if self.on_change is not None and old is not new:
            self.on_change(old, new, why)
