"""The SSRF guard refuses non-public destinations where the connection is made.

Each check points at a real receiver on loopback: if the guard let the request through, the
receiver would record it. No broker: the pipeline's side of it is in
tests/integration/test_ssrf_pipeline.py.
"""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from dispatcher.decisions.retry_policy import OutcomeKind
from dispatcher.http.sender import HttpSender
from dispatcher.http.ssrf import GuardedResolver, is_forbidden


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "not-an-ip",
    ],
)
def test_forbidden_ranges(address: str) -> None:
    assert is_forbidden(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert not is_forbidden(address)


class Rebinding(AbstractResolver):
    """DNS that answers a public address first and 127.0.0.1 afterwards (a rebinding attack)."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        address = "93.184.215.14" if self.calls == 1 else "127.0.0.1"
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


async def test_guard_refuses_literals_loopback_names_and_rebinding(receivers) -> None:
    rec = receivers.add("inside")
    port = receivers.port
    host = socket.gethostname()
    resolved = {info[4][0] for info in socket.getaddrinfo(host, port, socket.AF_INET)}
    assert resolved and all(is_forbidden(a) for a in resolved), (
        f"this test needs the machine's hostname to resolve to loopback, got {resolved}"
    )
    async with HttpSender(allow_private_networks=False) as sender:
        for url in (
            rec.url,
            f"http://[::1]:{port}/hooks/inside",
            f"http://localhost:{port}/hooks/inside",
            f"http://{host}:{port}/hooks/inside",
        ):  # a name that resolves to 127.0.0.1
            outcome = await sender.post(url, b"{}", {}, timeout=2)
            assert outcome.kind is OutcomeKind.BLOCKED, (url, outcome)
            assert outcome.error and outcome.error.startswith("blocked_destination")
    # Rebinding: the name first resolves to a public address, then to 127.0.0.1. The first
    # answer is checked without connecting (nothing but loopback is ever a target here).
    rebinding = Rebinding()
    guarded = GuardedResolver(rebinding)
    assert (await guarded.resolve("rebind.example", port))[0]["host"] == "93.184.215.14"
    async with HttpSender(allow_private_networks=False, resolver=rebinding) as sender:
        second = await sender.post(
            f"http://rebind.example:{port}/hooks/inside", b"{}", {}, timeout=2
        )
    assert second.kind is OutcomeKind.BLOCKED and rebinding.calls == 2
    assert rec.count == 0 and rec.attempts == 0
    async with HttpSender(allow_private_networks=True) as sender:
        allowed = await sender.post(rec.url, b"{}", {}, timeout=2)
    assert allowed.kind is OutcomeKind.DELIVERED and rec.count == 1
