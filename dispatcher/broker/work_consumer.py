"""The work-queue consumer: deliveries straight from aiormq, without aio-pika's message object.

aio-pika wraps every delivery in an ``IncomingMessage`` (two dozen attribute copies, a lock, a
processed flag) before the callback sees it; on the work queue, which carries every event,
that wrapping was measured as one of the largest costs of a delivery after the token. The
pipeline needs nine fields and never acks through the message (`dispatcher/broker/acks.py` does), so
the work queue is consumed on the underlying aiormq channel and each delivery becomes an
`Inbound` of exactly those fields.

Nor do the deliveries go through aiormq's channel reader. aiormq hands every frame it reads to
the channel's frame queue, where the channel's own task takes it out again, puts the three frames
of a delivery back together and starts a task per delivery through its future store; with no
work at all that came to about a quarter of what taking a message in cost. The consumer puts a
`DeliveryTap` in front of that queue: the frames of deliveries to its own consumer tag are put
together as they arrive and each delivery is started at once; every other frame (replies,
returns, a close, other consumers' deliveries) goes on into the queue untouched, in order.
Without the tap (an aiormq whose channel has no frame queue), aiormq's own callback path is used.

One step earlier still: the tap is registered with the connection's frame reader
(`dispatcher.broker.frames`), which, where it is installed, takes the tap's deliveries from the
bytes it reads and hands them to `DeliveryTap.hand`, so they never become pamqp frames or enter
the queue at all. The tap's own ``put`` is what remains when that reader is not installed.

The consumer lives on a robust channel: when the channel or the connection is restored, the
channel's ``reopen_callbacks`` consume again on the new underlying channel (aio-pika restores
only the consumers it made itself).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from dispatcher.broker import frames

__all__ = ["DeliveryTap", "Inbound", "InboundMessage", "WorkConsumer"]

log = structlog.get_logger("dispatcher.work_consumer")


class InboundMessage(Protocol):
    """What the pipeline reads of a consumed message (an `Inbound`, or aio-pika's own message
    for parking queues and probes)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> dt.datetime | None: ...
    @property
    def redelivered(self) -> bool | None: ...
    @property
    def delivery_tag(self) -> int | None: ...
    @property
    def channel(self) -> Any: ...


class Inbound:
    """One delivery from the work queue: the fields the pipeline reads, nothing else."""

    __slots__ = (
        "body",
        "channel",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
        "redelivered",
        "routing_key",
        "timestamp",
    )

    def __init__(
        self,
        body: bytes,
        channel: Any,
        delivery_tag: int | None,
        exchange: str | None,
        routing_key: str | None,
        redelivered: bool | None,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        timestamp: dt.datetime | None,
    ) -> None:
        self.body = body
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.exchange = exchange
        self.routing_key = routing_key
        self.redelivered = redelivered
        self.headers = headers
        self.message_id = message_id
        self.timestamp = timestamp

    @classmethod
    def of_frames(cls, delivery: Any, header: ContentHeader, body: bytes, channel: Any) -> Inbound:
        """From pamqp's frames of one delivery."""
        props = header.properties
        return cls(
            body,
            channel,
            delivery.delivery_tag,
            delivery.exchange,
            delivery.routing_key,
            delivery.redelivered,
            props.headers,
            props.message_id,
            props.timestamp,
        )

    @classmethod
    def of(cls, delivered: DeliveredMessage) -> Inbound:
        """From aiormq's own message (its callback path)."""
        d = delivered
        return cls.of_frames(d.delivery, d.header, d.body, d.channel)


