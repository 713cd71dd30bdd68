"""Support for the receiver-recipe tests: recipes read from docs/receivers.md, recipe servers as
child processes, forged requests, an https JWKS endpoint and Apache httpd run from deploy/apache.

Nothing is mocked: each recipe is a real server on a loopback port, Apache is a real httpd
child process with its own config directory, and the JWKS comes from a running dispatcher.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signing import KeyRing, SigningKey, generate_key
from tests.support.ports import free_port
from tests.support.receiver_helpers import ISSUER, claims_for, craft_token, event_body

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "receivers.md"
KIT_DIR = Path(os.environ.get("RECEIVER_KIT_DIR", ROOT / "var" / "receiver-kit"))
NODE_MODULES = KIT_DIR / "node" / "node_modules"
APACHE = Path("/usr/sbin/apache2")
APACHE_MODULES = Path("/usr/lib/apache2/modules")
PATH = "/webhooks/email"

_VERIFIED = re.compile(r"verified (\S+) \d+")
_RECIPE = re.compile(r"<!-- recipe: (?P<name>[\w.]+) -->\s*```\w*\n(?P<code>.*?)```", re.DOTALL)


def recipes() -> dict[str, str]:
    """Every recipe in docs/receivers.md by file name, exactly as printed there."""
    return {m["name"]: m["code"] for m in _RECIPE.finditer(DOCS.read_text(encoding="utf-8"))}


def kit_problems() -> list[str]:
    """What scripts/ensure-receiver-kit should have installed but is missing."""
    problems = []
    if not APACHE.exists():
        problems.append(f"{APACHE} (apt-get install apache2-bin)")
    for module in ("mod_auth_openidc.so", "mod_proxy_http.so", "mod_mpm_event.so"):
        if not (APACHE_MODULES / module).exists():
            problems.append(f"{APACHE_MODULES / module}")
    if not (NODE_MODULES / "jose" / "package.json").exists():
        problems.append(f"jose in {NODE_MODULES}")
    try:
        subprocess.run(["node", "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        problems.append("node")
    return problems


# --- recipe servers ---------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A child process serving HTTP on a loopback port; its output is collected line by line."""

    argv: list[str]
    port: int
    env: dict[str, str]
    cwd: Path
    stop_signal: int = signal.SIGINT
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    returncode: int | None = None
    _proc: subprocess.Popen[str] | None = None
    _readers: list[threading.Thread] = field(default_factory=list)

    def verified(self) -> set[str]:
        """The webhook ids the recipe printed as verified."""
        # Threads' prints may interleave within a line: find every "verified <id>" in the text.
        return set(_VERIFIED.findall("".join(list(self.stdout))))

    async def __aenter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stream, sink in ((self._proc.stdout, self.stdout), (self._proc.stderr, self.stderr)):
            reader = threading.Thread(target=_collect, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + 30
        while not await _accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                await self._stop()
                raise AssertionError(f"{self.argv} did not listen: {''.join(self.stderr)[-2000:]}")
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 15)
        for reader in self._readers:
            await asyncio.to_thread(reader.join, 5)
        self.returncode = proc.returncode
        self._proc = None


