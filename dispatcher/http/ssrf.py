"""SSRF guard: refuse to connect to loopback, private, link-local and other non-global addresses.

Checked where the connection is made, on the addresses actually resolved, so a name that
resolves to a public address at config load and to 127.0.0.1 later (DNS rebinding) is still
refused. IP literals never reach a resolver in aiohttp, so `check_literal` covers them.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = ["BlockedDestination", "GuardedResolver", "check_literal", "is_forbidden"]


class BlockedDestination(OSError):
    """The destination resolved to an address the guard refuses."""


def is_forbidden(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_literal(host: str) -> None:
    """Refuse a URL whose host is a forbidden IP literal (names are checked on resolution)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        lowered = host.lower().rstrip(".")
        if lowered == "localhost" or lowered.endswith(".localhost"):
            raise BlockedDestination(f"{host} is a loopback name") from None
        return
    if is_forbidden(host.strip("[]")):
        raise BlockedDestination(f"{host} is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses forbidden addresses."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not is_forbidden(r["host"])]
        if not allowed:
            addrs = ", ".join(sorted({r["host"] for r in results}))
            raise BlockedDestination(f"{host} resolves to a non-public address ({addrs})")
        return allowed

    async def close(self) -> None:
        await self._inner.close()

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - passthrough
        return getattr(self._inner, name)
