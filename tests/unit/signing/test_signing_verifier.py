"""WebhookVerifier: every attack fails with its own reason, through `verify` and `verify_sync`
alike; JWKS fetched from a loopback server by the async (aiohttp) and the sync (urllib) client."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict
from signing_helpers import (
    AUDIENCE,
    BODY,
    ISSUER,
    WEBHOOK_ID,
    JwksServer,
    b64url,
    claims_for,
    craft_token,
    headers_for,
    hs256_token,
    make_minter,
    ring_header,
)

from signing import (
    KeyRing,
    MemoryReplayCache,
    TokenMinter,
    VerificationError,
    WebhookVerifier,
    generate_key,
    sign_hmac,
)
from signing.errors import REASONS
from signing.jwks_client import JwksClient, parse_jwks
from signing.jwks_sync import SyncJwksClient

Verify = Callable[[WebhookVerifier, Any, bytes], Awaitable[Any]]
_API: dict[str, str] = {"current": "async"}


@pytest.fixture(params=["async", "sync"], autouse=True)
def api(request: pytest.FixtureRequest) -> str:
    """Every test here runs through `verify` and through `verify_sync` (see `verify` below)."""
    _API["current"] = request.param
    return str(request.param)


async def _verify_async(verifier: WebhookVerifier, headers: Any, body: bytes) -> Any:
    return await verifier.verify(headers, body)


async def _verify_sync(verifier: WebhookVerifier, headers: Any, body: bytes) -> Any:
    # In a thread, as a WSGI server calls it, so the loopback JWKS server keeps answering.
    return await asyncio.to_thread(verifier.verify_sync, headers, body)


_VERIFY: dict[str, Verify] = {"async": _verify_async, "sync": _verify_sync}


async def verify(verifier: WebhookVerifier, headers: Any, body: bytes = BODY) -> Any:
    """The verifier's answer through the API this test run is for."""
    return await _VERIFY[_API["current"]](verifier, headers, body)


def _verifier(ring: KeyRing, **options: Any) -> WebhookVerifier:
    settings: dict[str, Any] = {"jwks": ring.jwks(), "audience": AUDIENCE, "issuer": ISSUER}
    settings.update(options)
    return WebhookVerifier(**settings)


async def _reason(verifier: WebhookVerifier, headers: Any, body: bytes = BODY) -> str:
    with pytest.raises(VerificationError) as caught:
        await verify(verifier, headers, body)
    assert caught.value.reason in REASONS
    return caught.value.reason


def _mint(minter: TokenMinter, **options: Any) -> str:
    settings: dict[str, Any] = {"audience": AUDIENCE, "webhook_id": WEBHOOK_ID, "body": BODY}
    settings.update(options)
    return minter.mint(**settings)


async def test_valid_token_returns_its_claims(ring: KeyRing, minter: TokenMinter) -> None:
    async with _verifier(ring) as verifier:
        claims = await verify(verifier, headers_for(_mint(minter)), BODY)
    assert isinstance(claims, dict)
    assert claims["webhook_id"] == WEBHOOK_ID
    assert claims["aud"] == AUDIENCE


async def test_es256_token(es_ring: KeyRing) -> None:
    async with _verifier(es_ring) as verifier:
        claims = await verify(verifier, headers_for(_mint(make_minter(es_ring))), BODY)
    assert isinstance(claims, dict)


@pytest.mark.parametrize(
    "headers",
    [
        lambda token: {"AUTHORIZATION": f"bearer {token}", "Webhook-Id": WEBHOOK_ID},
        lambda token: CIMultiDict({"Authorization": f"Bearer {token}", "WEBHOOK-ID": WEBHOOK_ID}),
    ],
    ids=["dict", "cimultidict"],
)
async def test_header_names_are_case_insensitive(
    ring: KeyRing, minter: TokenMinter, headers: Callable[[str], Any]
) -> None:
    async with _verifier(ring) as verifier:
        assert isinstance(await verify(verifier, headers(_mint(minter)), BODY), dict)


def _other_key_same_kid(ring: KeyRing, tmp_path: Path) -> str:
    forger = generate_key(tmp_path / "forger")
    return craft_token(ring_header(ring), claims_for(), key=forger)


