"""The tap in front of an aiormq channel's frame queue: deliveries to its consumer are put
together from their frames and taken at once; every other frame reaches the queue as it came."""

from __future__ import annotations

import asyncio
from typing import Any

from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from dispatcher.broker.work_consumer import DeliveryTap, Inbound

TAG = "dispatcher.test"


def deliver(tag: int, consumer: str = TAG, exchange: str = "events") -> Basic.Deliver:
    return Basic.Deliver(
        consumer_tag=consumer, delivery_tag=tag, exchange=exchange, routing_key="Message.Bounced"
    )


def header(size: int, message_id: str | None = None) -> ContentHeader:
    return ContentHeader(
        body_size=size, properties=Basic.Properties(message_id=message_id, headers={"x": 1})
    )


class Rig:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.channel = object()
        self.taken: list[Inbound] = []
        self.tap = DeliveryTap(self.queue, self.channel, TAG, self.taken.append)

    async def feed(self, *frames: Any) -> None:
        for frame in frames:
            await self.tap.put((1, frame))

    def queued(self) -> list[Any]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait()[1])
        return out


async def test_a_delivery_is_taken_whole_with_the_fields_the_pipeline_reads() -> None:
    rig = Rig()
    await rig.feed(deliver(7), header(11, "m-1"), ContentBody(b"hello"), ContentBody(b" world"))
    [got] = rig.taken
    assert got.body == b"hello world" and got.delivery_tag == 7
    assert (got.exchange, got.routing_key, got.message_id) == ("events", "Message.Bounced", "m-1")
    assert got.headers == {"x": 1} and got.channel is rig.channel
    assert rig.queued() == [] and rig.tap.taken == 1


async def test_an_empty_body_is_taken_at_its_header() -> None:
    rig = Rig()
    await rig.feed(deliver(1), header(0))
    assert [m.body for m in rig.taken] == [b""]


async def test_other_frames_and_other_consumers_deliveries_reach_the_queue_in_order() -> None:
    rig = Rig()
    other = deliver(2, consumer="someone-else")
    returned = Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k")
    frames = [
        Basic.QosOk(),
        other,
        header(3),
        ContentBody(b"abc"),
        returned,
        header(2),
        ContentBody(b"zz"),
    ]
    await rig.feed(frames[0], frames[1], frames[2], frames[3], deliver(3), header(1))
    await rig.feed(ContentBody(b"!"), *frames[4:])
    assert [m.body for m in rig.taken] == [b"!"]
    assert rig.queued() == frames


async def test_a_message_broken_off_is_dropped_and_the_next_frame_passes() -> None:
    rig = Rig()
    close = Basic.Cancel(consumer_tag=TAG)
    await rig.feed(deliver(4), header(10), ContentBody(b"part"), close)
    assert rig.taken == [] and rig.queued() == [close]
    await rig.feed(deliver(5), header(1), ContentBody(b"x"))
    assert [m.delivery_tag for m in rig.taken] == [5]


async def test_after_stop_deliveries_go_to_the_channel_as_without_the_tap() -> None:
    rig = Rig()
    rig.tap.stop()
    frames = [deliver(6), header(1), ContentBody(b"y")]
    await rig.feed(*frames)
    assert rig.taken == [] and rig.queued() == frames


async def test_a_take_that_raises_does_not_reach_the_reader() -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def broken(_: Inbound) -> None:
        raise RuntimeError("bug")

    tap = DeliveryTap(queue, object(), TAG, broken)
    for frame in (deliver(1), header(1), ContentBody(b"z"), Basic.QosOk()):
        await tap.put((1, frame))  # no exception: the connection's reader keeps reading
    assert tap.taken == 1 and queue.qsize() == 1


async def test_everything_but_put_is_the_queues() -> None:
    rig = Rig()
    await rig.feed(Basic.QosOk())
    assert rig.tap.qsize() == 1 and not rig.tap.empty()
    assert isinstance((await rig.tap.get())[1], Basic.QosOk)
    rig.tap.task_done()
