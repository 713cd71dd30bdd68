"""RabbitMQ topology: the events exchange, the work queue, dead letters and the delay tiers.

Retries wait in RabbitMQ itself, never in the dispatcher's memory. A per-queue TTL only expires
messages at the head of a queue, so a queue can only hold one delay. To express any delay
(jitter, Retry-After) exactly, delays are written in binary: tier ``k`` is a queue
``<queue>.retry.<2**k>ms`` whose TTL is ``2**k`` ms. A delayed message's routing key spells its
delay as bits, most significant first (``0.0.1.0.1...``); the exchange of level ``k`` looks at
bit ``k`` only and routes to tier ``k`` (bit set) or on to level ``k - 1`` (bit clear). Tier ``k``
dead-letters into level ``k - 1`` when the TTL runs out; below level 0 the message reaches the
``<queue>.retry.due`` exchange, which feeds the work queue. A 5 s delay visits 6 tiers, a 6 h
delay at most 28; every queue holds messages of one TTL, so expiry order is exact.

Deliveries that were not attempted (the subscriber's breaker is open, its lane is full, its rate
limit is reached) do not go through the tiers: they are *parked* in the subscriber's own queue
``<queue>.parked.<subscriber>`` (fed by the direct exchange ``<queue>.parked``, routing key = the
subscriber id), which the dispatcher consumes only while that subscriber can take deliveries.
A subscriber that is down for an hour costs each of its deliveries one trip, not one per cooldown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType
from aiormq.exceptions import ChannelClosed
from pamqp.common import FieldTable, FieldValue

from dispatcher.config import BrokerConfig

__all__ = [
    "LEVELS",
    "Topology",
    "declare",
    "declare_parking",
    "delay_route",
    "delete",
    "parking_exchange",
    "parking_queue",
    "queue_depths",
    "tier_queue_names",
]

LEVELS = 28  # 2**28 ms, about 74.5 hours: longer than any allowed delay


def _level_exchange(queue: str, level: int) -> str:
    return f"{queue}.delay.{level}"


def _tier_queue(queue: str, level: int) -> str:
    return f"{queue}.retry.{2**level}ms"


def _due_exchange(queue: str) -> str:
    return f"{queue}.retry.due"


def _dead_exchange(queue: str) -> str:
    return f"{queue}.dead"


def parking_exchange(queue: str) -> str:
    return f"{queue}.parked"


def parking_queue(queue: str, subscriber: str) -> str:
    return f"{queue}.parked.{subscriber}"


def tier_queue_names(queue: str) -> list[str]:
    return [_tier_queue(queue, k) for k in range(LEVELS)]


def delay_route(queue: str, delay_seconds: float) -> tuple[str, str]:
    """The (exchange, routing key) that delivers a message back to ``queue`` after the delay.

    Exact to the millisecond: rounding delays to fewer set bits (fewer hops) was measured to
    quantize the jitter away and send deferred deliveries back in synchronized waves.
    """
    ms = max(1, min(round(delay_seconds * 1000), 2**LEVELS - 1))
    bits = format(ms, f"0{LEVELS}b")  # bit LEVELS-1 first
    top = ms.bit_length() - 1
    return _level_exchange(queue, top), ".".join(bits)


def _binding(level: int, bit: str) -> str:
    # Routing keys have LEVELS words, the first is bit LEVELS-1; look at bit `level` only.
    before = LEVELS - 1 - level
    return ".".join(["*"] * before + [bit] + ["#"]) if level else ".".join(["*"] * before + [bit])


@dataclass(slots=True)
class Topology:
    """Handles to what `declare` set up, on one channel."""

    events: AbstractExchange
    work: AbstractQueue
    dead: AbstractQueue
    dead_exchange: AbstractExchange


def _queue_args(cfg: BrokerConfig, **extra: FieldValue) -> FieldTable:
    args: FieldTable = {"x-queue-type": cfg.queue_type}
    if cfg.queue_type == "quorum" and "x-dead-letter-exchange" in extra:
        # Dead-letter at least once, so a TTL expiry can never drop a pending retry.
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    args.update(extra)
    return args


async def declare(channel: AbstractChannel, cfg: BrokerConfig) -> Topology:
    """Declare everything idempotently; safe to run on every start and from every worker."""
    q = cfg.queue
    events = await channel.declare_exchange(cfg.exchange, ExchangeType.TOPIC, durable=True)

    dead_exchange = await channel.declare_exchange(
        _dead_exchange(q), ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(
        cfg.dead_letter_queue, durable=True, arguments={"x-queue-type": cfg.queue_type}
    )
    await dead.bind(dead_exchange, routing_key="")

    # Anything the broker itself gives up on (a reject, a quorum delivery limit) is a dead letter.
    work = await channel.declare_queue(
        q, durable=True, arguments=_queue_args(cfg, **{"x-dead-letter-exchange": _dead_exchange(q)})
    )
    for key in cfg.binding_keys:
        await work.bind(events, routing_key=key)

    await channel.declare_exchange(parking_exchange(q), ExchangeType.DIRECT, durable=True)

    due = await channel.declare_exchange(_due_exchange(q), ExchangeType.FANOUT, durable=True)
    await work.bind(due, routing_key="")

    for level in range(LEVELS):
        exchange = await channel.declare_exchange(
            _level_exchange(q, level), ExchangeType.TOPIC, durable=True
        )
        below = _level_exchange(q, level - 1) if level else _due_exchange(q)
        tier = await channel.declare_queue(
            _tier_queue(q, level),
            durable=True,
            arguments=_queue_args(
                cfg, **{"x-message-ttl": 2**level, "x-dead-letter-exchange": below}
            ),
        )
        await tier.bind(exchange, routing_key=_binding(level, "1"))
        if level:
            lower = await channel.get_exchange(below, ensure=False)
            await lower.bind(exchange, routing_key=_binding(level, "0"))
        else:
            await due.bind(exchange, routing_key=_binding(level, "0"))
    return Topology(events=events, work=work, dead=dead, dead_exchange=dead_exchange)


async def declare_parking(
    channel: AbstractChannel, cfg: BrokerConfig, subscriber: str
) -> AbstractQueue:
    """One subscriber's parking queue, bound to the parking exchange by its id (idempotent)."""
    queue = await channel.declare_queue(
        parking_queue(cfg.queue, subscriber),
        durable=True,
        arguments={"x-queue-type": cfg.queue_type},
    )
    await queue.bind(parking_exchange(cfg.queue), routing_key=subscriber)
    return queue