def _tampered_claims(ring: KeyRing, minter: TokenMinter) -> str:
    header, _, signature = _mint(minter).split(".")
    payload = b64url(orjson.dumps(claims_for(aud=AUDIENCE, exp=int(time.time()) + 86_400)))
    return f"{header}.{payload}.{signature}"


def _hs256_with_public_key(ring: KeyRing, algorithm: str = "EdDSA") -> str:
    key = ring.signing_key(algorithm=algorithm)
    pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hs256_token(ring_header(ring, alg="HS256", kid=key.kid), claims_for(), pem)


def _other_alg(ring: KeyRing, tmp_path: Path, key_alg: str, token_alg: str) -> str:
    """A token that names `token_alg` and the kid of our `key_alg` key, signed by a forger."""
    forger = generate_key(tmp_path / f"forger-{token_alg}", token_alg)
    header = ring_header(ring, alg=token_alg, kid=ring.signing_key(algorithm=key_alg).kid)
    return craft_token(header, claims_for(), key=forger)


def _signed(ring: KeyRing, **claims: Any) -> str:
    """A token really signed with the ring's key, with these claims changed (None removes one)."""
    return craft_token(ring_header(ring), claims_for(**claims), key=ring.signing_key())


def _lifetime(ring: KeyRing, seconds: int) -> str:
    now = int(time.time())
    return craft_token(
        ring_header(ring), claims_for(iat=now, exp=now + seconds), key=ring.signing_key()
    )


def _hs256_with_raw_x(ring: KeyRing) -> str:
    x = ring.signing_key().public_jwk()["x"]
    return hs256_token(ring_header(ring, alg="HS256"), claims_for(), x.encode())


