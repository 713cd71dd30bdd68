"""The core pipeline against the real broker and real receivers on loopback."""

from __future__ import annotations

import asyncio
import base64

import jwt
import orjson

from signing import KeyRing
from tests.support.harness import (
    SEED_EVENT,
    Publisher,
    ReceiverServer,
    always,
    dead_letters,
    event_body,
    hang,
    running,
    settle,
    wait_for_dead_letters,
    wait_until,
)


async def test_seed_event_is_delivered_byte_for_byte_to_matching_subscribers_only(
    make, receivers: ReceiverServer
) -> None:
    bounces = receivers.add("bounces")
    everything = receivers.add("everything")
    complaints = receivers.add("complaints")
    cfg = make(
        [
            {"id": "bounces", "url": bounces.url, "events": ["Message.Bounced"]},
            {"id": "everything", "url": everything.url, "events": ["*"]},
            {"id": "complaints", "url": complaints.url, "events": ["Message.Complained"]},
        ]
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish(SEED_EVENT, message_id="evt-seed-1")
        assert await wait_until(lambda: bounces.count == 1 and everything.count == 1)
        await settle()
        jwks = disp.keyring.jwks()

    assert complaints.count == 0
    for rec in (bounces, everything):
        got = rec.requests[0]
        assert got.body == SEED_EVENT
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["webhook-id"] == "evt-seed-1"
        assert got.headers["User-Agent"].startswith("bounce-dispatcher/")
        token = got.headers["Authorization"].removeprefix("Bearer ")
        key = jwt.PyJWK(jwks["keys"][0])
        claims = jwt.decode(
            token, key, algorithms=["EdDSA"], audience=rec.url, issuer=cfg.signing.issuer
        )
        assert claims["webhook_id"] == "evt-seed-1"
        assert claims["scope"] == "webhooks:deliver"
    assert (
        bounces.requests[0].headers["Authorization"]
        != everything.requests[0].headers["Authorization"]
    )


async def test_event_type_patterns_route(make, receivers: ReceiverServer) -> None:
    family = receivers.add("family")
    exact = receivers.add("exact")
    star = receivers.add("star")
    cfg = make(
        [
            {"id": "family", "url": family.url, "events": ["Message.*"]},
            {"id": "exact", "url": exact.url, "events": ["Message.Complained", "Message.Deferred"]},
            {"id": "star", "url": star.url, "events": ["*"]},
        ]
    )
    kinds = [
        "Message.Bounced",
        "Message.Deferred",
        "Message.Delivered",
        "Message.Complained",
        "Message.Unsubscribed",
    ]
    async with running(cfg), Publisher(cfg) as pub:
        for i, kind in enumerate(kinds):
            await pub.publish(event_body(kind, n=i, event_id=f"e{i}"))
        assert await wait_until(lambda: family.count == 5 and star.count == 5 and exact.count == 2)
        await settle()
    assert sorted(exact.ids()) == ["e1", "e3"]
    assert sorted(family.ids()) == [f"e{i}" for i in range(5)]


async def test_event_id_comes_from_body_id_then_message_id(make, receivers) -> None:
    rec = receivers.add("r")
    cfg = make([{"id": "r", "url": rec.url}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(n=1, event_id="from-body"))
        await pub.publish(event_body(n=2, event_id="body-wins"), message_id="random-stamp")
        await pub.publish(event_body(n=3), message_id="from-property")
        assert await wait_until(lambda: rec.count == 3)
    assert sorted(rec.ids()) == ["body-wins", "from-body", "from-property"]


async def test_failed_delivery_is_never_lost(make, receivers) -> None:
    broken = receivers.add("broken", always(500))
    timing_out = receivers.add("slow", hang(30))
    cfg = make(
        [
            {"id": "broken", "url": broken.url},
            {"id": "slow", "url": timing_out.url, "timeout": "200ms"},
        ],
        retry={"schedule": ["20ms"], "jitter": 0.0},
    )
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="keep-me"))
        letters = await wait_for_dead_letters(cfg, 2)
    assert broken.attempts == 2 and timing_out.attempts == 0
    assert sorted((d.record.subscriber, d.record.event_id, d.record.reason) for d in letters) == [
        ("broken", "keep-me", "attempts_exhausted"),
        ("slow", "keep-me", "attempts_exhausted"),
    ]
    by_sub = {d.record.subscriber: d for d in letters}
    assert by_sub["broken"].record.last_status == 500
    assert by_sub["slow"].record.last_error.startswith("timeout")
    assert by_sub["broken"].body == event_body(event_id="keep-me")


