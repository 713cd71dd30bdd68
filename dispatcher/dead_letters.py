"""`dispatcher dlq`: list, show, replay, purge and export dead letters.

Reading never removes: every dead letter is fetched unacknowledged and handed back when the
channel closes, so a crash mid-listing loses nothing. Replay publishes a fresh delivery (attempt
1, publisher-confirmed) and only then acknowledges the dead letter it came from.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from dispatcher.config import Config
from dispatcher.events import derive_event_id
from dispatcher.records import DeadLetterRecord, Delivery

__all__ = ["DeadLetter", "DeadLetterTool"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: DeadLetterRecord
    body: bytes
    headers: dict[str, Any]

    def export(self) -> dict[str, Any]:
        out = self.record.as_dict()
        try:
            out["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(self.body).decode()
        return out


def _decode(message: AbstractIncomingMessage) -> DeadLetter:
    headers = {
        k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
        for k, v in (message.headers or {}).items()
    }
    fallback = f"tag-{message.delivery_tag}"
    record = DeadLetterRecord.from_message(headers, message.message_id, fallback)
    return DeadLetter(record=record, body=message.body, headers=headers)


class _Progress:
    def __init__(self, what: str, stream: TextIO | None, every: int = 1000) -> None:
        self._what, self._stream, self._every = what, stream, every
        self.count = 0
        self._started = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        if self._stream is not None and self.count % self._every == 0:
            rate = self.count / max(time.monotonic() - self._started, 1e-6)
            print(f"{self._what} {self.count} dead letters ({rate:.0f}/s)", file=self._stream)


class DeadLetterTool:
    def __init__(self, config: Config, *, progress: TextIO | None = sys.stderr) -> None:
        self._cfg = config
        self._progress = progress

    @asynccontextmanager
    async def _channel(self) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
        connection = await aio_pika.connect(self._cfg.broker.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(self._cfg.broker.dead_letter_queue, passive=True)
            yield channel, queue
            # Closing the channel hands back every dead letter fetched and not acked.

    async def count(self) -> int:
        async with self._channel() as (_, queue):
            return int(queue.declaration_result.message_count or 0)

    async def _scan(
        self, queue: AbstractQueue, what: str, limit: int | None = None
    ) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
        progress = _Progress(what, self._progress)
        while limit is None or progress.count < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            progress.tick()
            yield message, _decode(message)

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        async with self._channel() as (_, queue):
            return [dl async for _, dl in self._scan(queue, "read", limit)]

    async def show(self, dead_id: str) -> DeadLetter | None:
        async with self._channel() as (_, queue):
            async for _, dl in self._scan(queue, "searched"):
                if dl.record.id == dead_id:
                    return dl
        return None

    async def export(self, path: str) -> int:
        """Write every dead letter as a JSON line; the queue keeps them all."""
        lines: list[bytes] = []
        async with self._channel() as (_, queue):
            async for _, dl in self._scan(queue, "exported"):
                lines.append(orjson.dumps(dl.export()) + b"\n")
        await asyncio.to_thread(_write_lines, path, lines)
        return len(lines)

    async def replay(
        self, ids: Collection[str] | None, *, subscriber: str | None = None
    ) -> tuple[int, set[str], set[str]]:
        """Replay the dead letters named by ``ids`` (all when None), optionally only those of
        ``subscriber``. Returns (replayed, ids not found, ids kept because their subscriber is
        no longer configured)."""
        wanted = set(ids) if ids is not None else None
        missing = set(wanted) if wanted is not None else set()
        kept: set[str] = set()
        replayed = 0

        def chosen(dl: DeadLetter) -> bool:
            if wanted is not None and dl.record.id not in wanted:
                return False
            return subscriber is None or dl.record.subscriber == subscriber

        async with self._channel() as (channel, queue):
            due = await channel.get_exchange(f"{self._cfg.broker.queue}.retry.due", ensure=True)
            async for message, dl in self._scan(queue, "scanned"):
                if not chosen(dl):
                    continue
                sub = dl.record.subscriber
                if sub and self._cfg.subscriber(sub) is None:
                    kept.add(dl.record.id)
                    missing.discard(dl.record.id)
                    continue
                await due.publish(self._replay_message(dl), routing_key="", mandatory=True)
                await message.ack()
                missing.discard(dl.record.id)
                replayed += 1
                if wanted is not None and not missing:
                    break
        return replayed, missing, kept

    def _replay_message(self, dl: DeadLetter) -> aio_pika.Message:
        carried = ("x-published-at", "x-dispatch-routing-key")
        headers: dict[str, Any] = {k: v for k, v in dl.headers.items() if k in carried}
        sub = dl.record.subscriber
        if sub:
            headers.update(Delivery(sub, 1, time.time()).headers())
        # Without a subscriber (an invalid event, a broker dead letter) it goes back through
        # the whole pipeline as a new event.
        return aio_pika.Message(
            dl.body,
            headers=headers,
            message_id=dl.record.event_id or derive_event_id(dl.body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=time.time(),
        )

    async def purge(self) -> int:
        async with self._channel() as (_, queue):
            result = await queue.purge()
            return int(getattr(result, "message_count", 0) or 0)


def _write_lines(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as out:
        out.writelines(lines)
