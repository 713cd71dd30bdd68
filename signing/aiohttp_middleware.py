"""aiohttp glue: verify incoming webhooks before the handler runs.

What `verify` returns (the token's claims; with HMAC alone, ``{"webhook_id": ...}``) is stored at
``request[WEBHOOK]``; a request that fails verification gets ``401 {"error": "<reason>"}`` and
never reaches the handler.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .errors import VerificationError
from .verifier import WebhookVerifier

__all__ = ["WEBHOOK", "verified", "webhook_middleware"]

WEBHOOK: web.RequestKey[dict[str, Any]] = web.RequestKey("webhook")


async def _verify_then(
    verifier: WebhookVerifier, request: web.Request, handler: Handler
) -> web.StreamResponse:
    try:
        request[WEBHOOK] = await verifier.verify(request.headers, await request.read())
    except VerificationError as exc:
        return web.json_response({"error": exc.reason}, status=401)
    return await handler(request)


def webhook_middleware(
    verifier: WebhookVerifier, *, paths: Collection[str] | None = None
) -> Middleware:
    """Middleware verifying every request, or only those whose path is in `paths`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if paths is not None and request.path not in paths:
            return await handler(request)
        return await _verify_then(verifier, request, handler)

    return middleware


def verified(verifier: WebhookVerifier) -> Callable[[Handler], Handler]:
    """Decorator verifying the requests of a single handler."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            return await _verify_then(verifier, request, handler)

        return wrapper

    return decorate