MALFORMED: list[tuple[str, bytes, dict]] = [
    ("not json", b"this is not json", {}),
    ("invalid utf-8", b'{"event": "Message.Bounced", "x": "\xff\xfe"}', {}),
    ("array", b'[{"event": "Message.Bounced"}]', {}),
    ("missing event", b'{"timestamp": "2026-03-12T09:14:02Z", "data": {}}', {}),
    (
        "unknown type",
        b'{"event": "Message.Exploded", "timestamp": "2026-03-12T09:14:02Z", "data": {}}',
        {},
    ),
    ("missing data", b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z"}', {}),
    ("bad recipient", event_body(recipient="not-an-address"), {}),
    ("bad bounce_type", event_body(bounce_type="Exploded"), {}),
    ("wrong type timestamp", b'{"event": "Message.Delivered", "timestamp": 5, "data": {}}', {}),
    (
        "oversized",
        b'{"event": "Message.Delivered", "timestamp": "2026-03-12T09:14:02Z", '
        b'"data": {"pad": "' + b"x" * 300_000 + b'"}}',
        {},
    ),
    ("empty", b"", {}),
    ("bad message_id", event_body(n=3), {"message_id": "has spaces in it"}),
]


async def test_malformed_messages_are_dead_lettered_while_valid_ones_flow(make, receivers) -> None:
    rec = receivers.add("r")
    cfg = make([{"id": "r", "url": rec.url}])
    async with running(cfg), Publisher(cfg) as pub:
        for i, (_, body, props) in enumerate(MALFORMED):
            await pub.publish(body, routing_key="Message.Bounced", **props)
            await pub.publish(event_body(n=i, event_id=f"good-{i}"))
        assert await wait_until(lambda: rec.count == len(MALFORMED))
        await settle()
    letters = await dead_letters(cfg)
    assert len(letters) == len(MALFORMED)
    assert all(d.record.reason.startswith("invalid_event: ") for d in letters)
    assert sorted(rec.ids()) == sorted(f"good-{i}" for i in range(len(MALFORMED)))
    assert {d.body for d in letters} == {body for _, body, _ in MALFORMED}
    reasons = {d.body: d.record.reason for d in letters}
    assert "not valid UTF-8 JSON" in reasons[b"this is not json"]
    assert "over the" in reasons[MALFORMED[9][1]]


async def test_redirect_is_not_followed(make, receivers) -> None:
    target = receivers.add("target")
    redirecting = receivers.add("redirect", always(307, {"Location": "/hooks/target"}))
    cfg = make([{"id": "redirect", "url": redirecting.url}], retry={"schedule": []})
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="r1"))
        assert await wait_until(lambda: redirecting.attempts == 1)
        await settle()
    assert target.count == 0
    [letter] = await dead_letters(cfg)
    assert letter.record.reason == "attempts_exhausted"
    assert letter.record.last_error.startswith("redirect: 307")


async def test_jwks_endpoint_serves_the_signing_key(make, receivers) -> None:
    import aiohttp

    rec = receivers.add("r")
    cfg = make([{"id": "r", "url": rec.url}])
    async with running(cfg) as disp, aiohttp.ClientSession() as http:
        assert disp.ops is not None
        base = f"http://127.0.0.1:{disp.ops.port}"
        async with http.get(f"{base}/.well-known/jwks.json") as resp:
            assert resp.status == 200
            jwks = await resp.json()
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
    ring = KeyRing.load(cfg.signing.keys_dir, create_if_empty=False)
    assert [k["kid"] for k in jwks["keys"]] == [ring.signing_key().kid]
    await asyncio.sleep(0)


