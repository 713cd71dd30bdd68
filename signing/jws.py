"""Checking one agent token, step by step, without I/O: the rules both verify paths share.

`parse` reads the compact JWS and its header, `check_signature` verifies it with a key pinned
to one algorithm, `check_claims` applies the receiver's policy. Each failure raises
`VerificationError` with the reason of the first rule broken, in this order:

    malformed_token   not a canonical compact JWS, header not a JSON object, crit/b64, bad kid
    bad_type          typ is not webhook+jwt
    algorithm_not_allowed   alg is not one the receiver accepts (none, HS256, ...)
    (the caller looks the kid up: unknown_kid, jwks_unavailable)
    algorithm_mismatch      alg differs from the algorithm the kid's key is pinned to
    bad_signature
    malformed_token   claims not a JSON object, time claims not numbers, jti not a string
    missing_claim     exp iat iss aud jti sub scope webhook_id body_sha256
    not_yet_valid, expired, lifetime_too_long, wrong_issuer, wrong_audience, bad_scope,
    wrong_account, webhook_id_mismatch, body_mismatch
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .errors import VerificationError
from .jose import b64url_decode
from .jwks import PinnedKey, valid_kid
from .tokens import TOKEN_TYPE, body_sha256

__all__ = ["ClaimsPolicy", "Token", "check_claims", "check_signature", "parse"]

_REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "aud", "jti", "sub")
_DELIVERY_CLAIMS: Final = ("scope", "webhook_id", "body_sha256")
_MAX_TOKEN_LENGTH: Final = 8192


@dataclass(frozen=True)
class Token:
    """A parsed, not yet trusted token."""

    alg: str
    kid: str
    signing_input: bytes
    signature: bytes
    payload: bytes


@dataclass(frozen=True)
class ClaimsPolicy:
    """What the receiver requires of a token's claims."""

    audience: str
    issuer: str | None
    leeway: float
    scope: str
    max_lifetime: float
    account: str | None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse(token: str, algorithms: Collection[str]) -> Token:
    """The token's parts and the header's alg and kid, checked up to the key lookup."""
    segments = token.split(".") if len(token) <= _MAX_TOKEN_LENGTH else []
    decoded = [b64url_decode(s) for s in segments] if len(segments) == 3 else []
    if len(decoded) != 3 or any(part is None for part in decoded):
        raise VerificationError("malformed_token", "not a compact JWS")
    header_raw, payload, signature = (part or b"" for part in decoded)
    try:
        header = orjson.loads(header_raw)
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict):
        raise VerificationError("malformed_token", "header is not a JSON object")
    if "crit" in header or "b64" in header:
        raise VerificationError("malformed_token", "unsupported critical header")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != TOKEN_TYPE:
        raise VerificationError("bad_type", f"typ {_short(typ)}")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise VerificationError("algorithm_not_allowed", f"alg {_short(alg)}")
    kid = header.get("kid")
    if not valid_kid(kid):
        raise VerificationError("malformed_token", "kid missing or invalid")
    signing_input = token.rpartition(".")[0].encode("ascii")
    return Token(alg, kid, signing_input, signature, payload)


def check_signature(token: Token, pinned: PinnedKey) -> None:
    """The signature, with the algorithm the key is pinned to (never the one the token names)."""
    if token.alg != pinned.alg:
        raise VerificationError(
            "algorithm_mismatch", f"token says {token.alg}, key {pinned.kid} is {pinned.alg}"
        )
    key, data, signature = pinned.key, token.signing_input, token.signature
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                raise InvalidSignature
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:  # pragma: no cover - parse_jwks pins nothing else
            raise InvalidSignature
    except (InvalidSignature, ValueError):
        raise VerificationError("bad_signature", "signature does not verify") from None


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise VerificationError("malformed_token", f"{name} is not a number")
    return float(value)


def check_claims(
    token: Token, policy: ClaimsPolicy, webhook_id: str | None, body: bytes, now: float
) -> dict[str, Any]:
    """The verified token's claims, once every rule of `policy` holds for this request."""
    try:
        claims = orjson.loads(token.payload)
    except orjson.JSONDecodeError:
        claims = None
    if not isinstance(claims, dict):
        raise VerificationError("malformed_token", "claims are not a JSON object")
    for name in _REQUIRED_CLAIMS:
        if name not in claims:
            raise VerificationError("missing_claim", f"token has no {name} claim")
    exp, iat = _number(claims, "exp"), _number(claims, "iat")
    if not isinstance(claims["jti"], str) or not claims["jti"]:
        raise VerificationError("malformed_token", "jti is not a string")
    leeway = policy.leeway
    if iat > now + leeway:
        raise VerificationError("not_yet_valid", "issued in the future")
    if "nbf" in claims and _number(claims, "nbf") > now + leeway:
        raise VerificationError("not_yet_valid", "not valid before nbf")
    if exp <= now - leeway:
        raise VerificationError("expired", "token has expired")
    if exp - iat > policy.max_lifetime:
        raise VerificationError(
            "lifetime_too_long", f"lifetime {exp - iat:g} s exceeds {policy.max_lifetime:g} s"
        )
    if policy.issuer is not None and claims["iss"] != policy.issuer:
        raise VerificationError("wrong_issuer", f"iss {_short(claims['iss'])}")
    aud = claims["aud"]
    audiences = aud if isinstance(aud, list) else [aud]
    if policy.audience not in [a for a in audiences if isinstance(a, str)]:
        raise VerificationError("wrong_audience", f"aud {_short(aud)}")
    for name in _DELIVERY_CLAIMS:
        if name not in claims:
            raise VerificationError("missing_claim", f"token has no {name} claim")
    scope = claims["scope"]
    if not isinstance(scope, str) or policy.scope not in scope.split():
        raise VerificationError("bad_scope", f"scope {_short(scope)}")
    if policy.account is not None and claims.get("account") != policy.account:
        raise VerificationError("wrong_account", f"account {_short(claims.get('account'))}")
    if webhook_id is None or claims["webhook_id"] != webhook_id:
        raise VerificationError("webhook_id_mismatch", "webhook-id header differs from token")
    digest = claims["body_sha256"]
    if not isinstance(digest, str) or not hmac.compare_digest(
        digest.encode(), body_sha256(body).encode()
    ):
        raise VerificationError("body_mismatch", "body does not match body_sha256")
    return claims
