"""`dispatcher dlq`: list, show, replay, purge and export dead letters.

Reading never removes: every dead letter is fetched (basic.get) unacknowledged and handed back
afterwards, so a crash mid-listing loses nothing. A hand-back counts as a delivery on quorum
queues; the dead-letter queue is declared with a delivery limit nothing can reach (see
`dispatcher.broker.topology`), so any number of reads is safe on RabbitMQ 3.x and 4.x alike. Dead
letters are read one at a time and never gathered: listing, exporting or scanning 50,000 takes
the memory of one.

Order: a classic queue puts handed-back messages back where they were; the reader closes its
channel (a basic.nack of many is far slower on classic queues: 20,000 took 170 s, a close
0.13 s, on 4.0). A quorum queue appends them at its tail in the order its returns are applied, and
a batch of more than 32 (a closed channel hands back everything at once; a queue member batches
returns once 32 are outstanding) comes back shuffled (measured on 3.10 and 4.0). So on a quorum
queue the reader reads to the end (after ``--limit`` or a ``show`` that found its dead letter
too, or the ones it left would end up first), then hands back oldest first, at most
`_HAND_BACK_CHUNK` at a time, each chunk once the queue shows the previous one back.

Replay publishes a fresh delivery (attempt 1, publisher-confirmed) and only then acknowledges
the dead letter it came from. A filtered purge acknowledges only the matching dead letters; the
others go back where they were.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import AbstractChannel as RawChannel

from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import Config
from dispatcher.decisions.events import derive_event_id
from dispatcher.decisions.records import DeadLetterRecord, Delivery
from dispatcher.names import CARRIED_HEADERS, H_BATCH_ID, dead_queue, due_exchange

__all__ = ["DeadLetter", "DeadLetterTool", "Filter"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: DeadLetterRecord
    body: bytes
    headers: dict[str, Any]

    def export(self) -> dict[str, Any]:
        out = self.record.as_dict()
        members = self.members
        if members is not None:
            out["batch"] = {"id": self.record.event_id, "size": len(members), "members": members}
        try:
            out["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(self.body).decode()
        return out

    @property
    def members(self) -> list[str | None] | None:
        """For a dead-lettered batch, the event id of each member, in order (None for a
        member whose id cannot be told); None when this is not a batch."""
        if H_BATCH_ID not in self.headers:
            return None
        try:
            elements = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(elements, list):
            return []
        return [_member_id(e) for e in elements]


def _member_id(element: object) -> str | None:
    if isinstance(element, dict):
        value = element.get("id")
        if isinstance(value, str):
            return value
        # An event without an id has the id derived from its exact bytes, which a parsed
        # array no longer holds: say so rather than guess.
    return None


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters a command applies to: every given field must match; ``reason`` is a
    prefix (``invalid_event`` matches ``invalid_event: not JSON``)."""

    subscriber: str | None = None
    account: str | None = None
    reason: str | None = None

    def __call__(self, record: DeadLetterRecord) -> bool:
        if self.subscriber is not None and record.subscriber != self.subscriber:
            return False
        if self.account is not None and record.account != self.account:
            return False
        return self.reason is None or record.reason.startswith(self.reason)

    @property
    def everything(self) -> bool:
        return self.subscriber is None and self.account is None and self.reason is None


EVERYTHING = Filter()


def _decode(message: AbstractIncomingMessage) -> DeadLetter:
    headers = {
        k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
        for k, v in (message.headers or {}).items()
    }
    fallback = f"tag-{message.delivery_tag}"
    record = DeadLetterRecord.from_message(headers, message.message_id, fallback)
    return DeadLetter(record=record, body=message.body, headers=headers)


_HAND_BACK_CHUNK = 30  # under the 32 returns a quorum queue member applies in order
_HAND_BACK_WAIT = 2.0  # seconds to wait for a chunk to show (then on, shuffled at worst)


