"""`dispatcher demo`: the whole local loop once, then a summary.

It starts the example receiver (verifying every agent token against the dispatcher's JWKS and
writing to SQLite), a second receiver that fails its first try (to show a retry), and the
dispatcher, all on loopback; publishes sample bounces; shows them arriving; sends one forged
webhook that must be refused; prints a summary and exits 0 only if everything held.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from dispatcher.broker.dead_letters import DeadLetterTool
from dispatcher.broker.publisher import publish_events
from dispatcher.broker.topology import delete
from dispatcher.config import BreakerConfig, Config, SubscriberConfig
from dispatcher.process.daemon import Dispatcher

__all__ = ["run_demo", "sample_events"]

_RECIPIENTS = ["ada", "grace", "linus", "margaret", "ken", "barbara", "dennis", "frances"]


def sample_events(n: int, run: str) -> list[bytes]:
    """A mix like a real stream: mostly hard bounces, some soft ones, complaints, deliveries."""
    kinds = [
        (
            "Message.Bounced",
            "HardBounce",
            "550 5.1.1 The email account that you tried to reach does not exist",
        ),
        ("Message.Bounced", "SoftBounce", "452 4.2.2 Mailbox full"),
        ("Message.Complained", None, None),
        ("Message.Bounced", "HardBounce", "550 5.1.2 Bad destination domain"),
        ("Message.Delivered", None, None),
    ]
    out = []
    for i in range(n):
        event, bounce, code = kinds[i % len(kinds)]
        who = _RECIPIENTS[i % len(_RECIPIENTS)]
        data: dict[str, Any] = {"messageid": f"msg{i:05d}", "recipient": f"{who}{i}@example.com"}
        if bounce:
            data.update(bounce_type=bounce, diagnostic_code=code)
        out.append(
            orjson.dumps(
                {
                    "id": f"demo-{run}-{i:04d}",
                    "event": event,
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "data": data,
                }
            )
        )
    return out


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _broker_reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 5672), timeout=3
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


class _Flaky:
    """A subscriber that fails the first attempt of every event with a 503, then accepts."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.accepted: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        if webhook_id not in self.seen:
            self.seen.add(webhook_id)
            return web.Response(status=503, text="warming up")
        self.accepted.add(webhook_id)
        return web.Response(status=204)