def _spare_bits_set(token: str) -> str:
    """The same token with the unused low bits of the signature's last character set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    return token[:-1] + alphabet[last ^ 1]


def _expired_token(ring: KeyRing) -> str:
    now = int(time.time())
    claims = claims_for(iat=now - 400, exp=now - 100)
    return craft_token(ring_header(ring), claims, key=ring.signing_key())


# Each attack: how to build the token (sent with `headers_for` and BODY), or where the headers or
# the body are the attack, the whole request (headers, body), from the ring (an EdDSA, an ES256 and
# an RS256 key, all published) and its default minter (EdDSA); the reason; optionally the
# verifier's options (`_prime`: the request was verified once already, as a captured request
# would be; `_edit`: then edited).
ATTACKS: dict[str, tuple[Any, ...]] = {
    "forged with another key under the same kid": (
        lambda ring, minter, tmp: _other_key_same_kid(ring, tmp),
        "bad_signature",
    ),
    "tampered body": (
        lambda ring, minter, tmp: (headers_for(_mint(minter)), BODY + b" "),
        "body_mismatch",
    ),
    "tampered claims": (
        lambda ring, minter, tmp: _tampered_claims(ring, minter),
        "bad_signature",
    ),
    "signature stripped": (
        lambda ring, minter, tmp: _mint(minter).rsplit(".", 1)[0] + ".",
        "bad_signature",
    ),
    "expired": (
        lambda ring, minter, tmp: _expired_token(ring),
        "expired",
    ),
    "issued in the future": (
        lambda ring, minter, tmp: _mint(minter, now=int(time.time()) + 120),
        "not_yet_valid",
    ),
    "wrong audience": (
        lambda ring, minter, tmp: _mint(minter, audience="https://other.example/hooks"),
        "wrong_audience",
    ),
    "wrong issuer": (
        lambda ring, minter, tmp: _mint(make_minter(ring, issuer="https://evil.example")),
        "wrong_issuer",
    ),
    "unknown kid": (
        lambda ring, minter, tmp: _mint(make_minter(KeyRing.load(tmp / "stranger"))),
        "unknown_kid",
    ),
    "alg none": (
        lambda ring, minter, tmp: craft_token(ring_header(ring, alg="none"), claims_for()),
        "algorithm_not_allowed",
    ),
    "HS256 keyed with the public key PEM": (
        lambda ring, minter, tmp: _hs256_with_public_key(ring),
        "algorithm_not_allowed",
    ),
    "HS256 keyed with the public x": (
        lambda ring, minter, tmp: _hs256_with_raw_x(ring),
        "algorithm_not_allowed",
    ),
    "ES256 token carrying an EdDSA key's kid": (
        lambda ring, minter, tmp: _other_alg(ring, tmp, "EdDSA", "ES256"),
        "algorithm_mismatch",
    ),
    "EdDSA token carrying an ES256 key's kid": (
        lambda ring, minter, tmp: _other_alg(ring, tmp, "ES256", "EdDSA"),
        "algorithm_mismatch",
    ),
    "RS256 token carrying an ES256 key's kid": (
        lambda ring, minter, tmp: _other_alg(ring, tmp, "ES256", "RS256"),
        "algorithm_mismatch",
    ),
    "ES256 token carrying an RS256 key's kid": (
        lambda ring, minter, tmp: _other_alg(ring, tmp, "RS256", "ES256"),
        "algorithm_mismatch",
    ),
    "HS256 keyed with the RSA public key PEM": (
        lambda ring, minter, tmp: _hs256_with_public_key(ring, "RS256"),
        "algorithm_not_allowed",
    ),
    "RS256 forged with another RSA key under our kid": (
        lambda ring, minter, tmp: craft_token(
            ring_header(ring, alg="RS256", kid=ring.signing_key(algorithm="RS256").kid),
            claims_for(),
            key=generate_key(tmp / "rsa-forger", "RS256"),
        ),
        "bad_signature",
    ),
    "year-long lifetime (really signed)": (
        lambda ring, minter, tmp: _lifetime(ring, 365 * 86_400),
        "lifetime_too_long",
    ),
    "lifetime one second over 15 minutes (really signed)": (
        lambda ring, minter, tmp: _lifetime(ring, 901),
        "lifetime_too_long",
    ),
    "nbf in the future (really signed)": (
        lambda ring, minter, tmp: _signed(ring, nbf=int(time.time()) + 600),
        "not_yet_valid",
    ),
    "exp not a number (really signed)": (
        lambda ring, minter, tmp: _signed(ring, exp="soon"),
        "malformed_token",
    ),
    "audience list without us (really signed)": (
        lambda ring, minter, tmp: _signed(ring, aud=["https://other.example/hooks"]),
        "wrong_audience",
    ),
    "wrong account": (
        lambda ring, minter, tmp: _mint(minter, account="globex"),
        "wrong_account",
        {"account": "acme"},
    ),
    "no account claim where one is required": (
        lambda ring, minter, tmp: _mint(minter),
        "wrong_account",
        {"account": "acme"},
    ),
    "account claim not a string": (
        lambda ring, minter, tmp: _signed(ring, account=["acme"]),
        "wrong_account",
        {"account": "acme"},
    ),
    "replay: exact": (
        lambda ring, minter, tmp: _mint(minter),
        "replayed",
        {"_prime": True},
    ),
    "replay: padding added": (
        lambda ring, minter, tmp: _mint(minter),
        "malformed_token",
        {"_prime": True, "_edit": lambda auth: auth + "=="},
    ),
    "replay: spare signature bits set": (
        lambda ring, minter, tmp: _mint(minter),
        "malformed_token",
        {"_prime": True, "_edit": _spare_bits_set},
    ),
    "token from another key (unknown kid, really signed)": (
        lambda ring, minter, tmp: _mint(
            make_minter(
                KeyRing.load(tmp / "own", "ES256"),
            )
        ),
        "unknown_kid",
    ),
    "missing token": (lambda ring, minter, tmp: None, "missing_token"),
    "basic auth instead of bearer": (
        lambda ring, minter, tmp: (
            {"Authorization": "Basic dXNlcjpwYXNz", "webhook-id": WEBHOOK_ID},
            BODY,
        ),
        "missing_token",
    ),
    "empty bearer": (lambda ring, minter, tmp: "", "malformed_token"),
    "one segment": (lambda ring, minter, tmp: "abc", "malformed_token"),
    "garbage segments": (
        lambda ring, minter, tmp: "a.b.c",
        "malformed_token",
    ),
    "four segments": (
        lambda ring, minter, tmp: _mint(minter) + ".AAAA",
        "malformed_token",
    ),
    "padding added": (
        lambda ring, minter, tmp: _mint(minter) + "==",
        "malformed_token",
    ),
    "stray character inside a segment": (
        lambda ring, minter, tmp: _mint(minter).replace(".", ".!", 1),
        "malformed_token",
    ),
    "spare bits of the signature set": (
        lambda ring, minter, tmp: _spare_bits_set(_mint(minter)),
        "malformed_token",
    ),
    "header not json": (
        lambda ring, minter, tmp: b64url(b"{not json") + "." + _mint(minter).split(".", 1)[1],
        "malformed_token",
    ),
    "kid with path characters": (
        lambda ring, minter, tmp: craft_token(
            ring_header(ring, kid="../../etc/passwd"), claims_for()
        ),
        "malformed_token",
    ),
    "kid not a string": (
        lambda ring, minter, tmp: craft_token(ring_header(ring, kid=7), claims_for()),
        "malformed_token",
    ),
    "unsupported crit": (
        lambda ring, minter, tmp: craft_token(
            ring_header(ring, crit=["b64"], b64=False),
            claims_for(),
            key=ring.signing_key(),
        ),
        "malformed_token",
    ),
    "typ JWT": (
        lambda ring, minter, tmp: craft_token(
            ring_header(ring, typ="JWT"), claims_for(), key=ring.signing_key()
        ),
        "bad_type",
    ),
    "typ missing": (
        lambda ring, minter, tmp: craft_token(ring_header(ring, typ=None), claims_for()),
        "bad_type",
    ),
    "wrong scope": (
        lambda ring, minter, tmp: _mint(make_minter(ring, scope="admin")),
        "bad_scope",
    ),
    "webhook-id mismatch": (
        lambda ring, minter, tmp: (headers_for(_mint(minter), webhook_id="evt_other"), BODY),
        "webhook_id_mismatch",
    ),
    "webhook-id header missing": (
        lambda ring, minter, tmp: (
            {"Authorization": f"Bearer {_mint(minter)}"},
            BODY,
        ),
        "webhook_id_mismatch",
    ),
    "no body_sha256 claim": (
        lambda ring, minter, tmp: _signed(ring, body_sha256=None),
        "missing_claim",
    ),
    "no jti claim": (
        lambda ring, minter, tmp: _signed(ring, jti=None),
        "missing_claim",
    ),
    "no exp claim": (
        lambda ring, minter, tmp: _signed(ring, exp=None),
        "missing_claim",
    ),
    "jti not a string": (
        lambda ring, minter, tmp: _signed(ring, jti=5),
        "malformed_token",
    ),
    "claims not an object": (
        lambda ring, minter, tmp: craft_token(ring_header(ring), [1, 2], key=ring.signing_key()),
        "malformed_token",
    ),
}


@pytest.fixture(scope="module")
def all_algorithms(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    keys_dir = tmp_path_factory.mktemp("all")
    return KeyRing.load(keys_dir, "EdDSA", algorithms=["ES256", "RS256"])


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_with_its_reason(
    attack: str, all_algorithms: KeyRing, tmp_path: Path
) -> None:
    ring = all_algorithms
    build, reason, *rest = ATTACKS[attack]
    options = dict(rest[0]) if rest else {}
    prime, edit = options.pop("_prime", False), options.pop("_edit", None)
    built = build(ring, make_minter(ring), tmp_path)
    headers, body = built if isinstance(built, tuple) else (headers_for(built), BODY)
    async with _verifier(ring, **options) as verifier:
        if prime:
            assert isinstance(await verify(verifier, headers, body), dict)
        if edit is not None:
            headers = {**headers, "Authorization": edit(headers["Authorization"])}
        assert await _reason(verifier, headers, body) == reason


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
async def test_each_algorithm_verifies(all_algorithms: KeyRing, algorithm: str) -> None:
    token = _mint(make_minter(all_algorithms), algorithm=algorithm)
    async with _verifier(all_algorithms) as verifier:
        claims = await verify(verifier, headers_for(token), BODY)
    assert isinstance(claims, dict)
    assert claims["webhook_id"] == WEBHOOK_ID


async def test_algorithms_can_be_narrowed(all_algorithms: KeyRing) -> None:
    minter = make_minter(all_algorithms)
    async with _verifier(all_algorithms, algorithms=["ES256"]) as verifier:
        assert isinstance(
            await verify(verifier, headers_for(_mint(minter, algorithm="ES256"))), dict
        )
        refused = await _reason(verifier, headers_for(_mint(minter, algorithm="EdDSA")))
    assert refused == "algorithm_not_allowed"


async def test_matching_account_is_accepted(ring: KeyRing, minter: TokenMinter) -> None:
    async with _verifier(ring, account="acme") as verifier:
        claims = await verify(verifier, headers_for(_mint(minter, account="acme")), BODY)
    assert isinstance(claims, dict)
    assert claims["account"] == "acme"


async def test_without_account_option_any_account_is_accepted(
    ring: KeyRing, minter: TokenMinter
) -> None:
    async with _verifier(ring) as verifier:
        assert isinstance(await verify(verifier, headers_for(_mint(minter, account="x"))), dict)


@pytest.mark.parametrize(
    ("lifetime", "max_lifetime", "accepted"),
    [(900, None, True), (901, None, False), (3600, 3600, True), (3601, 3600, False)],
)
async def test_max_lifetime_boundary(
    ring: KeyRing, lifetime: int, max_lifetime: int | None, accepted: bool
) -> None:
    options = {} if max_lifetime is None else {"max_lifetime": max_lifetime}
    async with _verifier(ring, **options) as verifier:
        headers = headers_for(_lifetime(ring, lifetime))
        if accepted:
            assert isinstance(await verify(verifier, headers), dict)
        else:
            assert await _reason(verifier, headers) == "lifetime_too_long"


async def test_sync_verifier_is_thread_safe_and_fetches_once(
    ring: KeyRing, minter: TokenMinter, jwks_server: JwksServer
) -> None:
    jwks_server.document = ring.jwks()
    verifier = WebhookVerifier(jwks_url=jwks_server.url, audience=AUDIENCE)
    tokens = [_mint(minter) for _ in range(200)]
    results: list[object] = []

    def worker(chunk: list[str]) -> None:
        for token in chunk:
            results.append(verifier.verify_sync(headers_for(token), BODY))

    threads = [threading.Thread(target=worker, args=(tokens[i::8],)) for i in range(8)]

    def run_all() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    await asyncio.to_thread(run_all)
    assert len(results) == 200 and all(isinstance(r, dict) for r in results)
    assert jwks_server.requests == 1
    # And every one of them is now a replay.
    assert await _reason(verifier, headers_for(tokens[0])) == "replayed"


async def test_sync_verify_needs_a_sync_replay_cache(ring: KeyRing, minter: TokenMinter) -> None:
    class AsyncOnly:
        async def seen(self, jti: str, expires_at: float) -> bool:
            return False

    verifier = _verifier(ring, replay_cache=AsyncOnly())
    with pytest.raises(TypeError, match="seen_sync"):
        verifier.verify_sync(headers_for(_mint(minter)), BODY)
    assert isinstance(await verifier.verify(headers_for(_mint(minter)), BODY), dict)


async def test_replayed_token(ring: KeyRing, minter: TokenMinter) -> None:
    headers = headers_for(_mint(minter))
    async with _verifier(ring) as verifier:
        await verify(verifier, headers, BODY)
        assert await _reason(verifier, headers) == "replayed"


async def test_failed_request_does_not_use_up_the_token(ring: KeyRing, minter: TokenMinter) -> None:
    token = _mint(minter)
    async with _verifier(ring) as verifier:
        assert await _reason(verifier, headers_for(token), BODY + b"x") == "body_mismatch"
        assert isinstance(await verify(verifier, headers_for(token), BODY), dict)


async def test_replay_cache_holds_ids_until_expiry_plus_leeway(
    ring: KeyRing, minter: TokenMinter
) -> None:
    cache = MemoryReplayCache()
    token = _mint(minter)
    async with _verifier(ring, replay_cache=cache, leeway=10) as verifier:
        claims = await verify(verifier, headers_for(token), BODY)
    assert isinstance(claims, dict)
    assert await cache.seen(claims["jti"], 0)
    assert cache._expiry[claims["jti"]] == claims["exp"] + 10


async def test_scope_may_be_a_list(ring: KeyRing) -> None:
    minter = make_minter(ring, scope="events:read webhooks:deliver")
    async with _verifier(ring) as verifier:
        assert isinstance(await verify(verifier, headers_for(_mint(minter)), BODY), dict)


async def test_issuer_is_optional(ring: KeyRing) -> None:
    token = _mint(make_minter(ring, issuer="https://anyone.example"))
    async with _verifier(ring, issuer=None) as verifier:
        assert isinstance(await verify(verifier, headers_for(token), BODY), dict)


# -- HMAC, alone and together with the token ------------------------------------------------------


def _hmac_headers(secret: bytes, body: bytes = BODY, msg_id: str = WEBHOOK_ID) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_hmac([secret], msg_id, timestamp, body),
    }


def _whsec(secret: bytes) -> str:
    return "whsec_" + base64.b64encode(secret).decode()


async def test_hmac_only_returns_the_webhook_id() -> None:
    secret = os.urandom(32)
    async with WebhookVerifier(hmac_secrets=_whsec(secret)) as verifier:
        assert await verify(verifier, _hmac_headers(secret), BODY) == {"webhook_id": WEBHOOK_ID}
        assert await _reason(verifier, _hmac_headers(secret), BODY + b"!") == "bad_signature"
        assert await _reason(verifier, {"webhook-id": WEBHOOK_ID}) == "missing_header"


async def test_hmac_secret_rotation_list() -> None:
    old, new = os.urandom(32), os.urandom(32)
    async with WebhookVerifier(hmac_secrets=[_whsec(old), _whsec(new)]) as verifier:
        assert await verify(verifier, _hmac_headers(old), BODY) == {"webhook_id": WEBHOOK_ID}
        assert await verify(verifier, _hmac_headers(new), BODY) == {"webhook_id": WEBHOOK_ID}


@pytest.mark.parametrize("configured", ["token", "hmac", "token and hmac"])
async def test_every_configuration_answers_a_dict_with_the_webhook_id(
    ring: KeyRing, minter: TokenMinter, configured: str
) -> None:
    secret = os.urandom(32)
    options: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if "token" in configured:
        options.update(jwks=ring.jwks(), audience=AUDIENCE)
        headers.update(headers_for(_mint(minter)))
    if "hmac" in configured:
        options.update(hmac_secrets=_whsec(secret))
        headers.update(_hmac_headers(secret))
    async with WebhookVerifier(**options) as verifier:
        result = await verify(verifier, headers, BODY)
    assert type(result) is dict
    assert result["webhook_id"] == WEBHOOK_ID
    assert ("jti" in result) == ("token" in configured)


async def test_token_and_hmac_both_required_when_both_configured(
    ring: KeyRing, minter: TokenMinter
) -> None:
    secret = os.urandom(32)
    async with _verifier(ring, hmac_secrets=_whsec(secret)) as verifier:
        both = {**headers_for(_mint(minter)), **_hmac_headers(secret)}
        assert isinstance(await verify(verifier, both, BODY), dict)

        bad_hmac = {**headers_for(_mint(minter)), **_hmac_headers(os.urandom(32))}
        assert await _reason(verifier, bad_hmac) == "bad_signature"
        token_only = headers_for(_mint(minter))
        assert await _reason(verifier, token_only) == "missing_header"
        assert await _reason(verifier, _hmac_headers(secret)) == "missing_token"
        assert await _reason(verifier, {"webhook-id": WEBHOOK_ID}) == "no_credentials"


async def test_failed_hmac_does_not_use_up_the_token(ring: KeyRing, minter: TokenMinter) -> None:
    secret = os.urandom(32)
    token_headers = headers_for(_mint(minter))
    async with _verifier(ring, hmac_secrets=_whsec(secret)) as verifier:
        bad = {**token_headers, **_hmac_headers(os.urandom(32))}
        assert await _reason(verifier, bad) == "bad_signature"
        good = {**token_headers, **_hmac_headers(secret)}
        assert isinstance(await verify(verifier, good, BODY), dict)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "configure jwks_url, jwks or hmac_secrets"),
        ({"jwks": {"keys": []}}, "audience"),
        ({"jwks": {"keys": []}, "jwks_url": "http://x", "audience": "a"}, "not both"),
        ({"hmac_secrets": "whsec_***"}, "base64"),
        ({"hmac_secrets": "whsec_AAAA", "leeway": -1}, "leeway"),
        ({"hmac_secrets": "whsec_AAAA", "require_scope": ""}, "require_scope"),
        ({"hmac_secrets": "whsec_AAAA", "max_lifetime": 0}, "max_lifetime"),
        ({"hmac_secrets": "whsec_AAAA", "account": ""}, "account"),
        ({"hmac_secrets": "whsec_AAAA", "algorithms": ["HS256"]}, "algorithms"),
        ({"hmac_secrets": "whsec_AAAA", "algorithms": "EdDSA"}, "algorithms"),
        ({"hmac_secrets": "whsec_AAAA", "algorithms": []}, "algorithms"),
        ({"jwks_url": "file:///etc/passwd", "audience": "a"}, "http"),
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WebhookVerifier(**options)


# -- JWKS over HTTP -------------------------------------------------------------------------------


async def test_jwks_is_fetched_once_and_cached(
    ring: KeyRing, minter: TokenMinter, jwks_server: JwksServer
) -> None:
    jwks_server.document = ring.jwks()
    async with WebhookVerifier(jwks_url=jwks_server.url, audience=AUDIENCE) as verifier:
        for _ in range(3):
            await verify(verifier, headers_for(_mint(minter)), BODY)
    assert jwks_server.requests == 1


async def test_unknown_kid_refetches_then_is_rate_limited(
    ring: KeyRing, minter: TokenMinter, tmp_path: Path, jwks_server: JwksServer
) -> None:
    jwks_server.document = ring.jwks()
    newer = KeyRing.load(tmp_path / "newer")
    stranger = KeyRing.load(tmp_path / "stranger")
    async with WebhookVerifier(jwks_url=jwks_server.url, audience=AUDIENCE) as verifier:
        await verify(verifier, headers_for(_mint(minter)), BODY)
        assert jwks_server.requests == 1

        # A key published after the first fetch is found by refetching.
        jwks_server.document = {"keys": ring.jwks()["keys"] + newer.jwks()["keys"]}
        await verify(verifier, headers_for(_mint(make_minter(newer))), BODY)
        assert jwks_server.requests == 2

        # A kid that is nowhere does not turn every request into a fetch.
        stranger_minter = make_minter(stranger)
        for _ in range(5):
            token = _mint(stranger_minter)
            assert await _reason(verifier, headers_for(token)) == "unknown_kid"
        assert jwks_server.requests == 2


async def test_jwks_server_error_is_jwks_unavailable(
    minter: TokenMinter, jwks_server: JwksServer
) -> None:
    jwks_server.status = 500
    async with WebhookVerifier(jwks_url=jwks_server.url, audience=AUDIENCE) as verifier:
        assert await _reason(verifier, headers_for(_mint(minter))) == "jwks_unavailable"
        # Rate-limited: the second request does not hit the failing server again.
        assert await _reason(verifier, headers_for(_mint(minter))) == "jwks_unavailable"
    assert jwks_server.requests == 1


async def test_jwks_redirect_is_not_followed(minter: TokenMinter, jwks_server: JwksServer) -> None:
    jwks_server.status = 302
    jwks_server.headers = {"Location": "http://127.0.0.1:1/elsewhere"}
    async with WebhookVerifier(jwks_url=jwks_server.url, audience=AUDIENCE) as verifier:
        assert await _reason(verifier, headers_for(_mint(minter))) == "jwks_unavailable"


async def test_jwks_unreachable_is_jwks_unavailable(minter: TokenMinter) -> None:
    url = "http://127.0.0.1:9/.well-known/jwks.json"
    async with WebhookVerifier(jwks_url=url, audience=AUDIENCE) as verifier:
        assert await _reason(verifier, headers_for(_mint(minter))) == "jwks_unavailable"


async def test_verifier_uses_a_given_session_and_leaves_it_open(
    ring: KeyRing, minter: TokenMinter, jwks_server: JwksServer
) -> None:
    import aiohttp

    jwks_server.document = ring.jwks()
    async with aiohttp.ClientSession() as session:
        verifier = WebhookVerifier(jwks_url=jwks_server.url, audience=AUDIENCE, session=session)
        await verify(verifier, headers_for(_mint(minter)), BODY)
        await verifier.close()
        assert not session.closed


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Client:
    """The async JwksClient or the SyncJwksClient (called in a thread), by the test's API."""

    def __init__(self, api: str, url: str, **options: Any) -> None:
        self._sync = SyncJwksClient(url, **options) if api == "sync" else None
        self._async = JwksClient(url, **options) if api == "async" else None

    async def get(self, kid: str) -> Any:
        if self._sync is not None:
            return await asyncio.to_thread(self._sync.get, kid)
        assert self._async is not None
        return await self._async.get(kid)

    async def close(self) -> None:
        if self._async is not None:
            await self._async.close()


