"""The prefetch window against batched subscribers: a window that holds fewer than four full
batches of the largest one is named at start-up and on reload, with the prefetch that would."""

from __future__ import annotations

from dataclasses import replace

from structlog.testing import capture_logs

from dispatcher.config import BatchConfig, BrokerConfig, Config, SubscriberConfig
from dispatcher.decisions.batching import window_for_batches
from dispatcher.process.daemon import Dispatcher


def sub(name: str, max_events: int | None) -> SubscriberConfig:
    batch = None if max_events is None else BatchConfig(max_events=max_events)
    return SubscriberConfig(id=name, url=f"https://{name}.example/h", batch=batch)


def test_the_largest_batched_subscriber_sets_the_window() -> None:
    subs = [sub("a", None), sub("b", 100), sub("c", 250)]
    assert window_for_batches(256, subs) == 1000
    assert window_for_batches(999, subs) == 1000
    assert window_for_batches(1000, subs) is None


def test_without_batched_subscribers_any_window_will_do() -> None:
    assert window_for_batches(1, [sub("a", None)]) is None
    assert window_for_batches(1, []) is None


def test_a_small_window_is_named_with_the_prefetch_that_would_hold_the_batches() -> None:
    cfg = replace(Config(), subscribers=(sub("b", 100),), broker=BrokerConfig(prefetch=256))
    with capture_logs() as logs:
        Dispatcher._check_window(cfg)
        Dispatcher._check_window(replace(cfg, broker=BrokerConfig(prefetch=400)))
    [warning] = logs
    assert warning["event"] == "prefetch_holds_few_batches"
    assert (warning["prefetch"], warning["suggested"]) == (256, 400)
