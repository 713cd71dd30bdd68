"""Agent tokens and signatures for webhook deliveries.

Sender side: `KeyRing` (keys on disk, rotation), `TokenMinter` (the per-delivery JWT), `sign_hmac`
(Standard Webhooks signature). Receiver side: `WebhookVerifier` and its aiohttp glue, imported on
first use so the sender does not load aiohttp's server half.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import VerificationError
from .hmac_signature import parse_secrets
from .hmac_signature import sign as sign_hmac
from .keys import KeyRing, KeyRingError, SigningKey, generate_key, prune, rotate
from .replay import MemoryReplayCache, ReplayCache
from .tokens import TokenMinter

if TYPE_CHECKING:
    from .aiohttp_middleware import WEBHOOK, verified, webhook_middleware
    from .verifier import WebhookVerifier

__all__ = [
    "WEBHOOK",
    "KeyRing",
    "KeyRingError",
    "MemoryReplayCache",
    "ReplayCache",
    "SigningKey",
    "TokenMinter",
    "VerificationError",
    "WebhookVerifier",
    "generate_key",
    "parse_secrets",
    "prune",
    "rotate",
    "sign_hmac",
    "verified",
    "webhook_middleware",
]

_LAZY = {
    "WebhookVerifier": ".verifier",
    "WEBHOOK": ".aiohttp_middleware",
    "verified": ".aiohttp_middleware",
    "webhook_middleware": ".aiohttp_middleware",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
