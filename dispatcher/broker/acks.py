"""Acknowledgements in groups: one ``basic.ack(multiple=True)`` for many settled messages.

The pipeline decides *whether* a message is acked or handed back (`Pipeline._finish` is the one
owner of that decision); this module decides *how the frames go out*. Deliveries on one channel
carry increasing tags, and an ack with ``multiple=True`` settles every outstanding tag up to
its own. So once per event-loop pass, for each channel:

    1. hand-backs go out first, one ``basic.nack(requeue=True)`` each (a multiple ack sent
       after them can no longer cover them);
    2. the longest run of consecutive settled tags from the oldest outstanding one goes out as
       a single ``basic.ack(multiple=True)`` of its highest acked tag (consecutive: a gap is a
       delivery this window never saw, which a multiple ack would settle unseen);
    3. acked tags behind a delivery still in flight wait at most ``max_delay`` (a slow
       delivery must not hold the others' acks, and with them the prefetch window), then go
       out one by one.

Nothing here waits for the broker (acks are not confirmed in AMQP); a channel that closed before
its acks went out makes the broker redeliver those messages, as it would have anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Protocol

import structlog

from dispatcher.clock import SYSTEM_CLOCK, Clock

__all__ = ["AckChannel", "AckWindow", "Acks"]

log = structlog.get_logger("dispatcher.acks")

_IN_FLIGHT, _ACK, _NACK, _SENT = 0, 1, 2, 3


class AckChannel(Protocol):
    """What the window needs of a channel (aiormq's, in production; a fake in unit tests)."""

    async def basic_ack(
        self, delivery_tag: int, multiple: bool = ..., wait: bool = ...
    ) -> None: ...

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = ..., requeue: bool = ..., wait: bool = ...
    ) -> None: ...


