"""A clock the test moves by hand: every reading of the worker's `Clock` is ``now``."""

from __future__ import annotations

from dispatcher.clock import Clock

__all__ = ["FakeTime"]


class FakeTime:
    """Call it for the time; set or advance ``now`` to move it. ``clock`` is a `Clock` whose
    wall, monotonic and elapsed readings are all this one."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    @property
    def clock(self) -> Clock:
        return Clock(wall=self, monotonic=self, elapsed=self)
