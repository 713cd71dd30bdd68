"""CPU per delivery of taking work-queue deliveries in, with and without the frame reader.

    python -m loadtest.bench_intake [--events 40000] [--prefetch 1024] [--rounds 2]
        [--broker-url amqp://guest:guest@127.0.0.1:5672/]

Each round publishes ``--events`` events like the generator's (an event body, a message id,
a ``published-at`` header, persistent) to a queue of its own, then consumes them through the
dispatcher's `WorkConsumer` with a take that does nothing but ack every 100th delivery
(``multiple=True``), once with aiormq's frame reader (deliveries put together by the
`DeliveryTap` from the channel's frame queue) and once with the dispatcher's
(`dispatcher.broker.frames`: deliveries taken from the bytes). Each side runs in a process
of its own (the reader is installed per process). It prints CPU microseconds per delivery and
deliveries per second for both, and the ratio of their CPU, which is what compares across runs.
The queues are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import aio_pika

from dispatcher.broker import frames
from dispatcher.broker.work_consumer import Inbound, WorkConsumer
from loadtest.generator import EventMix

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


async def _publish(url: str, queue: str, events: int) -> None:
    mix = EventMix(seed=7)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        for start in range(0, events, 500):
            batch = []
            for i in range(start, min(events, start + 500)):
                now_ms = time.time() * 1000
                _, body, _, _ = mix.document(f"evt_{i:08d}", now_ms, None)
                message = aio_pika.Message(
                    body,
                    message_id=f"evt_{i:08d}",
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={"published-at": int(now_ms)},
                )
                batch.append(channel.default_exchange.publish(message, routing_key=queue))
            await asyncio.gather(*batch)


async def _consume(url: str, queue: str, events: int, prefetch: int, reader: str) -> dict[str, Any]:
    if reader == "dispatcher" and not frames.install():
        raise SystemExit("this aiormq has no frame reader to replace")
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    raw: Any = await channel.get_underlay_channel()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    taken = 0
    acking: set[asyncio.Task[None]] = set()

    def take(message: Inbound) -> None:
        nonlocal taken
        taken += 1
        if taken % 100 == 0 or taken == events:
            task = loop.create_task(raw.basic_ack(message.delivery_tag, multiple=True))
            acking.add(task)
            task.add_done_callback(acking.discard)
        if taken == events:
            done.set()

    consumer = WorkConsumer(channel, queue, take)
    cpu, wall = time.process_time(), time.perf_counter()
    await consumer.start()
    await asyncio.wait_for(done.wait(), timeout=300)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    from_bytes = consumer.from_reader
    await consumer.cancel()
    await connection.close()
    return {
        "reader": reader,
        "cpu_us_per_delivery": round(1e6 * cpu / events, 1),
        "deliveries_per_s": round(events / wall),
        "taken_from_bytes": from_bytes,
    }


async def _delete(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


def _side(url: str, queue: str, events: int, prefetch: int, reader: str) -> dict[str, Any]:
    """One consuming side, in a process of its own."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.bench_intake",
            "--side",
            reader,
            "--queue",
            queue,
            "--events",
            str(events),
            "--prefetch",
            str(prefetch),
            "--broker-url",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_intake")
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--prefetch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER)
    parser.add_argument("--side", choices=("aiormq", "dispatcher"), help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import uvloop

    if args.side:
        result = uvloop.run(
            _consume(args.broker_url, args.queue, args.events, args.prefetch, args.side)
        )
        print(json.dumps(result))
        return 0
    results: dict[str, list[dict[str, Any]]] = {"aiormq": [], "dispatcher": []}
    for n in range(1, args.rounds + 1):
        for reader in ("aiormq", "dispatcher"):
            queue = f"bench-intake-{uuid.uuid4().hex[:10]}"
            try:
                print(f"round {n}: publishing {args.events} events for {reader}", flush=True)
                asyncio.run(_publish(args.broker_url, queue, args.events))
                got = _side(args.broker_url, queue, args.events, args.prefetch, reader)
            finally:
                asyncio.run(_delete(args.broker_url, queue))
            results[reader].append(got)
            print(
                f"round {n}: {reader:10} {got['cpu_us_per_delivery']:6.1f} us CPU per delivery,"
                f" {got['deliveries_per_s']:6d} deliveries/s,"
                f" {got['taken_from_bytes']} taken from the bytes",
                flush=True,
            )
    cpu = {r: statistics.median(x["cpu_us_per_delivery"] for x in v) for r, v in results.items()}
    print(
        f"median CPU per delivery: aiormq's reader {cpu['aiormq']:.1f} us, the dispatcher's"
        f" {cpu['dispatcher']:.1f} us ({cpu['dispatcher'] / cpu['aiormq']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
