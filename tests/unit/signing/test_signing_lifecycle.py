"""The verifier leaves nothing open: each documented way of using it exits without a warning.

Each case runs in its own interpreter with -W error (so an unclosed session, socket or
transport would print at exit), serves a JWKS on loopback, verifies one real token through
the JWKS URL, and must exit 0 with an empty stderr.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PRELUDE = """
import asyncio, sys, tempfile
from aiohttp import web
from signing import KeyRing, TokenMinter, WebhookVerifier

ring = KeyRing.load(tempfile.mkdtemp())
minter = TokenMinter(ring, issuer="https://mail.example.com", subject="s", ttl_seconds=60)
AUD = "https://hooks.example/email"

def request():
    body = b'{"event": "Message.Bounced"}'
    token = minter.mint(audience=AUD, webhook_id="evt_1", body=body)
    return {"Authorization": "Bearer " + token, "webhook-id": "evt_1"}, body

async def jwks(request):
    return web.json_response(ring.jwks())

async def jwks_server():
    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/jwks"
"""

CASES = {
    "async with": """
        async def main():
            runner, url = await jwks_server()
            async with WebhookVerifier(jwks_url=url, audience=AUD) as verifier:
                assert isinstance(await verifier.verify(*request()), dict)
            await runner.cleanup()
        asyncio.run(main())
    """,
    "aclose": """
        async def main():
            runner, url = await jwks_server()
            verifier = WebhookVerifier(jwks_url=url, audience=AUD)
            assert isinstance(await verifier.verify(*request()), dict)
            await verifier.aclose()
            await verifier.aclose()  # twice is fine
            await runner.cleanup()
        asyncio.run(main())
    """,
    "module-level verifier, never closed": """
        verifier = None
        async def main():
            global verifier
            runner, url = await jwks_server()
            verifier = WebhookVerifier(jwks_url=url, audience=AUD)
            assert isinstance(await verifier.verify(*request()), dict)
            await runner.cleanup()
        asyncio.run(main())
    """,
    "verify_sync in a thread": """
        import threading
        async def main():
            runner, url = await jwks_server()
            verifier = WebhookVerifier(jwks_url=url, audience=AUD)
            result = []
            t = threading.Thread(target=lambda: result.append(verifier.verify_sync(*request())))
            t.start()
            await asyncio.to_thread(t.join)
            assert isinstance(result[0], dict)
            await runner.cleanup()
        asyncio.run(main())
    """,
}


@pytest.mark.parametrize("case", list(CASES))
def test_exits_cleanly_under_w_error(case: str, tmp_path: Path) -> None:
    script = tmp_path / "case.py"
    script.write_text(_PRELUDE + textwrap.dedent(CASES[case]) + "\nprint('ok')\n")
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "ok", "")