def _collect(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
    stream.close()


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def recipe_env(jwks_url: str, audience: str, port: int, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WEBHOOK_", "PYTHONWARNINGS"))
    }
    env.update(
        WEBHOOK_JWKS_URL=jwks_url,
        WEBHOOK_AUDIENCE=audience,
        WEBHOOK_ISSUER=ISSUER,
        PORT=str(port),
        NODE_PATH=str(NODE_MODULES),
        **extra,
    )
    return env


# --- deliveries and forgeries ------------------------------------------------------------------


def genuine(ring: KeyRing, url: str, algorithm: str, **claims: Any) -> tuple[dict[str, str], bytes]:
    """A request as the dispatcher would send it, signed with its real key for `algorithm`."""
    key = ring.signing_key(algorithm=algorithm)
    body = event_body(recipient=f"real-{uuid.uuid4().hex[:8]}@example.com")
    webhook_id = f"evt_{uuid.uuid4().hex}"
    token = craft_token(key, _header(key), claims_for(url, webhook_id, body, **claims))
    return _headers(token, webhook_id), body


def _header(key: SigningKey, **overrides: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "webhook+jwt"}
    for name, value in overrides.items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    return header


def _headers(token: str | None, webhook_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "webhook-id": webhook_id}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


Forgery = Callable[[], tuple[dict[str, str], bytes]]


def forgeries(ring: KeyRing, url: str, algorithm: str, scratch: Path) -> dict[str, Forgery]:
    """Forged requests to `url` by name, with the reason `signing` gives for each.

    Insider forgeries are signed with the dispatcher's real `algorithm` key (the claims must stop
    them); the others use only what an outsider has.
    """
    real = ring.signing_key(algorithm=algorithm)
    other_alg = "EdDSA" if algorithm != "EdDSA" else "ES256"
    now = int(time.time())

    def signed(
        name: str,
        *,
        key: SigningKey | None = real,
        header: dict[str, Any] | None = None,
        body: bytes | None = None,
        **overrides: Any,
    ) -> Forgery:
        def build() -> tuple[dict[str, str], bytes]:
            sent = body if body is not None else event_body(recipient=f"victim-{name}@example.com")
            webhook_id = f"evt_forged_{uuid.uuid4().hex}"
            claims = claims_for(url, webhook_id, sent, **overrides)
            for claim in [c for c, v in overrides.items() if v is None]:
                claims.pop(claim)
            return _headers(craft_token(key, header or _header(real), claims), webhook_id), sent

        return build

    def attacker(alg: str) -> SigningKey:
        return generate_key(scratch / f"attacker-{alg}-{uuid.uuid4().hex[:6]}", alg)

    def tampered_body() -> tuple[dict[str, str], bytes]:
        headers, _ = genuine(ring, url, algorithm)
        return headers, event_body(recipient="victim-body@example.com")

    def id_swapped() -> tuple[dict[str, str], bytes]:
        headers, body = genuine(ring, url, algorithm)
        return {**headers, "webhook-id": f"evt_forged_{uuid.uuid4().hex}"}, body

    def tampered_claims() -> tuple[dict[str, str], bytes]:
        headers, body = genuine(ring, url, algorithm)
        head, _, signature = headers["Authorization"].removeprefix("Bearer ").split(".")
        claims = claims_for("https://attacker.example/", headers["webhook-id"], body)
        payload = craft_token(None, {}, claims).split(".")[1]
        return {**headers, "Authorization": f"Bearer {head}.{payload}.{signature}"}, body

    def hs256_public_pem() -> tuple[dict[str, str], bytes]:
        pem = real.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        body = event_body(recipient="victim-hs256@example.com")
        webhook_id = f"evt_forged_{uuid.uuid4().hex}"
        unsigned = craft_token(None, _header(real, alg="HS256"), claims_for(url, webhook_id, body))
        signing_input = unsigned.rsplit(".", 1)[0]
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return _headers(f"{signing_input}.{_b64(mac)}", webhook_id), body

    return {
        "missing token": lambda: (_headers(None, "evt_forged_none"), event_body()),
        "another key under our kid": signed("samekid", key=attacker(algorithm)),
        "token from an unknown key": _own_key(attacker(algorithm), url),
        f"{algorithm} token carrying our {other_alg} key's kid": signed(
            "algkid",
            key=attacker(algorithm),
            header=_header(real, kid=ring.signing_key(algorithm=other_alg).kid),
        ),
        "alg none": signed("none", key=None, header=_header(real, alg="none")),
        "HS256 keyed with the public key": hs256_public_pem,
        "captured token, claims tampered": tampered_claims,
        "captured token, another body": tampered_body,
        "captured token, another webhook-id": id_swapped,
        "expired (really signed)": signed("expired", iat=now - 900, exp=now - 600),
        "wrong audience (really signed)": signed("aud", aud="https://other.example/hooks"),
        "wrong issuer (really signed)": signed("iss", iss="https://evil.example"),
        "wrong scope (really signed)": signed("scope", scope="admin"),
        "year-long lifetime (really signed)": signed("year", iat=now, exp=now + 365 * 86_400),
        "typ JWT (really signed)": signed("typ", header=_header(real, typ="JWT")),
    }


def _own_key(key: SigningKey, url: str) -> Forgery:
    def build() -> tuple[dict[str, str], bytes]:
        body = event_body(recipient="victim-ownkey@example.com")
        webhook_id = f"evt_forged_{uuid.uuid4().hex}"
        token = craft_token(key, _header(key), claims_for(url, webhook_id, body))
        return _headers(token, webhook_id), body

    return build


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# Reasons `signing` gives (the Python recipes and the example receiver answer with them).
REASONS = {
    "missing token": "missing_token",
    "another key under our kid": "bad_signature",
    "token from an unknown key": "unknown_kid",
    "alg none": "algorithm_not_allowed",
    "HS256 keyed with the public key": "algorithm_not_allowed",
    "captured token, claims tampered": "bad_signature",
    "captured token, another body": "body_mismatch",
    "captured token, another webhook-id": "webhook_id_mismatch",
    "expired (really signed)": "expired",
    "wrong audience (really signed)": "wrong_audience",
    "wrong issuer (really signed)": "wrong_issuer",
    "wrong scope (really signed)": "bad_scope",
    "year-long lifetime (really signed)": "lifetime_too_long",
    "typ JWT (really signed)": "bad_type",
}


def expected_reason(name: str) -> str:
    return REASONS.get(name, "algorithm_mismatch")


async def post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> tuple[int, Any]:
    async with session.post(url, data=body, headers=headers) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")


# --- an https JWKS endpoint (mod_auth_openidc fetches https only) -------------------------------


def self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "jwks-cert.pem", directory / "jwks-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@contextlib.asynccontextmanager
async def https_jwks(upstream: str, directory: Path) -> AsyncIterator[str]:
    """An https proxy on loopback for the dispatcher's JWKS; yields its URL."""
    async with aiohttp.ClientSession() as session:

        async def jwks(request: web.Request) -> web.Response:
            async with session.get(upstream) as resp:
                return web.Response(
                    body=await resp.read(),
                    status=resp.status,
                    content_type="application/json",
                    headers={"Cache-Control": resp.headers.get("Cache-Control", "max-age=60")},
                )

        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=self_signed(directory))
            await site.start()
            yield f"https://127.0.0.1:{port}/.well-known/jwks.json"
        finally:
            await runner.cleanup()


