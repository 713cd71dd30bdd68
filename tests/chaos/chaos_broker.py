"""Owning the broker for a restart: only when every connection to it is ours, and always put
back the way it was.

    reason = await broker_not_ours()     # None when every AMQP connection is this test's
    async with broker_stopped():         # rabbitmqctl stop_app ... start_app + await_startup
        ...

rabbitmqctl is the test broker's: ``DISPATCHER_TEST_RABBITMQCTL`` (``make test-rabbitmq4`` sets
it to the RabbitMQ 4 node's, run inside its chroot), else the one on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator

import psutil

from tests.support.harness import RABBITMQCTL as CTL_COMMAND
from tests.support.harness import RABBITMQCTL_FROM_ENV

__all__ = [
    "broker_not_ours",
    "broker_stopped",
    "rabbitmqctl",
    "restart_allowed",
    "restore_if_stopped",
]

RABBITMQCTL = CTL_COMMAND[0] if CTL_COMMAND else None
_stopped = False  # set while this process has the broker's app stopped


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    assert CTL_COMMAND is not None
    proc = await asyncio.create_subprocess_exec(
        *CTL_COMMAND,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"rabbitmqctl {' '.join(args)} took over {timeout}s") from None
    if proc.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


def restart_allowed() -> str | None:
    """None when this run may restart the broker, else why not."""
    from chaos_scale import FULL

    if RABBITMQCTL is None:
        return "rabbitmqctl is not installed here (the broker is not ours to restart)"
    # A command of its own (DISPATCHER_TEST_RABBITMQCTL) is trusted to reach its node.
    if (
        not RABBITMQCTL_FROM_ENV
        and os.geteuid() != 0
        and not os.access(os.path.expanduser("~/.erlang.cookie"), os.R_OK)
    ):
        return "no permission to run rabbitmqctl"
    wanted = os.environ.get("CHAOS_BROKER_RESTART", "")
    if wanted == "0":
        return "CHAOS_BROKER_RESTART=0"
    # CI owns its broker: there the smoke run restarts it too.
    if not FULL and wanted != "1" and not os.environ.get("CI"):
        return "broker restarts run in CHAOS_SCALE=full, in CI, or with CHAOS_BROKER_RESTART=1"
    return None


def _our_ports() -> set[int]:
    me = psutil.Process()
    ports: set[int] = set()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            ports.update(c.laddr.port for c in proc.net_connections(kind="tcp") if c.laddr)
    return ports


async def broker_not_ours() -> str | None:
    """None if every connection the broker has comes from this process or its children."""
    listing = await rabbitmqctl(
        "list_connections", "peer_host", "peer_port", "--formatter", "json", "--quiet"
    )
    try:
        connections = json.loads(listing or "[]")
    except ValueError:
        return f"cannot read rabbitmqctl list_connections: {listing[:200]!r}"
    ours = _our_ports()
    foreign = [
        f"{_host(c.get('peer_host'))}:{c.get('peer_port')}"
        for c in connections
        if c.get("peer_port") not in ours
    ]
    if foreign:
        return f"the broker has {len(foreign)} other clients ({', '.join(foreign[:3])})"
    return None


def _host(value: object) -> str:
    if isinstance(value, list):  # rabbitmqctl's JSON spells an IPv4 address as four numbers
        return ".".join(str(v) for v in value)
    return str(value)


@contextlib.asynccontextmanager
async def broker_stopped() -> AsyncIterator[None]:
    """``rabbitmqctl stop_app`` for the body; ``start_app`` and ``await_startup`` always."""
    global _stopped
    try:
        _stopped = True
        await rabbitmqctl("stop_app")
        yield
    finally:
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")
        _stopped = False


def restore_if_stopped() -> None:
    """The last resort (session end, interpreter exit): start the app if a test stopped it
    and could not start it again (a timeout killed the test mid-restart)."""
    global _stopped
    if _stopped and CTL_COMMAND is not None:
        for args in (["start_app"], ["await_startup"]):
            subprocess.run(
                [*CTL_COMMAND, *args],
                check=False,
                timeout=120,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
        _stopped = False