async def test_cache_expires_after_max_age(
    ring: KeyRing, jwks_server: JwksServer, api: str
) -> None:
    jwks_server.document = ring.jwks()
    jwks_server.headers = {"Cache-Control": "public, max-age=60"}
    kid = ring.signing_key().kid
    clock = _Clock()
    client = _Client(api, jwks_server.url, cache_ttl=300, clock=clock)
    try:
        await client.get(kid)
        clock.now += 59
        await client.get(kid)
        assert jwks_server.requests == 1
        clock.now += 2
        await client.get(kid)
        assert jwks_server.requests == 2
    finally:
        await client.close()


async def test_stale_keys_are_kept_while_the_server_fails(
    ring: KeyRing, jwks_server: JwksServer, api: str
) -> None:
    jwks_server.document = ring.jwks()
    kid = ring.signing_key().kid
    clock = _Clock()
    client = _Client(api, jwks_server.url, cache_ttl=30, min_refetch_interval=10, clock=clock)
    try:
        await client.get(kid)
        jwks_server.status = 503
        clock.now += 31
        assert (await client.get(kid)).kid == kid
        assert (await client.get(kid)).kid == kid
        assert jwks_server.requests == 2  # one failed refresh, then rate-limited
        clock.now += 10
        await client.get(kid)
        assert jwks_server.requests == 3
        # A key that was removed from the document stops verifying once refetched.
        jwks_server.status = 200
        jwks_server.document = {"keys": []}
        clock.now += 31
        with pytest.raises(VerificationError) as caught:
            await client.get(kid)
        assert caught.value.reason == "unknown_kid"
    finally:
        await client.close()