async def run_demo(config: Config, *, events: int = 20, keep: bool = False) -> int:
    from example_receiver.app import create_app
    from example_receiver.settings import ReceiverSettings

    if not await _broker_reachable(config.broker.url):
        where = urlsplit(config.broker.url).netloc.split("@")[-1]
        print(
            f"dispatcher demo: RabbitMQ is not answering at {where}. Start it "
            "(rabbitmq-server -detached, or docker compose up -d rabbitmq) and run the demo again.",
            file=sys.stderr,
        )
        return 1

    run = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-demo-"))
    ops_port, receiver_port, flaky_port = _free_port(), _free_port(), _free_port()
    receiver_url = f"http://127.0.0.1:{receiver_port}/webhooks/email"
    flaky_url = f"http://127.0.0.1:{flaky_port}/hooks/flaky"
    cfg = replace(
        config,
        allow_private_networks=True,
        broker=replace(
            config.broker,
            exchange=f"demo-{run}.events",
            queue=f"demo-{run}.dispatch",
            queue_type="classic",
        ),
        http=replace(config.http, listen=f"127.0.0.1:{ops_port}"),
        signing=replace(config.signing, keys_dir=str(workdir / "keys")),
        retry=replace(config.retry, schedule=(0.2, 0.5, 1.0), jitter=0.0),
        # Every event's first try fails on purpose here: keep the breaker out of the story.
        breaker=BreakerConfig(failure_threshold=1000, cooldown=1.0),
        subscribers=(
            SubscriberConfig(
                id="example-receiver",
                url=receiver_url,
                events=("Message.Bounced", "Message.Complained"),
            ),
            SubscriberConfig(id="flaky", url=flaky_url, events=("Message.Bounced",)),
        ),
    )
    db_path = workdir / "receiver.sqlite3"
    settings = ReceiverSettings(
        db_url=f"sqlite:///{db_path}",
        host="127.0.0.1",
        port=receiver_port,
        jwks_url=f"http://127.0.0.1:{ops_port}/.well-known/jwks.json",
        audience=receiver_url,
        issuer=cfg.signing.issuer,
    )
    bodies = sample_events(events, run)
    matching = [b for b in bodies if b'"Message.Bounced"' in b or b'"Message.Complained"' in b]
    bounces = [b for b in bodies if b'"Message.Bounced"' in b]

    _say(f"demo: broker {urlsplit(cfg.broker.url).hostname}, exchange {cfg.broker.exchange}")
    _say(f"demo: example receiver on {receiver_url} (SQLite {db_path})")
    _say(f"demo: flaky receiver on {flaky_url} (503 on each event's first try)")
    flaky = _Flaky()
    flaky_app = web.Application()
    flaky_app.router.add_post("/hooks/flaky", flaky.handle)
    runners = [
        web.AppRunner(create_app(settings), access_log=None, handle_signals=False),
        web.AppRunner(flaky_app, access_log=None, handle_signals=False),
    ]
    ok = False
    try:
        for runner, port in zip(runners, (receiver_port, flaky_port), strict=True):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        async with Dispatcher(cfg) as disp:
            _say(
                f"demo: dispatcher consuming {cfg.broker.queue}; JWKS on "
                f"http://127.0.0.1:{ops_port}/.well-known/jwks.json"
            )
            started = time.monotonic()
            await publish_events(cfg, bodies, progress=None)
            _say(f"demo: published {len(bodies)} events ({len(matching)} bounces/complaints)")
            stats = await _watch(receiver_port, len(matching), flaky, len(bounces))
            elapsed = time.monotonic() - started
            forged_status, forged_reason = await _forge(receiver_url, bodies[0])
            metrics = disp.metrics
            retries = sum(
                s.value
                for m in metrics.retries.collect()
                for s in m.samples
                if s.name.endswith("_total")
            )
        letters = await DeadLetterTool(cfg, progress=None).list()
        invalid = _invalid_addresses(db_path)
        _say("")
        _say("summary")
        _say(f"  events published            {len(bodies)}")
        _say(f"  verified by the receiver    {stats.get('verified', 0)} of {len(matching)}")
        _say(f"  addresses invalidated       {len(invalid)} (e.g. {', '.join(invalid[:3])})")
        _say(
            f"  flaky: retried, then ok     {len(flaky.accepted)} of {len(bounces)} "
            f"({int(retries)} retries scheduled)"
        )
        _say(f"  forged webhook              {forged_status} {forged_reason}")
        _say(f"  dead letters                {len(letters)}")
        _say(f"  time                        {elapsed:.2f}s")
        ok = (
            stats.get("verified", 0) == len(matching)
            and len(flaky.accepted) == len(bounces)
            and forged_status == 401
            and not letters
            and bool(invalid)
        )
        _say("demo OK" if ok else "demo FAILED: see above")
    finally:
        for runner in runners:
            await runner.cleanup()
        if not keep:
            await _delete_topology(cfg)
    return 0 if ok else 1


async def _watch(port: int, want: int, flaky: _Flaky, want_flaky: int) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    shown = -1
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"http://127.0.0.1:{port}/stats") as resp:
                stats = await resp.json()
            got = int(stats.get("verified", 0))
            if got != shown:
                _say(
                    f"demo: receiver verified {got}/{want} webhooks, "
                    f"flaky accepted {len(flaky.accepted)}/{want_flaky}"
                )
                shown = got
            if got >= want and len(flaky.accepted) >= want_flaky:
                break
            await asyncio.sleep(0.1)
    return stats


async def _forge(url: str, body: bytes) -> tuple[int, str]:
    """A hard bounce signed with a key the dispatcher never published: must be refused."""
    from signing import KeyRing, TokenMinter

    with tempfile.TemporaryDirectory() as tmp:
        minter = TokenMinter(
            KeyRing.load(tmp),
            issuer="https://mail.example.com",
            subject="agent:webhook-dispatcher",
            ttl_seconds=300,
        )
        token = minter.mint(audience=url, webhook_id="forged-1", body=body)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url,
            data=body,
            headers={
                "Authorization": f"Bearer {token}",
                "webhook-id": "forged-1",
                "webhook-timestamp": str(int(time.time())),
                "Content-Type": "application/json",
            },
        ) as resp,
    ):
        try:
            reason = (await resp.json()).get("error", "")
        except (aiohttp.ContentTypeError, ValueError):
            reason = ""
        return resp.status, f"refused ({reason})" if resp.status == 401 else "ACCEPTED"


def _invalid_addresses(db_path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute("SELECT email FROM users WHERE email_valid = 0 ORDER BY email")
        return [r[0] for r in rows.fetchall()]


async def _delete_topology(cfg: Config) -> None:
    import aio_pika

    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(cfg.broker.url)
        async with connection:
            await delete(await connection.channel(), cfg.broker, [s.id for s in cfg.subscribers])