# --- Apache httpd from deploy/apache -----------------------------------------------------------


@contextlib.asynccontextmanager
async def apache_edge(
    directory: Path, *, port: int, jwks_url: str, app_url: str, audience: str
) -> AsyncIterator[ServerProcess]:
    """Apache httpd in the foreground as a child process, configured by deploy/apache."""
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    os.chmod(directory, 0o755)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "WEBHOOK_EDGE_DIR": str(directory),
        "WEBHOOK_EDGE_LISTEN": f"127.0.0.1:{port}",
        "WEBHOOK_EDGE_CONF": str(ROOT / "deploy" / "apache" / "webhook-edge.conf"),
        "WEBHOOK_PATH": PATH,
        "WEBHOOK_AUDIENCE": audience,
        "WEBHOOK_ISSUER": ISSUER,
        "WEBHOOK_JWKS_URL": jwks_url,
        "WEBHOOK_JWKS_TLS": "Off",  # the test's JWKS certificate is self-signed
        "WEBHOOK_APP_URL": app_url,
    }
    conf = ROOT / "deploy" / "apache" / "httpd-standalone.conf"
    check = subprocess.run(
        [str(APACHE), "-t", "-f", str(conf)], env=env, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, f"apache2 -t: {check.stderr}"
    server = ServerProcess(
        [str(APACHE), "-f", str(conf), "-DFOREGROUND"],
        port,
        env,
        directory,
        stop_signal=signal.SIGTERM,
    )
    async with server:
        yield server
    error_log = directory / "error.log"
    server.stderr.append(error_log.read_text() if error_log.exists() else "")
