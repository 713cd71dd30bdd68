"""Every name the dispatcher gives things on the broker and on the wire, in one place.

Queues and exchanges are named after the work queue (`[broker].queue`): this module says how,
and every other module asks it rather than spelling a suffix out. It owns the dispatcher's own
message headers too (``x-dispatch-*`` and the dead-letter record's), the headers RabbitMQ writes
that the dispatcher reads back, and the webhook headers a subscriber receives. It holds names
and the numbers that shape them, nothing else: no I/O, so every layer may import it.

What the names look like, for a work queue ``q``:

- ``q.dead``: the dead-letter exchange and queue.
- ``q.delay.<level>``: the delay exchanges, one per bit of a delay in milliseconds; a message
  routed to one waits in ``q.retry.<2**level>ms`` and falls through lower levels to
  ``q.retry.due``, the exchange that hands it back to the work queue.
- ``q.parked``: the parking exchange (routing key: the subscriber id); ``q.parked.<subscriber>``
  a subscriber's parking queue; ``q.parked-index`` the queue that remembers recent parking.
- ``q.control``: the cluster's fanout exchange; ``q.control.<member>`` one process's queue;
  ``q.control.members`` the presence queue.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "CARRIED_HEADERS",
    "H_ACCOUNT",
    "H_ATTEMPT",
    "H_BATCH_ID",
    "H_BATCH_SIZE",
    "H_DEAD_AT",
    "H_DEAD_ID",
    "H_DEATH",
    "H_DEFERRALS",
    "H_EVENT_ID",
    "H_EVENT_TYPE",
    "H_FIRST_ATTEMPT",
    "H_FIRST_DEATH_QUEUE",
    "H_FIRST_DEATH_REASON",
    "H_LAST_ERROR",
    "H_LAST_STATUS",
    "H_PUBLISHED_AT",
    "H_REASON",
    "H_ROUTING_KEY",
    "H_SUBSCRIBER",
    "LEVELS",
    "MAX_DELAY_MS",
    "NO_DELIVERY_LIMIT",
    "WEBHOOK_BATCH_SIZE",
    "WEBHOOK_ID",
    "WEBHOOK_SIGNATURE",
    "WEBHOOK_TIMESTAMP",
    "WORK_DELIVERY_LIMIT",
    "ControlNames",
    "control_names",
    "dead_exchange",
    "dead_queue",
    "dead_queue_pattern",
    "delay_exchange",
    "due_exchange",
    "is_delay_exchange",
    "parking_exchange",
    "parking_index",
    "parking_queue",
    "parking_queue_pattern",
    "policy_name",
    "tier_queue",
    "tier_queue_names",
    "tier_queue_pattern",
    "work_queue_pattern",
]

# --- queues and exchanges -------------------------------------------------------------------

LEVELS = 28  # 2**28 ms, about 74.5 hours: longer than any allowed delay
MAX_DELAY_MS = 2**LEVELS - 1  # the longest delay the tiers can hold, in milliseconds

# Tries of one work-queue message (deliveries not settled: the process died, the channel was
# lost) before the broker dead-letters it. Quorum queues only: classic queues have no limit.
WORK_DELIVERY_LIMIT = 20
# The delivery limit of every other quorum queue: the largest AMQP long, out of reach of any
# number of reads or hand-backs, accepted alike by RabbitMQ 3.10-3.13 and 4.x.
NO_DELIVERY_LIMIT = 2**63 - 1


def dead_exchange(queue: str) -> str:
    """The dead-letter exchange: a fanout to the dead-letter queue of the same name, the one
    `dispatcher dlq` reads."""
    return f"{queue}.dead"


dead_queue = dead_exchange  # one name for both


def delay_exchange(queue: str, level: int) -> str:
    """The exchange of delay level ``level`` (its tier holds a message 2**level ms)."""
    return f"{queue}.delay.{level}"


def is_delay_exchange(queue: str, exchange: str) -> bool:
    """Whether ``exchange`` is one of ``queue``'s delay exchanges."""
    return exchange.startswith(f"{queue}.delay.")


def tier_queue(queue: str, level: int) -> str:
    """The retry tier that holds a message 2**level ms."""
    return f"{queue}.retry.{2**level}ms"


