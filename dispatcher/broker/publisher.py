"""`dispatcher publish`: put events on the exchange the way a delivery node does."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import aio_pika
import orjson

from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import Config
from dispatcher.decisions.events import derive_event_id
from dispatcher.names import H_PUBLISHED_AT

__all__ = ["PublishError", "event_message", "publish_events", "read_events"]


class PublishError(ValueError):
    """Input that cannot be published; one line."""


def read_events(text: bytes) -> list[bytes]:
    """One JSON object, or JSON lines (blank lines skipped). Returns each event's exact bytes."""
    stripped = text.strip()
    if not stripped:
        raise PublishError("no events in the input")
    try:
        doc = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        return [stripped]
    out = []
    for n, line in enumerate(stripped.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise PublishError(f"line {n}: not valid JSON") from None
        if not isinstance(value, dict):
            raise PublishError(f"line {n}: not a JSON object")
        out.append(line)
    return out


def event_message(
    body: bytes, *, now: float, doc: dict[str, Any] | None = None
) -> tuple[aio_pika.Message, str]:
    """The AMQP message and routing key a delivery node would publish for ``body`` at ``now``
    (unix seconds)."""
    if doc is None:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        doc = parsed if isinstance(parsed, dict) else {}
    event_type = doc.get("event")
    routing_key = event_type if isinstance(event_type, str) and event_type else "unknown"
    event_id = doc.get("id")
    message = aio_pika.Message(
        body,
        # Without an id of its own, the id derived from the body: publishing the same body
        # twice must give the same event id (aiormq would otherwise invent a random one).
        message_id=event_id if isinstance(event_id, str) else derive_event_id(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={H_PUBLISHED_AT: int(now * 1000)},
        timestamp=now,
    )
    return message, routing_key


async def publish_events(
    config: Config,
    bodies: Iterable[bytes],
    *,
    progress: TextIO | None = sys.stderr,
    batch: int = 200,
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Publish with publisher confirms, ``batch`` at a time; returns how many were confirmed."""
    import asyncio

    connection = await aio_pika.connect(config.broker.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            config.broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        done = 0
        wall, monotonic = clock.wall, clock.monotonic
        started = monotonic()
        for chunk in _chunks(bodies, batch):
            messages = (event_message(body, now=wall()) for body in chunk)
            await asyncio.gather(*(exchange.publish(m, routing_key=k) for m, k in messages))
            done += len(chunk)
            if progress is not None and done % 5000 < batch:
                rate = done / max(monotonic() - started, 1e-6)
                print(f"published {done} events ({rate:.0f}/s)", file=progress)
        return done


def _chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
