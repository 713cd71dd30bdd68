"""Agent tokens minted off the event loop, many per hand-off.

A token's signature (EdDSA, ES256 or RS256) is the largest single cost a delivery puts on the
worker's event loop beyond the bare consume-POST-ack: about 45 us of CPU on this class of machine,
a tenth of a delivery. The signing library releases the GIL while it signs, so the signature can
run on another core while the loop parses, routes and POSTs. `ThreadedMinter` keeps one thread
for that. The tokens asked for in one loop pass go to the thread together (one hand-off per
pass, not per token), and while the thread signs one group, the loop collects the next.

The claims are the same as a direct `TokenMinter.mint`: each request carries its own ``now``,
so the token's ``iat`` is the delivery's ``webhook-timestamp``. Only the thread calls the
minter (its caches need no lock). A request whose minting fails gets that exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from signing import TokenMinter

__all__ = ["ThreadedMinter"]

_Request = tuple[dict[str, Any], "asyncio.Future[str]"]


class ThreadedMinter:
    """`TokenMinter.mint` on a thread of its own, batched per loop pass."""

    def __init__(self, minter: TokenMinter) -> None:
        self.minter = minter
        self._executor: ThreadPoolExecutor | None = None
        self._waiting: list[_Request] = []
        self._busy = False  # a group is with the thread
        self._closed = False
        self.handoffs = 0  # groups sent to the thread (tests, metrics)
        self.last_seconds = 0.0  # thread time per token of the last group

    def mint(self, **request: Any) -> asyncio.Future[str]:
        """A future for one token; ``request`` is `TokenMinter.mint`'s keywords."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        if self._closed:
            future.set_exception(RuntimeError("the token minter is closed"))
            return future
        self._waiting.append((request, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._hand_off, loop)  # after this pass has asked for its tokens
        return future

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        group, self._waiting = self._waiting, []
        group = [(req, fut) for req, fut in group if not fut.cancelled()]
        if not group or self._closed:
            self._busy = False
            self._fail(group, RuntimeError("the token minter is closed"))
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="token-minter")
        self.handoffs += 1
        requests = [req for req, _ in group]
        self._executor.submit(self._mint_group, loop, requests, group)

    def _mint_group(
        self,
        loop: asyncio.AbstractEventLoop,
        requests: list[dict[str, Any]],
        group: list[_Request],
    ) -> None:
        """On the thread: every token of the group, then one call back to the loop."""
        started = time.perf_counter()
        results: list[str | BaseException] = []
        for request in requests:
            try:
                results.append(self.minter.mint(**request))
            except Exception as exc:  # that request fails, the others do not
                results.append(exc)
        per_token = (time.perf_counter() - started) / max(1, len(requests))
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(self._finish, loop, group, results, per_token)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Request],
        results: list[str | BaseException],
        per_token: float,
    ) -> None:
        self.last_seconds = per_token
        for (_, future), result in zip(group, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._waiting and not self._closed:
            self._hand_off(loop)  # what the loop asked for while the thread was signing
        else:
            self._busy = False
            if self._closed:
                self._fail(self._waiting, RuntimeError("the token minter is closed"))
                self._waiting = []

    @staticmethod
    def _fail(group: list[_Request], exc: BaseException) -> None:
        for _, future in group:
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        """Refuse new requests and let the thread go once its group is done."""
        self._closed = True
        if not self._busy:
            self._fail(self._waiting, RuntimeError("the token minter is closed"))
            self._waiting = []
        if self._executor is not None:
            self._executor.shutdown(wait=False)
