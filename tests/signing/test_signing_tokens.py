"""Minted agent tokens are ordinary JWS that other libraries verify with only the JWKS."""

from __future__ import annotations

import base64
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

from signing import KeyRing, TokenMinter, generate_key, rotate
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
        algs=["EdDSA", "ES256"],
        check_claims={"iss": ISSUER, "aud": AUDIENCE, "exp": None},
        expected_type="JWS",
    )
    claims: dict[str, object] = json.loads(verified.claims)
    return claims


@pytest.fixture(params=["EdDSA", "ES256"])
def any_ring(request: pytest.FixtureRequest, tmp_path: Path) -> KeyRing:
    return KeyRing.load(tmp_path / request.param, request.param)


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
