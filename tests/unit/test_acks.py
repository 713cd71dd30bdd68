"""Acks in groups (dispatcher/broker/acks.py): which frames settle which deliveries.

Pure, no broker."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.broker.acks import Acks, AckWindow
from tests.support.fake_time import FakeTime


def window(max_delay: float = 0.02) -> tuple[AckWindow, FakeTime]:
    time = FakeTime()
    clock = time.clock
    return AckWindow(object(), max_delay=max_delay, clock=clock), time  # type: ignore[arg-type]


def test_a_settled_run_goes_out_as_one_multiple_ack() -> None:
    w, _ = window()
    for tag in range(1, 6):
        w.received(tag)
    for tag in (3, 1, 2, 5, 4):
        w.settle(tag, True)
    assert w.plan() == [("ack", 5, True)]
    assert w.outstanding == 0 and w.plan() == []


def test_hand_backs_go_first_and_the_run_covers_the_rest() -> None:
    w, _ = window()
    for tag in range(1, 5):
        w.received(tag)
    w.settle(1, True)
    w.settle(2, False)  # handed back: its own nack, before the multiple ack can cover it
    w.settle(3, True)
    w.settle(4, True)
    assert w.plan() == [("nack", 2, False), ("ack", 4, True)]


def test_a_run_stops_at_a_delivery_still_in_flight() -> None:
    w, clock = window(max_delay=0.05)
    for tag in range(1, 5):
        w.received(tag)
    w.settle(1, True)
    w.settle(3, True)
    w.settle(4, True)
    assert w.plan() == [("ack", 1, True)]  # 2 is in flight: 3 and 4 wait
    assert w.next_deadline() == pytest.approx(0.05)
    clock.now = 0.06  # waited long enough: one by one, so 2 keeps its own fate
    assert w.plan() == [("ack", 3, False), ("ack", 4, False)]
    w.settle(2, True)
    assert w.plan() == [("ack", 2, True)]  # 3 and 4 are already acked: covered harmlessly
    assert w.outstanding == 0


def test_a_straggler_settled_twice_keeps_its_first_verdict() -> None:
    w, _ = window()
    w.received(1)
    w.settle(1, True)
    w.settle(1, False)
    assert w.plan() == [("ack", 1, True)]


def test_only_hand_backs_send_no_ack() -> None:
    w, _ = window()
    w.received(1)
    w.received(2)
    w.settle(1, False)
    w.settle(2, False)
    assert w.plan() == [("nack", 1, False), ("nack", 2, False)]
    assert w.outstanding == 0


def test_a_gap_in_the_tags_is_never_covered_by_a_multiple_ack() -> None:
    w, clock = window(max_delay=0.05)
    for tag in (1, 2, 4, 5):  # 3 was delivered on this channel but never seen here
        w.received(tag)
    for tag in (1, 2, 4, 5):
        w.settle(tag, True)
    assert w.plan() == [("ack", 2, True)]
    assert w.plan() == []  # 3 may still come (a fetched message registers late)
    clock.now = 0.06
    # Not seen in time: gone for good. One by one from now on, and nothing is kept.
    frames = w.plan()
    assert sorted(frames) == [("ack", 4, False), ("ack", 5, False)]
    assert w.single and w.outstanding == 0
    w.received(6)
    w.received(7)
    w.settle(7, True)
    w.settle(6, True)
    assert sorted(w.plan()) == [("ack", 6, False), ("ack", 7, False)]


def test_tags_received_out_of_order_are_kept_in_order() -> None:
    w, _ = window()
    for tag in (1, 3, 2):
        w.received(tag)
    w.settle(1, True)
    w.settle(2, True)
    assert w.plan() == [("ack", 2, True)]


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []
        self.is_closed = False

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.sent.append(("ack", delivery_tag, multiple))

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        self.sent.append(("nack", delivery_tag, multiple))


async def test_one_loop_pass_sends_one_frame_for_many_settlements() -> None:
    acks = Acks(max_delay=0.01)
    channel = FakeChannel()
    for tag in range(1, 101):
        acks.received(channel, tag)
    for tag in range(1, 101):
        acks.settle(channel, tag, True)
    await asyncio.sleep(0.01)
    assert channel.sent == [("ack", 100, True)]
    # A straggler behind an unsettled delivery goes out on its own after max_delay.
    for tag in (101, 102):
        acks.received(channel, tag)
    acks.settle(channel, 102, True)
    await asyncio.sleep(0.05)
    assert channel.sent[-1] == ("ack", 102, False)
    acks.settle(channel, 101, False)
    await acks.close()
    assert channel.sent[-1] == ("nack", 101, False)


class SlowChannel(FakeChannel):
    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        await asyncio.sleep(0.001)  # a write that yields: later flushes must not overtake it
        self.sent.append(("ack", delivery_tag, multiple))


async def test_frames_of_successive_passes_go_out_in_order() -> None:
    acks = Acks()
    channel = SlowChannel()
    for tag in range(1, 7):
        acks.received(channel, tag)
    for tag in (1, 2, 3):
        acks.settle(channel, tag, True)
    await asyncio.sleep(0)  # the first pass plans ack(3, multiple)
    for tag in (4, 5, 6):
        acks.settle(channel, tag, True)
    await asyncio.sleep(0.02)
    assert channel.sent == [("ack", 3, True), ("ack", 6, True)]
