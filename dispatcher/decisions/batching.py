"""Batches: many events to one subscriber in one POST, for subscribers that opt in.

A subscriber with ``batch = { max_events, max_wait, max_bytes }`` gets its fresh deliveries
collected here, in the order they were consumed, and sent as one JSON array whose elements are
the exact published bytes of each event (``[`` + e1 + ``,`` + e2 + ... + ``]``, never
re-serialized). A batch is sent when it holds ``max_events`` events, when one more event would
take it past ``max_bytes``, when its oldest event has waited ``max_wait``, or at once when the
consumer's prefetch window is full (a batch that waits for events the broker will not send
until something is acked would never fill).

From then on the batch is the unit: one attempt, one verdict for the breaker, one retry or park
or dead letter (the array is the message body; its id and size travel in headers, so a retried
batch keeps its id and members). Each member's work-queue message waits on its batch, and is
acked only once the batch is delivered or durably in the retry tiers, parking or dead letters.

This module decides and collects; it does no I/O. The pipeline sends.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from dispatcher.config import BatchConfig, SubscriberConfig
from dispatcher.decisions.events import Event

__all__ = ["Batch", "Batcher", "Member", "batch_body", "new_batch_id", "window_for_batches"]

# Full batches of its largest batched subscriber the prefetch window should hold: with fewer,
# the worker, the broker and the subscriber take turns instead of working at once (measured
# with batches of 100: 3.7-3.9x the unbatched rate at a window of 256, 5.6x at 512, 7.3x at
# 1,024; loadtest/RESULTS.md).
WINDOW_BATCHES = 4


def new_batch_id() -> str:
    return "bat_" + os.urandom(12).hex()


def window_for_batches(prefetch: int, subscribers: Iterable[SubscriberConfig]) -> int | None:
    """The prefetch that holds `WINDOW_BATCHES` full batches of the largest batched
    subscriber, when ``prefetch`` holds fewer; None when it is enough (or nobody batches)."""
    largest = max((s.batch.max_events for s in subscribers if s.batch is not None), default=0)
    wanted = WINDOW_BATCHES * largest
    return wanted if prefetch < wanted else None


def batch_body(bodies: list[bytes]) -> bytes:
    """The exact bytes of each event, as a JSON array."""
    return b"[" + b",".join(bodies) + b"]"


@dataclass(frozen=True, slots=True)
class Batch:
    """What is sent and settled in place of one event: the fields the pipeline reads of an
    `Event` (``id``, ``body``, ``account``, ``type``, always ``"batch"``), and ``size``."""

    type: ClassVar[str] = "batch"
    id: str
    body: bytes
    size: int
    account: str | None = None


def _unwatched(_: BaseException | None) -> None:
    """What a member nobody waits on is told (the batcher's own tests)."""


@dataclass(slots=True)
class Member:
    """One event waiting in an open batch. ``settled`` is called once, when its batch is
    settled (with None) or could not be (with the exception): a callback, not a future, so a
    member needs no task waiting on it."""

    event: Event
    carry: dict[str, Any]
    settled: Callable[[BaseException | None], None] = _unwatched


class _Open:
    __slots__ = ("bytes", "members", "sub", "timer")

    def __init__(self, sub: SubscriberConfig) -> None:
        self.sub = sub
        self.members: list[Member] = []
        self.bytes = 2  # the brackets
        self.timer: asyncio.TimerHandle | None = None


Send = Callable[[SubscriberConfig, list[Member]], None]


class Batcher:
    """The open batches of one worker, one per batched subscriber.

    ``send(sub, members)`` is called (synchronously; it starts the sending) with each batch
    that closes. The batcher never waits on anything itself.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._open: dict[str, _Open] = {}

    def __len__(self) -> int:
        return sum(len(b.members) for b in self._open.values())

    def add(self, sub: SubscriberConfig, member: Member) -> None:
        policy = sub.batch
        assert policy is not None
        size = len(member.event.body) + 1
        current = self._open.get(sub.id)
        if current is not None and current.sub != sub:
            self._close(sub.id)  # a reload changed the subscriber: its old batch goes as it was
            current = None
        if current is not None and current.members and current.bytes + size > policy.max_bytes:
            self._close(sub.id)
            current = None
        if current is None:
            current = self._open[sub.id] = _Open(sub)
            current.timer = asyncio.get_running_loop().call_later(
                policy.max_wait, self._close, sub.id
            )
        current.members.append(member)
        current.bytes += size
        if full(policy, len(current.members), current.bytes):
            self._close(sub.id)

    def flush(self) -> int:
        """Close every open batch now (a full prefetch window, shutdown). Returns how many."""
        ids = list(self._open)
        for sub_id in ids:
            self._close(sub_id)
        return len(ids)

    def _close(self, sub_id: str) -> None:
        batch = self._open.pop(sub_id, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.members:
            self._send(batch.sub, batch.members)


def full(policy: BatchConfig, events: int, size: int) -> bool:
    """Is a batch of this many events and bytes ready to go without waiting?"""
    return events >= policy.max_events or size >= policy.max_bytes
