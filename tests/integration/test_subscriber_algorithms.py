"""A per-subscriber signing algorithm: each gets tokens of its own, every key in the JWKS."""

from __future__ import annotations

import base64

import orjson

from signing import WebhookVerifier
from tests.support.harness import Publisher, ReceiverServer, event_body, running, settle, wait_until


def header_of(token: str) -> dict[str, str]:
    part = token.split(".")[0]
    return orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


async def test_each_subscriber_gets_tokens_of_its_algorithm(
    make, receivers: ReceiverServer
) -> None:
    default = receivers.add("default")
    ec = receivers.add("ec")
    rsa = receivers.add("rsa")
    cfg = make(
        [
            {"id": "default", "url": default.url},
            {"id": "ec", "url": ec.url, "algorithm": "ES256"},
            {"id": "rsa", "url": rsa.url, "algorithm": "RS256"},
        ]
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish_many([event_body(n=i, event_id=f"a{i}") for i in range(3)])
        assert await wait_until(lambda: default.count == ec.count == rsa.count == 3)
        await settle()
        jwks = disp.keyring.jwks()
    assert {k["alg"] for k in jwks["keys"]} >= {"EdDSA", "ES256", "RS256"}
    for rec, alg in ((default, "EdDSA"), (ec, "ES256"), (rsa, "RS256")):
        verifier = WebhookVerifier(
            jwks=jwks, audience=rec.url, issuer=cfg.signing.issuer, algorithms=[alg]
        )
        for got in rec.requests:
            token = got.headers["Authorization"].removeprefix("Bearer ")
            assert header_of(token)["alg"] == alg
            claims = await verifier.verify(got.headers, got.body)
            assert isinstance(claims, dict) and claims["webhook_id"] == got.headers["webhook-id"]
