"""Test harness: unique broker names, real aiohttp receivers on loopback, a running dispatcher.

Nothing here mocks the broker or HTTP: receivers are aiohttp servers on 127.0.0.1 and the
dispatcher talks to the real RabbitMQ. Every test declares its own exchange and queues under a
unique prefix and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import orjson
import pytest
from aiohttp import web

from dispatcher.broker.publisher import event_message
from dispatcher.broker.topology import delete
from dispatcher.config import Config, parse_config
from dispatcher.process.daemon import Dispatcher

# The one broker setting every test takes its broker from (`make test-rabbitmq4` points it at the
# RabbitMQ 4 node on 5673); the rest is derived from it.
BROKER_URL = os.environ.get("DISPATCHER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
_BROKER = urlsplit(BROKER_URL)
BROKER_HOST = _BROKER.hostname or "127.0.0.1"
BROKER_PORT = _BROKER.port or 5672
# The queue type of the tests' configs (tests of quorum behaviour set it themselves).
QUEUE_TYPE = os.environ.get("DISPATCHER_TEST_QUEUE_TYPE", "classic")
# How to run rabbitmqctl against that broker: DISPATCHER_TEST_RABBITMQCTL (a command line, e.g.
# "scripts/ensure-rabbitmq4 ctl" for the node in its chroot), else rabbitmqctl on PATH; None
# when neither exists.
RABBITMQCTL: list[str] | None = shlex.split(os.environ.get("DISPATCHER_TEST_RABBITMQCTL", "")) or (
    [found] if (found := shutil.which("rabbitmqctl")) else None
)
RABBITMQCTL_FROM_ENV = bool(os.environ.get("DISPATCHER_TEST_RABBITMQCTL", "").strip())


def broker_url(*, port: int | None = None, password: str | None = None, query: str = "") -> str:
    """`BROKER_URL` through another port (a proxy in front of the broker), with another
    password, and/or with query options (``"reconnect_interval=0.3"``)."""
    user = _BROKER.username or "guest"
    secret = (_BROKER.password or "guest") if password is None else password
    netloc = f"{user}:{secret}@{BROKER_HOST}:{port or BROKER_PORT}"
    return urlunsplit((_BROKER.scheme, netloc, _BROKER.path or "/", query.lstrip("?"), ""))


SEED_EVENT = (
    b'{"event": "Message.Bounced", "timestamp": "2026-03-12T09:14:02Z", "data": '
    b'{"messageid": "msg12345", "recipient": "invalid@example.com", "bounce_type": "HardBounce",'
    b' "diagnostic_code": "550 5.1.1 User unknown"}}'
)


def event_body(
    event: str = "Message.Bounced",
    *,
    n: int = 0,
    event_id: str | None = None,
    recipient: str | None = None,
    bounce_type: str = "HardBounce",
    account: str | None = None,
    **data_fields: Any,
) -> bytes:
    data: dict[str, Any] = {
        "messageid": f"msg{n}",
        "recipient": recipient or f"user{n}@example.com",
    }
    if event == "Message.Bounced":
        data.update(bounce_type=bounce_type, diagnostic_code="550 5.1.1 User unknown")
    data.update(data_fields)
    doc: dict[str, Any] = {"event": event, "timestamp": "2026-03-12T09:14:02Z", "data": data}
    if event_id is not None:
        doc["id"] = event_id
    if account is not None:
        doc["account"] = account
    return orjson.dumps(doc)


# --- receivers ------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


Behaviour = Callable[["Receiver", web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """One endpoint on a real aiohttp server; records every request it answers."""

    path: str
    behaviour: Behaviour | None = None
    requests: list[Received] = field(default_factory=list)  # answered 2xx
    failures: list[Received] = field(default_factory=list)  # answered otherwise
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    @property
    def count(self) -> int:
        return len(self.requests)

    def ids(self) -> list[str]:
        return [r.headers.get("webhook-id", "") for r in self.requests]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.read()
            n = self.attempts + 1
            if self.behaviour is not None:
                resp = await self.behaviour(self, request, n)
            else:
                resp = web.Response(status=204)
            if 200 <= getattr(resp, "status", 0) < 300:
                self.requests.append(Received(dict(request.headers), body, time.time()))
            else:
                self.failures.append(Received(dict(request.headers), body, time.time()))
            return resp
        finally:
            self.in_flight -= 1

    @property
    def attempts(self) -> int:
        return len(self.requests) + len(self.failures)


class ReceiverServer:
    """An aiohttp server on 127.0.0.1 hosting any number of `Receiver` endpoints."""

    def __init__(self) -> None:
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.receivers: dict[str, Receiver] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add(self, name: str, behaviour: Behaviour | None = None) -> Receiver:
        rec = Receiver(path=f"/hooks/{name}", behaviour=behaviour)
        self.receivers[name] = rec
        if self.port:
            rec.url = f"http://127.0.0.1:{self.port}{rec.path}"
        return rec

    async def _route(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        rec = self.receivers.get(name)
        if rec is None:
            return web.Response(status=404)
        return await rec.handle(request)

    async def __aenter__(self) -> ReceiverServer:
        self.app.router.add_post("/hooks/{name}", self._route)
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined,union-attr]
        for rec in self.receivers.values():
            rec.url = f"http://127.0.0.1:{self.port}{rec.path}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def fail_times(n: int, status: int = 500) -> Behaviour:
    async def behaviour(_: Receiver, __: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=status if count <= n else 200)

    return behaviour


def always(status: int, headers: dict[str, str] | None = None) -> Behaviour:
    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=status, headers=headers or {})

    return behaviour


def hang(seconds: float = 3600) -> Behaviour:
    async def behaviour(_: Receiver, __: web.Request, ___: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=200)

    return behaviour


def slow(seconds: float) -> Behaviour:
    return hang(seconds)


# --- config and broker ----------------------------------------------------------------------


@dataclass
class Names:
    prefix: str

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def queue(self) -> str:
        return f"{self.prefix}.dispatch"


def unique_names() -> Names:
    return Names(prefix=f"test-{uuid.uuid4().hex[:10]}")


def config_doc(
    names: Names, keys_dir: str, subscribers: list[dict[str, Any]], **sections: Any
) -> dict[str, Any]:
    """The TOML document (as data) for a test config; `make_config` validates it."""
    doc: dict[str, Any] = {
        "allow_private_networks": True,
        "broker": {
            "url": BROKER_URL,
            "exchange": names.exchange,
            "queue": names.queue,
            "queue_type": QUEUE_TYPE,
            "prefetch": 256,
        },
        "http": {"listen": "127.0.0.1:0"},
        "signing": {"keys_dir": keys_dir, "token_ttl": "5m"},
        "retry": {"schedule": ["50ms", "100ms", "150ms"], "jitter": 0.0, "max_age": "1h"},
        # Tests of the schedule must not see the breaker; breaker tests lower this.
        "breaker": {"failure_threshold": 1000, "cooldown": "1s"},
        "dispatcher": {"drain_timeout": "5s", "log_level": "warning", "log_format": "json"},
        "subscribers": subscribers,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def make_config(
    names: Names,
    keys_dir: str,
    subscribers: list[dict[str, Any]],
    *,
    env: dict[str, str] | None = None,
    **sections: Any,
) -> Config:
    return parse_config(config_doc(names, keys_dir, subscribers, **sections), env or {})


async def cleanup_topology(config: Config, subscribers: Iterable[str] = ()) -> None:
    """Delete the config's topology and the parking queues of its (and these) subscribers."""
    ids = {s.id for s in config.subscribers} | set(subscribers)
    connection = await aio_pika.connect(config.broker.url)
    async with connection:
        channel = await connection.channel()
        await delete(channel, config.broker, sorted(ids))


