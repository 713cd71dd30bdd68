"""A subscriber URL that resolves to loopback is dead-lettered as a blocked destination, never
attempted (the guard itself: tests/unit/test_ssrf.py)."""

from __future__ import annotations

import socket

from tests.support.harness import (
    Publisher,
    ReceiverServer,
    event_body,
    running,
    wait_for_dead_letters,
)


async def test_pipeline_dead_letters_a_blocked_destination(make, receivers: ReceiverServer) -> None:
    rec = receivers.add("inside")
    host = socket.gethostname()
    url = f"http://{host}:{receivers.port}/hooks/inside"
    cfg = make([{"id": "sneaky", "url": url}], allow_private_networks=False)
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="ssrf-1"))
        [letter] = await wait_for_dead_letters(cfg, 1)
    assert letter.record.reason == "blocked_destination"
    assert rec.attempts == 0
