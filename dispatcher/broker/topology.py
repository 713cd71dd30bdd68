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

Nothing is left to the broker's defaults, which differ between RabbitMQ 3.x and 4.x:

- Every queue has a dead-letter exchange, so nothing the broker gives up on is dropped: the work
  queue and the dead-letter queue itself lead to ``<queue>.dead`` (a dead letter some client
  rejects goes back to the end of the dead-letter queue), the tiers to the next level down.
- Quorum queues get an explicit ``x-delivery-limit``. RabbitMQ 4 gives a quorum queue without one
  a limit of 20 deliveries and drops the message at the 21st; every read of a dead letter (get,
  then hand back) and every hand-back of a parked or in-flight delivery counts as one. The work
  queue keeps a bound (`WORK_DELIVERY_LIMIT`): a message that kills the dispatcher on every try
  is dead-lettered (``broker_delivery_limit``) after that many tries. Every other queue gets
  `NO_DELIVERY_LIMIT`, a limit nothing can reach. ``-1``, which switches the limit off on 4.x,
  drops a message on its first return on 3.10 (measured), so one number serves both
  generations, and a queue declared on 3.x keeps its arguments through an upgrade to 4.x.
- A queue that already exists with other arguments (declared by an older version) is used as
  it is: the declare is tried on a throwaway channel first (a refused declare closes its
  channel), the queue is then declared passively, and one warning names the queues and the fix
  (`migration_policies`, printed by ``dispatcher migrate-queues``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType
from aiormq.exceptions import ChannelClosed, ChannelPreconditionFailed
from pamqp.common import FieldTable, FieldValue

from dispatcher.config import BrokerConfig
from dispatcher.names import (
    LEVELS,
    MAX_DELAY_MS,
    NO_DELIVERY_LIMIT,
    WORK_DELIVERY_LIMIT,
    control_names,
    dead_exchange,
    dead_queue,
    dead_queue_pattern,
    delay_exchange,
    due_exchange,
    parking_exchange,
    parking_index,
    parking_queue,
    parking_queue_pattern,
    policy_name,
    tier_queue,
    tier_queue_names,
    tier_queue_pattern,
    work_queue_pattern,
)

__all__ = [
    "Policy",
    "Topology",
    "dead_arguments",
    "declare",
    "declare_control",
    "declare_parking",
    "declare_parking_index",
    "delay_route",
    "delete",
    "migration_policies",
    "parking_arguments",
    "queue_depths",
    "tier_arguments",
    "work_arguments",
]

log = structlog.get_logger("dispatcher.topology")


def delay_route(queue: str, delay_seconds: float) -> tuple[str, str]:
    """The (exchange, routing key) that delivers a message back to ``queue`` after the delay.

    Exact to the millisecond: rounding delays to fewer set bits (fewer hops) was measured to
    quantize the jitter away and send deferred deliveries back in synchronized waves.
    """
    ms = max(1, min(round(delay_seconds * 1000), MAX_DELAY_MS))
    bits = format(ms, f"0{LEVELS}b")  # bit LEVELS-1 first
    top = ms.bit_length() - 1
    return delay_exchange(queue, top), ".".join(bits)


def _binding(level: int, bit: str) -> str:
    # Routing keys have LEVELS words, the first is bit LEVELS-1; look at bit `level` only.
    before = LEVELS - 1 - level
    return ".".join(["*"] * before + [bit] + ["#"]) if level else ".".join(["*"] * before + [bit])


@dataclass(slots=True)
class Topology:
    """Handles to what `declare` set up, on one channel: the work queue (the rest is reached
    by name, from dispatcher.names)."""

    work: AbstractQueue


def _queue_args(cfg: BrokerConfig, **extra: FieldValue) -> FieldTable:
    args: FieldTable = {"x-queue-type": cfg.queue_type}
    if cfg.queue_type == "quorum":
        args["x-delivery-limit"] = NO_DELIVERY_LIMIT
        if "x-dead-letter-exchange" in extra:
            # Dead-letter at least once, so a TTL expiry can never drop a pending retry.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    args.update(extra)
    return args


def work_arguments(cfg: BrokerConfig) -> FieldTable:
    """The work queue: whatever the broker gives up on (a reject, the delivery limit) is a dead
    letter."""
    args = _queue_args(cfg, **{"x-dead-letter-exchange": dead_exchange(cfg.queue)})
    if "x-delivery-limit" in args:
        args["x-delivery-limit"] = WORK_DELIVERY_LIMIT
    return args


def dead_arguments(cfg: BrokerConfig) -> FieldTable:
    """The dead-letter queue: read any number of times; a dead letter some client rejects goes
    back to its end (a cycle through a rejection is not one the broker breaks)."""
    return _queue_args(cfg, **{"x-dead-letter-exchange": dead_exchange(cfg.queue)})


def tier_arguments(cfg: BrokerConfig, level: int) -> FieldTable:
    below = delay_exchange(cfg.queue, level - 1) if level else due_exchange(cfg.queue)
    return _queue_args(cfg, **{"x-message-ttl": 2**level, "x-dead-letter-exchange": below})


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'")


async def side_channel(channel: AbstractChannel) -> aiormq.abc.AbstractChannel:
    """A raw channel of its own on ``channel``'s connection, for a passive declare that may fail
    (a refused declare closes the channel it ran on).

    During a reconnect the robust channel may still hold the old connection, and aiormq opens
    no channel on a closed one with a bare `RuntimeError`. That is a broken link, and callers
    treat broker errors as transient (the message goes back, it is not dead-lettered), so it is
    raised as `ConnectionClosed`.
    """
    raw = await channel.get_underlay_channel()
    try:
        return await raw.connection.channel(publisher_confirms=False)
    except RuntimeError as exc:
        raise aiormq.exceptions.ConnectionClosed(320, str(exc)) from exc


@dataclass
class _Declarer:
    """Declares queues on ``channel``, trying their arguments on a throwaway channel first.

    A declare the broker refuses (PRECONDITION_FAILED: the queue exists with other arguments)
    closes the channel it ran on, and the caller's channel may be consuming. A refused queue is
    declared passively instead (used as it is) and reported by `warn`.
    """

    channel: AbstractChannel
    refused: dict[str, str] = field(default_factory=dict)  # queue -> the argument that differs
    _side: aiormq.abc.AbstractChannel | None = None

    async def queue(self, name: str, arguments: FieldTable) -> AbstractQueue:
        if await self._accepted(name, arguments):
            return await self.channel.declare_queue(name, durable=True, arguments=arguments)
        return await self.channel.declare_queue(name, durable=True, passive=True)

    async def _accepted(self, name: str, arguments: FieldTable) -> bool:
        if self._side is None or self._side.is_closed:
            self._side = await side_channel(self.channel)
        try:
            await self._side.queue_declare(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as exc:
            found = _INEQUIVALENT.search(str(exc))
            self.refused[name] = found.group(1) if found else str(exc)
            self._side = None  # closed by the refusal
            return False
        return True

    async def close(self) -> None:
        side, self._side = self._side, None
        if side is not None and not side.is_closed:
            with contextlib.suppress(Exception):
                await side.close()

    def warn(self, cfg: BrokerConfig) -> None:
        if not self.refused:
            return
        names = sorted(self.refused)
        log.warning(
            "queues_declared_with_other_arguments",
            queues=names,
            differ=sorted(set(self.refused.values())),
            using="as they are (passive declare)",
            fix=(
                "apply the policies `dispatcher migrate-queues` prints (or recreate the queues "
                "once drained); until then RabbitMQ 4 may drop a message after 20 deliveries "
                f"in {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            ),
            queue_type=cfg.queue_type,
        )


async def declare(channel: AbstractChannel, cfg: BrokerConfig) -> Topology:
    """Declare everything idempotently; safe to run on every start and from every worker."""
    q = cfg.queue
    events = await channel.declare_exchange(cfg.exchange, ExchangeType.TOPIC, durable=True)

    dead_fanout = await channel.declare_exchange(
        dead_exchange(q), ExchangeType.FANOUT, durable=True
    )
    declarer = _Declarer(channel)
    try:
        return await _declare(channel, cfg, declarer, events, dead_fanout)
    finally:
        await declarer.close()
        declarer.warn(cfg)


async def _declare(
    channel: AbstractChannel,
    cfg: BrokerConfig,
    declarer: _Declarer,
    events: AbstractExchange,
    dead_fanout: AbstractExchange,
) -> Topology:
    q = cfg.queue
    dead = await declarer.queue(dead_queue(cfg.queue), dead_arguments(cfg))
    await dead.bind(dead_fanout, routing_key="")

    # Anything the broker itself gives up on (a reject, a quorum delivery limit) is a dead letter.
    work = await declarer.queue(q, work_arguments(cfg))
    for key in cfg.binding_keys:
        await work.bind(events, routing_key=key)

    await channel.declare_exchange(parking_exchange(q), ExchangeType.DIRECT, durable=True)

    due = await channel.declare_exchange(due_exchange(q), ExchangeType.FANOUT, durable=True)
    await work.bind(due, routing_key="")

    for level in range(LEVELS):
        exchange = await channel.declare_exchange(
            delay_exchange(q, level), ExchangeType.TOPIC, durable=True
        )
        below = delay_exchange(q, level - 1) if level else due_exchange(q)
        tier = await declarer.queue(tier_queue(q, level), tier_arguments(cfg, level))
        await tier.bind(exchange, routing_key=_binding(level, "1"))
        if level:
            lower = await channel.get_exchange(below, ensure=False)
            await lower.bind(exchange, routing_key=_binding(level, "0"))
        else:
            await due.bind(exchange, routing_key=_binding(level, "0"))
    return Topology(work=work)


PARK_TTL_DEFAULT = 600.0  # seconds a parked delivery waits before it returns to the work queue


def parking_arguments(cfg: BrokerConfig, park_ttl: float = PARK_TTL_DEFAULT) -> FieldTable:
    """A parking queue's arguments: what nobody consumes returns to the work queue (through the
    due exchange) after ``park_ttl``; the queue itself goes once unused for three times that."""
    ttl_ms = max(1000, round(park_ttl * 1000))
    extra: dict[str, FieldValue] = {
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": due_exchange(cfg.queue),
        "x-expires": 3 * ttl_ms,
    }
    return _queue_args(cfg, **extra)


async def declare_parking(
    channel: AbstractChannel,
    cfg: BrokerConfig,
    subscriber: str,
    *,
    park_ttl: float = PARK_TTL_DEFAULT,
) -> AbstractQueue:
    """One subscriber's parking queue, bound to the parking exchange by its id (idempotent)."""
    declarer = _Declarer(channel)
    try:
        queue = await declarer.queue(
            parking_queue(cfg.queue, subscriber), parking_arguments(cfg, park_ttl)
        )
    finally:
        await declarer.close()
        declarer.warn(cfg)
    await queue.bind(parking_exchange(cfg.queue), routing_key=subscriber)
    return queue


async def declare_parking_index(
    channel: AbstractChannel, cfg: BrokerConfig, *, park_ttl: float = PARK_TTL_DEFAULT
) -> AbstractQueue:
    """A hint for restarts: one small message per parking queue created, kept as long as the
    queue can live (three park_ttl), so a process that starts finds the queues it must consume
    without asking about every configured subscriber."""
    ttl_ms = max(1000, round(park_ttl * 1000))
    extra: dict[str, FieldValue] = {"x-message-ttl": 3 * ttl_ms}
    declarer = _Declarer(channel)
    try:
        return await declarer.queue(parking_index(cfg.queue), _queue_args(cfg, **extra))
    finally:
        await declarer.close()
        declarer.warn(cfg)


# --- queues declared by an older version ----------------------------------------------------

# Queue arguments a policy can set in their place; the queue type never changes.
_POLICY_KEYS = {
    "x-delivery-limit": "delivery-limit",
    "x-dead-letter-exchange": "dead-letter-exchange",
    "x-dead-letter-strategy": "dead-letter-strategy",
    "x-overflow": "overflow",
}
POLICY_PRIORITY = 10


@dataclass(frozen=True, slots=True)
class Policy:
    """A RabbitMQ policy for queues declared before their arguments were what they are now."""

    name: str
    pattern: str
    definition: dict[str, Any]
    priority: int = POLICY_PRIORITY
    apply_to: str = "queues"

    def rabbitmqctl(self, vhost: str = "/") -> list[str]:
        """The ``rabbitmqctl`` arguments that set this policy."""
        return [
            "set_policy",
            "-p",
            vhost,
            "--priority",
            str(self.priority),
            "--apply-to",
            self.apply_to,
            self.name,
            self.pattern,
            json.dumps(self.definition, separators=(",", ":")),
        ]


def _policy(name: str, pattern: str, arguments: FieldTable, *skip: str) -> Policy:
    definition = {
        key: arguments[arg]
        for arg, key in _POLICY_KEYS.items()
        if arg in arguments and arg not in skip
    }
    return Policy(name=name, pattern=pattern, definition=definition)


def migration_policies(cfg: BrokerConfig) -> list[Policy]:
    """Policies that give queues declared by an older version what `declare` gives new ones:
    the delivery limits and dead-letter exchanges (a queue's own arguments cannot change; a
    policy fills in those it lacks). One per kind of queue; a queue gets only the policy of
    highest priority, so these replace a lower one of the operator's on these queues."""
    q = cfg.queue
    policies = [
        _policy(policy_name(q, "work"), work_queue_pattern(q), work_arguments(cfg)),
        _policy(policy_name(q, "dead"), dead_queue_pattern(q), dead_arguments(cfg)),
        # Each tier dead-letters into its own level: that argument they always had.
        _policy(
            policy_name(q, "retry"),
            tier_queue_pattern(q),
            tier_arguments(cfg, 0),
            "x-dead-letter-exchange",
        ),
        _policy(policy_name(q, "parked"), parking_queue_pattern(q), parking_arguments(cfg)),
    ]
    return [p for p in policies if p.definition]


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
    names = [q, dead_queue(cfg.queue), *tier_queue_names(q)]
    names += [parking_queue(q, sub) for sub in subscribers]
    names.append(control_names(q).presence)
    names.append(parking_index(q))
    for name in names:
        await channel.queue_delete(name)
    for name in [
        dead_exchange(q),
        due_exchange(q),
        parking_exchange(q),
        control_names(q).exchange,
    ] + [delay_exchange(q, k) for k in range(LEVELS)]:
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
        ("dead", [dead_queue(cfg.queue)]),
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


# --- the control plane (dispatcher/broker/cluster.py) ---------------------------------------------

CONTROL_MESSAGE_TTL_MS = 5000  # a control message nobody read for this long is stale
_PRESENCE_EXPIRES_MS = 3_600_000


async def declare_control(
    channel: AbstractChannel, cfg: BrokerConfig, member: str
) -> tuple[AbstractExchange, AbstractQueue, AbstractQueue]:
    """One process's part of the control plane: the fanout exchange every process on the queue
    publishes to, this process's own queue bound to it, and the shared presence queue whose
    consumer count says how many processes are registered.

    Classic queues whatever ``queue_type`` says: nothing here outlives its process, and a
    consumer count must be exact. The member queue is exclusive (it goes with the connection);
    the presence queue is durable (RabbitMQ 4 deprecates transient shared queues), nothing is
    ever routed to it, and the broker removes it once no process has used it for an hour.
    """
    names = control_names(cfg.queue)
    exchange = await channel.declare_exchange(names.exchange, ExchangeType.FANOUT, durable=True)
    own = await channel.declare_queue(
        names.member(member),
        durable=False,
        exclusive=True,
        auto_delete=True,
        arguments={
            "x-queue-type": "classic",
            "x-message-ttl": CONTROL_MESSAGE_TTL_MS,
            "x-max-length": 10_000,
        },
    )
    await own.bind(exchange, routing_key="")
    presence = await channel.declare_queue(
        names.presence,
        durable=True,
        arguments={"x-queue-type": "classic", "x-expires": _PRESENCE_EXPIRES_MS},
    )
    return exchange, own, presence
