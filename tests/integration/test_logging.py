"""Logs: JSON lines by default, console on a terminal, and never a secret or a token."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog
from aiohttp import web

from dispatcher.config import parse_config
from dispatcher.process.log import configure_logging, scrub
from tests.support.harness import (
    Publisher,
    Receiver,
    ReceiverServer,
    always,
    event_body,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


JWT = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIiwidHlwIjoid2ViaG9vaytqd3QifQ"
    ".eyJpc3MiOiJodHRwczovL21haWwuZXhhbXBsZS5jb20iLCJzdWIiOiJhZ2VudCJ9"
    ".c2lnbmF0dXJlLWJ5dGVzLXNpZ25hdHVyZS1ieXRlcw"
)
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SIGNATURE = "v1," + base64.b64encode(b"s" * 32).decode()
PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4\n"
    "-----END PRIVATE KEY-----\n"
)


@pytest.mark.parametrize(
    "text, leaked",
    [
        (f"http 401: Bearer {JWT}", JWT),
        (f"token={JWT}", JWT),
        (f"secret {SECRET} in a message", SECRET),
        (f"webhook-signature: {SIGNATURE}", SIGNATURE),
        (f"key: {PEM}", "MC4CAQAwBQYDK2VwBCIEIHh4"),
        ("amqp://dispatcher:s3cr3t-pw@rabbitmq:5672/mail", "s3cr3t-pw"),
    ],
)
def test_scrub_removes_secret_shapes(text: str, leaked: str) -> None:
    out = scrub(text)
    assert leaked not in out and "[redacted]" in out


def test_json_by_default_and_console_on_a_terminal(restore_logging: None) -> None:
    log = structlog.get_logger("t")

    pipe = io.StringIO()
    configure_logging("info", "auto", pipe)
    log.info("delivery_retry_scheduled", subscriber="acme", attempt=2, error=f"http 401: {JWT}")
    log.debug("hidden")
    logging.getLogger("aio_pika").warning("Connection to %s closed", "amqp://u:pw123456@h/")
    lines = [orjson.loads(line) for line in pipe.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "delivery_retry_scheduled",
        "Connection to amqp://[redacted]@h/ closed",
    ]
    assert lines[0]["subscriber"] == "acme" and lines[0]["level"] == "info"
    assert "timestamp" in lines[0] and JWT not in pipe.getvalue()
    assert lines[1]["logger"] == "aio_pika" and lines[1]["level"] == "warning"

    tty = _Tty()
    configure_logging("debug", "auto", tty)
    log.debug("shown", subscriber="acme")
    text = tty.getvalue()
    assert "shown" in text and "subscriber" in text and "acme" in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text.splitlines()[0])

    forced = io.StringIO()
    configure_logging("info", "console", forced)
    try:
        raise RuntimeError(f"bad token {JWT}")
    except RuntimeError:
        log.exception("message_failed")
    text = forced.getvalue()
    assert "message_failed" in text and "RuntimeError" in text and JWT not in text
    assert not text.lstrip().startswith("{")


def test_level_and_format_come_from_config_or_env() -> None:
    doc = {"dispatcher": {"log_level": "warning", "log_format": "console"}}
    assert parse_config(doc, {}).dispatcher.log_level == "warning"
    env = {"DISPATCHER_LOG_LEVEL": "DEBUG", "DISPATCHER_LOG_FORMAT": "json"}
    cfg = parse_config(doc, env)
    assert (cfg.dispatcher.log_level, cfg.dispatcher.log_format) == ("debug", "json")


def start_dispatcher(toml: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "DISPATCHER_"))
    }
    child_env.update(env)
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(toml), "run", "--workers", "2"],
            cwd=ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def key_material(keys_dir: str) -> set[str]:
    """Every base64 line of every private key PEM."""
    pems = list(Path(keys_dir).glob("*.pem"))
    assert pems
    return {
        ln
        for pem in pems
        for ln in pem.read_text().splitlines()
        if ln and not ln.startswith("-----")
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_full_run_logs_no_secret_or_token(
    make, receivers: ReceiverServer, tmp_path: Path, keys_dir: str
) -> None:
    seen: list[dict[str, str]] = []

    def recording(status: int) -> object:
        async def behaviour(_: Receiver, request: web.Request, __: int) -> web.StreamResponse:
            seen.append(dict(request.headers))
            return web.Response(status=status)

        return behaviour

    async def echo(_: Receiver, request: web.Request, __: int) -> web.StreamResponse:
        # A subscriber that echoes its credentials into the error body (which is logged).
        seen.append(dict(request.headers))
        return web.Response(
            status=401,
            text=" ".join(
                f"{k}: {v}"
                for k, v in request.headers.items()
                if k.lower() in ("authorization", "webhook-signature")
            ),
        )

    retried: set[str] = set()

    async def flaky(_: Receiver, request: web.Request, __: int) -> web.StreamResponse:
        seen.append(dict(request.headers))
        wid = request.headers["webhook-id"]
        if wid in retried:
            return web.Response(status=204)
        retried.add(wid)
        return web.Response(status=503)

    jwt_rec = receivers.add("jwt", recording(204))  # type: ignore[arg-type]
    hmac_rec = receivers.add("hmac", recording(204))  # type: ignore[arg-type]
    flaky_rec = receivers.add("flaky", flaky)
    echo_rec = receivers.add("echo", echo)
    broken = receivers.add("broken", always(500))
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {"LOGTEST_SECRET": secret}
    toml = tmp_path / "dispatcher.toml"
    port = _free_port()
    make(
        [
            {"id": "jwt", "url": jwt_rec.url, "auth": "jwt"},
            {
                "id": "hmac",
                "url": hmac_rec.url,
                "auth": "jwt+hmac",
                "hmac_secret_env": "LOGTEST_SECRET",
            },
            {
                "id": "flaky",
                "url": flaky_rec.url,
                "auth": "jwt+hmac",
                "hmac_secret_env": "LOGTEST_SECRET",
            },
            {
                "id": "echo",
                "url": echo_rec.url,
                "auth": "jwt+hmac",
                "hmac_secret_env": "LOGTEST_SECRET",
            },
            {"id": "broken", "url": broken.url, "events": ["Message.Complained"]},
        ],
        toml=toml,
        env=env,
        http={"listen": f"127.0.0.1:{port}"},
        retry={"schedule": ["20ms", "40ms"], "jitter": 0.0},
        breaker={"failure_threshold": 100},
        dispatcher={"log_level": "debug", "log_format": "json", "drain_timeout": "5s"},
    )
    cfg = make([], env=env)  # only for publishing; same names
    log_path = tmp_path / "run.log"
    proc = start_dispatcher(toml, log_path, env)
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            for _ in range(300):
                if await ready():
                    break
                await asyncio.sleep(0.1)
            assert await ready(), log_path.read_text()[-2000:]

        async with Publisher(cfg) as pub:
            for i in range(5):
                await pub.publish(event_body(n=i, event_id=f"log-{i}"))
            await pub.publish(event_body("Message.Complained", n=7, event_id="log-c"))
            await pub.publish(
                b'{"event": "Message.Bounced", "data": 5}', routing_key="Message.Bounced"
            )
        assert await wait_until(
            lambda: (
                jwt_rec.count == 6
                and hmac_rec.count == 6
                and flaky_rec.count == 6
                and echo_rec.attempts == 18
                and broken.attempts == 3
            ),
            timeout=20,
        )
        await asyncio.sleep(0.3)  # the last dead letters are confirmed and logged
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    raw = log_path.read_text()
    lines = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
    events = {line["event"] for line in lines}
    assert {
        "dispatcher_started",
        "delivery_retry_scheduled",
        "delivery_dead_lettered",
        "event_invalid",
        "drained",
        "supervisor_stopped",
    } <= events, events
    assert all({"event", "level", "timestamp"} <= line.keys() for line in lines)

    # Everything that must never appear.
    tokens = {h["Authorization"].removeprefix("Bearer ") for h in seen if "Authorization" in h}
    signatures = {h["webhook-signature"] for h in seen if "webhook-signature" in h}
    assert len(tokens) == len(seen) == 42
    assert sum("webhook-signature" in h for h in seen) == 36
    forbidden = tokens | signatures | {s.removeprefix("v1,") for s in signatures}
    forbidden |= {secret, secret.removeprefix("whsec_"), "PRIVATE KEY", "guest:guest@"}
    forbidden |= key_material(keys_dir)
    leaked = sorted(f[:24] + "..." for f in forbidden if f in raw)
    assert not leaked, f"secrets in the logs: {leaked}"
    # The echoed credentials did reach the log path, redacted.
    assert any("[redacted]" in str(line.get("error")) for line in lines)
