"""The one clock of a worker: the daemon makes it and hands it to every part that tells time.

Three readings, each for what it is good at: ``wall`` (seconds since the epoch) for what goes on
the wire or into a record (a delivery's first attempt, a request's timestamp); ``monotonic`` for
deadlines and cooldowns (breakers, lanes, parking, metrics' idle series, the cluster's
heartbeats); ``elapsed`` for short durations measured in-process (request, mint and confirm
times). Every part takes the `Clock` itself and binds the reading it needs once; a function that
only computes is given the time instead. Tests pass a `Clock` built on a fake. The supervisor and
the command-line tools (publish, dlq) take one the same way, the system's unless told otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SYSTEM_CLOCK", "Clock"]


@dataclass(frozen=True, slots=True)
class Clock:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    elapsed: Callable[[], float] = time.perf_counter


SYSTEM_CLOCK = Clock()