class DeliveryTap:
    """Stands in front of an aiormq channel's frame queue (``channel.frames``).

    The frames of a delivery to ``consumer_tag`` (``Basic.Deliver``, the content header, the
    body frames) are put together here and the delivery handed to ``take`` as soon as its last
    frame arrives. Any other frame, and the content frames that follow any other method, go on
    into the queue as they came, so the channel's own reader sees exactly what it would have,
    minus these deliveries. Everything but ``put`` is the queue's own (the channel's reader
    waits on it).
    """

    def __init__(
        self,
        queue: asyncio.Queue[Any],
        channel: Any,
        consumer_tag: str,
        take: Callable[[Inbound], None],
    ) -> None:
        self.queue = queue
        self._channel = channel
        self._tag = consumer_tag
        self._take = take
        self._delivery: Any = None  # the Deliver whose content is being put together
        self._header: ContentHeader | None = None
        self._parts: list[bytes] = []
        self._got = 0
        self._passing = False  # content of a frame that went on into the queue
        self._stopped = False
        self.taken = 0  # deliveries handed over
        self.from_reader = 0  # of which the connection's frame reader took from the bytes

    def stop(self) -> None:
        """The consumer was cancelled: deliveries still on their way go to the channel, as
        without the tap (aiormq drops those of a cancelled consumer; the broker redelivers)."""
        self._stopped = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    async def put(self, item: tuple[Any, Any]) -> None:
        frame = item[1]
        if self._delivery is not None:
            if self._header is None:
                if isinstance(frame, ContentHeader):
                    self._header = frame
                    if not frame.body_size:
                        self._complete(b"")
                    return
            elif isinstance(frame, ContentBody):
                self._parts.append(frame.value)
                self._got += len(frame.value)
                if self._got >= self._header.body_size:
                    parts = self._parts
                    self._complete(parts[0] if len(parts) == 1 else b"".join(parts))
                    if self.taken % frames.YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                return
            # A frame out of place (the broker broke off the message): what was gathered is
            # dropped, unacked, and the broker redelivers it once the channel closes.
            self._reset()
        elif self._passing and isinstance(frame, ContentHeader | ContentBody):
            await self.queue.put(item)
            return
        if (
            isinstance(frame, Basic.Deliver)
            and frame.consumer_tag == self._tag
            and not self._stopped
        ):
            self._passing = False
            self._delivery = frame
            return
        self._passing = True
        await self.queue.put(item)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def hand(
        self,
        body: bytes,
        delivery_tag: int,
        exchange: str,
        routing_key: str,
        redelivered: bool,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        timestamp: dt.datetime | None,
    ) -> None:
        """A delivery the connection's frame reader took from the bytes (`frames`)."""
        self.from_reader += 1
        self._give(
            Inbound(
                body,
                self._channel,
                delivery_tag,
                exchange,
                routing_key,
                redelivered,
                headers,
                message_id,
                timestamp,
            )
        )

    def _complete(self, body: bytes) -> None:
        delivery, header = self._delivery, self._header
        self._reset()
        assert header is not None
        self._give(Inbound.of_frames(delivery, header, body, self._channel))

    def _give(self, message: Inbound) -> None:
        self.taken += 1
        try:
            self._take(message)
        except Exception as exc:  # a bug: never into aiormq's reader (it would drop the link)
            # The message stays unacked: the broker hands it out again when the channel closes.
            log.error("delivery_not_taken", error=f"{type(exc).__name__}: {exc}", exc_info=True)

    def _reset(self) -> None:
        self._delivery = self._header = None
        self._parts = []
        self._got = 0


Take = Callable[[Inbound], None]


class WorkConsumer:
    """Consumes one queue on a robust channel's underlying channel, again after each restore."""

    def __init__(self, channel: AbstractRobustChannel, queue: str, take: Take) -> None:
        self._channel = channel
        self._queue = queue
        self._take = take  # each delivery, as it arrives (it starts whatever work it needs)
        self._tag: str | None = None
        self._underlay: Any = None
        self._stopped = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._channel.reopen_callbacks.add(self._reopened)
        await self._consume()

    async def _consume(self) -> None:
        raw: Any = await self._channel.get_underlay_channel()
        tag = f"dispatcher.{uuid.uuid4().hex}"
        queue = getattr(raw, "frames", None)
        if isinstance(queue, DeliveryTap):
            queue = queue.queue  # consuming again on the same channel
        if isinstance(queue, asyncio.Queue):
            # In place before the consume goes out: its first deliveries may follow the reply
            # into the queue before basic_consume returns.
            raw.frames = tap = DeliveryTap(queue, raw, tag, self._take)
            frames.register(tag, tap)
        ok = await raw.basic_consume(self._queue, self._deliver, no_ack=False, consumer_tag=tag)
        self._tag, self._underlay = ok.consumer_tag, raw

    async def _deliver(self, delivered: DeliveredMessage) -> None:
        self._take(Inbound.of(delivered))

    async def _reopened(self, *_: Any) -> None:
        await self.ensure()

    async def ensure(self) -> None:
        """Consume on the channel's current underlying channel, unless that is done already
        (called on every channel reopen and every connection restore: either may come first)."""
        async with self._lock:
            if self._stopped:
                return
            try:
                raw = await self._channel.get_underlay_channel()
                if raw is self._underlay and self._tag is not None and not raw.is_closed:
                    return
                self._tag = None
                await self._consume()
                log.info("work_consumer_restored", queue=self._queue)
            except Exception as exc:  # the next restore tries again; readiness stays down
                self._tag = None
                log.warning("work_consumer_restore_failed", error=str(exc) or type(exc).__name__)

    @property
    def taken(self) -> int:
        """Deliveries taken through the tap on the current channel (0 on aiormq's own path)."""
        tap = getattr(self._underlay, "frames", None)
        return tap.taken if isinstance(tap, DeliveryTap) else 0

    @property
    def from_reader(self) -> int:
        """Of those, the deliveries the connection's frame reader took from the bytes."""
        tap = getattr(self._underlay, "frames", None)
        return tap.from_reader if isinstance(tap, DeliveryTap) else 0

    @property
    def consuming(self) -> bool:
        return self._tag is not None and not self._stopped

    async def cancel(self) -> None:
        """Stop intake: deliveries already received are the pipeline's to settle."""
        self._stopped = True
        self._channel.reopen_callbacks.discard(self._reopened)
        tag, raw = self._tag, self._underlay
        self._tag = None
        tap = getattr(raw, "frames", None)
        if isinstance(tap, DeliveryTap):
            tap.stop()
        if tag is not None and raw is not None and not raw.is_closed:
            await raw.basic_cancel(tag)