async def test_posts_verify_with_our_verifier_jwcrypto_and_standard_webhooks(
    make, receivers
) -> None:
    import aiohttp
    from jwcrypto import jwk as jw_jwk
    from jwcrypto import jwt as jw_jwt
    from standardwebhooks.webhooks import Webhook

    from signing import WebhookVerifier

    secret = "whsec_" + "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IGZvciBobWFj"
    both = receivers.add("both")
    cfg = make(
        [{"id": "both", "url": both.url, "auth": "jwt+hmac", "hmac_secret_env": "BOTH_SECRET"}],
        env={"BOTH_SECRET": secret},
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish(SEED_EVENT, message_id="evt-verify")
        assert await wait_until(lambda: both.count == 1)
        assert disp.ops is not None
        jwks_url = f"http://127.0.0.1:{disp.ops.port}/.well-known/jwks.json"
        async with aiohttp.ClientSession() as http, http.get(jwks_url) as resp:
            jwks_text = await resp.text()
        got = both.requests[0]
        async with WebhookVerifier(
            jwks_url=jwks_url, audience=both.url, issuer=cfg.signing.issuer, hmac_secrets=secret
        ) as verifier:
            claims = await verifier.verify(got.headers, got.body)
    assert claims["webhook_id"] == "evt-verify" and claims["aud"] == both.url

    token = got.headers["Authorization"].removeprefix("Bearer ")
    keyset = jw_jwk.JWKSet.from_json(jwks_text)
    checked = jw_jwt.JWT(
        jwt=token,
        key=keyset,
        algs=["EdDSA"],
        check_claims={"iss": cfg.signing.issuer, "aud": both.url},
    )
    import hashlib

    body_hash = base64.urlsafe_b64encode(hashlib.sha256(SEED_EVENT).digest()).rstrip(b"=")
    assert orjson.loads(checked.claims)["body_sha256"] == body_hash.decode()

    Webhook(secret).verify(got.body, {k.lower(): v for k, v in got.headers.items()})


async def test_a_message_that_breaks_the_pipeline_twice_is_dead_lettered(make, receivers) -> None:
    rec = receivers.add("r")
    cfg = make([{"id": "r", "url": rec.url}])
    async with running(cfg) as disp, Publisher(cfg) as pub:
        assert disp.pipeline is not None
        real = disp.pipeline._deliver

        async def broken(event, sub, delivery, *rest):
            if event.id == "poison":
                raise RuntimeError("a bug")
            await real(event, sub, delivery, *rest)

        disp.pipeline._deliver = broken  # type: ignore[method-assign]
        await pub.publish(event_body(event_id="poison"))
        await pub.publish(event_body(n=1, event_id="fine"))
        [letter] = await wait_for_dead_letters(cfg, 1)
        assert await wait_until(lambda: rec.count == 1)
    assert letter.record.reason == "dispatch_error: RuntimeError: a bug"
    assert letter.record.event_id == "poison" and rec.ids() == ["fine"]


async def test_dispatch_headers_on_a_published_event_are_ignored(make, receivers) -> None:
    """A publisher cannot narrow an event to one subscriber or fake its attempt count."""
    one = receivers.add("one")
    two = receivers.add("two")
    cfg = make([{"id": "one", "url": one.url}, {"id": "two", "url": two.url}])
    forged = {
        "x-dispatch-subscriber": "one",
        "x-dispatch-attempt": 99,
        "x-published-at": "not-a-number",
        "x-dispatch-first-attempt": -5,
    }
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="forged"), headers=forged)
        assert await wait_until(lambda: one.count == 1 and two.count == 1)
        await settle()
    assert one.ids() == ["forged"] and two.ids() == ["forged"]
    assert await dead_letters(cfg) == []
