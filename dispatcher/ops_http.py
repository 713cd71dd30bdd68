"""The operations endpoints: /healthz, /readyz, /metrics and /.well-known/jwks.json."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["OpsServer"]


class OpsServer:
    """An aiohttp server on [http].listen, as an async context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        jwks: Callable[[], dict[str, Any]],
        jwks_max_age: float,
    ) -> None:
        self._host, self._port = host, port
        self._ready, self._metrics, self._jwks = ready, metrics, jwks
        self._max_age = int(jwks_max_age)
        self._runner: web.AppRunner | None = None
        self.port = port

    async def __aenter__(self) -> OpsServer:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/.well-known/jwks.json", self._jwks_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and getattr(server, "sockets", None):
            self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        if self._ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        resp = web.Response(body=self._metrics())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _jwks_handler(self, _: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(self._jwks()),
            content_type="application/json",
            headers={"Cache-Control": f"public, max-age={self._max_age}"},
        )