def tier_queue_names(queue: str) -> list[str]:
    """Every retry tier of ``queue``, shortest first."""
    return [tier_queue(queue, k) for k in range(LEVELS)]


def due_exchange(queue: str) -> str:
    """Where a delay ends: the exchange that hands a message back to the work queue."""
    return f"{queue}.retry.due"


def parking_exchange(queue: str) -> str:
    """The parking exchange; a delivery is routed by its subscriber id."""
    return f"{queue}.parked"


def parking_queue(queue: str, subscriber: str) -> str:
    """One subscriber's parking queue."""
    return f"{parking_exchange(queue)}.{subscriber}"


def parking_index(queue: str) -> str:
    """The queue that remembers which subscribers parked lately (no subscriber id can end a
    name this way: ids never follow ``parked-``)."""
    return f"{parking_exchange(queue)}-index"


class ControlNames(NamedTuple):
    """The cluster's names on a work queue ``q``, declared together: the fanout exchange every
    process publishes to (``q.control``), the presence queue whose consumer count says how many
    processes are registered (``q.control.members``), and each process's own queue
    (``q.control.<member>``, from `member`)."""

    exchange: str
    presence: str

    def member(self, member: str) -> str:
        return f"{self.exchange}.{member}"


def control_names(queue: str) -> ControlNames:
    exchange = f"{queue}.control"
    return ControlNames(exchange, f"{exchange}.members")


# Policies (`dispatcher migrate-queues`): one per kind of queue, with a regular expression that
# matches the queues of that kind.


def policy_name(queue: str, kind: str) -> str:
    """The policy for one kind of queue: ``work``, ``dead``, ``retry`` or ``parked``."""
    return f"{queue}.{kind}"


def work_queue_pattern(queue: str) -> str:
    return f"^{re.escape(queue)}$"


def dead_queue_pattern(queue: str) -> str:
    return f"^{re.escape(dead_queue(queue))}$"


def tier_queue_pattern(queue: str) -> str:
    return f"^{re.escape(queue)}\\.retry\\.[0-9]+ms$"


def parking_queue_pattern(queue: str) -> str:
    return f"^{re.escape(parking_exchange(queue))}\\..+$"


# --- the dispatcher's message headers -------------------------------------------------------

H_SUBSCRIBER = "x-dispatch-subscriber"  # the one subscriber a retry is for
H_ACCOUNT = "x-dispatch-account"  # the subscriber's account, on retries, parks and dead letters
H_ATTEMPT = "x-dispatch-attempt"  # the attempt number the message is due for (1-based)
H_FIRST_ATTEMPT = "x-dispatch-first-attempt"  # unix ms of the first attempt
H_DEFERRALS = "x-dispatch-deferrals"  # times the delivery was deferred without an attempt
H_LAST_STATUS = "x-dispatch-last-status"
H_LAST_ERROR = "x-dispatch-last-error"
H_EVENT_TYPE = "x-dispatch-event"
H_ROUTING_KEY = "x-dispatch-routing-key"  # the routing key the event was published with
H_PUBLISHED_AT = "x-published-at"  # unix ms when the delivery node published (optional)
H_EVENT_ID = "x-dispatch-event-id"  # the event id, on dead letters (absent when unknown)
H_REASON = "x-dead-reason"
H_DEAD_ID = "x-dead-id"
H_DEAD_AT = "x-dead-lettered-at"
H_BATCH_ID = "x-dispatch-batch"  # on a batch: its id (the webhook-id); the body is the array
H_BATCH_SIZE = "x-dispatch-batch-size"  # on a batch: how many events it holds

# Headers that stay with an event (or a batch) from hop to hop: retries, parks, dead letters,
# replays.
CARRIED_HEADERS = (H_PUBLISHED_AT, H_ROUTING_KEY, H_ACCOUNT, H_BATCH_ID, H_BATCH_SIZE)

# Headers RabbitMQ writes on a message it dead-letters itself (a reject, the delivery limit).
H_FIRST_DEATH_REASON = "x-first-death-reason"
H_FIRST_DEATH_QUEUE = "x-first-death-queue"
H_DEATH = "x-death"

# --- the webhook's headers (Standard Webhooks) ----------------------------------------------

WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
WEBHOOK_BATCH_SIZE = "webhook-batch-size"