class AckWindow:
    """The outstanding deliveries of one channel and the frames that settle them."""

    def __init__(
        self,
        channel: AckChannel,
        *,
        max_delay: float = 0.02,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.channel = channel
        self.max_delay = max_delay
        self._monotonic = clock.monotonic  # when an ack was settled, for max_delay
        self._order: collections.deque[int] = collections.deque()  # outstanding tags, in order
        self._state: dict[int, int] = {}
        # Acked tags behind one still in flight, in the order they were settled (so oldest
        # first: a scan for the overdue ones stops at the first that is not).
        self._settled_at: dict[int, float] = {}
        self._nacks: list[int] = []  # handed back, frame not sent yet
        self.frames = 0  # frames sent (metrics and tests)
        self._next = 1  # the tag a run must start at: a channel's tags count from 1
        self.single = False  # a gap was found: no multiple acks on this channel any more
        self.outbox: collections.deque[tuple[str, int, bool]] = collections.deque()
        self.sender: asyncio.Task[None] | None = None
        self._gap_since: float | None = None

    def received(self, tag: int) -> None:
        if tag in self._state:
            return
        if self._order and tag < self._order[-1]:
            # Out of order (it does not happen with one consumer task per delivery, started in
            # order): keep the order sorted anyway, the prefix rule depends on it.
            ordered = sorted([*self._order, tag])
            self._order.clear()
            self._order.extend(ordered)
        else:
            self._order.append(tag)
        self._state[tag] = _IN_FLIGHT

    def settle(self, tag: int, ack: bool) -> None:
        if self._state.get(tag) != _IN_FLIGHT:
            if tag not in self._state:  # not registered (a probe fetched on its own): settle it
                self._order.append(tag)
            else:
                return  # settled twice: the first verdict stands
        self._state[tag] = _ACK if ack else _NACK
        if ack:
            self._settled_at[tag] = self._monotonic()
        else:
            self._nacks.append(tag)

    @property
    def pending(self) -> int:
        """Settled tags whose frame has not gone out yet."""
        return sum(1 for s in self._state.values() if s in (_ACK, _NACK))

    @property
    def outstanding(self) -> int:
        return len(self._order)

    def plan(self, now: float | None = None) -> list[tuple[str, int, bool]]:
        """The frames to send now, as (kind, tag, multiple), and forget what they settle.

        Pure bookkeeping: the caller sends them, in this order, on this channel.
        """
        now = self._monotonic() if now is None else now
        frames: list[tuple[str, int, bool]] = []
        # Per loop pass, so nothing here walks every outstanding delivery: with a full
        # prefetch window and one settled per pass, that walk cost more than the ack.
        for tag in self._nacks:
            if self._state.get(tag) == _NACK:
                frames.append(("nack", tag, False))
                self._state[tag] = _SENT
        self._nacks.clear()
        # The run must be of consecutive tags from the channel's first: a gap is a delivery
        # this window never saw (aiormq drops deliveries that arrive for a cancelled
        # consumer), and a multiple ack would settle it unseen. A gap that outlasts max_delay
        # is for good: from then on this channel's acks go one by one.
        highest = 0
        while self._order and (self._order[0] == self._next or self.single):
            tag = self._order[0]
            state = self._state.get(tag, _SENT)
            if state == _IN_FLIGHT:
                break
            self._order.popleft()
            self._state.pop(tag, None)
            self._settled_at.pop(tag, None)
            if state == _ACK:
                if self.single:
                    frames.append(("ack", tag, False))
                else:
                    highest = tag
            self._next = tag + 1
        if highest:
            frames.append(("ack", highest, True))
        if self._order and self._order[0] != self._next and not self.single:
            head = self._order[0]
            since = self._gap_since = self._gap_since if self._gap_since is not None else now
            if self._state.get(head) != _IN_FLIGHT and now - since >= self.max_delay:
                self.single = True
                log.warning("ack_gap", missing_from=self._next, next_seen=head)
                return frames + self.plan(now)
        else:
            self._gap_since = None
        if self._settled_at:
            cutoff = now - self.max_delay
            overdue = []
            for tag, at in self._settled_at.items():
                if at > cutoff:
                    break
                overdue.append(tag)
            for tag in overdue:
                del self._settled_at[tag]
                if self._state.get(tag) == _ACK:
                    frames.append(("ack", tag, False))
                    self._state[tag] = _SENT
        self.frames += len(frames)
        return frames

    def next_deadline(self) -> float | None:
        """When the oldest straggler must go out, if any waits."""
        for at in self._settled_at.values():
            return at + self.max_delay  # the first is the oldest
        return None


class Acks:
    """The ack windows of every channel a worker consumes on, flushed once per loop pass."""

    def __init__(self, *, max_delay: float = 0.02, clock: Clock = SYSTEM_CLOCK) -> None:
        self._max_delay = max_delay
        self._clock = clock  # the windows' too
        self._monotonic = clock.monotonic
        self._windows: dict[int, AckWindow] = {}
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def _window(self, channel: Any) -> AckWindow:
        window = self._windows.get(id(channel))
        if window is None or window.channel is not channel:
            window = self._windows[id(channel)] = AckWindow(
                channel, max_delay=self._max_delay, clock=self._clock
            )
        return window

    def received(self, channel: Any, tag: int | None) -> None:
        if tag is not None:
            self._window(channel).received(tag)

    def settle(self, channel: Any, tag: int | None, ack: bool) -> None:
        if tag is None:
            return
        self._window(channel).settle(tag, ack)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    @property
    def frames(self) -> int:
        return sum(w.frames for w in self._windows.values())

    def _flush(self) -> None:
        self._scheduled = False
        now = self._monotonic()
        deadline: float | None = None
        for key, window in list(self._windows.items()):
            frames = window.plan(now)
            if frames:
                # One sender per channel, in order: a multiple ack overtaken by a later one
                # would name a tag the broker no longer knows (and it closes the channel).
                window.outbox.extend(frames)
                if window.sender is None or window.sender.done():
                    window.sender = asyncio.ensure_future(self._send(window))
                    self._sending.add(window.sender)
                    window.sender.add_done_callback(self._sending.discard)
            nxt = window.next_deadline()
            if nxt is not None:
                deadline = nxt if deadline is None else min(deadline, nxt)
            if getattr(window.channel, "is_closed", False):
                del self._windows[key]  # its unsettled messages are redelivered by the broker
        if deadline is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - now), self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    async def _send(self, window: AckWindow) -> None:
        channel, outbox = window.channel, window.outbox
        try:
            while outbox:
                kind, tag, multiple = outbox.popleft()
                if kind == "ack":
                    await channel.basic_ack(tag, multiple=multiple, wait=False)
                else:
                    await channel.basic_nack(tag, multiple=False, requeue=True, wait=False)
        except Exception as exc:  # the channel went away: the broker redelivers
            outbox.clear()
            log.warning("settle_failed", error=str(exc) or type(exc).__name__)

    async def close(self) -> None:
        """Send everything settled, stragglers included (shutdown)."""
        for window in self._windows.values():
            window.max_delay = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()
        if self._sending:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._sending), timeout=5)
