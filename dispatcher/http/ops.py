"""The operations endpoints (CONTRACT section 6), as an async context manager.

    GET /healthz                 200 while the process runs
    GET /readyz                  200 while connected to the broker and consuming, else 503
    GET /metrics                 Prometheus text exposition
    GET /.well-known/jwks.json   the public keys that may verify a live agent token

The server only asks: readiness, the metrics text and the JWKS are callbacks, so the same
server fronts one worker (`Dispatcher`) or the supervisor of several.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["OpsServer"]


class OpsServer:
    """An aiohttp server on [http].listen. ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        jwks: Callable[[], Mapping[str, Any]],
        jwks_max_age: float,
        status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._ready, self._metrics, self._jwks = ready, metrics, jwks
        self._status = status
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
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self._ready()
        body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
        if self._status is not None:
            body.update(self._status())
        return web.Response(
            body=orjson.dumps(body), status=200 if ready else 503, content_type="application/json"
        )

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
