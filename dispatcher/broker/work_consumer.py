"""The work-queue consumer: deliveries straight from aiormq, without aio-pika's message object.

aio-pika wraps every delivery in an ``IncomingMessage`` (two dozen attribute copies, a lock, a
processed flag) before the callback sees it; on the work queue, which carries every event,
that wrapping was measured as one of the largest costs of a delivery after the token. The
pipeline needs nine fields and never acks through the message (`dispatcher/broker/acks.py` does), so
the work queue is consumed on the underlying aiormq channel and each delivery becomes an
`Inbound` of exactly those fields.

The consumer lives on a robust channel: when the channel or the connection is restored, the
channel's ``reopen_callbacks`` consume again on the new underlying channel (aio-pika restores
only the consumers it made itself).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

__all__ = ["Inbound", "InboundMessage", "WorkConsumer"]

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

    def __init__(self, delivered: DeliveredMessage) -> None:
        delivery: Any = delivered.delivery
        props = delivered.header.properties
        self.body: bytes = delivered.body
        self.channel: Any = delivered.channel
        self.delivery_tag: int | None = delivery.delivery_tag
        self.exchange: str | None = delivery.exchange
        self.routing_key: str | None = delivery.routing_key
        self.redelivered: bool | None = delivery.redelivered
        self.headers: Mapping[str, Any] | None = props.headers
        self.message_id: str | None = props.message_id
        self.timestamp: dt.datetime | None = props.timestamp


Handler = Callable[[Inbound], Awaitable[None]]


class WorkConsumer:
    """Consumes one queue on a robust channel's underlying channel, again after each restore."""

    def __init__(self, channel: AbstractRobustChannel, queue: str, handler: Handler) -> None:
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._tag: str | None = None
        self._underlay: Any = None
        self._stopped = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._channel.reopen_callbacks.add(self._reopened)
        await self._consume()

    async def _consume(self) -> None:
        raw = await self._channel.get_underlay_channel()
        ok = await raw.basic_consume(self._queue, self._deliver, no_ack=False)
        self._tag, self._underlay = ok.consumer_tag, raw

    async def _deliver(self, delivered: DeliveredMessage) -> None:
        await self._handler(Inbound(delivered))

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
    def consuming(self) -> bool:
        return self._tag is not None and not self._stopped

    async def cancel(self) -> None:
        """Stop intake: deliveries already received are the pipeline's to settle."""
        self._stopped = True
        self._channel.reopen_callbacks.discard(self._reopened)
        tag, raw = self._tag, self._underlay
        self._tag = None
        if tag is not None and raw is not None and not raw.is_closed:
            await raw.basic_cancel(tag)
