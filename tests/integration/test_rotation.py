"""Key rotation under load: no delivery lost, no verification failure at the receiver."""

from __future__ import annotations

import asyncio
import base64

import orjson
from aiohttp import web

from signing import KeyRing, VerificationError, WebhookVerifier, prune, rotate
from tests.support.harness import Publisher, ReceiverServer, event_body, running, wait_until


def _kid(token: str) -> str:
    header = token.split(".", 1)[0]
    return orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


async def test_rotation_under_load(make, receivers: ReceiverServer) -> None:
    refused: list[str] = []
    kids: list[str] = []
    verifiers: dict[str, WebhookVerifier] = {}

    async def verifying(rec, request: web.Request, _: int) -> web.Response:
        try:
            claims = await verifiers["v"].verify(request.headers, await request.read())
        except VerificationError as exc:
            refused.append(exc.reason)
            return web.json_response({"error": exc.reason}, status=401)
        kids.append(_kid(request.headers["Authorization"].removeprefix("Bearer ")))
        assert claims["webhook_id"] == request.headers["webhook-id"]
        return web.Response(status=204)

    rec = receivers.add("verifying", verifying)
    cfg = make(
        [{"id": "verifying", "url": rec.url}], signing={"token_ttl": "10s", "jwks_max_age": "2s"}
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        assert disp.ops is not None
        verifiers["v"] = WebhookVerifier(
            jwks_url=f"http://127.0.0.1:{disp.ops.port}/.well-known/jwks.json",
            audience=rec.url,
            issuer=cfg.signing.issuer,
        )
        old = KeyRing.load(cfg.signing.keys_dir).signing_key().kid
        published = 0

        async def stream(seconds: float) -> None:
            nonlocal published
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                await pub.publish_many(
                    [event_body(n=published + i, event_id=f"k{published + i}") for i in range(10)]
                )
                published += 10
                await asyncio.sleep(0.05)

        await stream(1.0)
        # Published now, signs in 10 s (longer than the verifier's minimum refetch interval).
        new, retiring = rotate(
            cfg.signing.keys_dir, cfg.signing.algorithm, publish_lead=10.0, retire_after=2.0
        )
        assert [k.kid for k in retiring] == [old]
        await stream(13.0)
        assert await wait_until(lambda: rec.count == published, timeout=30)
        assert prune(cfg.signing.keys_dir) == [old]
        await asyncio.sleep(1.5)  # the daemon re-reads its keys every second
        await stream(0.5)
        assert await wait_until(lambda: rec.count == published, timeout=30)
        jwks_kids = [k["kid"] for k in disp.keyring.jwks()["keys"]]
        await verifiers["v"].close()

    assert refused == []
    assert old in kids and new.kid in kids
    assert kids.index(new.kid) > kids.index(old) and kids[-1] == new.kid
    assert sorted(set(rec.ids())) == sorted(f"k{i}" for i in range(published))
    assert jwks_kids == [new.kid]
