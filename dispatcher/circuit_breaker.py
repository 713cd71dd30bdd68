"""Per-subscriber circuit breaker: a small state machine with the clock passed in.

    state      event                        next state   effect
    closed     success                      closed       failures := 0
    closed     failure (n < threshold)      closed       failures += 1
    closed     failure (n = threshold)      open         until := now + cooldown
    open       ask, now < until             open         deny for (until - now)
    open       ask, now >= until            half_open    this caller is the probe
    half_open  ask (probe out)              half_open    deny for the base cooldown
    half_open  success                      closed       cooldown := base
    half_open  failure                      open         cooldown := min(2 * cooldown, max)

Deliveries that are denied are not lost: the caller parks them in the subscriber's parking queue,
which is consumed again when the breaker closes (dispatcher/parking.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from dispatcher.config import BreakerConfig

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class CircuitBreaker:
    policy: BreakerConfig
    on_change: Callable[[BreakerState, BreakerState, str], None] | None = None
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    open_until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False

    def __post_init__(self) -> None:
        self.cooldown = self.policy.cooldown

    def ask(self, now: float) -> float | None:
        """None: go ahead. A number: stay away that many seconds."""
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.OPEN:
            if now < self.open_until:
                return self.open_until - now
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
            return now >= self.open_until
        return not (self.state is BreakerState.HALF_OPEN and self.probing)

    def success(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown = self.policy.cooldown
            self.probing = False
            self._move(BreakerState.CLOSED, "probe succeeded")
        self.failures = 0

    def failure(self, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.probing = False
            self.cooldown = min(self.cooldown * 2, self.policy.max_cooldown)
            self.open_until = now + self.cooldown
            self._move(BreakerState.OPEN, f"probe failed, cooling down {self.cooldown:g}s")
            return
        if self.state is BreakerState.OPEN:
            return  # a straggler that started before the breaker opened
        self.failures += 1
        if self.failures >= self.policy.failure_threshold:
            self.open_until = now + self.cooldown
            self._move(
                BreakerState.OPEN,
                f"{self.failures} consecutive failures, cooling down {self.cooldown:g}s",
            )

    def release_probe(self) -> None:
        """The probe ended without a verdict (e.g. it was cancelled): let another one try."""
        self.probing = False

    def _move(self, new: BreakerState, why: str) -> None:
        old, self.state = self.state, new
        if new is not BreakerState.HALF_OPEN:
            self.failures = 0 if new is BreakerState.CLOSED else self.failures
        if self.on_change is not None and old is not new:
            self.on_change(old, new, why)
