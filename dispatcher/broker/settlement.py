"""The one owner of publishing retries, parked deliveries and dead letters, always confirmed.

A delivery's outcome is settled only when the broker has confirmed the retry or dead letter
that carries it; only then may the original message be acknowledged.

Publishing is on the hot path when a subscriber is down (one park per event), so messages go
straight to the channel as AMQP properties, without aio-pika's `Message` wrapper: the same
frames, measured at about a sixth less CPU per publish. The channel has publisher confirms and
raises on returns, so a nack, a return (nothing routed it) or a lost channel raises here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic

from dispatcher.broker.topology import delay_route
from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import BrokerConfig
from dispatcher.decisions.records import Delivery, iso_time
from dispatcher.decisions.retry_policy import DeadLetter, Park, Retry
from dispatcher.names import (
    CARRIED_HEADERS,
    H_DEAD_AT,
    H_DEAD_ID,
    H_EVENT_ID,
    H_EVENT_TYPE,
    H_REASON,
    dead_exchange,
    parking_exchange,
)

__all__ = ["Settlement"]


class Settlement:
    def __init__(
        self,
        channel: AbstractChannel,
        cfg: BrokerConfig,
        *,
        observe: Callable[[str, float], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._channel = channel
        self._cfg = cfg
        self._wall = clock.wall  # the messages' timestamps
        self._elapsed = clock.elapsed
        self._observe = observe  # (kind, seconds until the broker confirmed)

    async def _publish(
        self, kind: str, exchange: str, routing_key: str, body: bytes, props: Basic.Properties
    ) -> None:
        if self._channel.is_closed:
            raise ChannelInvalidStateError(f"{self._channel!r} closed")
        channel = await self._channel.get_underlay_channel()
        started = self._elapsed()
        await channel.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=props, mandatory=True
        )
        if self._observe is not None:
            self._observe(kind, self._elapsed() - started)

    async def settle(
        self,
        decision: Retry | Park | DeadLetter,
        body: bytes,
        *,
        event_id: str,
        event_type: str,
        delivery: Delivery,
        carry: Mapping[str, Any],
    ) -> str | None:
        """Publish what a decision calls for and return once the broker confirmed it: a retry
        into the delay tiers (carrying the attempt it is due for), a park in the subscriber's
        own queue (one deferral more) or a dead letter (whose id is returned)."""
        if isinstance(decision, Retry):
            due = replace(delivery, attempt=decision.next_attempt)
            await self.retry(
                body,
                event_id=event_id,
                event_type=event_type,
                delivery=due,
                delay=decision.delay,
                carry=carry,
            )
            return None
        if isinstance(decision, Park):
            deferred = replace(delivery, deferrals=delivery.deferrals + 1)
            await self.park(
                body, event_id=event_id, event_type=event_type, delivery=deferred, carry=carry
            )
            return None
        return await self.dead_letter(
            body,
            reason=decision.reason,
            event_id=event_id,
            event_type=event_type,
            delivery=delivery,
            carry=carry,
        )

    async def retry(
        self,
        body: bytes,
        *,
        event_id: str,
        event_type: str,
        delivery: Delivery,
        delay: float,
        carry: Mapping[str, Any],
    ) -> None:
        """Park one subscriber's delivery in the delay tiers; it returns to the work queue."""
        name, key = delay_route(self._cfg.queue, delay)
        headers = {**_carried(carry), **delivery.headers(), H_EVENT_TYPE: event_type}
        props = _properties(event_id, headers, self._wall())
        await self._publish("retry", name, key, body, props)

    async def park(
        self,
        body: bytes,
        *,
        event_id: str,
        event_type: str,
        delivery: Delivery,
        carry: Mapping[str, Any],
    ) -> None:
        """Park one subscriber's delivery in its own queue until the subscriber can take it.

        Published mandatory on a channel whose returns raise: a subscriber whose parking queue
        is missing makes this fail (and the message is handed back), never silently drop.
        """
        headers = {**_carried(carry), **delivery.headers(), H_EVENT_TYPE: event_type}
        exchange = parking_exchange(self._cfg.queue)
        props = _properties(event_id, headers, self._wall())
        await self._publish("park", exchange, delivery.subscriber, body, props)

    async def dead_letter(
        self,
        body: bytes,
        *,
        reason: str,
        event_id: str | None,
        event_type: str | None,
        delivery: Delivery | None,
        carry: Mapping[str, Any],
    ) -> str:
        """Write a dead letter with its record; return the dead letter's id."""
        dead_id = uuid.uuid4().hex
        now = self._wall()
        headers: dict[str, Any] = {**_carried(carry)}
        if delivery is not None:
            headers.update(delivery.headers())
        headers.update({H_REASON: reason[:500], H_DEAD_ID: dead_id, H_DEAD_AT: iso_time(now)})
        if event_id:
            headers[H_EVENT_ID] = event_id
        if event_type:
            headers[H_EVENT_TYPE] = event_type
        exchange = dead_exchange(self._cfg.queue)
        props = _properties(event_id, headers, now)
        await self._publish("dead_letter", exchange, "", body, props)
        return dead_id


def _carried(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers that stay with the event from hop to hop."""
    return {k: headers[k] for k in CARRIED_HEADERS if k in headers}


def _properties(event_id: str | None, headers: dict[str, Any], now: float) -> Basic.Properties:
    """Persistent JSON with our headers, stamped ``now`` (unix seconds); without an event id the
    client invents a message id (returns are matched to publishes by it)."""
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=event_id,
        timestamp=dt.datetime.fromtimestamp(now, dt.UTC),
        headers=headers,
    )