def test_parse_jwks_pins_algorithms_and_skips_unusable_keys(
    ring: KeyRing, es_ring: KeyRing, all_algorithms: KeyRing
) -> None:
    ed, es = ring.jwks()["keys"][0], es_ring.jwks()["keys"][0]
    rs = next(k for k in all_algorithms.jwks()["keys"] if k["kty"] == "RSA")
    off_curve = {**es, "kid": "offcurve", "y": es["x"]}
    small = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers()
    )
    small_rsa = {**rs, "kid": "rsa1024", "n": b64url(small.n.to_bytes(128, "big"))}
    document = {
        "keys": [
            ed,
            es,
            {**ed, "kid": "enc", "use": "enc"},
            {**ed, "kid": "claims-es256", "alg": "ES256"},
            {**ed, "kid": "bad/kid"},
            {**ed, "kid": "short", "x": "AAAA"},
            {**ed, "kid": "padded", "x": ed["x"] + "="},
            {**ed, "kid": "stray", "x": ed["x"][:20] + "!" + ed["x"][20:]},
            {**es, "kid": "es-padded", "y": es["y"] + "="},
            off_curve,
            rs,
            {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
            small_rsa,
            {**rs, "kid": "rsa-even-e", "e": "AAI"},
            {**rs, "kid": "rsa-claims-es256", "alg": "ES256"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": ed["x"]},
            "not a jwk",
        ]
    }
    keys = parse_jwks(document)
    assert {kid: key.alg for kid, key in keys.items()} == {
        ed["kid"]: "EdDSA",
        es["kid"]: "ES256",
        rs["kid"]: "RS256",
    }
    with pytest.raises(ValueError):
        parse_jwks({"keys": "nope"})
