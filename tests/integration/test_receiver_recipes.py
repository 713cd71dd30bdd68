"""The receiver recipes of docs/receivers.md, each a real server against a real dispatcher.

Each recipe verifies 100 real deliveries from a running Dispatcher (real RabbitMQ, JWKS from its
ops endpoint) and refuses every forgery: Python async (aiohttp), Python sync (Flask), the
standard-library WSGI recipe in a fresh virtualenv holding only `pip install ./signing`, Node.js
with jose, and Apache httpd with mod_auth_openidc in front of the example receiver. What they
need beyond the venv comes from scripts/ensure-receiver-kit (`make test` runs it); a missing
piece fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dispatcher.config import Config
from dispatcher.process.daemon import Dispatcher
from signing import KeyRing
from tests.support.harness import Publisher, dead_letters, event_body, running, wait_until
from tests.support.ports import free_port
from tests.support.receiver_recipes import (
    NODE_MODULES,
    PATH,
    ROOT,
    ServerProcess,
    apache_edge,
    expected_reason,
    forgeries,
    genuine,
    https_jwks,
    kit_problems,
    post,
    recipe_env,
    recipes,
)

DELIVERIES = 100
ALGORITHMS = ("EdDSA", "ES256", "RS256")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _receiver_kit() -> None:
    problems = kit_problems()
    if problems:
        pytest.fail("missing (run scripts/ensure-receiver-kit): " + ", ".join(problems))


@dataclass
class Sending:
    config: Config
    dispatcher: Dispatcher
    publisher: Publisher
    ring: KeyRing
    url: str  # the subscriber url = the tokens' audience

    @property
    def jwks_url(self) -> str:
        assert self.dispatcher.ops is not None
        return f"http://127.0.0.1:{self.dispatcher.ops.port}/.well-known/jwks.json"

    account: str | None = None

    async def publish(self, n: int = DELIVERIES) -> set[str]:
        prefix = uuid.uuid4().hex[:8]
        await self.publisher.publish_many(
            [event_body(n=i, event_id=f"{prefix}-{i}", account=self.account) for i in range(n)]
        )
        return {f"{prefix}-{i}" for i in range(n)}

    async def deliver(self, server: ServerProcess, n: int = DELIVERIES) -> None:
        """Publish n events; every one must be verified by the recipe, none dead-lettered."""
        ids = await self.publish(n)
        done = await wait_until(lambda: ids <= server.verified(), timeout=90)
        assert done, (
            f"verified {len(ids & server.verified())} of {n}: {''.join(server.stderr)[-3000:]}"
        )
        assert await dead_letters(self.config) == []


@pytest.fixture
def sending(make: Callable[..., Config], keys_dir: str) -> Callable[..., Any]:
    """A running dispatcher with one subscriber at `url` whose tokens use `algorithm` (and carry
    `account`, whose events it then gets).

    Its keys directory holds a key of every algorithm, as a dispatcher serving subscribers of
    each would: the recipes see a JWKS with EdDSA, ES256 and RS256 keys.
    """

    @asynccontextmanager
    async def start(url: str, algorithm: str, account: str | None = None) -> AsyncIterator[Sending]:
        ring = KeyRing.load(keys_dir, "EdDSA", algorithms=ALGORITHMS)
        subscriber: dict[str, Any] = {"id": "recipe", "url": url, "algorithm": algorithm}
        if account is not None:
            subscriber["account"] = account
        cfg = make([{**subscriber, "max_in_flight": 16}])
        async with running(cfg) as disp, Publisher(cfg) as pub:
            yield Sending(cfg, disp, pub, ring, url, account)

    return start


async def _refuses_forgeries(
    sending: Sending, server: ServerProcess, scratch: Path, algorithm: str, *, reasons: bool
) -> None:
    """Every forgery gets 401 (with `signing`'s reason where the recipe reports it), nothing of
    it is handled; a genuine request is accepted once and its replay refused."""
    before = server.verified()
    async with aiohttp.ClientSession() as session:
        for name, build in forgeries(sending.ring, sending.url, algorithm, scratch).items():
            status, answer = await post(session, sending.url, *build())
            assert status == 401, (name, status, answer)
            if reasons:
                assert answer == {"error": expected_reason(name)}, name
        headers, body = genuine(sending.ring, sending.url, algorithm)
        assert (await post(session, sending.url, headers, body))[0] == 200
        status, answer = await post(session, sending.url, headers, body)
        assert status == 401, ("replay", answer)
        if reasons:
            assert answer == {"error": "replayed"}
    assert len(server.verified() - before) == 1


async def _checks_account(
    sending: Sending, argv: list[str], cwd: Path, algorithm: str, *, reasons: bool
) -> None:
    """Started with WEBHOOK_ACCOUNT, the recipe takes only tokens carrying that account."""
    port = int(sending.url.split(":")[2].split("/")[0])
    env = recipe_env(sending.jwks_url, sending.url, port, WEBHOOK_ACCOUNT="acme")
    server = ServerProcess(argv, port, env, cwd, stop_signal=signal.SIGTERM)
    async with server, aiohttp.ClientSession() as session:
        mine = await post(
            session, sending.url, *genuine(sending.ring, sending.url, algorithm, account="acme")
        )
        theirs = await post(
            session, sending.url, *genuine(sending.ring, sending.url, algorithm, account="globex")
        )
        none = await post(session, sending.url, *genuine(sending.ring, sending.url, algorithm))
    assert mine[0] == 200, mine
    assert theirs[0] == 401 and none[0] == 401, (theirs, none)
    if reasons:
        assert theirs[1] == none[1] == {"error": "wrong_account"}
    assert len(server.verified()) == 1


def _write_recipe(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(recipes()[name], encoding="utf-8")
    return path


def test_every_recipe_is_found() -> None:
    assert set(recipes()) == {
        "aiohttp_receiver.py",
        "flask_receiver.py",
        "wsgi_receiver.py",
        "verify.mjs",
    }


# --- Python ------------------------------------------------------------------------------------


async def test_python_async_recipe(sending: Callable[..., Any], tmp_path: Path) -> None:
    script = _write_recipe(tmp_path, "aiohttp_receiver.py")
    port = free_port()
    url = f"http://127.0.0.1:{port}{PATH}"
    argv = [sys.executable, "-W", "error", str(script)]
    async with sending(url, "EdDSA") as s:
        server = ServerProcess(argv, port, recipe_env(s.jwks_url, url, port), tmp_path)
        async with server:
            await s.deliver(server)
            await _refuses_forgeries(s, server, tmp_path, "EdDSA", reasons=True)
        await _checks_account(s, argv, tmp_path, "EdDSA", reasons=True)
    # The documented lifecycle closes what it opened: no warning, no unclosed session, exit 0.
    assert server.returncode == 0
    assert server.stderr == []


async def test_python_sync_flask_recipe(sending: Callable[..., Any], tmp_path: Path) -> None:
    script = _write_recipe(tmp_path, "flask_receiver.py")
    port = free_port()
    url = f"http://127.0.0.1:{port}{PATH}"
    argv = [sys.executable, str(script)]
    async with sending(url, "RS256") as s:
        env = recipe_env(s.jwks_url, url, port)
        server = ServerProcess(argv, port, env, tmp_path, stop_signal=signal.SIGTERM)
        async with server:
            await s.deliver(server)
            await _refuses_forgeries(s, server, tmp_path, "RS256", reasons=True)
        await _checks_account(s, argv, tmp_path, "RS256", reasons=True)
    assert not [line for line in server.stderr if "Traceback" in line or "Warning" in line]


@pytest.fixture(scope="module")
def signing_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with nothing but `pip install <repo>/signing` (from a clean copy, so
    the build leaves nothing in the working tree)."""
    base = tmp_path_factory.mktemp("signing-only")
    source = base / "signing"
    import shutil

    shutil.copytree(
        ROOT / "signing",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist"),
    )
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    return python


def test_signing_alone_installs_none_of_the_daemon(signing_only_venv: Path) -> None:
    listed = subprocess.run(
        [
            str(signing_only_venv),
            "-m",
            "pip",
            "list",
            "--format",
            "json",
            "--disable-pip-version-check",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"bounce-signing", "cryptography", "orjson"} <= names
    daemon = {"aio-pika", "aiormq", "uvloop", "structlog", "prometheus-client", "aiohttp", "pyjwt"}
    assert names & daemon == set()
    probe = subprocess.run(
        [
            str(signing_only_venv),
            "-c",
            "import signing, sys; print(signing.__file__); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('aiohttp', 'jwt', 'dispatcher')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd="/",
    )
    where, loaded = probe.stdout.splitlines()
    assert "site-packages" in where and loaded == "[]"
    typed = Path(where).parent / "py.typed"
    assert typed.exists()
    # The async path says what to install instead of failing obscurely.
    async_probe = subprocess.run(
        [
            str(signing_only_venv),
            "-c",
            "import asyncio; from signing import WebhookVerifier; "
            "v = WebhookVerifier(jwks_url='http://127.0.0.1:9/j', audience='https://a.example/'); "
            "asyncio.run(v.verify({}, b''))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert async_probe.returncode == 1
    assert "pip install 'bounce-signing[aiohttp]'" in async_probe.stderr


async def test_signing_alone_verifies_real_deliveries(
    sending: Callable[..., Any], signing_only_venv: Path, tmp_path: Path
) -> None:
    script = _write_recipe(tmp_path, "wsgi_receiver.py")
    port = free_port()
    url = f"http://127.0.0.1:{port}{PATH}"
    argv = [str(signing_only_venv), "-W", "error", str(script)]
    async with sending(url, "EdDSA") as s:
        env = recipe_env(s.jwks_url, url, port)
        env.pop("PYTHONPATH", None)
        server = ServerProcess(argv, port, env, tmp_path, stop_signal=signal.SIGTERM)
        async with server:
            await s.deliver(server)
            await _refuses_forgeries(s, server, tmp_path, "EdDSA", reasons=True)
    assert server.stderr == []


# --- Node.js -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
async def test_node_jose_recipe(
    sending: Callable[..., Any], tmp_path: Path, algorithm: str
) -> None:
    # ES modules resolve `jose` from the script's directory up (not NODE_PATH): link it there.
    (tmp_path / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    script = _write_recipe(tmp_path, "verify.mjs")
    port = free_port()
    url = f"http://127.0.0.1:{port}{PATH}"
    argv = ["node", str(script)]
    async with sending(url, algorithm) as s:
        env = recipe_env(s.jwks_url, url, port)
        server = ServerProcess(argv, port, env, tmp_path, stop_signal=signal.SIGTERM)
        async with server:
            await s.deliver(server)
            await _refuses_forgeries(s, server, tmp_path, algorithm, reasons=False)
        await _checks_account(s, argv, tmp_path, algorithm, reasons=False)
    assert server.stderr == []


# --- the edge ----------------------------------------------------------------------------------

# Refused by Apache itself: these never reach the app. The rest pass the edge (Apache does not
# look at the body, the webhook-id, typ or the lifetime) and are refused by the app behind it.
APACHE_REFUSES = {
    "missing token",
    "another key under our kid",
    "token from an unknown key",
    "ES256 token carrying our EdDSA key's kid",
    "alg none",
    "HS256 keyed with the public key",
    "captured token, claims tampered",
    "expired (really signed)",
    "wrong audience (really signed)",
    "wrong issuer (really signed)",
    "wrong scope (really signed)",
}


async def test_apache_edge_in_front_of_the_example_receiver(
    sending: Callable[..., Any], tmp_path: Path
) -> None:
    edge_port, app_port = free_port(), free_port()
    url = f"http://127.0.0.1:{edge_port}{PATH}"  # the subscriber url: Apache
    app_url = f"http://127.0.0.1:{app_port}{PATH}"
    async with sending(url, "ES256") as s, https_jwks(s.jwks_url, tmp_path) as jwks_tls:
        app_argv = [
            sys.executable,
            "-m",
            "example_receiver",
            "--listen",
            f"127.0.0.1:{app_port}",
            "--jwks-url",
            s.jwks_url,
            "--audience",
            url,
            "--issuer",
            s.config.signing.issuer,
            "--db",
            f"sqlite:///{tmp_path / 'receiver.sqlite3'}",
        ]
        app = ServerProcess(app_argv, app_port, dict(os.environ), ROOT)
        async with (
            app,
            apache_edge(
                tmp_path / "apache",
                port=edge_port,
                jwks_url=jwks_tls,
                app_url=app_url,
                audience=url,
            ) as edge,
            aiohttp.ClientSession() as session,
        ):

            async def app_stats() -> dict[str, Any]:
                async with session.get(f"http://127.0.0.1:{app_port}/stats") as resp:
                    return dict(await resp.json())

            prefix = uuid.uuid4().hex[:8]
            await s.publisher.publish_many(
                [event_body(n=i, event_id=f"{prefix}-{i}") for i in range(DELIVERIES)]
            )
            stats: dict[str, Any] = {}

            async def all_verified() -> bool:
                stats.update(await app_stats())
                return int(stats["verified"]) >= DELIVERIES

            assert await _eventually(all_verified), (stats, edge.stderr)
            assert stats["received"] == DELIVERIES and stats["rejected"] == {}
            assert await dead_letters(s.config) == []

            for name, build in forgeries(s.ring, url, "ES256", tmp_path).items():
                before = (await app_stats())["received"]
                status, answer = await post(session, url, *build())
                after = (await app_stats())["received"]
                assert status == 401, (name, status, answer)
                if name in APACHE_REFUSES:
                    assert after == before, f"{name} reached the app"
                else:  # the app saw it, and refused it with signing's reason
                    assert after == before + 1 and answer == {"error": expected_reason(name)}, name
            # An EdDSA token of the same dispatcher: Apache cannot parse Ed25519; refused there.
            before = (await app_stats())["received"]
            status, _ = await post(session, url, *genuine(s.ring, url, "EdDSA"))
            assert status == 401 and (await app_stats())["received"] == before
            # A captured genuine request, replayed: the edge lets it through, the app does not.
            headers, body = genuine(s.ring, url, "ES256")
            assert (await post(session, url, headers, body))[0] == 200
            assert await post(session, url, headers, body) == (401, {"error": "replayed"})
    access = (tmp_path / "apache" / "access.log").read_text()
    assert access.count(" 200 ") >= DELIVERIES


async def _eventually(check: Callable[[], Any], timeout: float = 90.0) -> bool:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return bool(await check())


async def test_example_receiver_account_option(sending: Callable[..., Any], tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}{PATH}"
    async with sending(url, "EdDSA", account="acme") as s:
        argv = [
            sys.executable,
            "-m",
            "example_receiver",
            "--listen",
            f"127.0.0.1:{port}",
            "--jwks-url",
            s.jwks_url,
            "--issuer",
            s.config.signing.issuer,
            "--account",
            "acme",
            "--db",
            f"sqlite:///{tmp_path / 'receiver.sqlite3'}",
        ]
        async with ServerProcess(argv, port, dict(os.environ), ROOT), aiohttp.ClientSession() as h:
            await s.publish()  # real deliveries of acme's events, each token carrying the account

            async def stats() -> dict[str, Any]:
                async with h.get(f"http://127.0.0.1:{port}/stats") as resp:
                    return dict(await resp.json())

            async def all_verified() -> bool:
                return int((await stats())["verified"]) >= DELIVERIES

            assert await _eventually(all_verified)
            assert (await stats())["rejected"] == {}
            theirs = await post(h, url, *genuine(s.ring, url, "EdDSA", account="globex"))
            none = await post(h, url, *genuine(s.ring, url, "EdDSA"))
        assert await dead_letters(s.config) == []
    assert theirs == none == (401, {"error": "wrong_account"})


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Receiving webhooks") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_readme_snippet_verifies_and_leaves_nothing_open(
    sending: Callable[..., Any], tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/email"
    async with sending(url, "EdDSA") as s:
        code = _readme_snippet()
        # Only the addresses change, and the placeholder gets a line the test can count.
        for old, new in {
            '"https://mail.example.com/.well-known/jwks.json"': repr(s.jwks_url),
            '"https://hooks.acme.example/email"': repr(url),
            '...  # claims["webhook_id"]; the body is authentic and unmodified': (
                "print(f\"verified {claims['webhook_id']} {len(body)}\", flush=True)"
            ),
            "web.run_app(app)": f'web.run_app(app, host="127.0.0.1", port={port}, print=None)',
        }.items():
            assert code.count(old) == 1, f"README snippet changed: {old}"
            code = code.replace(old, new)
        script = tmp_path / "readme_receiver.py"
        script.write_text(code, encoding="utf-8")
        argv = [sys.executable, "-W", "error", str(script)]
        server = ServerProcess(argv, port, recipe_env(s.jwks_url, url, port), tmp_path)
        async with server:
            await s.deliver(server, 20)
    # SIGINT, as Ctrl+C: a clean exit with nothing on stderr (no unclosed session, no warning).
    assert server.returncode == 0
    assert server.stderr == []
