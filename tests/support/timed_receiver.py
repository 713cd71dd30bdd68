"""Receivers in a process of their own, for measurements of time at the subscriber.

A receiver inside the test process shares its event loop with pytest, the publisher and the
test's own polling: a stall there bunches requests that arrived a few hundred milliseconds apart
into one instant, and a one-second window counts requests that were never sent in it. This
process does nothing but answer and write down when each request began and ended
(``time.monotonic``, the same clock in every process on the machine).

    python tests/support/timed_receiver.py PORT '{"paced": {"delay": 0, "status": 204}}'

``POST /hooks/<name>`` answers as configured; ``GET /spans/<name>`` returns the
``[[start, end], ...]`` and webhook ids recorded so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web


def _app(behaviours: dict[str, dict[str, Any]]) -> web.Application:
    spans: dict[str, list[tuple[float, float]]] = {name: [] for name in behaviours}
    ids: dict[str, list[str]] = {name: [] for name in behaviours}

    async def hook(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        name = request.match_info["name"]
        how = behaviours.get(name)
        if how is None:
            return web.Response(status=404)
        try:
            await request.read()
            if how.get("delay"):
                await asyncio.sleep(how["delay"])
            status = int(how.get("status", 204))
            if 200 <= status < 300:
                ids[name].append(request.headers.get("webhook-id", ""))
            return web.Response(status=status)
        finally:
            spans[name].append((started, time.monotonic()))

    async def report(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response({"spans": spans.get(name, []), "ids": ids.get(name, [])})

    app = web.Application()
    app.router.add_post("/hooks/{name}", hook)
    app.router.add_get("/spans/{name}", report)
    return app


class TimedReceivers:
    """The receiver process, seen from the test: URLs, and what each receiver recorded."""

    def __init__(self, behaviours: dict[str, dict[str, Any]]) -> None:
        self.behaviours = behaviours
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{name}"

    async def __aenter__(self) -> TimedReceivers:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.port), json.dumps(self.behaviours)], env=env
        )
        self._http = aiohttp.ClientSession()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.get(f"http://127.0.0.1:{self.port}/spans/-") as resp:
                    if resp.status == 200:
                        return self
            await asyncio.sleep(0.1)
        raise RuntimeError("the timed receiver did not start")

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    async def recorded(self, name: str) -> tuple[list[tuple[float, float]], list[str]]:
        """(spans, webhook ids of the 2xx answers) recorded so far for ``name``."""
        assert self._http is not None
        async with self._http.get(f"http://127.0.0.1:{self.port}/spans/{name}") as resp:
            doc = await resp.json()
        return [(s, e) for s, e in doc["spans"]], list(doc["ids"])


if __name__ == "__main__":
    web.run_app(
        _app(json.loads(sys.argv[2])),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        print=None,
        access_log=None,
        handle_signals=True,
    )
