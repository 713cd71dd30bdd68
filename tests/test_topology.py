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
    assert exchange == f"q.delay.{(5000).bit_length() - 1}"  # enters at its highest set bit
    assert _ms(delay_route("q", 0.0)[1]) == 1  # never zero: at least one tier


@given(st.floats(min_value=0.001, max_value=86400))
def test_any_delay_is_exact_to_the_millisecond(seconds: float) -> None:
    exchange, key = delay_route("q", seconds)
    ms = _ms(key)
    assert ms == max(1, round(seconds * 1000))
    assert exchange == f"q.delay.{ms.bit_length() - 1}"
