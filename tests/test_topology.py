"""Delay routing through the binary tiers (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.topology import LEVELS, delay_route


def _ms(key: str) -> int:
    return int(key.replace(".", ""), 2)


def test_exact_delays_spell_their_milliseconds() -> None:
    exchange, key = delay_route("q", 5.0)
    assert _ms(key) == 5000 and len(key.split(".")) == LEVELS
    assert exchange == f"q.delay.{5000 .bit_length() - 1}"  # enters at its highest set bit
    assert _ms(delay_route("q", 0.0)[1]) == 1  # never zero: at least one tier


@given(st.floats(min_value=0.001, max_value=86400))
def test_coarse_delays_use_few_tiers_and_never_shorten(seconds: float) -> None:
    exact = _ms(delay_route("q", seconds)[1])
    coarse = _ms(delay_route("q", seconds, coarse=True)[1])
    assert coarse.bit_count() <= 3
    assert exact <= coarse <= exact * 1.25 + 1
