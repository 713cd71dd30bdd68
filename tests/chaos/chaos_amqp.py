"""A bare AMQP 0-9-1 publisher: pamqp frames on a socket, publisher confirms, nothing else.

aio-pika (through aiormq) fills in a random ``message_id`` on every message published without
one, so with it a delivery node can never send an event *without* a message id, and the
contract's "else the body's id, else one derived from the body" could not be exercised. This
publisher sends exactly the properties it is given, as other client libraries do.

    async with RawPublisher() as pub:
        await pub.publish("email.events", "Message.Bounced", body, Basic.Properties(...))
        await pub.confirmed()
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pamqp import body as amqp_body
from pamqp import commands, frame, header
from pamqp.exceptions import UnmarshalingException

from tests.support.harness import BROKER_HOST, BROKER_PORT

__all__ = ["RawPublisher"]


class RawPublisher:
    def __init__(
        self,
        host: str = BROKER_HOST,
        port: int = BROKER_PORT,
        *,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
    ) -> None:
        self._addr = (host, port)
        self._auth = f"\0{user}\0{password}"
        self._vhost = vhost
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""
        self._frame_max = 131072
        self._published = 0
        self._pending: set[int] = set()  # delivery tags not yet confirmed
        self._nacked: list[int] = []

    async def __aenter__(self) -> RawPublisher:
        self._reader, self._writer = await asyncio.open_connection(*self._addr)
        self._writer.write(frame.marshal(header.ProtocolHeader(), 0))
        await self._expect(commands.Connection.Start)
        self._send(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "chaos raw publisher"},
                mechanism="PLAIN",
                response=self._auth,
            ),
        )
        tune = await self._expect(commands.Connection.Tune)
        self._frame_max = tune.frame_max or self._frame_max
        self._send(
            0,
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=self._frame_max, heartbeat=0
            ),
        )
        self._send(0, commands.Connection.Open(virtual_host=self._vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(1, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is None:
            return
        with contextlib.suppress(Exception):
            self._send(0, commands.Connection.Close(reply_code=200, reply_text="bye"))
            await asyncio.wait_for(self._expect(commands.Connection.CloseOk), 5)
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    def _send(self, channel: int, value: Any) -> None:
        assert self._writer is not None
        self._writer.write(frame.marshal(value, channel))

    async def _read_frame(self) -> Any:
        assert self._reader is not None
        while True:
            try:
                used, _, value = frame.unmarshal(self._buffer)
            except UnmarshalingException:
                chunk = await self._reader.read(65536)
                if not chunk:
                    raise ConnectionError("the broker closed the connection") from None
                self._buffer += chunk
                continue
            self._buffer = self._buffer[used:]
            return value

    async def _expect(self, kind: type) -> Any:
        while True:
            value = await self._read_frame()
            if isinstance(value, kind):
                return value
            if isinstance(value, commands.Channel.Close | commands.Connection.Close):
                raise ConnectionError(f"broker closed: {value.reply_code} {value.reply_text}")
            self._note(value)

    def _note(self, value: Any) -> None:
        if isinstance(value, commands.Basic.Ack | commands.Basic.Nack):
            tag = value.delivery_tag
            done = {t for t in self._pending if t <= tag} if value.multiple else {tag}
            self._pending -= done
            if isinstance(value, commands.Basic.Nack):
                self._nacked += sorted(done)

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: commands.Basic.Properties
    ) -> None:
        self._send(1, commands.Basic.Publish(exchange=exchange, routing_key=routing_key))
        self._send(1, header.ContentHeader(0, len(body), properties))
        step = self._frame_max - 8
        for i in range(0, len(body), step):
            self._send(1, amqp_body.ContentBody(body[i : i + step]))
        self._published += 1
        self._pending.add(self._published)
        assert self._writer is not None
        await self._writer.drain()

    async def confirmed(self, timeout: float = 30.0) -> None:
        """Wait until the broker has confirmed everything published; fail on a nack."""

        async def wait() -> None:
            while self._pending:
                self._note(await self._read_frame())

        await asyncio.wait_for(wait(), timeout)
        assert not self._nacked, f"the broker refused deliveries {self._nacked[:10]}"
