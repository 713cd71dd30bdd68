"""Agent tokens and signatures for webhook deliveries.

Receiver side: `WebhookVerifier` (async `verify` and sync `verify_sync`), `VerificationError`,
replay caches, and aiohttp glue (`webhook_middleware`, `verified`; the `aiohttp` extra), imported
on first use. Sender side: `KeyRing` (keys on disk per algorithm, rotation), `TokenMinter` (the
per-delivery JWT), `sign_hmac` (Standard Webhooks signature).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import VerificationError
from .hmac_signature import parse_secrets
from .hmac_signature import sign as sign_hmac
from .jose import ALGORITHMS
from .keys import KeyRing, KeyRingError, SigningKey, generate_key, prune, rotate
from .replay import MemoryReplayCache, ReplayCache, SyncReplayCache
from .tokens import TokenMinter
from .verifier import WebhookVerifier

if TYPE_CHECKING:
    from .aiohttp_middleware import WEBHOOK, verified, webhook_middleware

__all__ = [
    "ALGORITHMS",
    "WEBHOOK",
    "KeyRing",
    "KeyRingError",
    "MemoryReplayCache",
    "ReplayCache",
    "SigningKey",
    "SyncReplayCache",
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
