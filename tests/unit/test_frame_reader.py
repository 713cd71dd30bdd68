"""The connection's frame reader: frames cut from bulk reads are pamqp's own, exactly as aiormq's
reader returns them; deliveries to a registered consumer tag are taken from the bytes and never
returned; a reader that took frames returns a sign of life before it waits for the socket."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import aiormq.connection
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic, Connection
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from dispatcher.broker import frames
from dispatcher.broker.frames import FrameReader
from dispatcher.broker.work_consumer import DeliveryTap, Inbound

START = Connection.Start(server_properties={"product": "test"})


def wire(channel: int, *items: Any) -> bytes:
    return b"".join(pamqp_frame.marshal(item, channel) for item in items)


def delivery(
    tag: str,
    number: int,
    body: bytes,
    *,
    redelivered: bool = False,
    split: int = 0,
    **props: Any,
) -> list[Any]:
    parts = [body[i : i + split] for i in range(0, len(body), split)] if split else [body]
    return [
        Basic.Deliver(
            consumer_tag=tag,
            delivery_tag=number,
            redelivered=redelivered,
            exchange="events",
            routing_key="Message.Bounced",
        ),
        ContentHeader(body_size=len(body), properties=Basic.Properties(**props)),
        *[ContentBody(part) for part in parts if part],
    ]


class Rig:
    """A tap registered under a fresh consumer tag, and a reader over a fed stream."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.taken: list[Inbound] = []
        self.channel_queue: asyncio.Queue[Any] = asyncio.Queue()
        self.tap = DeliveryTap(self.channel_queue, "the-channel", tag, self.taken.append)
        frames.register(tag, self.tap)
        self.stream = asyncio.StreamReader()
        self.reader = FrameReader(self.stream)

    def feed(self, data: bytes, *, chunk: int = 0) -> None:
        data = wire(0, START) + data
        step = chunk or len(data)
        for i in range(0, len(data), step):
            self.stream.feed_data(data[i : i + step])
        self.stream.feed_eof()

    async def returned(self) -> list[tuple[int, Any]]:
        """(channel, frame) of everything returned after Connection.Start, to the end."""
        out = []
        async for _, channel, got in self.reader:
            out.append((channel, got))
        assert isinstance(out[0][1], Connection.Start)
        return out[1:]


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    return f"dispatcher.test-{request.node.name}"


