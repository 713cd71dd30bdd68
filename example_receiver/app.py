"""The subscriber's aiohttp application: verify, apply, commit, and only then answer 2xx.

POST <path>   401 {"error": reason} when verification fails (nothing is written)
              400 {"error": "invalid_event"} when a verified body is not a usable event
              503 {"error": "storage_unavailable"} when the write did not commit (sender retries)
              200 {"status": "processed" | "duplicate", ...} / 204 for event types not handled
POST <path> with `webhook-batch-size` (a batch: a JSON array of that many events)
              401 as above: the token and the HMAC cover the whole array
              400 {"error": "invalid_batch", "detail": ...} when the array is not exactly that
                  many usable events (nothing of it is written)
              403 {"error": "account_mismatch", "detail": ...} when a member event belongs to
                  another account than the verified one (nothing of it is written)
              503 as above: nothing of the batch was written
              200 {"status": "processed" | "duplicate", "batch_id", "events", "applied",
                  "duplicates", "actions"} once every member is applied in one transaction
GET /healthz  200
GET /stats    counters since start, plus invalid addresses in the database
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from signing import MemoryReplayCache, VerificationError, WebhookVerifier

from .events import BatchError, BatchMember, EventError, parse_batch, parse_event
from .settings import ReceiverSettings
from .store import Applied, Store, StoreUnavailable, open_store

__all__ = ["SETTINGS", "STATS", "ReceiverStats", "create_app"]

log = structlog.get_logger("example_receiver")


@dataclass
class ReceiverStats:
    received: int = 0
    verified: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    duplicates: int = 0
    invalidated: int = 0
    storage_errors: int = 0
    batches: int = 0  # batches applied (their events count in duplicates and actions)
    actions: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "verified": self.verified,
            "rejected": dict(self.rejected),
            "malformed": self.malformed,
            "duplicates": self.duplicates,
            "invalidated": self.invalidated,
            "storage_errors": self.storage_errors,
            "batches": self.batches,
            "actions": dict(self.actions),
        }


@dataclass
class _Resources:
    """Opened at startup, closed at cleanup (see `_lifecycle`)."""

    store: Store | None = None
    verifier: WebhookVerifier | None = None


SETTINGS = web.AppKey("settings", ReceiverSettings)
STATS = web.AppKey("stats", ReceiverStats)
_RESOURCES = web.AppKey("resources", _Resources)


def create_app(settings: ReceiverSettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body)
    app[SETTINGS] = settings
    app[STATS] = ReceiverStats()
    app[_RESOURCES] = _Resources()
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post(settings.path, receive_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    resources = app[_RESOURCES]
    async with open_store(settings) as store:
        verifier = WebhookVerifier(
            jwks_url=settings.jwks_url,
            audience=settings.audience,
            issuer=settings.issuer,
            account=settings.account,
            hmac_secrets=list(settings.hmac_secrets) or None,
            leeway=settings.leeway,
            replay_cache=MemoryReplayCache(),
        )
        resources.store, resources.verifier = store, verifier
        try:
            yield
        finally:
            resources.store = resources.verifier = None
            await verifier.aclose()


def _open(app: web.Application) -> tuple[Store, WebhookVerifier]:
    resources = app[_RESOURCES]
    if resources.store is None or resources.verifier is None:
        raise web.HTTPServiceUnavailable(reason="not started")
    return resources.store, resources.verifier


def _webhook_id(verified: Mapping[str, Any]) -> str | None:
    """The id the verifier vouched for (the token's claim, or with HMAC alone the header)."""
    claim = verified.get("webhook_id")
    return claim if isinstance(claim, str) and claim else None


async def receive_webhook(request: web.Request) -> web.StreamResponse:
    store, verifier = _open(request.app)
    counters = request.app[STATS]
    counters.received += 1
    body = await request.read()
    try:
        verified = await verifier.verify(request.headers, body)
    except VerificationError as exc:
        counters.rejected[exc.reason] += 1
        log.warning(
            "webhook rejected",
            reason=exc.reason,
            detail=exc.detail,
            webhook_id=request.headers.get("webhook-id"),
            remote=request.remote,
        )
        return web.json_response({"error": exc.reason}, status=401)
    webhook_id = _webhook_id(verified)
    if webhook_id is None:
        counters.rejected["missing_claim"] += 1
        log.warning("webhook rejected", reason="missing_claim", detail="no webhook_id")
        return web.json_response({"error": "missing_claim"}, status=401)
    counters.verified += 1
    batch_size = request.headers.get("webhook-batch-size")
    if batch_size is not None:
        return await _receive_batch(request, store, webhook_id, verified, batch_size, body)
    try:
        event = parse_event(body)
    except EventError as exc:
        counters.malformed += 1
        log.warning("webhook malformed", webhook_id=webhook_id, detail=str(exc))
        return web.json_response({"error": "invalid_event", "detail": str(exc)}, status=400)
    try:
        applied = await store.apply(webhook_id, event, datetime.now(UTC))
    except StoreUnavailable as exc:
        counters.storage_errors += 1
        log.error(
            "webhook not applied", webhook_id=webhook_id, event_type=event.event, error=str(exc)
        )
        return web.json_response({"error": "storage_unavailable"}, status=503)
    return _answer(counters, applied, event.event, event.recipient)


def _expected_account(settings: ReceiverSettings, verified: Mapping[str, Any]) -> str | None:
    """Whose events a batch may hold: --account, else the verified token's account claim."""
    if settings.account is not None:
        return settings.account
    claim = verified.get("account")
    return claim if isinstance(claim, str) and claim else None


def _foreign_member(members: list[BatchMember], account: str) -> str | None:
    for index, member in enumerate(members):
        if member.account != account:
            found = "no account" if member.account is None else f"account {member.account!r}"
            return f"element {index} ({member.event_id}) has {found}, not {account!r}"
    return None


async def _receive_batch(
    request: web.Request,
    store: Store,
    batch_id: str,
    verified: Mapping[str, Any],
    batch_size: str,
    body: bytes,
) -> web.Response:
    """A verified batch: check all of it, apply all of it in one transaction, then answer."""
    counters = request.app[STATS]
    try:
        members = parse_batch(body, batch_size)
    except BatchError as exc:
        counters.malformed += 1
        log.warning("batch malformed", batch_id=batch_id, detail=str(exc))
        return web.json_response({"error": "invalid_batch", "detail": str(exc)}, status=400)
    account = _expected_account(request.app[SETTINGS], verified)
    foreign = None if account is None else _foreign_member(members, account)
    if foreign is not None:
        counters.rejected["account_mismatch"] += 1
        log.warning("batch refused", batch_id=batch_id, reason="account_mismatch", detail=foreign)
        return web.json_response({"error": "account_mismatch", "detail": foreign}, status=403)
    try:
        results = await store.apply_batch(members, datetime.now(UTC))
    except StoreUnavailable as exc:
        counters.storage_errors += 1
        log.error("batch not applied", batch_id=batch_id, events=len(members), error=str(exc))
        return web.json_response({"error": "storage_unavailable"}, status=503)
    counters.batches += 1
    actions: Counter[str] = Counter()
    for member, applied in zip(members, results, strict=True):
        decided = applied.plan
        log.info(
            "webhook",
            webhook_id=applied.webhook_id,
            batch_id=batch_id,
            event_type=member.event.event,
            recipient=member.event.recipient,
            action="duplicate" if decided is None else decided.action,
            reason=None if decided is None else decided.reason,
        )
        if decided is None:
            counters.duplicates += 1
            continue
        actions[decided.action] += 1
        counters.actions[decided.action] += 1
        counters.invalidated += decided.invalidates
    applied_count = sum(actions.values())
    return web.json_response(
        {
            "status": "processed" if applied_count else "duplicate",
            "batch_id": batch_id,
            "events": len(members),
            "applied": applied_count,
            "duplicates": len(members) - applied_count,
            "actions": dict(actions),
        }
    )


def _answer(
    counters: ReceiverStats, applied: Applied, event: str, recipient: str | None
) -> web.Response:
    decided = applied.plan
    action = "duplicate" if decided is None else decided.action
    reason = None if decided is None else decided.reason
    log.info(
        "webhook",
        webhook_id=applied.webhook_id,
        event_type=event,
        recipient=recipient,
        action=action,
        reason=reason,
    )
    if decided is None:
        counters.duplicates += 1
        return web.json_response({"status": "duplicate", "webhook_id": applied.webhook_id})
    counters.actions[action] += 1
    counters.invalidated += decided.invalidates
    if action == "ignored":
        return web.Response(status=204)
    answer: dict[str, Any] = {"status": "processed", "action": action}
    if reason is not None:
        answer["reason"] = reason
    return web.json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    store, _ = _open(request.app)
    body = request.app[STATS].as_dict()
    try:
        body["invalid_addresses"] = await store.invalid_user_count()
    except StoreUnavailable:
        body["invalid_addresses"] = None
    return web.json_response(body)
