"""The aiohttp middleware and decorator on a real app served on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from signing_helpers import (
    AUDIENCE,
    BODY,
    WEBHOOK_ID,
    claims_for,
    craft_token,
    headers_for,
    ring_header,
)

from signing import (
    WEBHOOK,
    KeyRing,
    TokenMinter,
    WebhookVerifier,
    generate_key,
    verified,
    webhook_middleware,
)

Client = TestClient[web.Request, web.Application]


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"webhook": request[WEBHOOK], "body": (await request.read()).decode()})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def verifier(ring: KeyRing) -> AsyncIterator[WebhookVerifier]:
    async with WebhookVerifier(jwks=ring.jwks(), audience=AUDIENCE) as v:
        yield v


@pytest.fixture
async def client(
    verifier: WebhookVerifier,
) -> AsyncIterator[Client]:
    app = web.Application(middlewares=[webhook_middleware(verifier, paths={"/hooks"})])
    app.router.add_post("/hooks", _echo)
    app.router.add_get("/health", _health)
    app.router.add_post("/single", verified(verifier)(_echo))
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def test_valid_webhook_reaches_the_handler_with_its_claims(
    client: Client, minter: TokenMinter
) -> None:
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    response = await client.post("/hooks", data=BODY, headers=headers_for(token))
    assert response.status == 200
    payload = await response.json()
    assert payload["webhook"]["webhook_id"] == WEBHOOK_ID
    assert payload["body"] == BODY.decode()


async def test_forged_webhook_gets_401_with_the_reason(
    client: Client, ring: KeyRing, tmp_path: Path
) -> None:
    forged = craft_token(ring_header(ring), claims_for(), key=generate_key(tmp_path / "forger"))
    response = await client.post("/hooks", data=BODY, headers=headers_for(forged))
    assert response.status == 401
    assert await response.json() == {"error": "bad_signature"}


async def test_unsigned_webhook_gets_401(client: Client) -> None:
    response = await client.post("/hooks", data=BODY, headers=headers_for(None))
    assert response.status == 401
    assert await response.json() == {"error": "missing_token"}


async def test_paths_outside_the_list_are_not_checked(
    client: Client,
) -> None:
    response = await client.get("/health")
    assert response.status == 200


async def test_decorator_protects_one_handler(client: Client, minter: TokenMinter) -> None:
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    ok = await client.post("/single", data=BODY, headers=headers_for(token))
    assert ok.status == 200
    replayed = await client.post("/single", data=BODY, headers=headers_for(token))
    assert replayed.status == 401
    assert await replayed.json() == {"error": "replayed"}