class _Reader:
    """Fetches a queue's messages one by one, unacknowledged, on a channel of its own, and
    hands back whatever was not acked, in the order it was fetched."""

    def __init__(
        self,
        channel: AbstractChannel,
        raw: RawChannel,
        queue: AbstractQueue,
        *,
        quorum: bool,
        clock: Clock,
    ) -> None:
        self.channel, self._raw, self.queue = channel, raw, queue
        self._quorum = quorum  # read to the end, hand back in chunks
        self._monotonic = clock.monotonic
        self._last_tag = 0
        self._acked: dict[int, int] = {}  # chunk -> messages acked in it

    async def get(self) -> AbstractIncomingMessage | None:
        message = await self.queue.get(no_ack=False, fail=False, timeout=10)
        if message is not None and message.delivery_tag is not None:
            self._last_tag = max(self._last_tag, message.delivery_tag)
        return message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        if message.delivery_tag is not None:
            chunk = (message.delivery_tag - 1) // _HAND_BACK_CHUNK
            self._acked[chunk] = self._acked.get(chunk, 0) + 1

    async def hand_back(self) -> None:
        """nack (requeue) chunk by chunk, oldest first. Delivery tags of basic.get on a fresh
        channel run 1, 2, 3, ...; a chunk is a range of them (multiple=True skips acked ones)."""
        if self._last_tag == 0:
            return
        if not self._quorum:
            await self.channel.close()
            self._last_tag = 0
            return
        while await self.get() is not None:
            pass
        ready = await self._ready()
        for chunk, start in enumerate(range(1, self._last_tag + 1, _HAND_BACK_CHUNK)):
            end = min(start + _HAND_BACK_CHUNK - 1, self._last_tag)
            back = end - start + 1 - self._acked.get(chunk, 0)
            if back <= 0:
                continue
            await self._raw.basic_nack(delivery_tag=end, multiple=True, requeue=True)
            ready += back
            ready = await self._until_ready(ready)
        self._last_tag = 0

    async def _ready(self) -> int:
        declared = await self._raw.queue_declare(self.queue.name, passive=True)
        return int(declared.message_count or 0)

    async def _until_ready(self, want: int) -> int:
        """Wait until the queue holds ``want`` ready messages (the chunk is back) or a while has
        passed; returns what it holds then."""
        deadline = self._monotonic() + _HAND_BACK_WAIT
        pause = 0.0005
        while True:
            ready = await self._ready()
            if ready >= want or self._monotonic() > deadline:
                return ready
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)


class _Progress:
    def __init__(self, what: str, stream: TextIO | None, clock: Clock, every: int = 1000) -> None:
        self._what, self._stream, self._every = what, stream, every
        self.count = 0
        self._monotonic = clock.monotonic
        self._started = self._monotonic()

    def tick(self) -> None:
        self.count += 1
        if self._stream is not None and self.count % self._every == 0:
            rate = self.count / max(self._monotonic() - self._started, 1e-6)
            print(f"{self._what} {self.count} dead letters ({rate:.0f}/s)", file=self._stream)


