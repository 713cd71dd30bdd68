"""Signing test fixtures: real keys on disk, real tokens, a real JWKS server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from signing_helpers import JwksServer, make_minter

from signing import KeyRing, TokenMinter


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.load(tmp_path / "keys")


@pytest.fixture
def es_ring(tmp_path: Path) -> KeyRing:
    return KeyRing.load(tmp_path / "es-keys", "ES256")


@pytest.fixture
def minter(ring: KeyRing) -> TokenMinter:
    return make_minter(ring)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    state = JwksServer()

    async def handler(request: web.Request) -> web.Response:
        state.requests += 1
        if state.status != 200:
            return web.Response(status=state.status, headers=state.headers)
        return web.json_response(state.document, headers=state.headers)

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        state.url = str(server.make_url("/.well-known/jwks.json"))
        yield state