class Publisher:
    """Publishes events with confirms, as a delivery node would."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def __aenter__(self) -> Publisher:
        self._conn = await aio_pika.connect(self._config.broker.url)
        channel = await self._conn.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(
            self._config.broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str | None = None,
        message_id: str | None = None,
        **props: Any,
    ) -> None:
        assert self._exchange is not None
        message, key = event_message(body, now=time.time())
        if message_id is not None:
            message.message_id = message_id
        for name, value in props.items():
            setattr(message, name, value)
        await self._exchange.publish(message, routing_key=routing_key or key)

    async def publish_many(self, bodies: list[bytes], batch: int = 200) -> None:
        for i in range(0, len(bodies), batch):
            await asyncio.gather(*(self.publish(b) for b in bodies[i : i + batch]))


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def settle(duration: float = 0.3) -> None:
    """Let in-flight work finish before asserting that nothing more arrives."""
    await asyncio.sleep(duration)


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Dispatcher]:
    async with Dispatcher(config) as disp:
        yield disp


async def wait_for_dead_letters(config: Config, n: int, timeout: float = 15.0) -> list[Any]:
    """Poll the dead-letter queue (non-destructively) until it holds ``n`` records."""
    deadline = time.monotonic() + timeout
    letters = await dead_letters(config)
    while len(letters) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        letters = await dead_letters(config)
    return letters


async def dead_letters(config: Config) -> list[Any]:
    from dispatcher.broker.dead_letters import DeadLetterTool

    return await DeadLetterTool(config, progress=None).list()


def require_broker() -> None:
    """Fail the run at once, saying how to start it, when RabbitMQ is not answering (a test
    tier that needs the broker calls this once per session)."""
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
            return
    except OSError:
        pass
    pytest.fail(
        f"RabbitMQ is not answering on {BROKER_HOST}:{BROKER_PORT} (DISPATCHER_TEST_BROKER_URL;"
        " start it: scripts/ensure-broker, or scripts/ensure-rabbitmq4 for 5673)"
    )


async def wait_ready(port: int, timeout: float = 20.0, want: int = 200) -> bool:
    """Poll GET /readyz until it answers ``want``."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == want:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    return False