class DeadLetterTool:
    def __init__(
        self, config: Config, *, progress: TextIO | None = sys.stderr, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._cfg = config
        self._progress = progress
        self._clock = clock

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Reader]:
        connection = await aio_pika.connect(self._cfg.broker.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(dead_queue(self._cfg.broker.queue), passive=True)
            raw = await channel.get_underlay_channel()
            quorum = self._cfg.broker.queue_type == "quorum"
            reader = _Reader(channel, raw, queue, quorum=quorum, clock=self._clock)
            try:
                yield reader
            finally:
                # Also when the caller stopped early. If the link is gone, what is still held
                # goes back as the connection closes: all of it, though a quorum queue may
                # shuffle it.
                with contextlib.suppress(Exception):
                    await reader.hand_back()

    async def count(self, where: Filter = EVERYTHING) -> int:
        if where.everything:
            async with self._reader() as reader:
                return int(reader.queue.declaration_result.message_count or 0)
        n = 0
        async for _ in self.iterate(where=where, what="counted"):
            n += 1
        return n

    async def _scan(
        self, reader: _Reader, what: str
    ) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
        """Every dead letter, fetched one at a time and held unacknowledged until the reader
        hands it back; the caller keeps none of them, so memory stays flat however many."""
        progress = _Progress(what, self._progress, self._clock)
        while True:
            message = await reader.get()
            if message is None:
                break
            progress.tick()
            yield message, _decode(message)

    async def iterate(
        self, limit: int | None = None, where: Filter = EVERYTHING, *, what: str = "read"
    ) -> AsyncGenerator[DeadLetter, None]:
        """The dead letters that match, in queue order, as they are read (nothing is removed).
        Close it (``contextlib.aclosing``) when stopping early: that hands the rest back."""
        found = 0
        if limit is not None and limit < 1:
            return
        async with self._reader() as reader:
            async for _, dl in self._scan(reader, what):
                if not where(dl.record):
                    continue
                yield dl
                found += 1
                if limit is not None and found >= limit:
                    break

    async def list(self, limit: int | None = None, where: Filter = EVERYTHING) -> list[DeadLetter]:
        """Gathered in memory: for tests and small queues; the command line streams `iterate`."""
        return [dl async for dl in self.iterate(limit, where)]

    async def show(self, dead_id: str) -> DeadLetter | None:
        async with aclosing(self.iterate(what="searched")) as letters:
            async for dl in letters:
                if dl.record.id == dead_id:
                    return dl
        return None

    async def export(self, path: str, where: Filter = EVERYTHING) -> int:
        """Write the matching dead letters as JSON lines, as they are read; the queue keeps
        them all."""
        n = 0
        # Buffered: a write is a copy into memory, a flush every MiB.
        out = await asyncio.to_thread(open, path, "wb", 1 << 20)
        try:
            async for dl in self.iterate(where=where, what="exported"):
                out.write(orjson.dumps(dl.export()) + b"\n")
                n += 1
        finally:
            await asyncio.to_thread(out.close)
        return n

    async def replay(
        self,
        ids: Collection[str] | None,
        *,
        subscriber: str | None = None,
        where: Filter = EVERYTHING,
    ) -> tuple[int, set[str], set[str]]:
        """Replay the dead letters named by ``ids`` (all when None) that match ``where`` (and
        ``subscriber``). Returns (replayed, ids not found, ids kept because their subscriber is
        no longer configured)."""
        wanted = set(ids) if ids is not None else None
        missing = set(wanted) if wanted is not None else set()
        kept: set[str] = set()
        replayed = 0
        if subscriber is not None:
            where = Filter(subscriber, where.account, where.reason)

        def chosen(dl: DeadLetter) -> bool:
            if wanted is not None and dl.record.id not in wanted:
                return False
            return where(dl.record)

        async with self._reader() as reader:
            due = await reader.channel.get_exchange(
                due_exchange(self._cfg.broker.queue), ensure=True
            )
            # Only what was there at the start: a replay that fails fast comes back as a new
            # dead letter while the scan runs, and must not be replayed again and again.
            present = int(reader.queue.declaration_result.message_count or 0)
            async for message, dl in self._scan(reader, "scanned"):
                present -= 1
                if present < 0 or not chosen(dl):
                    continue
                sub = dl.record.subscriber
                if sub and self._cfg.subscriber(sub) is None:
                    kept.add(dl.record.id)
                    missing.discard(dl.record.id)
                    continue
                await due.publish(self._replay_message(dl), routing_key="", mandatory=True)
                await reader.ack(message)
                missing.discard(dl.record.id)
                replayed += 1
                if wanted is not None and not missing:
                    break
        return replayed, missing, kept

    def _replay_message(self, dl: DeadLetter) -> aio_pika.Message:
        now = self._clock.wall()
        headers: dict[str, Any] = {k: v for k, v in dl.headers.items() if k in CARRIED_HEADERS}
        sub = dl.record.subscriber
        if sub:
            headers.update(Delivery(sub, 1, now).headers())
        # Without a subscriber (an invalid event, a broker dead letter) it goes back through
        # the whole pipeline as a new event.
        return aio_pika.Message(
            dl.body,
            headers=headers,
            message_id=dl.record.event_id or derive_event_id(dl.body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=now,
        )

    async def purge(self, where: Filter = EVERYTHING) -> int:
        """Delete the matching dead letters (all of them without a filter); the others stay,
        in their order."""
        async with self._reader() as reader:
            if where.everything:
                result = await reader.queue.purge()
                return int(getattr(result, "message_count", 0) or 0)
            purged = 0
            async for message, dl in self._scan(reader, "scanned"):
                if where(dl.record):
                    await reader.ack(message)
                    purged += 1
            return purged
