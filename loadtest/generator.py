"""The load generator: a realistic mix of email events, published with confirms and time-stamped.

Every event carries its publish time twice: as unix milliseconds in the ``x-published-at`` header
(which the dispatcher carries from hop to hop) and as a top-level ``published_at`` field in the
body (which the dispatcher passes through byte for byte), so a receiver can compute
publish-to-receipt latency from the request alone. Event ids are unique per run and phase; they
are both the top-level ``id`` and the AMQP ``message_id``. Given accounts, every valid event
also names one of them in a top-level ``account`` (contract section 7), drawn evenly.

Two publishing modes:

* as fast as possible: batches published concurrently, each batch awaited for its confirms;
* at a target rate: due events are published every tick (a few ms), confirms awaited in the
  background with a bounded window, so a slow confirm never delays the schedule.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aio_pika
import orjson
from aio_pika.abc import AbstractExchange

from dispatcher.names import H_PUBLISHED_AT

__all__ = ["EventMix", "Generator", "PublishStats", "Published"]

# Shares of each event type in a day of a mid-sized sender's traffic (deliveries dominate;
# bounces and deferrals are the bulk of the rest; complaints and unsubscribes are rare).
_TYPE_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("Message.Delivered", 0.74),
    ("Message.Deferred", 0.11),
    ("Message.Bounced", 0.10),
    ("Message.Unsubscribed", 0.035),
    ("Message.Complained", 0.015),
)
_BOUNCES: tuple[tuple[str, float, str], ...] = (
    ("HardBounce", 0.55, "smtp; 550 5.1.1 <{r}>: Recipient address rejected: User unknown"),
    ("SoftBounce", 0.25, "smtp; 452 4.2.2 <{r}>: Mailbox full"),
    ("Blocked", 0.15, "smtp; 554 5.7.1 Service unavailable; client host blocked using zen"),
    ("Undetermined", 0.05, "smtp; 550 Message rejected"),
)
_DEFERRALS = (
    "smtp; 421 4.7.0 Try again later, closing connection",
    "smtp; 451 4.3.0 Temporary lookup failure",
    "smtp; 450 4.2.1 The user you are trying to contact is receiving mail too quickly",
)
# Recipient domains: a few giant mailbox providers, then a long tail of company domains.
_PROVIDERS: tuple[tuple[str, float], ...] = (
    ("gmail.com", 0.31),
    ("outlook.com", 0.10),
    ("yahoo.com", 0.09),
    ("hotmail.com", 0.06),
    ("icloud.com", 0.06),
    ("gmx.de", 0.02),
    ("aol.com", 0.02),
)
_SENDERS = (
    "news@shop.example.com",
    "receipts@shop.example.com",
    "alerts@app.example.io",
    "noreply@bank.example.net",
)
_MTAS = ("mta1.mail.example.com", "mta2.mail.example.com", "mta3.mail.example.com")


@dataclass(frozen=True, slots=True)
class Published:
    """One confirmed event: its id, type, publish time (unix ms), whether it was valid, and
    the account it names (None: no ``account`` in the body)."""

    id: str
    type: str
    published_ms: float
    valid: bool = True
    account: str | None = None


@dataclass(slots=True)
class PublishStats:
    confirmed: int = 0
    refused: int = 0  # nacked or returned by the broker: never entered the system
    started: float = 0.0
    finished: float = 0.0

    @property
    def rate(self) -> float:
        span = self.finished - self.started
        return self.confirmed / span if span > 0 else 0.0


@dataclass
class EventMix:
    """Builds event documents; deterministic for a seed."""

    seed: int = 1
    invalid_fraction: float = 0.0  # share of deliberately invalid events (dead-lettered)
    company_domains: int = 400
    users_per_domain: int = 5000
    accounts: tuple[str, ...] = ()  # each valid event names one of these (none: no account)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._types = [t for t, _ in _TYPE_WEIGHTS]
        self._type_w = [w for _, w in _TYPE_WEIGHTS]
        provider_share = sum(w for _, w in _PROVIDERS)
        self._domains = [d for d, _ in _PROVIDERS] + [
            f"company-{i}.example" for i in range(self.company_domains)
        ]
        tail = (1.0 - provider_share) / self.company_domains
        # Zipf-like tail: earlier company domains send more.
        weights = [1.0 / (i + 1) for i in range(self.company_domains)]
        scale = tail * self.company_domains / sum(weights)
        self._domain_w = [w for _, w in _PROVIDERS] + [w * scale for w in weights]

    def recipient(self) -> str:
        rng = self._rng
        domain = rng.choices(self._domains, self._domain_w)[0]
        return f"user{rng.randrange(self.users_per_domain)}.{rng.randrange(1000)}@{domain}"

    def document(
        self, event_id: str, published_ms: float, account: str | None = None
    ) -> tuple[str, bytes, bool, str | None]:
        """(routing key, body, valid, account) for one event stamped with ``published_ms``;
        ``account`` overrides the drawn one."""
        rng = self._rng
        if account is None and self.invalid_fraction and rng.random() < self.invalid_fraction:
            return (*self._invalid(event_id, published_ms), None)
        if account is None and self.accounts:
            account = self.accounts[rng.randrange(len(self.accounts))]
        event_type = rng.choices(self._types, self._type_w)[0]
        recipient = self.recipient()
        local = f"{rng.getrandbits(64):016x}.{rng.getrandbits(32):08x}"
        data: dict[str, object] = {
            "messageid": f"<{local}@{rng.choice(_MTAS)}>",
            "recipient": recipient,
            "sender": rng.choice(_SENDERS),
            "campaign": f"cmp-{rng.randrange(50):03d}",
        }
        if event_type == "Message.Bounced":
            kind = rng.choices(_BOUNCES, [w for _, w, _ in _BOUNCES])[0]
            data["bounce_type"] = kind[0]
            data["diagnostic_code"] = kind[2].format(r=recipient)
        elif event_type == "Message.Deferred":
            data["diagnostic_code"] = rng.choice(_DEFERRALS)
            data["attempt"] = rng.randrange(1, 6)
        elif event_type == "Message.Delivered":
            data["mx"] = f"mx{rng.randrange(1, 5)}.{recipient.rsplit('@', 1)[1]}"
            data["smtp_response"] = "250 2.0.0 OK"
        doc: dict[str, object] = {
            "id": event_id,
            "event": event_type,
            "timestamp": _iso(published_ms),
            "published_at": published_ms,
            "data": data,
        }
        if account is not None:
            doc["account"] = account
        return event_type, orjson.dumps(doc), True, account

    def _invalid(self, event_id: str, published_ms: float) -> tuple[str, bytes, bool]:
        kind = self._rng.randrange(3)
        if kind == 0:  # a bounce without its required fields
            doc = {
                "id": event_id,
                "event": "Message.Bounced",
                "timestamp": _iso(published_ms),
                "published_at": published_ms,
                "data": {"messageid": "x"},
            }
            return "Message.Bounced", orjson.dumps(doc), False
        if kind == 1:  # an event type nobody knows
            doc = {
                "id": event_id,
                "event": "Message.Opened",
                "timestamp": _iso(published_ms),
                "published_at": published_ms,
                "data": {"recipient": self.recipient()},
            }
            return "Message.Opened", orjson.dumps(doc), False
        return "Message.Delivered", b"{not json at all", False


def _iso(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Generator:
    """Publishes to one exchange with publisher confirms; an async context manager."""

    def __init__(self, broker_url: str, exchange: str, *, prefix: str, mix: EventMix) -> None:
        self._url = broker_url
        self._exchange_name = exchange
        self._prefix = prefix
        self._mix = mix
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self.published: list[Published] = []
        self.stats = PublishStats()
        self._seq = 0

    async def __aenter__(self) -> Generator:
        self._conn = await aio_pika.connect(self._url)
        channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._exchange = await channel.declare_exchange(
            self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _publish_one(self) -> None:
        self._seq += 1
        published = await self.publish_one(f"{self._prefix}-{self._seq}")
        if published is None:
            self.stats.refused += 1
            return
        self.stats.confirmed += 1
        self.published.append(published)

    async def publish_one(self, event_id: str, *, account: str | None = None) -> Published | None:
        """Publish one event (``account`` forces the account it names) and wait for its
        confirm; None if the broker refused it. Not counted in `published` or `stats`."""
        assert self._exchange is not None
        now_ms = round(time.time() * 1000, 3)
        key, body, valid, named = self._mix.document(event_id, now_ms, account)
        message = aio_pika.Message(
            body,
            message_id=event_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={H_PUBLISHED_AT: int(now_ms)},
        )
        try:
            await self._exchange.publish(message, routing_key=key, mandatory=True)
        except Exception:  # nack or unroutable: the event never entered the system
            return None
        return Published(event_id, key, now_ms, valid, named)

    async def run(
        self,
        count: int,
        *,
        rate: float | None = None,
        batch: int = 500,
        stop: Callable[[], bool] | None = None,
    ) -> PublishStats:
        """Publish ``count`` events: as fast as confirms allow, or at ``rate`` per second."""
        self.stats.started = time.time()
        try:
            if rate is None or rate <= 0:
                await self._flat_out(count, batch, stop)
            else:
                await self._paced(count, rate, stop)
        finally:
            self.stats.finished = time.time()
        return self.stats

    async def _flat_out(self, count: int, batch: int, stop: Callable[[], bool] | None) -> None:
        done = 0
        while done < count and not (stop and stop()):
            n = min(batch, count - done)
            await asyncio.gather(*(self._publish_one() for _ in range(n)))
            done += n

    async def _paced(
        self, count: int, rate: float, stop: Callable[[], bool] | None, window: int = 5000
    ) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        outstanding = asyncio.Semaphore(window)
        tasks: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                await self._publish_one()
            finally:
                outstanding.release()

        while sent < count and not (stop and stop()):
            due = min(count, int((loop.time() - start) * rate) + 1)
            while sent < due:
                await outstanding.acquire()
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            next_at = start + sent / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        if tasks:
            await asyncio.gather(*tasks)
