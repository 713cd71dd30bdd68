"""How big a chaos run is: ``CHAOS_SCALE=smoke`` (the default, CI) or ``CHAOS_SCALE=full``.

Every scenario picks its sizes with `pick(smoke, full)`, so one table of numbers decides how long
a run takes. The smoke set keeps the whole suite well under three minutes on two cores; the full
set runs tens of thousands of events through many faults.
"""

from __future__ import annotations

import os
import random
from typing import TypeVar

_T = TypeVar("_T")

SCALE = os.environ.get("CHAOS_SCALE", "smoke").strip().lower() or "smoke"
if SCALE not in ("smoke", "full"):
    raise RuntimeError(f"CHAOS_SCALE must be smoke or full, got {SCALE!r}")
FULL = SCALE == "full"

# One seed per run for every random choice the scenarios make (kill times, fuzzed input);
# printed in the table so a failing run can be repeated with CHAOS_SEED=<seed>.
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))


def pick(smoke: _T, full: _T) -> _T:
    return full if FULL else smoke


def rng(salt: str) -> random.Random:
    """A random source for one scenario, reproducible from the run's seed."""
    return random.Random(f"{SEED}:{salt}")
