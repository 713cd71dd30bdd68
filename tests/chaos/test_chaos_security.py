"""Security under fire: forged webhooks never change the example receiver's database, secrets
never reach a log or an error message, and a redirect to an internal address is not followed.

One dispatcher process (debug logs) delivers genuine events to two example receivers (one
verifying agent tokens, one HMAC signatures), to a tap that sees what an eavesdropper would, to
a receiver that echoes credentials back in its error pages, and to subscribers that redirect
to an internal endpoint. Meanwhile an attacker sends every forgery and replay in
`chaos_attacks` to both receivers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from chaos_attacks import Target, hmac_attacks, jwt_attacks
from chaos_endpoints import Endpoint, EndpointServer, redirect
from chaos_events import owed_to
from chaos_ledger import Ledger, record
from chaos_process import PROJECT_ROOT, DispatcherProcess, await_settled
from chaos_scale import pick
from cryptography.hazmat.primitives import serialization

from example_receiver import ReceiverSettings, create_app
from signing import KeyRing
from tests.support.harness import (
    Publisher,
    broker_url,
    dead_letters,
    event_body,
    running,
    wait_until,
)
from tests.support.receiver_helpers import ISSUER, bound_socket, serve, sqlite_snapshot
from tests.support.toml_files import to_toml

pytestmark = pytest.mark.chaos

RETRY = {"schedule": ["50ms", "100ms"], "jitter": 0.0}  # 3 attempts


def _whsec(raw: bytes) -> str:
    return "whsec_" + base64.b64encode(raw).decode()


class _Tap:
    """Middleware that records each request an example receiver answered, and how."""

    def __init__(self) -> None:
        self.genuine: list[tuple[dict[str, str], bytes]] = []  # answered 2xx, not attacks
        self.receipts: list[str] = []
        self.attacks: list[tuple[str, int, Any]] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        response = await handler(request)
        headers = dict(request.headers)
        if "x-chaos-attack" not in headers and 200 <= response.status < 300:
            self.genuine.append((headers, body))
            self.receipts.append(headers.get("webhook-id", ""))
        return response


async def _echo(endpoint: Endpoint, request: web.Request, _: int) -> web.StreamResponse:
    """A careless subscriber: its error page repeats the credentials it was sent."""
    text = (
        f"denied sig={request.headers.get('webhook-signature')} "
        f"auth={request.headers.get('Authorization')}"
    )
    return web.Response(status=500, text=text)


def _secrets_of(keyring: KeyRing, hmac_secrets: list[bytes]) -> dict[str, str]:
    """Every form in which the private key and the HMAC secrets could leak."""
    out: dict[str, str] = {}
    key = keyring.signing_key()
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    for i, line in enumerate(pem.splitlines()):
        if not line.startswith("-----"):
            out[f"private key PEM line {i}"] = line
    raw = key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    out["private key (base64url)"] = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    out["private key (base64)"] = base64.b64encode(raw).decode().rstrip("=")
    out["private key (hex)"] = raw.hex()
    for n, secret in enumerate(hmac_secrets):
        out[f"hmac secret {n} (whsec)"] = _whsec(secret)
        out[f"hmac secret {n} (base64)"] = base64.b64encode(secret).decode().rstrip("=")
        out[f"hmac secret {n} (hex)"] = secret.hex()
    return out


def _tokens(requests: list[dict[str, str]]) -> dict[str, str]:
    out = {}
    for headers in requests:
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth.removeprefix("Bearer ")
            out[f"agent token {len(out)}"] = token
            out[f"agent token {len(out) - 1} signature"] = token.rsplit(".", 1)[1]
    return out


async def _cli(*args: str, config: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "--config",
        str(config),
        *args,
        cwd=PROJECT_ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace") + err.decode(errors="replace")


def _leaks(secrets: dict[str, str], outputs: dict[str, str]) -> list[str]:
    return [
        f"{what} appears in {where}"
        for where, text in outputs.items()
        for what, secret in secrets.items()
        if len(secret) >= 16 and secret in text
    ]


@pytest.mark.timeout(pick(120, 600))
async def test_forgeries_change_nothing_secrets_stay_secret_redirects_are_not_followed(
    chaos_config, keys_dir: str, tmp_path: Path
) -> None:
    n_events, rounds = pick(10, 100), pick(1, 10)
    keyring = KeyRing.load(keys_dir, "EdDSA")  # the dispatcher's key, made before it starts
    rx_secret, tap_secret = os.urandom(32), os.urandom(32)
    env = {"CHAOS_HMAC_RX": _whsec(rx_secret), "CHAOS_HMAC_TAP": _whsec(tap_secret)}
    jwt_sock, hmac_sock = bound_socket(), bound_socket()
    jwt_url = f"http://127.0.0.1:{jwt_sock.getsockname()[1]}/webhooks/email"
    hmac_url = f"http://127.0.0.1:{hmac_sock.getsockname()[1]}/webhooks/email"
    jwt_tap, hmac_tap = _Tap(), _Tap()

    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(EndpointServer())
        internal_server = await stack.enter_async_context(EndpointServer())
        internal = internal_server.add("internal")  # an internal service: must see nothing
        tap = server.add("tap", keep_headers=True)
        echo = server.add("echo", _echo, keep_headers=True)
        redirectors = {
            status: server.add(f"redirect-{status}", redirect(internal.url, status))
            for status in (301, 302, 303, 307, 308)
        }
        subs: list[dict[str, Any]] = [
            {"id": "jwt-rx", "url": jwt_url, "auth": "jwt", "events": ["Message.Bounced"]},
            {
                "id": "hmac-rx",
                "url": hmac_url,
                "auth": "hmac",
                "hmac_secret_env": "CHAOS_HMAC_RX",
                "events": ["Message.Bounced"],
            },
            {"id": "tap", "url": tap.url, "auth": "jwt+hmac", "hmac_secret_env": "CHAOS_HMAC_TAP"},
            {
                "id": "echo",
                "url": echo.url,
                "auth": "jwt+hmac",
                "hmac_secret_env": "CHAOS_HMAC_TAP",
            },
            *({"id": f"redirect-{s}", "url": e.url} for s, e in redirectors.items()),
        ]
        # No breaker in the way: it would serialize the always-failing subscribers' attempts.
        doc, cfg = chaos_config(
            subs,
            env=env,
            retry=RETRY,
            breaker={"failure_threshold": 10_000},
            dispatcher={"log_level": "debug", "log_format": "json"},
        )
        proc = await stack.enter_async_context(DispatcherProcess(doc, tmp_path, env=env))
        await proc.start()
        captured_logs = stack.enter_context(structlog.testing.capture_logs())
        receivers = {}
        for name, sock, url, tapper, extra in (
            (
                "jwt",
                jwt_sock,
                jwt_url,
                jwt_tap,
                {
                    "jwks_url": f"{proc.base}/.well-known/jwks.json",
                    "audience": jwt_url,
                    "issuer": ISSUER,
                },
            ),
            ("hmac", hmac_sock, hmac_url, hmac_tap, {"hmac_secrets": (_whsec(rx_secret),)}),
        ):
            settings = ReceiverSettings(
                db_url=f"sqlite:///{tmp_path / f'{name}.sqlite3'}",
                port=sock.getsockname()[1],
                **extra,
            )
            app = create_app(settings)
            app.middlewares.append(tapper.middleware)
            await stack.enter_async_context(serve(app, sock))
            receivers[name] = (url, Path(settings.database.target), tapper)

        ledger = Ledger("security: forged webhooks, secrets, redirects")
        ids = [f"genuine-{i:04d}" for i in range(n_events)]
        for event_id in ids:
            ledger.expect(event_id, owed_to("Message.Bounced", subs))

        def receipts() -> dict[str, list[str]]:
            return {**server.receipts(), "jwt-rx": jwt_tap.receipts, "hmac-rx": hmac_tap.receipts}

        async with Publisher(cfg) as pub:
            for i, event_id in enumerate(ids):
                await pub.publish(
                    event_body(
                        "Message.Bounced",
                        n=i,
                        event_id=event_id,
                        recipient=f"genuine-{i}@example.com",
                    )
                )
        # Attack while genuine traffic flows, once something has been captured to replay.
        assert await wait_until(
            lambda: bool(jwt_tap.genuine and hmac_tap.genuine and tap.headers), timeout=30
        ), proc.log_tail()
        targets = {
            "jwt": Target(
                jwt_url,
                keyring,
                tmp_path,
                captured=jwt_tap.genuine,
                elsewhere=[(h, b) for h, b in zip(tap.headers, tap.bodies, strict=True)],
            ),
            "hmac": Target(
                hmac_url,
                keyring,
                tmp_path,
                secret=rx_secret,
                captured=hmac_tap.genuine,
                elsewhere=[(h, b) for h, b in zip(tap.headers, tap.bodies, strict=True)],
            ),
        }
        answers: list[tuple[str, str, int, Any]] = []
        async with aiohttp.ClientSession() as http:
            for _ in range(rounds):
                for rx, attacks in (
                    ("jwt", jwt_attacks(targets["jwt"])),
                    ("hmac", hmac_attacks(targets["hmac"])),
                ):
                    url = receivers[rx][0]
                    for name, build in attacks.items():
                        headers, body = build()
                        async with http.post(url, data=body, headers=headers) as resp:
                            raw = await resp.read()
                            answers.append(
                                (rx, name, resp.status, json.loads(raw) if raw.strip() else None)
                            )
        tally = await await_settled(ledger, receipts, cfg, timeout=pick(60, 300))
        metrics = (await _get(f"{proc.base}/metrics")) or ""
        jwks = (await _get(f"{proc.base}/.well-known/jwks.json")) or ""
        letters = await dead_letters(cfg)
        echo_letter = next(d for d in letters if d.record.subscriber == "echo")
        cli_outputs = {}
        for args in (
            ["dlq", "list", "--json"],
            ["dlq", "show", echo_letter.record.id],
            ["check-config"],
            ["keys", "jwks"],
        ):
            code, text = await _cli(*args, config=proc.config_path, env=env)
            assert code == 0, text
            cli_outputs[f"`dispatcher {' '.join(args[:2])}`"] = text
        code = await proc.terminate()
        logs = proc.log_text()

    record(tally)
    problems: list[str] = []

    # 1. Forgeries: refused, and the databases hold exactly the genuine events.
    for rx, name, status, answer in answers:
        duplicate = (
            status == 200 and isinstance(answer, dict) and answer.get("status") == "duplicate"
        )
        if status != 401 and not (name == "replay: exact" and duplicate):
            problems.append(f"{rx} receiver answered forgery {name!r} with {status} {answer}")
    print(
        "\nforgeries answered: "
        + ", ".join(
            f"{rx}/{name}: {status} {(answer or {}).get('error', (answer or {}).get('status'))}"
            for rx, name, status, answer in answers[: len(answers) // rounds]
        )
    )
    for rx, (_, db, _) in receivers.items():
        snapshot = sqlite_snapshot(db)
        emails = sorted(row[0] for row in snapshot["users"])
        processed = sorted(row[0] for row in snapshot["processed_webhooks"])
        if emails != sorted(f"genuine-{i}@example.com" for i in range(n_events)):
            problems.append(
                f"{rx} receiver users changed: "
                f"{[e for e in emails if not e.startswith('genuine-')][:5]}"
            )
        if processed != ids:
            problems.append(
                f"{rx} receiver processed {len(processed)} webhook ids, "
                f"e.g. strays {[p for p in processed if p not in ids][:5]}"
            )
        if snapshot["soft_bounce_log"]:
            problems.append(f"{rx} receiver soft_bounce_log changed")

    # 2. Secrets: not in any log, error, dead letter, endpoint or CLI output.
    tokens = _tokens([h for h, _ in jwt_tap.genuine] + tap.headers + echo.headers)
    assert len(tokens) >= 2 * n_events, "the agent tokens to look for were not collected"
    secrets = {**_secrets_of(keyring, [rx_secret, tap_secret]), **tokens}
    assert _leaks(secrets, {"a planted leak": f"x{next(iter(tokens.values()))}x"})
    outputs = {
        "dispatcher log": logs,
        "example receiver logs": json.dumps(captured_logs, default=str),
        "/metrics": metrics,
        "/.well-known/jwks.json": jwks,
        "dead-letter records": json.dumps(
            [d.export() | {"headers": d.headers} for d in letters], default=str
        ),
        **cli_outputs,
    }
    problems += _leaks(secrets, outputs)
    if '"d"' in jwks:
        problems.append("the JWKS publishes a private member")

    # 3. Redirects: never followed; each is a failed attempt, then a dead letter.
    if internal.requests:
        problems.append(f"the internal endpoint was reached {internal.requests} times")
    for status, endpoint in redirectors.items():
        mine = [d for d in letters if d.record.subscriber == f"redirect-{status}"]
        if sorted(d.record.event_id for d in mine) != ids:
            problems.append(f"redirect {status}: {len(mine)} dead letters for {n_events} events")
        for d in mine:
            if d.record.reason != "attempts_exhausted" or not (
                d.record.last_error or ""
            ).startswith(f"redirect: {status}"):
                problems.append(f"redirect {status}: {d.record.reason} {d.record.last_error!r}")
                break
        if any(n != 3 for n in endpoint.attempts.values()):
            problems.append(f"redirect {status}: attempts {dict(endpoint.attempts)}")
    if code != 0:
        problems.append(f"dispatcher exit code {code}")
    assert not problems, "\n".join(problems[:30])
    tally.holds(max_duplicates=0)


async def _get(url: str) -> str | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return await resp.text()
    except aiohttp.ClientError:
        return None


# --- error paths ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_secrets_stay_out_of_error_messages(names, keys_dir: str, tmp_path: Path) -> None:
    """Bad secrets and unreachable or refusing brokers fail with one line that names the
    problem, never the secret."""
    secret = os.urandom(32)
    password = "S3cret-Broker-Passw0rd"
    cases: list[tuple[str, dict[str, Any], dict[str, str], list[str], int]] = [
        (
            "HMAC secret that is not base64",
            {
                "subscribers": [
                    {
                        "id": "s",
                        "url": "http://127.0.0.1:9/h",
                        "auth": "hmac",
                        "hmac_secret_env": "CHAOS_BAD_SECRET",
                    }
                ]
            },
            {"CHAOS_BAD_SECRET": "whsec_" + base64.b64encode(secret).decode() + "!!"},
            ["check-config"],
            2,
        ),
        (
            "HMAC secret too short",
            {
                "subscribers": [
                    {
                        "id": "s",
                        "url": "http://127.0.0.1:9/h",
                        "auth": "hmac",
                        "hmac_secret_env": "CHAOS_BAD_SECRET",
                    }
                ]
            },
            {"CHAOS_BAD_SECRET": "whsec_" + base64.b64encode(secret[:8]).decode()},
            ["run", "--workers", "1"],
            2,
        ),
        (
            "broker refuses the password",
            {"broker": {"url": broker_url(password=password)}},
            {},
            ["dlq", "list"],
            1,
        ),
        (
            "broker unreachable",
            {"broker": {"url": f"amqp://guest:{password}@127.0.0.1:9/"}},
            {},
            ["run", "--workers", "1"],
            1,
        ),
    ]
    problems = []
    for name, overrides, env, args, want in cases:
        doc: dict[str, Any] = {
            "allow_private_networks": True,
            "broker": {
                "exchange": names.exchange,
                "queue": names.queue,
                "queue_type": "classic",
                **overrides.get("broker", {}),
            },
            "http": {"listen": "127.0.0.1:0"},
            "signing": {"keys_dir": keys_dir},
            "subscribers": overrides.get("subscribers", []),
        }
        path = tmp_path / f"{name.replace(' ', '-')}.toml"
        path.write_text(to_toml({k: v for k, v in doc.items() if v != []}), encoding="utf-8")
        code, text = await _cli(*args, config=path, env=env)
        lines = [line for line in text.splitlines() if line.startswith("dispatcher:")]
        if code != want or len(lines) != 1:
            problems.append(f"{name}: exit {code} (want {want}), output {text[-300:]!r}")
        leaked = [
            s
            for s in (
                base64.b64encode(secret).decode().rstrip("="),
                base64.b64encode(secret[:8]).decode().rstrip("="),
                password,
                secret.hex(),
            )
            if s in text
        ]
        if leaked:
            problems.append(f"{name}: the error shows a secret: {text[-300:]!r}")
    assert not problems, "\n".join(problems)


# --- SSRF ---------------------------------------------------------------------------------------


def _loopback_name() -> str | None:
    """A host name (not "localhost") that resolves to a loopback address here, if any."""
    for name in (socket.gethostname(), "ip6-localhost", "localhost.localdomain"):
        try:
            infos = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        if (
            name != "localhost"
            and infos
            and all(i[4][0].startswith("127.") or i[4][0] == "::1" for i in infos)
        ):
            return name
    return None


@pytest.mark.timeout(60)
async def test_a_name_that_resolves_to_loopback_is_blocked(make) -> None:
    """Without ``allow_private_networks``, a subscriber URL whose *name* resolves to a loopback
    address passes the config check (names are checked when connecting) and is refused at
    connect time: dead-lettered ``blocked_destination``, the endpoint never reached."""
    name = _loopback_name()
    if name is None:
        pytest.skip("no host name here resolves only to loopback")
    async with EndpointServer() as server:
        target = server.add("internal")
        url = target.url.replace("127.0.0.1", name)
        cfg = make([{"id": "sneaky", "url": url}], allow_private_networks=False, retry=RETRY)
        ledger = Ledger("security: subscriber name resolving to loopback")
        ledger.expect("ssrf-1", ["sneaky"])
        with structlog.testing.capture_logs():
            async with running(cfg), Publisher(cfg) as pub:
                await pub.publish(event_body(event_id="ssrf-1"))
                tally = await await_settled(ledger, server.receipts, cfg, timeout=20)
    record(tally)
    letters = await dead_letters(cfg)
    assert target.requests == 0
    assert [(d.record.reason, d.record.event_id) for d in letters] == [
        ("blocked_destination", "ssrf-1")
    ]
    tally.holds(max_duplicates=0)
