"""Receiver side: verify a webhook's agent token and/or Standard Webhooks signature.

Usage::

    async with WebhookVerifier(jwks_url=..., audience="https://me.example/hooks") as verifier:
        claims = await verifier.verify(request.headers, await request.read())

Every failure is a `VerificationError` whose `.reason` says what was wrong; nothing else escapes.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import aiohttp
import jwt
import orjson

from .errors import VerificationError
from .hmac_signature import parse_secrets, verify_hmac
from .jwks_client import JwksClient, valid_kid
from .replay import MemoryReplayCache, ReplayCache
from .tokens import TOKEN_TYPE, body_sha256

__all__ = ["WebhookVerifier"]

_ALLOWED_ALGORITHMS: Final = frozenset({"EdDSA", "ES256"})
_REQUIRED_CLAIMS: Final = ["exp", "iat", "iss", "aud", "jti", "sub"]
_MAX_TOKEN_LENGTH: Final = 8192
_HMAC_TOLERANCE: Final = 300.0

# PyJWT exceptions to reasons; subclasses before their bases (InvalidSignatureError is a
# DecodeError, ExpiredSignatureError an InvalidTokenError).
_JWT_ERRORS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed"),
)


def _reason_for(exc: jwt.PyJWTError) -> str:
    for exc_type, reason in _JWT_ERRORS:
        if isinstance(exc, exc_type):
            return reason
    return "malformed_token"


_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*")


def _canonical_compact_jws(token: str) -> bool:
    """Three segments, each canonical unpadded base64url.

    Decoders skip stray characters and ignore the spare bits of the last character, so without
    this check many different strings would verify as the same token.
    """
    segments = token.split(".")
    if len(segments) != 3:
        return False
    for segment in segments:
        if _SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
            return False
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
            return False
    return True


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a canonical compact JWS, not yet trusted for anything."""
    segment = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise VerificationError("malformed_token", "header is not a JSON object")
    return header


def _bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header, "" if empty, None if there is none."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _secrets_from(value: str | Sequence[str] | None) -> list[bytes]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [secret for item in items for secret in parse_secrets(item)]


class WebhookVerifier:
    """Verifies webhooks from the dispatcher.

    With JWKS (a URL or a static document) it checks the agent token and returns its claims. With
    `hmac_secrets` (``whsec_...``, space-separated or a list, for rotation) it checks the
    `webhook-signature` header; with HMAC alone it returns the webhook id. With both configured,
    both are required. Token ids are remembered until expiry to refuse replays; the default cache
    is per process.
    """

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        hmac_secrets: str | Sequence[str] | None = None,
        leeway: float = 30.0,
        replay_cache: ReplayCache | None = None,
        require_scope: str = "webhooks:deliver",
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if jwks_url is not None and jwks is not None:
            raise ValueError("give jwks_url or jwks, not both")
        self._secrets = _secrets_from(hmac_secrets)
        self._keys: JwksClient | None = None
        if jwks_url is not None or jwks is not None:
            if not audience:
                raise ValueError("audience (this endpoint's url) is required to verify tokens")
            self._keys = JwksClient(jwks_url, jwks=jwks, session=session)
        elif not self._secrets:
            raise ValueError("configure jwks_url, jwks or hmac_secrets")
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        if not require_scope or require_scope.strip() != require_scope:
            raise ValueError("require_scope must be a single non-empty scope")
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._replay: ReplayCache = MemoryReplayCache() if replay_cache is None else replay_cache
        self._scope = require_scope

    async def verify(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any] | str:
        """The token's claims (or, HMAC only, the webhook id); raises VerificationError."""
        try:
            return await self._verify(headers, body)
        except VerificationError:
            raise
        except Exception as exc:
            raise VerificationError("malformed_token", type(exc).__name__) from exc

    async def _verify(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any] | str:
        h = {str(name).lower(): value for name, value in headers.items()}
        token = _bearer_token(h.get("authorization"))
        signature = h.get("webhook-signature")
        if self._keys is not None and self._secrets and token is None and signature is None:
            raise VerificationError("no_credentials", "neither a token nor a signature was sent")
        claims: dict[str, Any] | None = None
        if self._keys is not None:
            if token is None:
                raise VerificationError("missing_token", "no Authorization: Bearer token")
            claims = await self._verify_token(token, h.get("webhook-id"), body)
        if self._secrets:
            verify_hmac(
                self._secrets,
                h.get("webhook-id"),
                h.get("webhook-timestamp"),
                signature,
                body,
                tolerance=_HMAC_TOLERANCE,
            )
        if claims is None:
            return h["webhook-id"]
        # Last, so a request that fails any other check does not use up its token id.
        if await self._replay.seen(claims["jti"], float(claims["exp"]) + self._leeway):
            raise VerificationError("replayed", "token id already used")
        return claims

    async def _verify_token(
        self, token: str, webhook_id: str | None, body: bytes
    ) -> dict[str, Any]:
        assert self._keys is not None
        if len(token) > _MAX_TOKEN_LENGTH or not _canonical_compact_jws(token):
            raise VerificationError("malformed_token", "not a compact JWS")
        header = _unverified_header(token)
        if "crit" in header or "b64" in header:
            raise VerificationError("malformed_token", "unsupported critical header")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower().removeprefix("application/") != TOKEN_TYPE:
            raise VerificationError("bad_type", f"typ {_short(typ)}")
        alg = header.get("alg")
        if alg not in _ALLOWED_ALGORITHMS:
            raise VerificationError("algorithm_not_allowed", f"alg {_short(alg)}")
        kid = header.get("kid")
        if not valid_kid(kid):
            raise VerificationError("malformed_token", "kid missing or invalid")
        pinned = await self._keys.get(kid)
        if alg != pinned.alg:
            raise VerificationError("algorithm_not_allowed", f"key {kid} is {pinned.alg}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                pinned.key,
                algorithms=[pinned.alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise VerificationError(_reason_for(exc), str(exc)) from None
        self._check_claims(claims, webhook_id, body)
        return claims

    def _check_claims(self, claims: dict[str, Any], webhook_id: str | None, body: bytes) -> None:
        for name in ("scope", "webhook_id", "body_sha256"):
            if name not in claims:
                raise VerificationError("missing_claim", f"token has no {name} claim")
        scope = claims["scope"]
        if not isinstance(scope, str) or self._scope not in scope.split():
            raise VerificationError("bad_scope", f"scope {_short(scope)}")
        if webhook_id is None or claims["webhook_id"] != webhook_id:
            raise VerificationError("webhook_id_mismatch", "webhook-id header differs from token")
        digest = claims["body_sha256"]
        if not isinstance(digest, str) or not hmac.compare_digest(
            digest.encode(), body_sha256(body).encode()
        ):
            raise VerificationError("body_mismatch", "body does not match body_sha256")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise VerificationError("malformed_token", "jti is not a string")

    async def close(self) -> None:
        """Release the JWKS client's HTTP session (if the verifier created it)."""
        if self._keys is not None:
            await self._keys.close()

    async def __aenter__(self) -> WebhookVerifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