@pytest.mark.parametrize("chunk", [0, 1, 5, 13, 64])
async def test_frames_are_pamqps_own_whatever_the_reads(tag: str, chunk: int) -> None:
    rig = Rig(tag)
    others = delivery("someone-else", 3, b"abc", message_id="m-3")
    sent = [
        (1, Basic.ConsumeOk(consumer_tag=tag)),
        (2, Basic.Ack(delivery_tag=9, multiple=True)),
        *[(1, item) for item in others],
        (0, Heartbeat()),
        (1, Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k")),
    ]
    rig.feed(b"".join(wire(channel, item) for channel, item in sent), chunk=chunk)
    got = await rig.returned()
    assert [wire(c, f) for c, f in got] == [wire(c, f) for c, f in sent]
    assert [type(f) for _, f in got] == [type(f) for _, f in sent]
    assert got[2][1].consumer_tag == "someone-else" and got[4][1].value == b"abc"
    assert got[3][1].properties.message_id == "m-3" and rig.taken == []


@pytest.mark.parametrize("chunk", [0, 1, 7, 100])
async def test_a_tapped_delivery_is_taken_from_the_bytes_with_the_fields_the_pipeline_reads(
    tag: str, chunk: int
) -> None:
    rig = Rig(tag)
    stamp = dt.datetime(2026, 12, 1, 20, 0, tzinfo=dt.UTC)
    body = b'{"id": "e-1", "type": "Message.Bounced"}' * 5
    data = wire(
        1,
        *delivery(
            tag,
            7,
            body,
            redelivered=True,
            split=33,
            content_type="application/json",
            headers={"published-at": 1764619200000, "x-death": [{"count": 2}]},
            delivery_mode=2,
            correlation_id="c",
            message_id="e-1",
            timestamp=stamp,
            app_id="node-1",
        ),
    )
    rig.feed(data, chunk=chunk)
    got = await rig.returned()
    [message] = rig.taken
    assert message.body == body and message.delivery_tag == 7 and message.redelivered is True
    assert (message.exchange, message.routing_key) == ("events", "Message.Bounced")
    assert message.headers == {"published-at": 1764619200000, "x-death": [{"count": 2}]}
    assert message.message_id == "e-1" and message.timestamp == stamp
    assert message.channel == "the-channel" and rig.tap.taken == 1
    # Nothing of the delivery reached the connection; a heartbeat stood in for it.
    assert [(c, type(f)) for c, f in got] == [(0, Heartbeat)]


async def test_tapped_fields_equal_pamqps_decoding_of_the_same_header(tag: str) -> None:
    rig = Rig(tag)
    props = {"headers": {"a": "b", "n": 3}, "message_id": "mid", "priority": 4, "expiration": "9"}
    rig.feed(wire(1, *delivery(tag, 1, b"x", **props)))
    await rig.returned()
    reference = Inbound.of_frames(*delivery(tag, 1, b"x", **props)[:2], b"x", "the-channel")
    [message] = rig.taken
    for field in Inbound.__slots__:
        assert getattr(message, field) == getattr(reference, field), field


async def test_empty_bodies_and_interleaved_channels(tag: str) -> None:
    rig = Rig(tag)
    first = delivery(tag, 1, b"hello world", split=4)
    data = (
        wire(1, first[0], first[1], first[2])
        + wire(2, Basic.Ack(delivery_tag=1))
        + wire(1, *first[3:])
        + wire(1, *delivery(tag, 2, b""))
    )
    rig.feed(data)
    got = await rig.returned()
    assert [(m.delivery_tag, m.body) for m in rig.taken] == [(1, b"hello world"), (2, b"")]
    assert [c for c, _ in got if c] == [2]


async def test_a_delivery_broken_off_is_dropped_and_the_frame_returned(tag: str) -> None:
    rig = Rig(tag)
    broken = delivery(tag, 4, b"partial!", split=4)[:3]
    cancel = Basic.Cancel(consumer_tag=tag)
    rig.feed(wire(1, *broken, cancel, *delivery(tag, 5, b"y")))
    got = await rig.returned()
    assert [m.delivery_tag for m in rig.taken] == [5]
    assert [wire(c, f) for c, f in got if not isinstance(f, Heartbeat)] == [wire(1, cancel)]


async def test_after_stop_deliveries_reach_the_channel(tag: str) -> None:
    rig = Rig(tag)
    rig.tap.stop()
    rig.feed(wire(1, *delivery(tag, 6, b"z")))
    got = await rig.returned()
    assert rig.taken == [] and [type(f) for _, f in got] == [
        Basic.Deliver,
        ContentHeader,
        ContentBody,
    ]


async def test_a_bad_frame_end_is_refused(tag: str) -> None:
    rig = Rig(tag)
    data = bytearray(wire(1, Basic.QosOk()))
    data[-1] = 0x00
    rig.feed(bytes(data))
    with pytest.raises(InvalidFrameError, match="frame end"):
        await rig.returned()


async def test_a_stream_cut_inside_a_frame_is_a_connection_error(tag: str) -> None:
    rig = Rig(tag)
    rig.feed(wire(1, Basic.QosOk())[:-3])
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await rig.returned()


async def test_a_stream_that_ends_while_the_reader_waits_is_a_connection_error(tag: str) -> None:
    rig = Rig(tag)
    rig.stream.feed_data(wire(0, START) + wire(1, Basic.QosOk()))
    got = [await rig.reader.get_frame(), await rig.reader.get_frame()]
    assert [type(f) for _, _, f in got] == [Connection.Start, Basic.QosOk]
    waiting = asyncio.ensure_future(rig.reader.get_frame())
    await asyncio.sleep(0.01)
    rig.stream.feed_eof()
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await waiting


async def test_many_deliveries_let_the_loop_run_between_them(tag: str) -> None:
    rig = Rig(tag)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    rig.feed(b"".join(wire(1, *delivery(tag, n, b"e")) for n in range(1, 161)))
    task = asyncio.create_task(ticker())
    await rig.returned()
    task.cancel()
    assert len(rig.taken) == 160 and ticks >= 160 // frames.YIELD_EVERY


def test_install_replaces_aiormqs_reader_for_new_connections() -> None:
    before = aiormq.connection.FrameReceiver
    try:
        assert frames.install() is True and frames.installed()
        assert aiormq.connection.FrameReceiver is FrameReader
    finally:
        aiormq.connection.FrameReceiver = before


def test_a_reader_of_another_shape_is_not_replaced() -> None:
    class Other:
        def __init__(self, reader: Any, loop: Any) -> None: ...

        async def get_frame(self) -> None: ...

    assert frames._fits(frames._AiormqReader)
    assert not frames._fits(Other) and not frames._fits(None) and not frames._fits(object)