async def delete(
    channel: AbstractChannel,
    cfg: BrokerConfig,
    subscribers: Iterable[str] = (),
    *,
    exchange: bool = True,
) -> None:
    """Remove every queue and exchange `declare` creates, and these subscribers' parking queues
    (tests, and tearing down a demo)."""
    q = cfg.queue
    names = [q, cfg.dead_letter_queue, *tier_queue_names(q)]
    names += [parking_queue(q, sub) for sub in subscribers]
    for name in names:
        await channel.queue_delete(name)
    for name in [_dead_exchange(q), _due_exchange(q), parking_exchange(q)] + [
        _level_exchange(q, k) for k in range(LEVELS)
    ]:
        await channel.exchange_delete(name)
    if exchange:
        await channel.exchange_delete(cfg.exchange)


async def queue_depths(
    channel: AbstractChannel, cfg: BrokerConfig, subscribers: Iterable[str] = ()
) -> dict[str, int]:
    """Messages ready in the work, dead-letter, (summed) retry and (summed) parking queues.

    A parking queue that does not exist (yet, or any more) counts as empty; it is looked up on
    a channel of its own, since a failed passive declare closes the channel it runs on.
    """
    out = {"work": 0, "dead": 0, "retry": 0, "parked": 0}
    # On the raw channel: a robust channel answers a repeated passive declare from its
    # cache, with the count of the first one.
    raw = await channel.get_underlay_channel()
    for kind, names in (
        ("work", [cfg.queue]),
        ("dead", [cfg.dead_letter_queue]),
        ("retry", tier_queue_names(cfg.queue)),
    ):
        for name in names:
            declared = await raw.queue_declare(name, passive=True)
            out[kind] += declared.message_count or 0
    subs = list(subscribers)
    probe = await raw.connection.channel() if subs else None
    for sub in subs:
        assert probe is not None
        try:
            declared = await probe.queue_declare(parking_queue(cfg.queue, sub), passive=True)
        except ChannelClosed:  # not declared: empty; the failure closed the probe channel
            probe = await raw.connection.channel()
            continue
        out["parked"] += declared.message_count or 0
    if probe is not None:
        with contextlib.suppress(Exception):
            await probe.close()
    return out


def persistent_message(body: bytes, **kwargs: object) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **kwargs)  # type: ignore[arg-type]
