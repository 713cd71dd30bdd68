"""Receiver side: verify a webhook's agent token and/or Standard Webhooks signature.

Usage, async (aiohttp, FastAPI, ...; needs the `aiohttp` extra to fetch a JWKS URL)::

    async with WebhookVerifier(jwks_url=..., audience="https://me.example/hooks") as verifier:
        claims = await verifier.verify(request.headers, await request.read())

and sync (Flask, Django, any WSGI app; standard library only)::

    verifier = WebhookVerifier(jwks_url=..., audience="https://me.example/hooks")
    claims = verifier.verify_sync(request.headers, request.get_data())

Every failure is a `VerificationError` whose `.reason` says what was wrong; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from . import jws
from .errors import VerificationError
from .hmac_signature import parse_secrets, verify_hmac
from .jose import ALGORITHMS
from .jwks import JwksCache, PinnedKey
from .jwks_sync import SyncJwksClient
from .replay import MemoryReplayCache, ReplayCache, SyncReplayCache

if TYPE_CHECKING:
    import aiohttp

    from .jwks_client import JwksClient

__all__ = ["WebhookVerifier"]

_HMAC_TOLERANCE: Final = 300.0
DEFAULT_MAX_LIFETIME: Final = 900.0  # 15 minutes


def _bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header, "" if empty, None if there is none.

    Only HTTP's own white space is taken off: spaces and tabs around the value, spaces between
    the scheme and the token. Any other character next to the token (a CR, a no-break space)
    stays part of it, and the token is refused as malformed.
    """
    if authorization is None:
        return None
    scheme, _, token = authorization.strip(_OWS).partition(" ")
    return token.lstrip(" ") if scheme.lower() == "bearer" else None


_OWS = " \t"


def _secrets_from(value: str | Sequence[str] | None) -> list[bytes]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [secret for item in items for secret in parse_secrets(item)]


