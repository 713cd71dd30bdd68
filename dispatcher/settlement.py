"""The one owner of publishing retries, parked deliveries and dead letters, always confirmed.

A delivery's outcome is settled only when the broker has confirmed the retry or dead letter
that carries it; only then may the original message be acknowledged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from dispatcher.config import BrokerConfig
from dispatcher.records import (
    H_DEAD_AT,
    H_DEAD_ID,
    H_EVENT_ID,
    H_EVENT_TYPE,
    H_PUBLISHED_AT,
    H_REASON,
    H_ROUTING_KEY,
    Delivery,
    iso_now,
)
from dispatcher.topology import delay_route, parking_exchange

__all__ = ["Settlement"]


class Settlement:
    def __init__(self, channel: AbstractChannel, cfg: BrokerConfig) -> None:
        self._channel = channel
        self._cfg = cfg
        self._exchanges: dict[str, AbstractExchange] = {}

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

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
        await (await self._exchange(name)).publish(
            _message(body, event_id, headers), routing_key=key, mandatory=True
        )

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
        await (await self._exchange(parking_exchange(self._cfg.queue))).publish(
            _message(body, event_id, headers), routing_key=delivery.subscriber, mandatory=True
        )

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
        headers: dict[str, Any] = {**_carried(carry)}
        if delivery is not None:
            headers.update(delivery.headers())
        headers.update({H_REASON: reason[:500], H_DEAD_ID: dead_id, H_DEAD_AT: iso_now()})
        if event_id:
            headers[H_EVENT_ID] = event_id
        if event_type:
            headers[H_EVENT_TYPE] = event_type
        exchange = await self._exchange(f"{self._cfg.queue}.dead")
        await exchange.publish(_message(body, event_id, headers), routing_key="", mandatory=True)
        return dead_id


def _carried(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers that stay with the event from hop to hop."""
    return {k: headers[k] for k in (H_PUBLISHED_AT, H_ROUTING_KEY) if k in headers}


def _message(body: bytes, event_id: str | None, headers: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        headers=headers,
        message_id=event_id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=time.time(),
    )
