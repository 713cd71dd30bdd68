"""What the broker holds for one phase, read from outside the dispatcher.

Every name a phase creates starts with its prefix (``lt-<run>-<n>.``), so the phase's queues,
their messages and their consumers are the broker's, filtered by that prefix. They are read with
``rabbitmqctl list_queues name messages consumers`` (the management plugin may be absent); where
rabbitmqctl cannot be run, a passive declare of the queues the load test knows by name gives
their message and consumer counts (queues the dispatcher made on its own are then not seen).

The same listing lets a phase with thousands of subscribers settle and clean up without probing
a parking queue per subscriber: the ones that exist are listed, the rest were never made.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aiormq.exceptions import ChannelClosed

__all__ = ["Census", "census", "delete_prefixed", "rabbitmqctl"]


@dataclass(frozen=True)
class Census:
    """The phase's queues at one moment: names with (messages, consumers)."""

    at: float  # unix seconds
    queues: dict[str, tuple[int, int]] = field(default_factory=dict)
    method: str = "rabbitmqctl"  # or "passive declare (known queues only)"

    @property
    def consumers(self) -> int:
        return sum(c for _, c in self.queues.values())

    @property
    def messages(self) -> int:
        return sum(m for m, _ in self.queues.values())

    def as_dict(self) -> dict[str, Any]:
        busiest = sorted(self.queues.items(), key=lambda kv: -kv[1][1])[:5]
        return {
            "at": round(self.at, 3),
            "method": self.method,
            "queues": len(self.queues),
            "consumers": self.consumers,
            "messages": self.messages,
            "most_consumers": {name: c for name, (_, c) in busiest if c},
        }


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> list[list[str]] | None:
    """Rows of ``rabbitmqctl -q <args> --no-table-headers``; None if it cannot be run."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "-q",
            *args,
            "--no-table-headers",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    if proc.returncode != 0:
        return None
    return [
        line.split("\t") for line in out.decode("utf-8", "replace").splitlines() if line.strip()
    ]


async def census(prefix: str, broker_url: str, known: Sequence[str] = ()) -> Census:
    """The queues whose names start with ``prefix``, their messages and consumers."""
    rows = await rabbitmqctl("list_queues", "name", "messages", "consumers")
    if rows is not None:
        queues = {}
        unread = 0
        for row in rows:
            if row and row[0].startswith(prefix):
                try:
                    queues[row[0]] = (int(row[1]), int(row[2]))
                except (IndexError, ValueError):  # a queue that did not answer in time
                    unread += 1
        method = "rabbitmqctl" if not unread else f"rabbitmqctl ({unread} queues unread)"
        return Census(time.time(), queues, method)
    return Census(
        time.time(), await _passive(broker_url, known), method="passive declare (known queues only)"
    )


async def _passive(broker_url: str, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        for name in names:
            try:
                ok = await raw.queue_declare(name, passive=True)
            except ChannelClosed:  # not there: a failed passive declare closes the channel
                channel = await connection.channel()
                raw = await channel.get_underlay_channel()
                continue
            out[name] = (ok.message_count or 0, ok.consumer_count or 0)
    return out


async def delete_prefixed(prefix: str, broker_url: str) -> bool:
    """Delete every queue and exchange whose name starts with ``prefix``; False if they could
    not be listed (the caller then deletes the names it knows)."""
    queues, exchanges = await asyncio.gather(
        rabbitmqctl("list_queues", "name"), rabbitmqctl("list_exchanges", "name")
    )
    if queues is None or exchanges is None:
        return False
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        for row in queues:
            if row and row[0].startswith(prefix):
                await channel.queue_delete(row[0])
        for row in exchanges:
            if row and row[0].startswith(prefix):
                await channel.exchange_delete(row[0])
    return True
