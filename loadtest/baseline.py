"""The bare pipeline the dispatcher is measured against: consume, POST the exact body, ack.

No validation, no signing, no retries, no limits, no metrics: what any consumer of this queue
must at least do. It uses the same client libraries (aio-pika, aiohttp), the same event loop
(uvloop) and the same prefetch as the dispatcher, and runs as its own process like the
dispatcher does, so the two are measured the same way::

    python -m loadtest.baseline --broker-url URL --queue Q --prefetch 256 --target URL [...]

Prints ``{"ready": true}`` once consuming; stops on SIGTERM. A failed POST is counted and the
message acked anyway (no retries); the load test reports it as loss.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage

__all__ = ["main", "serve"]


async def serve(broker_url: str, queue_name: str, prefetch: int, targets: list[str]) -> None:
    failures = 0
    connection = await aio_pika.connect(broker_url)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        skip_auto_headers=("Accept-Encoding",),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    headers = {"Content-Type": "application/json"}

    async def post(url: str, body: bytes) -> None:
        nonlocal failures
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status >= 300:
                    failures += 1
        except (aiohttp.ClientError, TimeoutError):
            failures += 1

    async def handle(message: AbstractIncomingMessage) -> None:
        if len(targets) == 1:
            await post(targets[0], message.body)
        else:
            await asyncio.gather(*(post(url, message.body) for url in targets))
        await message.ack()

    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        tag = await queue.consume(handle, no_ack=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write('{"ready": true}\n')
        sys.stdout.flush()
        await stop.wait()
        await queue.cancel(tag)
    finally:
        await session.close()
        await connection.close()
    sys.stderr.write(f"baseline: {failures} failed POSTs\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare consume-POST-ack pipeline")
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--target", action="append", required=True, help="subscriber url")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.broker_url, args.queue, args.prefetch, args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
