"""Subscriber endpoints that misbehave on purpose, on a real aiohttp server on loopback.

Unlike `harness.Receiver`, an `Endpoint` keeps only what accounting needs (the webhook-id of
each 2xx answer, and per attempt its status and times), so a run of tens of thousands of
events stays small. A behaviour gets the endpoint, the request and the attempt number *for
that webhook-id* (1 for the first time this id arrives), so "fail twice, then succeed" means
the same thing for every event.

The server can own a port before it listens: `EndpointServer(down=True)` reserves the port, so
subscriber URLs are known, and refuses connections until `up()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

__all__ = [
    "Behaviour",
    "Endpoint",
    "EndpointServer",
    "Hit",
    "abort_connection",
    "drip",
    "enormous",
    "flaky",
    "hang",
    "latency",
    "redirect",
    "respond",
]

Behaviour = Callable[["Endpoint", web.Request, int], Awaitable[web.StreamResponse]]
_ACCEPTED = web.RequestKey("chaos_accepted", bool)
_MEMBERS = web.RequestKey("chaos_batch_members", list)


@dataclass(slots=True)
class Hit:
    webhook_id: str
    attempt: int
    arrived: float
    answered: float
    status: int | None  # None: the handler never finished (client gone, cancelled, aborted)


@dataclass
class Endpoint:
    name: str
    behaviour: Behaviour | None = None
    keep_headers: bool = False
    url: str = ""
    receipts: list[str] = field(default_factory=list)  # webhook-id of every 2xx answer
    attempts: Counter[str] = field(default_factory=Counter)
    hits: list[Hit] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # when keep_headers
    bodies: list[bytes] = field(default_factory=list)  # when keep_headers
    bytes_sent: int = 0  # what enormous/drip behaviours managed to write
    in_flight: int = 0

    @property
    def requests(self) -> int:
        return len(self.hits)

    def accept(self, request: web.Request) -> None:
        """Count this request as received (a 2xx answer is on its way); once per request.
        Behaviours that stream call it when the status line goes out: the client may hang up
        mid-body (and the handler be cancelled) after it has seen the 2xx."""
        if not request.get(_ACCEPTED):
            request[_ACCEPTED] = True
            # A batch counts as a receipt of each member event (by the event's own id).
            self.receipts.extend(request.get(_MEMBERS) or [request.headers.get("webhook-id", "")])

    def hits_for(self, webhook_id: str) -> list[Hit]:
        return [h for h in self.hits if h.webhook_id == webhook_id]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        webhook_id = request.headers.get("webhook-id", "")
        self.attempts[webhook_id] += 1
        attempt = self.attempts[webhook_id]
        arrived = time.time()
        status: int | None = None
        self.in_flight += 1
        try:
            body = await request.read()
            if request.headers.get("webhook-batch-size"):
                request[_MEMBERS] = [str(e.get("id", "")) for e in orjson.loads(body)]
            if self.keep_headers:
                self.headers.append(dict(request.headers))
                self.bodies.append(body)
            if self.behaviour is None:
                resp: web.StreamResponse = web.Response(status=204)
            else:
                resp = await self.behaviour(self, request, attempt)
            status = resp.status
            if 200 <= status < 300:
                self.accept(request)
            return resp
        finally:
            self.in_flight -= 1
            self.hits.append(Hit(webhook_id, attempt, arrived, time.time(), status))


class EndpointServer:
    """One aiohttp server on 127.0.0.1 hosting `Endpoint`s at ``/hooks/<name>``."""

    def __init__(self, *, down: bool = False) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.port: int = self._sock.getsockname()[1]
        self._start_down = down
        self._runner: web.AppRunner | None = None

    def add(
        self, name: str, behaviour: Behaviour | None = None, *, keep_headers: bool = False
    ) -> Endpoint:
        endpoint = Endpoint(
            name, behaviour, keep_headers, url=f"http://127.0.0.1:{self.port}/hooks/{name}"
        )
        self.endpoints[name] = endpoint
        return endpoint

    def receipts(self) -> dict[str, list[str]]:
        return {name: e.receipts for name, e in self.endpoints.items()}

    async def _route(self, request: web.Request) -> web.StreamResponse:
        endpoint = self.endpoints.get(request.match_info["name"])
        if endpoint is None:
            return web.Response(status=404)
        return await endpoint.handle(request)

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    async def up(self) -> None:
        assert self._runner is None
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/hooks/{name}", self._route)
        app.router.add_route("*", "/{tail:.*}", self._route_any)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=0.5,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, backlog=1024).start()

    async def _route_any(self, request: web.Request) -> web.StreamResponse:
        # Anything that is not a POST to a hook (a followed redirect turned GET, a probe)
        # is counted on an endpoint named after the first path segment, if one exists.
        name = request.path.strip("/").split("/")[-1]
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            return web.Response(status=404)
        return await endpoint.handle(request)

    async def __aenter__(self) -> EndpointServer:
        if not self._start_down:
            await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            self._sock.close()


# --- behaviours ------------------------------------------------------------------------------


def respond(
    status: int,
    *,
    headers: dict[str, str] | None = None,
    times: int | None = None,
    body: bytes = b"",
) -> Behaviour:
    """Answer ``status`` (to the first ``times`` attempts of each event, then 200)."""

    async def behaviour(_: Endpoint, __: web.Request, attempt: int) -> web.StreamResponse:
        if times is not None and attempt > times:
            return web.Response(status=200)
        return web.Response(status=status, headers=headers or {}, body=body)

    return behaviour


def flaky(probability: float, rng: random.Random, status: int = 500) -> Behaviour:
    """Answer ``status`` with the given probability, else 204."""

    async def behaviour(_: Endpoint, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=status if rng.random() < probability else 204)

    return behaviour


def latency(low: float, high: float, rng: random.Random) -> Behaviour:
    """Answer 204 after a uniform delay: work that is in flight when a fault strikes."""

    async def behaviour(_: Endpoint, __: web.Request, ___: int) -> web.StreamResponse:
        await asyncio.sleep(rng.uniform(low, high))
        return web.Response(status=204)

    return behaviour


def hang(seconds: float = 3600.0, *, times: int | None = None) -> Behaviour:
    """Say nothing for ``seconds`` (past any sane timeout), then 200."""

    async def behaviour(_: Endpoint, __: web.Request, attempt: int) -> web.StreamResponse:
        if times is None or attempt <= times:
            await asyncio.sleep(seconds)
        return web.Response(status=200)

    return behaviour


def abort_connection(*, times: int | None = None) -> Behaviour:
    """Reset the TCP connection instead of answering."""

    async def behaviour(_: Endpoint, request: web.Request, attempt: int) -> web.StreamResponse:
        if times is not None and attempt > times:
            return web.Response(status=200)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close sends RST, not FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            transport.abort()
        raise asyncio.CancelledError  # nothing more to say on this connection

    return behaviour


def drip(total: int, interval: float, *, status: int = 200, times: int | None = None) -> Behaviour:
    """Send the status line, then the body one byte every ``interval`` seconds."""

    async def behaviour(
        endpoint: Endpoint, request: web.Request, attempt: int
    ) -> web.StreamResponse:
        if times is not None and attempt > times:
            return web.Response(status=200)
        resp = web.StreamResponse(status=status)
        resp.content_length = total
        await resp.prepare(request)
        for _ in range(total):
            await asyncio.sleep(interval)
            await resp.write(b".")  # a gone client raises here: no receipt is recorded
            endpoint.bytes_sent += 1
        await resp.write_eof()
        return resp

    return behaviour


def enormous(size: int, *, status: int = 200, chunk: int = 1 << 20) -> Behaviour:
    """Answer with a body of ``size`` bytes (tens of MB); count what could be written."""

    async def behaviour(endpoint: Endpoint, request: web.Request, _: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=status)
        resp.content_length = size
        await resp.prepare(request)
        if 200 <= status < 300:
            endpoint.accept(request)
        block = b"x" * chunk
        sent = 0
        try:
            while sent < size:
                piece = block[: size - sent]
                await resp.write(piece)
                sent += len(piece)
                endpoint.bytes_sent += len(piece)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the dispatcher hung up after its cap: the answer was already given
        return resp

    return behaviour


def redirect(location: str, status: int = 302) -> Behaviour:
    async def behaviour(_: Endpoint, __: web.Request, ___: int) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return behaviour
