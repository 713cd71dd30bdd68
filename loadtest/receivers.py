"""Receivers: subscriber endpoints on loopback that verify, record, and misbehave on request.

Runs as its own process (``python -m loadtest.receivers --endpoints K``) so that receiving and
verifying never share an event loop with the dispatcher or the generator. Each endpoint listens
on its own 127.0.0.1 port (path ``/hooks/<n>``); a control port takes the phase settings and hands
back the records. On start it prints one JSON line: ``{"control": port, "endpoints": [url, ...]}``.

Account endpoints: tens of thousands of subscribers cannot each be a server, so every port also
serves ``/a/<account>/<n>``, one endpoint per path, created on its first request and recorded on
its own. Such an endpoint knows its account: it counts every event whose body names another
account (a cross-account delivery: must never happen) and, verifying, refuses a token whose
``account`` claim is not its own.

Per request an endpoint:

1. verifies the agent token like a real subscriber (`signing.WebhookVerifier` against the
   dispatcher's JWKS, audience = its own url), when verification is on; a failure answers 401;
2. applies its behaviour: hang until healed (or the sender gives up), sleep, answer 410 or 500
   for a fraction of requests;
3. records (event id, ``published_at`` from the body, arrival time) for every 2xx it answers.

A batch (contract section 8: the body is a JSON array of events, ``webhook-batch-size: N``,
``webhook-id`` the batch id) is verified once over the whole body and records each member event
by its own id, so accounting counts events, not requests.

Control API (JSON): ``POST /control/phase`` (reset, verification, behaviours),
``POST /control/behaviour`` (change one endpoint mid-phase), ``GET /control/stats``,
``GET /control/paths`` (the account endpoints summed), ``POST /control/lookup`` (ids and arrival
times of some account endpoints), ``GET /control/records`` (``?paths=1``: with every account
endpoint; with the garbage collector's pauses since the phase began).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from loadtest.gcstats import GcPauses
from signing import VerificationError, WebhookVerifier

__all__ = ["Behaviour", "Endpoint", "ReceiverApp", "main"]

_HANG_LIMIT = 3600.0


@dataclass(frozen=True, slots=True)
class Behaviour:
    slow_ms: float = 0.0  # sleep this long before answering
    fail_fraction: float = 0.0  # answer 500 to this share of requests (retried by the sender)
    gone_fraction: float = 0.0  # answer 410 to this share (dead-lettered as endpoint_gone)
    hang: bool = False  # never answer until healed; the sender times out

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Behaviour:
        return cls(**(raw or {}))


@dataclass
class Endpoint:
    index: int
    url: str = ""
    account: str | None = None  # an account endpoint's own account (None: not checked)
    behaviour: Behaviour = field(default_factory=Behaviour)
    verifier: WebhookVerifier | None = None
    ids: list[str] = field(default_factory=list)
    published: list[float] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0
    failures: int = 0  # non-2xx answers given on purpose (behaviour)
    verify_failures: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    requests: int = 0  # 2xx answers (a batch is one)
    batched: int = 0  # events that came in a batch
    cross_account: int = 0  # events whose body names another account than this endpoint's
    own_unique: int = 0  # unique events of this endpoint's own account
    in_flight: int = 0
    healed: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        self.ids, self.published, self.arrived = [], [], []
        self.seen = set()
        self.duplicates = self.failures = self.verify_failures = 0
        self.requests = self.batched = self.cross_account = self.own_unique = 0
        self.reasons = Counter()
        self.healed = asyncio.Event()

    def record(self, doc: dict[str, Any], arrived: float, batched: bool) -> None:
        event_id = doc["id"]
        if event_id in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(event_id)
            if self.account is not None and doc.get("account") == self.account:
                self.own_unique += 1
        if self.account is not None and doc.get("account") != self.account:
            self.cross_account += 1
        self.ids.append(event_id)
        self.published.append(float(doc.get("published_at") or "nan"))
        self.arrived.append(arrived)
        self.batched += batched

    def stats(self) -> dict[str, Any]:
        return {
            "received": len(self.ids),
            "unique": len(self.seen),
            "duplicates": self.duplicates,
            "failures": self.failures,
            "verify_failures": self.verify_failures,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "batched": self.batched,
            "cross_account": self.cross_account,
            "own_unique": self.own_unique,
            "last_arrival": self.arrived[-1] if self.arrived else None,
        }

    def records(self) -> dict[str, Any]:
        return {
            "ids": self.ids,
            "published": self.published,
            "arrived": self.arrived,
            **self.stats(),
            "reasons": dict(self.reasons),
            "behaviour": asdict(self.behaviour),
        }


class ReceiverApp:
    """The endpoints and the control API on one aiohttp application."""

    def __init__(self, endpoints: int, seed: int = 7) -> None:
        self.endpoints = [Endpoint(i) for i in range(endpoints)]
        self.paths: dict[str, Endpoint] = {}  # account endpoints by path, made on first use
        self.gc = GcPauses().install()
        self._rng = random.Random(seed)
        self._verify: dict[str, Any] | None = None  # the phase's verification settings
        self._jwks: dict[str, Any] | None = None  # fetched once per phase for account endpoints
        self._jwks_lock = asyncio.Lock()
        self.app = web.Application(client_max_size=16 * 1024 * 1024)
        self.app.router.add_post("/hooks/{n}", self._hook)
        self.app.router.add_post("/a/{account}/{n}", self._account_hook)
        self.app.router.add_post("/control/phase", self._phase)
        self.app.router.add_post("/control/behaviour", self._behaviour)
        self.app.router.add_get("/control/stats", self._stats)
        self.app.router.add_get("/control/paths", self._path_stats)
        self.app.router.add_post("/control/lookup", self._lookup)
        self.app.router.add_get("/control/records", self._records)

    # --- the endpoints ---------------------------------------------------------------------

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        try:
            ep = self.endpoints[int(request.match_info["n"])]
        except (ValueError, IndexError):
            return web.Response(status=404)
        return await self._receive(ep, request, arrived)

    async def _account_hook(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        path = request.path
        ep = self.paths.get(path)
        if ep is None:  # registered before any await: concurrent first requests share it
            ep = self.paths[path] = Endpoint(
                len(self.paths),
                url=f"http://{request.host}{path}",
                account=request.match_info["account"],
            )
        if self._verify is not None and ep.verifier is None:
            jwks = await self._phase_jwks()
            if ep.verifier is None:
                ep.verifier = WebhookVerifier(
                    jwks=jwks, audience=ep.url, issuer=self._verify.get("issuer")
                )
        return await self._receive(ep, request, arrived)

    async def _phase_jwks(self) -> dict[str, Any]:
        """The dispatcher's JWKS, fetched once per phase (the keys do not rotate in a run)."""
        assert self._verify is not None
        async with self._jwks_lock:
            if self._jwks is None:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(self._verify["jwks_url"]) as r,
                ):
                    r.raise_for_status()
                    self._jwks = dict(await r.json())
        return self._jwks

    async def _receive(
        self, ep: Endpoint, request: web.Request, arrived: float
    ) -> web.StreamResponse:
        body = await request.read()
        ep.in_flight += 1
        try:
            if ep.verifier is not None:
                try:
                    claims = await ep.verifier.verify(request.headers, body)
                    if (
                        ep.account is not None
                        and isinstance(claims, dict)
                        and claims.get("account") != ep.account
                    ):
                        raise VerificationError(
                            "wrong_account", f"account claim {claims.get('account')!r}"
                        )
                except VerificationError as exc:
                    ep.verify_failures += 1
                    ep.reasons[exc.reason] += 1
                    return web.Response(status=401, text=exc.reason)
            if ep.behaviour.hang and not ep.healed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ep.healed.wait(), _HANG_LIMIT)
                arrived = time.time()  # answered only now
            status = await self._misbehave(ep)
            if status is not None:
                ep.failures += 1
                return web.Response(status=status)
            doc = orjson.loads(body)
            size = request.headers.get("webhook-batch-size")
            if isinstance(doc, list):
                if size is None or not size.isdigit() or int(size) != len(doc):
                    ep.verify_failures += 1
                    ep.reasons["batch_size_mismatch"] += 1
                    return web.Response(status=400, text="webhook-batch-size mismatch")
                for member in doc:
                    ep.record(member, arrived, batched=True)
            else:
                ep.record(doc, arrived, batched=False)
            ep.requests += 1
            return web.Response(status=204)
        finally:
            ep.in_flight -= 1

    async def _misbehave(self, ep: Endpoint) -> int | None:
        b = ep.behaviour
        if b.slow_ms:
            await asyncio.sleep(b.slow_ms / 1000)
        if b.gone_fraction or b.fail_fraction:
            r = self._rng.random()
            if r < b.gone_fraction:
                return 410
            if r < b.gone_fraction + b.fail_fraction:
                return 500
        return None

    # --- control ---------------------------------------------------------------------------

    async def _phase(self, request: web.Request) -> web.Response:
        spec = orjson.loads(await request.read())
        behaviours = spec.get("behaviours") or []
        for ep in [*self.endpoints, *self.paths.values()]:
            if ep.verifier is not None:
                await ep.verifier.close()
                ep.verifier = None
        self.paths = {}
        self._verify = spec if spec.get("verify") else None
        self._jwks = None
        self.gc.reset()
        for ep in self.endpoints:
            ep.reset()
            ep.behaviour = Behaviour.from_dict(
                behaviours[ep.index] if ep.index < len(behaviours) else None
            )
            if spec.get("verify"):
                ep.verifier = WebhookVerifier(
                    jwks_url=spec["jwks_url"], audience=ep.url, issuer=spec.get("issuer")
                )
        return web.json_response({"ok": True})

    async def _behaviour(self, request: web.Request) -> web.Response:
        spec = orjson.loads(await request.read())
        ep = self.endpoints[int(spec["index"])]
        ep.behaviour = Behaviour.from_dict(spec.get("behaviour"))
        if not ep.behaviour.hang:
            ep.healed.set()
        return web.json_response({"ok": True})

    async def _stats(self, _: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps([ep.stats() for ep in self.endpoints]),
            content_type="application/json",
        )

    async def _path_stats(self, _: web.Request) -> web.Response:
        total: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for ep in self.paths.values():
            for key, value in ep.stats().items():
                if key != "last_arrival":
                    total[key] += value
            reasons.update(ep.reasons)
        doc = {
            "paths": len(self.paths),
            **{
                k: total[k]
                for k in (
                    "received",
                    "unique",
                    "duplicates",
                    "failures",
                    "verify_failures",
                    "in_flight",
                    "requests",
                    "batched",
                    "cross_account",
                    "own_unique",
                )
            },
            "reasons": dict(reasons),
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _lookup(self, request: web.Request) -> web.Response:
        wanted = orjson.loads(await request.read()).get("paths") or []
        doc = {
            path: {"ids": ep.ids, "arrived": ep.arrived}
            for path in wanted
            if (ep := self.paths.get(path)) is not None
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _records(self, request: web.Request) -> web.Response:
        doc: dict[str, Any] = {
            "endpoints": [ep.records() for ep in self.endpoints],
            "gc": self.gc.as_dict(),
        }
        if request.query.get("paths"):
            doc["paths"] = {path: ep.records() for path, ep in self.paths.items()}
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def close(self) -> None:
        for ep in [*self.endpoints, *self.paths.values()]:
            ep.healed.set()
            if ep.verifier is not None:
                await ep.verifier.close()


async def serve(endpoints: int, seed: int) -> None:
    receiver = ReceiverApp(endpoints, seed)
    runner = web.AppRunner(
        receiver.app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    ports: list[int] = []
    for _ in range(endpoints + 1):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server: Any = site._server
        ports.append(server.sockets[0].getsockname()[1])
    control, *hook_ports = ports
    for ep, port in zip(receiver.endpoints, hook_ports, strict=True):
        ep.url = f"http://127.0.0.1:{port}/hooks/{ep.index}"
    sys.stdout.write(
        orjson.dumps(
            {"control": control, "endpoints": [ep.url for ep in receiver.endpoints]}
        ).decode()
        + "\n"
    )
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await receiver.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="load-test receivers on 127.0.0.1")
    parser.add_argument("--endpoints", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.endpoints, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
