"""Minted agent tokens are ordinary JWS that other libraries verify with only the JWKS."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from jwcrypto import jwk
from jwcrypto import jwt as jwcrypto_jwt
from signing_helpers import AUDIENCE, BODY, ISSUER, SUBJECT, WEBHOOK_ID, make_minter

from signing import KeyRing, KeyRingError, TokenMinter, generate_key, rotate
from signing.tokens import body_sha256


def _decode_with_pyjwt(token: str, jwks: Mapping[str, Any]) -> dict[str, object]:
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(dict(jwks))[header["kid"]]
    return jwt.decode(
        token,
        key.key,
        algorithms=[header["alg"]],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"require": ["exp", "iat", "iss", "aud", "jti", "sub"]},
    )


def _decode_with_jwcrypto(token: str, jwks: Mapping[str, Any]) -> dict[str, object]:
    keyset = jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwcrypto_jwt.JWT(
        jwt=token,
        key=keyset,
        algs=["EdDSA", "ES256", "RS256"],
        check_claims={"iss": ISSUER, "aud": AUDIENCE, "exp": None},
        expected_type="JWS",
    )
    claims: dict[str, object] = json.loads(verified.claims)
    return claims


@pytest.fixture(params=["EdDSA", "ES256", "RS256"])
def any_ring(request: pytest.FixtureRequest, tmp_path: Path) -> KeyRing:
    return KeyRing.load(tmp_path / request.param, request.param)


@pytest.fixture(scope="module")
def all_algorithms(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    return KeyRing.load(tmp_path_factory.mktemp("all"), "EdDSA", algorithms=["ES256", "RS256"])


def test_token_verifies_with_pyjwt_and_jwcrypto_from_the_jwks_alone(any_ring: KeyRing) -> None:
    token = make_minter(any_ring).mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    jwks = json.loads(json.dumps(any_ring.jwks()))
    assert _decode_with_pyjwt(token, jwks) == _decode_with_jwcrypto(token, jwks)


def test_header_and_claims_are_exact(any_ring: KeyRing) -> None:
    minter = make_minter(any_ring, ttl_seconds=120)
    now = int(time.time())
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY, now=now)
    key = any_ring.signing_key()

    assert jwt.get_unverified_header(token) == {
        "alg": key.alg,
        "kid": key.kid,
        "typ": "webhook+jwt",
    }
    claims = _decode_with_pyjwt(token, any_ring.jwks())
    jti = claims.pop("jti")
    assert claims == {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 120,
        "scope": "webhooks:deliver",
        "webhook_id": WEBHOOK_ID,
        "body_sha256": base64.urlsafe_b64encode(hashlib.sha256(BODY).digest())
        .rstrip(b"=")
        .decode(),
    }
    assert isinstance(jti, str)
    assert len(jti) >= 16
    assert minter.current_kid == key.kid


def test_jti_is_unique(minter: TokenMinter) -> None:
    jtis = set()
    for _ in range(10_000):
        token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
        payload = token.split(".")[1]
        jtis.add(orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])
    assert len(jtis) == 10_000


def test_token_segments_are_unpadded_base64url(minter: TokenMinter) -> None:
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=b"")
    assert "=" not in token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_minter_follows_rotation(tmp_path: Path) -> None:
    old = generate_key(tmp_path, activates_at=1000)
    ring = KeyRing.load(tmp_path)
    minter = make_minter(ring)
    assert _kid(minter.mint(audience=AUDIENCE, webhook_id="e", body=b"", now=2000)) == old.kid

    new, _ = rotate(tmp_path, publish_lead=60, retire_after=360, now=2000)
    assert ring.reload_if_changed()
    assert _kid(minter.mint(audience=AUDIENCE, webhook_id="e", body=b"", now=2059)) == old.kid
    assert _kid(minter.mint(audience=AUDIENCE, webhook_id="e", body=b"", now=2060)) == new.kid


def test_body_sha256_helper() -> None:
    expected = base64.urlsafe_b64encode(hashlib.sha256(b"abc").digest()).rstrip(b"=").decode()
    assert body_sha256(b"abc") == expected


def test_ttl_must_be_positive(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        TokenMinter(ring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=0)


def _kid(token: str) -> str:
    kid = jwt.get_unverified_header(token)["kid"]
    assert isinstance(kid, str)
    return kid


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256", None])
def test_mint_with_an_algorithm_signs_with_its_key(
    all_algorithms: KeyRing, algorithm: str | None
) -> None:
    minter = make_minter(all_algorithms)
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY, algorithm=algorithm)
    key = all_algorithms.signing_key(algorithm=algorithm)
    assert jwt.get_unverified_header(token) == {
        "alg": key.alg,
        "kid": key.kid,
        "typ": "webhook+jwt",
    }
    jwks = json.loads(json.dumps(all_algorithms.jwks()))
    assert _decode_with_pyjwt(token, jwks) == _decode_with_jwcrypto(token, jwks)
    assert minter.current_kid == key.kid


def test_algorithms_interleave_within_one_second(all_algorithms: KeyRing) -> None:
    minter = make_minter(all_algorithms)
    now = int(time.time())
    seen = []
    for algorithm in ["ES256", "EdDSA", "RS256", "ES256", None]:
        token = minter.mint(
            audience=AUDIENCE, webhook_id="e", body=b"", now=now, algorithm=algorithm
        )
        seen.append(jwt.get_unverified_header(token)["alg"])
    assert seen == ["ES256", "EdDSA", "RS256", "ES256", "EdDSA"]


def test_account_claim_only_when_given(ring: KeyRing) -> None:
    minter = make_minter(ring)
    with_account = minter.mint(audience=AUDIENCE, webhook_id="e", body=b"", account="acme")
    without = minter.mint(audience=AUDIENCE, webhook_id="e", body=b"")
    assert _decode_with_pyjwt(with_account, ring.jwks())["account"] == "acme"
    assert "account" not in _decode_with_pyjwt(without, ring.jwks())


def test_unknown_algorithm_is_refused(ring: KeyRing) -> None:
    with pytest.raises(KeyRingError, match="unsupported algorithm 'HS256'"):
        make_minter(ring).mint(audience=AUDIENCE, webhook_id="e", body=b"", algorithm="HS256")


def test_algorithm_without_a_key_is_an_error(ring: KeyRing) -> None:
    with pytest.raises(KeyRingError, match="no active ES256 signing key"):
        make_minter(ring).mint(audience=AUDIENCE, webhook_id="e", body=b"", algorithm="ES256")
    ring.ensure("ES256")
    token = make_minter(ring).mint(audience=AUDIENCE, webhook_id="e", body=b"", algorithm="ES256")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


def test_rotation_of_one_algorithm_leaves_the_other_signing(tmp_path: Path) -> None:
    ed = generate_key(tmp_path, activates_at=1000)
    generate_key(tmp_path, "ES256", activates_at=1000)
    ring = KeyRing.load(tmp_path)
    minter = make_minter(ring)
    new, _ = rotate(tmp_path, "ES256", publish_lead=60, retire_after=360, now=2000)
    assert ring.reload_if_changed()
    mint = functools.partial(minter.mint, audience=AUDIENCE, webhook_id="e", body=b"")
    assert _kid(mint(now=2060, algorithm="ES256")) == new.kid
    assert _kid(mint(now=2060)) == ed.kid


def test_libsodium_and_openssl_sign_eddsa_tokens_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `fast` extra changes the CPU a token costs, not the token: Ed25519 is deterministic,
    so both signers give the same signature, and without libsodium the minter still works."""
    import signing.tokens as tokens

    assert tokens._sodium_sign is not None, "the dispatcher installs the signing[fast] extra"
    ring = KeyRing.load(tmp_path, "EdDSA")
    key = ring.signing_key(time.time(), "EdDSA")
    fast = tokens._Signer.for_key(key).sign
    data = b"header.claims" * 20
    assert fast is not key.private_key.sign
    assert fast(data) == key.private_key.sign(data)

    monkeypatch.setattr(tokens, "_sodium_sign", None)
    assert tokens._Signer.for_key(key).sign == key.private_key.sign
    minted = TokenMinter(ring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=60).mint(
        audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY
    )
    assert _decode_with_pyjwt(minted, ring.jwks())["body_sha256"] == body_sha256(BODY)
