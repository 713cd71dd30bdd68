"""The connection's frame reader: frames cut from large reads, and work-queue deliveries taken
straight from the bytes.

aiormq reads every frame with three ``readexactly`` calls into a ``BytesIO`` under a lock, and
pamqp builds an object per frame (a validated ``Basic.Deliver``, a ``ContentHeader`` with all
fourteen properties, a ``ContentBody``), each then handed through the connection's reader loop
into the channel's frame queue. On the work queue that was most of what a batched event cost.
`FrameReader` keeps aiormq's interface (an async iterator of ``(weight, channel, frame)``) and
does two things instead:

- It reads whatever the socket has (up to `_READ` bytes) and cuts frames from that buffer.
  Every frame it returns is pamqp's own, decoded by pamqp, so the connection and its channels
  see exactly what they would have.
- A ``Basic.Deliver`` to a consumer tag a `DeliveryTap` registered (see `register`) is not
  returned at all: its content header and body frames, which follow it on its channel, are
  gathered here and the tap is handed the delivery's fields, decoded from the bytes (only the
  three properties the pipeline reads: ``headers``, ``message_id``, ``timestamp``).

The connection's reader counts a returned frame as a sign of life (it drops a connection that
shows none for its heartbeat grace), and a broker busy sending deliveries sends no heartbeats.
So whenever deliveries were taken and the reader has to wait for the socket, it first returns
a heartbeat frame of its own on channel 0, which the connection takes as just that.

`install` puts the reader in place of aiormq's for the connections made after it. If aiormq's
reader is not where this expects it (another aiormq), nothing is installed, and `DeliveryTap`
still takes deliveries from the channel's frame queue, one step later.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
import weakref
from typing import TYPE_CHECKING, Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import decode
from pamqp.exceptions import PAMQPException
from pamqp.heartbeat import Heartbeat

if TYPE_CHECKING:
    from dispatcher.broker.work_consumer import DeliveryTap

__all__ = ["YIELD_EVERY", "FrameReader", "install", "installed", "register"]

_READ = 1 << 18  # bytes asked of the socket at a time
_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_DELIVER = b"\x00\x3c\x00\x3c"  # Basic.Deliver's method index (class 60, method 60)
_TAG_BITS = struct.Struct(">QB")  # delivery tag, redelivered
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, property flags
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_END = 0xCE
# Deliveries taken between two turns of the event loop. aiormq's reader does not wait while
# frames are buffered, so a burst of deliveries would otherwise be taken in one stretch while
# the work they started (a closed batch's POST, the answers that settle them) waits behind it.
YIELD_EVERY = 16

# Consumer tags whose deliveries are taken from the bytes (unique per consume: a uuid).
_taps: weakref.WeakValueDictionary[bytes, DeliveryTap] = weakref.WeakValueDictionary()

_AiormqReader: Any = getattr(aiormq.connection, "FrameReceiver", None)


def register(tag: str, tap: DeliveryTap) -> None:
    """Deliveries to ``tag`` go to ``tap`` from now on (until the tap is gone or stopped)."""
    _taps[tag.encode()] = tap


def installed() -> bool:
    return _AiormqReader is not None and aiormq.connection.FrameReceiver is FrameReader


def _fits(reader: Any) -> bool:
    """Is this aiormq's reader the one `FrameReader` extends: made from a stream reader alone,
    read through ``get_frame``?"""
    if reader is None or not callable(getattr(reader, "get_frame", None)):
        return False
    try:
        params = list(inspect.signature(reader.__init__).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["self", "reader"]


def install() -> bool:
    """Use `FrameReader` for every aiormq connection made from now on; False if this aiormq
    does not read frames the way this expects (then nothing changed)."""
    if not _fits(_AiormqReader):
        return False
    setattr(aiormq.connection, "FrameReceiver", FrameReader)  # noqa: B010 (a module's name)
    return True


class _Gathering:
    """A tapped delivery whose content frames are still arriving."""

    __slots__ = (
        "delivery_tag",
        "exchange",
        "fields",
        "got",
        "parts",
        "redelivered",
        "routing_key",
        "size",
        "tap",
    )

    def __init__(
        self, tap: DeliveryTap, delivery_tag: int, redelivered: bool, exchange: str, key: str
    ) -> None:
        self.tap = tap
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = key
        self.fields: tuple[Any, Any, Any] | None = None  # headers, message_id, timestamp
        self.size = 0
        self.got = 0
        self.parts: list[bytes] = []


_Base: Any = _AiormqReader if _AiormqReader is not None else object


class FrameReader(_Base):  # type: ignore[misc]
    """aiormq's frame reader, reading in bulk and taking registered deliveries itself."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._data = b""
        self._at = 0
        self._gathering: dict[int, _Gathering] = {}
        self._quiet = False  # frames were taken since one was last returned
        self._handed = 0  # deliveries handed to taps

    async def get_frame(self) -> tuple[int, int, Any]:
        if not self.started:
            # The protocol header's answer and Connection.Start: aiormq's own checks.
            first: tuple[int, int, Any] = await super().get_frame()
            return first
        while True:
            data, at = self._data, self._at
            if len(data) - at >= 8:
                kind, channel, size = _HEAD.unpack_from(data, at)
                end = at + 7 + size  # the frame-end octet
                if end < len(data):
                    if data[end] != _FRAME_END:
                        raise InvalidFrameError(
                            f"frame end octet {data[end]:#04x} on channel {channel}"
                        )
                    self._at = end + 1
                    if channel and (channel in self._gathering or kind == _FRAME_METHOD):
                        handed = self._handed
                        if self._tapped(kind, channel, data, at + 7, end):
                            self._quiet = True
                            if self._handed != handed and self._handed % YIELD_EVERY == 0:
                                await asyncio.sleep(0)
                            continue
                    self._quiet = False
                    if kind == 8:
                        return 8, channel, Heartbeat()
                    try:
                        return pamqp.frame.unmarshal(data[at : end + 1])
                    except PAMQPException as exc:
                        raise InvalidFrameError(str(exc)) from exc
            if self._quiet:
                # Frames were taken and none returned since: a sign of life first.
                self._quiet = False
                return 8, 0, Heartbeat()
            await self._fill()

    async def _fill(self) -> None:
        # As aiormq's reader: a stream that had ended before the read is the iteration's end;
        # one that ends while the reader waits is a connection lost (the connection closes
        # with that error, and a robust one reconnects).
        left = len(self._data) - self._at
        if not left and self.reader.at_eof():
            raise StopAsyncIteration
        try:
            chunk = await self.reader.read(_READ)
        except (ConnectionError, OSError) as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        if not chunk:
            raise AMQPConnectionError(
                f"Server connection unexpectedly closed. Read {left} bytes of a frame"
            )
        self._data = self._data[self._at :] + chunk if self._at < len(self._data) else chunk
        self._at = 0

    def _tapped(self, kind: int, channel: int, data: bytes, start: int, end: int) -> bool:
        """Takes the frame ``data[start:end]`` into a tapped delivery; False if it is not one."""
        try:
            gathering = self._gathering.get(channel)
            if gathering is None:
                return kind == _FRAME_METHOD and self._deliver(channel, data, start)
            if kind == _FRAME_HEADER and gathering.fields is None:
                self._header(gathering, data, start, end)
            elif kind == _FRAME_BODY and gathering.fields is not None:
                gathering.parts.append(data[start:end])
                gathering.got += end - start
            else:
                # A frame out of place (the broker broke the message off): what was gathered
                # is dropped unacked, as aiormq would, and the broker redelivers it.
                del self._gathering[channel]
                return False
        except (IndexError, ValueError, UnicodeDecodeError, struct.error) as exc:
            raise InvalidFrameError(
                f"malformed delivery frame on channel {channel}: {exc}"
            ) from exc
        if gathering.fields is not None and gathering.got >= gathering.size:
            del self._gathering[channel]
            parts = gathering.parts
            body = b"" if not parts else parts[0] if len(parts) == 1 else b"".join(parts)
            headers, message_id, timestamp = gathering.fields
            self._handed += 1
            gathering.tap.hand(
                body,
                gathering.delivery_tag,
                gathering.exchange,
                gathering.routing_key,
                gathering.redelivered,
                headers,
                message_id,
                timestamp,
            )
        return True

    def _deliver(self, channel: int, data: bytes, at: int) -> bool:
        if data[at : at + 4] != _DELIVER:
            return False
        n = data[at + 4]
        tap = _taps.get(data[at + 5 : at + 5 + n])
        if tap is None or tap.stopped:
            return False
        at += 5 + n
        delivery_tag, bits = _TAG_BITS.unpack_from(data, at)
        at += 9
        n = data[at]
        exchange = data[at + 1 : at + 1 + n].decode()
        at += 1 + n
        n = data[at]
        key = data[at + 1 : at + 1 + n].decode()
        self._gathering[channel] = _Gathering(tap, delivery_tag, bool(bits & 1), exchange, key)
        return True

    @staticmethod
    def _header(gathering: _Gathering, data: bytes, at: int, end: int) -> None:
        _, _, size, flags = _CONTENT.unpack_from(data, at)
        if flags & 1:
            raise ValueError("continued property flags")
        at += 14
        headers = message_id = timestamp = None
        if flags & 0x8000:  # content-type
            at += 1 + data[at]
        if flags & 0x4000:  # content-encoding
            at += 1 + data[at]
        if flags & 0x2000:  # headers
            used, headers = decode.field_table(data[at:end])
            at += used
        if flags & 0x1000:  # delivery-mode
            at += 1
        if flags & 0x0800:  # priority
            at += 1
        for bit in (0x0400, 0x0200, 0x0100):  # correlation-id, reply-to, expiration
            if flags & bit:
                at += 1 + data[at]
        if flags & 0x0080:  # message-id
            n = data[at]
            message_id = data[at + 1 : at + 1 + n].decode()
            at += 1 + n
        if flags & 0x0040:  # timestamp
            timestamp = decode.timestamp(data[at : at + 8])[1]
        if at > end:
            raise ValueError("properties run past the frame")
        gathering.fields = (headers, message_id, timestamp)
        gathering.size = size
