"""Tokens minted on the signing thread (dispatcher/http/minting.py). Pure: a fake minter."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from dispatcher.http.minting import ThreadedMinter


class _Minter:
    """Returns the request as a string; remembers which thread minted it."""

    def __init__(self, fail_on: str | None = None, gate: threading.Event | None = None) -> None:
        self.threads: set[int] = set()
        self.calls: list[dict[str, Any]] = []
        self._fail_on = fail_on
        self._gate = gate

    def mint(self, **request: Any) -> str:
        if self._gate is not None:
            self._gate.wait(5)
        self.threads.add(threading.get_ident())
        self.calls.append(request)
        if request["webhook_id"] == self._fail_on:
            raise ValueError(f"no key for {request['webhook_id']}")
        return f"token-{request['webhook_id']}-{request['now']}"


async def test_each_request_gets_its_own_token_minted_off_the_loop_thread() -> None:
    fake = _Minter()
    minter = ThreadedMinter(fake)  # type: ignore[arg-type]
    tokens = await asyncio.gather(*(minter.mint(webhook_id=f"e{i}", now=i) for i in range(50)))
    assert tokens == [f"token-e{i}-{i}" for i in range(50)]
    assert fake.threads and threading.get_ident() not in fake.threads
    assert minter.handoffs == 1  # asked for in one loop pass: one hand-off
    minter.close()


async def test_requests_made_while_the_thread_signs_go_in_the_next_group() -> None:
    gate = threading.Event()
    fake = _Minter(gate=gate)
    minter = ThreadedMinter(fake)  # type: ignore[arg-type]
    first = minter.mint(webhook_id="a", now=1)
    await asyncio.sleep(0.05)  # the first group is with the thread, held at the gate
    later = [minter.mint(webhook_id=f"b{i}", now=2) for i in range(3)]
    gate.set()
    assert await first == "token-a-1"
    assert await asyncio.gather(*later) == ["token-b0-2", "token-b1-2", "token-b2-2"]
    assert minter.handoffs == 2
    minter.close()


async def test_a_failing_request_fails_alone() -> None:
    minter = ThreadedMinter(_Minter(fail_on="bad"))  # type: ignore[arg-type]
    good, bad = minter.mint(webhook_id="good", now=0), minter.mint(webhook_id="bad", now=0)
    assert await good == "token-good-0"
    with pytest.raises(ValueError, match="no key for bad"):
        await bad
    minter.close()


async def test_a_closed_minter_refuses_new_requests_and_fails_queued_ones() -> None:
    gate = threading.Event()
    minter = ThreadedMinter(_Minter(gate=gate))  # type: ignore[arg-type]
    busy = minter.mint(webhook_id="a", now=0)
    await asyncio.sleep(0.05)
    queued = minter.mint(webhook_id="b", now=0)
    minter.close()
    gate.set()
    assert await busy == "token-a-0"  # the group the thread had is finished
    with pytest.raises(RuntimeError, match="closed"):
        await queued
    with pytest.raises(RuntimeError, match="closed"):
        await minter.mint(webhook_id="c", now=0)


async def test_a_cancelled_request_is_not_minted() -> None:
    fake = _Minter()
    minter = ThreadedMinter(fake)  # type: ignore[arg-type]
    gone = minter.mint(webhook_id="gone", now=0)
    kept = minter.mint(webhook_id="kept", now=0)
    gone.cancel()
    assert await kept == "token-kept-0"
    assert [c["webhook_id"] for c in fake.calls] == ["kept"]
    minter.close()