class WebhookVerifier:
    """Verifies webhooks from the dispatcher.

    With JWKS (a URL or a static document) it checks the agent token and returns its claims. With
    `hmac_secrets` (``whsec_...``, space-separated or a list, for rotation) it checks the
    `webhook-signature` header; with HMAC alone it returns ``{"webhook_id": <the header>}``, so
    ``["webhook_id"]`` is the verified webhook id in either case. With both configured, both are
    required. Token ids are remembered until expiry to refuse replays; the default cache
    is per process.

    `account`: the token's `account` claim must equal it. `max_lifetime`: a token whose exp - iat
    exceeds it (seconds) is refused, however well signed. `algorithms`: the JWS algorithms
    accepted at all (each key still verifies only its own).

    Nothing is held open between JWKS fetches: `aclose()` (or leaving ``async with``) releases
    what the async path may hold, and is safe to call any number of times.
    """

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        account: str | None = None,
        hmac_secrets: str | Sequence[str] | None = None,
        leeway: float = 30.0,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        algorithms: Collection[str] = ALGORITHMS,
        replay_cache: ReplayCache | SyncReplayCache | None = None,
        require_scope: str = "webhooks:deliver",
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if jwks_url is not None and jwks is not None:
            raise ValueError("give jwks_url or jwks, not both")
        self._secrets = _secrets_from(hmac_secrets)
        self._jwks_url = jwks_url
        self._static: JwksCache | None = None
        self._sync_keys: SyncJwksClient | None = None
        self._async_keys: JwksClient | None = None
        self._session = session
        uses_tokens = jwks_url is not None or jwks is not None
        if uses_tokens:
            if not audience:
                raise ValueError("audience (this endpoint's url) is required to verify tokens")
            if jwks is not None:
                self._static = JwksCache.static(jwks)
            else:
                assert jwks_url is not None
                self._sync_keys = SyncJwksClient(jwks_url)
        elif not self._secrets:
            raise ValueError("configure jwks_url, jwks or hmac_secrets")
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        if not max_lifetime > 0:
            raise ValueError("max_lifetime must be positive (seconds)")
        if account is not None and not account:
            raise ValueError("account must not be empty")
        if not require_scope or require_scope.strip() != require_scope:
            raise ValueError("require_scope must be a single non-empty scope")
        unknown = set(algorithms).difference(ALGORITHMS)
        if unknown or not algorithms or isinstance(algorithms, str):
            raise ValueError(f"algorithms must be a list drawn from {list(ALGORITHMS)}")
        self._uses_tokens = uses_tokens
        self._algorithms = frozenset(algorithms)
        self._policy = jws.ClaimsPolicy(
            audience=audience or "",
            issuer=issuer,
            leeway=leeway,
            scope=require_scope,
            max_lifetime=float(max_lifetime),
            account=account,
        )
        self._replay = MemoryReplayCache() if replay_cache is None else replay_cache

    # -- async ---------------------------------------------------------------------------------

    async def verify(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """What the request proves: the token's claims, or with HMAC alone ``{"webhook_id": id}``.

        Either way ``["webhook_id"]`` is the webhook id vouched for. Raises VerificationError.
        """
        keys = self._async_client()
        with _refusals():
            h, token = self._credentials(headers)
            if token is None:
                return self._verified(h, body, None)
            pinned = await keys.get(token.kid) if keys is not None else self._static_key(token)
            claims = self._verified(h, body, (token, pinned))
            # Last, so a request that fails any other check does not use up its token id.
            _refuse_replay(await self._seen(claims))
            return claims

    def _async_client(self) -> JwksClient | None:
        if self._jwks_url is None:
            return None
        if self._async_keys is None:
            try:
                from .jwks_client import JwksClient
            except ImportError:  # pragma: no cover - depends on the installation
                raise ImportError(
                    "WebhookVerifier.verify with jwks_url needs aiohttp: "
                    "pip install 'bounce-signing[aiohttp]' (or use verify_sync)"
                ) from None
            self._async_keys = JwksClient(self._jwks_url, session=self._session)
        return self._async_keys

    async def _seen(self, claims: dict[str, Any]) -> bool:
        replay = self._replay
        if hasattr(replay, "seen"):
            return bool(await replay.seen(*self._replay_entry(claims)))
        return bool(replay.seen_sync(*self._replay_entry(claims)))

    async def aclose(self) -> None:
        """Release what the async path holds; the verifier may still be used afterwards."""
        keys, self._async_keys = self._async_keys, None
        if keys is not None:
            await keys.close()

    async def close(self) -> None:
        """Same as `aclose()`."""
        await self.aclose()

    async def __aenter__(self) -> WebhookVerifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- sync ----------------------------------------------------------------------------------

    def verify_sync(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """`verify` for synchronous code (WSGI); thread-safe. Raises VerificationError.

        Fetches the JWKS with the standard library, by the same cache and refetch rules. A custom
        replay cache must offer ``seen_sync(jti, expires_at)`` here (MemoryReplayCache does).
        """
        replay = self._replay
        if not hasattr(replay, "seen_sync"):
            raise TypeError("verify_sync needs a replay cache with a seen_sync() method")
        with _refusals():
            h, token = self._credentials(headers)
            if token is None:
                return self._verified(h, body, None)
            keys = self._sync_keys
            pinned = keys.get(token.kid) if keys is not None else self._static_key(token)
            claims = self._verified(h, body, (token, pinned))
            _refuse_replay(replay.seen_sync(*self._replay_entry(claims)))
            return claims

    # -- shared, no I/O ------------------------------------------------------------------------

    def _credentials(self, headers: Mapping[str, str]) -> tuple[dict[str, str], jws.Token | None]:
        """Lower-cased headers and the parsed bearer token, which must be there with tokens."""
        h = {str(name).lower(): value for name, value in headers.items()}
        token = _bearer_token(h.get("authorization"))
        if self._uses_tokens and self._secrets and token is None and "webhook-signature" not in h:
            raise VerificationError("no_credentials", "neither a token nor a signature was sent")
        if self._uses_tokens and token is None:
            raise VerificationError("missing_token", "no Authorization: Bearer token")
        if token is None or not self._uses_tokens:
            return h, None
        return h, jws.parse(token, self._algorithms)

    def _static_key(self, token: jws.Token) -> PinnedKey:
        assert self._static is not None
        return self._static.lookup(token.kid)

    def _verified(
        self, h: Mapping[str, str], body: bytes, keyed: tuple[jws.Token, PinnedKey] | None
    ) -> dict[str, Any]:
        """The token's claims (if `keyed`: the token and its key), once HMAC holds too."""
        claims = None
        if keyed is not None:
            token, pinned = keyed
            jws.check_signature(token, pinned)
            claims = jws.check_claims(token, self._policy, h.get("webhook-id"), body, time.time())
        if self._secrets:
            verify_hmac(
                self._secrets,
                h.get("webhook-id"),
                h.get("webhook-timestamp"),
                h.get("webhook-signature"),
                body,
                tolerance=_HMAC_TOLERANCE,
            )
        return {"webhook_id": h["webhook-id"]} if claims is None else claims

    def _replay_entry(self, claims: Mapping[str, Any]) -> tuple[str, float]:
        """The token id to remember, and until when: its expiry plus the leeway."""
        return claims["jti"], float(claims["exp"]) + self._policy.leeway


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Let a VerificationError through; any other error on hostile input is malformed_token."""
    try:
        yield
    except VerificationError:
        raise
    except Exception as exc:
        raise VerificationError("malformed_token", type(exc).__name__) from exc


def _refuse_replay(seen: bool) -> None:
    if seen:
        raise VerificationError("replayed", "token id already used")
