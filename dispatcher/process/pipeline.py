"""The delivery pipeline: one consumed message in, every matching subscriber settled, one ack.

Messages come in through `Pipeline.take` (the work queue) and `Pipeline.handle` (a subscriber's
parking queue); `Pipeline._finish` is the only place that acks or requeues one. A message is
acked when each of its deliveries is settled: delivered (2xx), or waiting in the retry tiers
or the subscriber's parking queue, or written as a dead letter, each confirmed by the broker.
Anything else (a publish that failed, a cancellation during shutdown, a bug) requeues the
message: at-least-once, never lost.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from dispatcher.broker.acks import Acks
from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import Config, SubscriberConfig
from dispatcher.decisions.batching import Batch, Batcher, Member, batch_body, new_batch_id
from dispatcher.decisions.circuit_breaker import BreakerState
from dispatcher.decisions.endpoint_limits import Admitted, Lane, LaneSet
from dispatcher.decisions.events import Event, InvalidEvent, parse_event
from dispatcher.http.headers import RequestHeaders
from dispatcher.http.sender import HttpSender
from dispatcher.process.metrics import Metrics

if TYPE_CHECKING:
    from dispatcher.broker.parking import ParkingLots
from dispatcher.broker.settlement import Settlement
from dispatcher.broker.work_consumer import InboundMessage
from dispatcher.decisions.records import Delivery, published_at
from dispatcher.decisions.retry_policy import (
    DeadLetter,
    Delivered,
    Outcome,
    OutcomeKind,
    Park,
    Retry,
    decide,
    deferred,
    expired,
)
from dispatcher.decisions.routing import RoutingTable
from dispatcher.names import (
    H_ACCOUNT,
    H_BATCH_ID,
    H_BATCH_SIZE,
    H_PUBLISHED_AT,
    H_ROUTING_KEY,
    due_exchange,
    is_delay_exchange,
    parking_exchange,
)
from signing import TokenMinter

__all__ = ["Pipeline"]

log = structlog.get_logger("dispatcher.pipeline")


_TRANSIENT_HOLD = 2.0  # seconds a message is held before it is handed back for a broker error


def _channel_lost(message: InboundMessage) -> bool:
    """Whether the channel ``message`` came on has closed (a reconnect is under way)."""
    try:
        channel = message.channel
    except ChannelInvalidStateError:
        return True
    return bool(getattr(channel, "is_closed", False))


class _Verdict(enum.Enum):
    ACK = "ack"
    REQUEUE = "requeue"


def _breaker_verdict(outcome: Outcome) -> bool | None:
    """Does this outcome say the endpoint is healthy (True), unhealthy (False), or neither?"""
    if outcome.kind is OutcomeKind.DELIVERED:
        return True
    if outcome.kind is OutcomeKind.FAILED:
        status = outcome.status
        return False if status is None or status >= 500 or status == 429 else None
    return None


class Pipeline:
    def __init__(
        self,
        config: Config,
        *,
        sender: HttpSender,
        settlement: Settlement,
        minter: TokenMinter | None,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self._sender = sender
        self._settlement = settlement
        self._headers = RequestHeaders(minter, clock=clock, observe_mint=metrics.mint_time.observe)
        self._metrics = metrics
        self._clock = clock.wall  # records: first attempts, ages, publish stamps
        self._elapsed = clock.elapsed  # request times
        self._rng = rng or random.Random()
        self._lanes = LaneSet(config.breaker, prefetch=config.broker.prefetch, clock=clock)
        # The lanes own the breakers; the metrics and the log follow the lane set's one
        # notification (the parking lots watch it themselves).
        self._lanes.watch_breakers(self._breaker_changed)
        self._lanes.retain(
            {s.id for s in config.subscribers}, {s.id: s for s in config.subscribers}
        )
        # The messages held (taken and not yet acked or handed back): the one count, which the
        # prefetch gauge shows.
        self._tasks: set[asyncio.Task[Any]] = set()
        # Messages whose events wait in open batches with no task of their own (`take`).
        self._joined = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._batcher = Batcher(self._send_batch)
        self.acks = Acks(clock=clock)
        self._count_events = metrics.events.labels("event")  # resolved once: the hot path
        self.config = config
        self._routing = RoutingTable(config.subscribers)
        self._parking_exchange = parking_exchange(config.broker.queue)
        self._internal = {due_exchange(config.broker.queue), self._parking_exchange}
        # The parking lots (set by the daemon): asked for a subscriber's queue before a park,
        # and told of a reload (`apply`).
        self.parking: ParkingLots | None = None

    # --- configuration -------------------------------------------------------------------------

    def apply(self, config: Config, routing: RoutingTable | None = None) -> None:
        """A reload: the one place that moves every piece of subscriber state to ``config``.

        Routing and the lanes first (a changed subscriber gets a new lane, a removed one loses
        its lane), then the parking lots (a removed subscriber's lot is drained, its deliveries
        dead-lettered as ``subscriber_removed``), then the metrics (a removed subscriber's series
        are pruned). Deliveries already running keep the settings they started with.
        ``routing``, if given, is the index of ``config.subscribers`` built beforehand (the
        daemon builds it in its reload thread: at tens of thousands of subscribers it is the
        largest part of a reload).
        """
        ids = {s.id for s in config.subscribers}
        self.config = config
        self._routing = RoutingTable(config.subscribers) if routing is None else routing
        self._lanes.retain(ids, {s.id: s for s in config.subscribers})
        if self.parking is not None:
            self.parking.retain(ids)
        self._metrics.retain_subscribers(ids)

    @property
    def held(self) -> int:
        """Messages taken from the queue and not yet acked or requeued."""
        return len(self._tasks) + self._joined

    @property
    def lanes(self) -> LaneSet:
        return self._lanes

    async def drain(self, timeout: float) -> int:
        """Wait for held messages to settle; cancel (and so requeue) what is left. Returns it.

        Open batches are sent first: their members' messages wait on them (cancelling a batch
        hands its members' messages back). Work started meanwhile is waited for too (a
        delivery that reached the consumer just before it was cancelled is taken a moment
        later, through aiormq's own callback)."""
        self._batcher.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: set[asyncio.Task[Any]] = set()
        while True:
            await asyncio.sleep(0)  # let tasks created just now start (and count themselves)
            pending = self._tasks | self._batches
            left = deadline - loop.time()
            if not pending or left <= 0:
                break
            await asyncio.wait(pending, timeout=left)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        await self.acks.close()
        return len(pending)

    # --- one message -------------------------------------------------------------------------

    def take(self, message: InboundMessage) -> None:
        """Where the work queue's deliveries start (synchronously, as each arrives).

        A fresh event whose subscribers all take batches joins their open batches at once and
        needs no task: its message is settled by the batches' callbacks. Anything else gets a
        task of its own (`_run`), with the event parsed here passed on.
        """
        # Registered here, in delivery order, whichever way it goes on: a batched event settled
        # before an earlier task started must not make the ack window reorder itself.
        self.acks.received(message.channel, message.delivery_tag)
        parsed: tuple[Event, tuple[SubscriberConfig, ...]] | None = None
        try:
            if not self._is_internal(message.exchange):
                event = parse_event(
                    message.body,
                    message_id=message.message_id,
                    max_bytes=self.config.broker.max_event_bytes,
                )
                parsed = (event, self._routing.targets(event.account, event.type, event.doc))
        except Exception:  # InvalidEvent (or worse): the task dead-letters it, with the reason
            parsed = None
        if parsed is not None and parsed[1] and all(s.batch is not None for s in parsed[1]):
            self._join(message, *parsed)
        else:
            # Counted as held from now, not from its first step: a drain that starts before
            # the task does must wait for it.
            self._tasks.add(asyncio.get_running_loop().create_task(self._run(message, parsed)))

    def _join(
        self, message: InboundMessage, event: Event, targets: tuple[SubscriberConfig, ...]
    ) -> None:
        """`take` for an event that only batched subscribers want: into their batches, and the
        message settled when the last of them is."""
        self._joined += 1
        self._metrics.prefetch_used.set(self.held)
        self._count_events.inc()
        carry = self._carry(message, message.headers or {}, internal=False)
        if event.account is not None:
            carry[H_ACCOUNT] = event.account
        left = len(targets)
        failure: BaseException | None = None

        def settled(exc: BaseException | None) -> None:
            nonlocal left, failure
            left -= 1
            failure = failure or exc
            if left == 0:
                self._joined_settled(message, failure)

        for sub in targets:
            self._batcher.add(sub, Member(event, carry, settled))
        if self.held >= self.config.broker.prefetch:
            self._batcher.flush()  # see _fan_out_with_batches

    def _joined_settled(self, message: InboundMessage, failure: BaseException | None) -> None:
        if failure is None or isinstance(failure, asyncio.CancelledError):
            self._joined -= 1
            self._metrics.prefetch_used.set(self.held)
            if failure is not None:
                log.warning("message_handed_back", reason="shutdown", message_id=message.message_id)
            self._finish(message, _Verdict.ACK if failure is None else _Verdict.REQUEUE)
            return
        # A batch that failed (a bug, or the broker link): decided as `_run` would, on a
        # task (the broker may have to be waited for).
        task = asyncio.get_running_loop().create_task(self._joined_failed(message, failure))
        self._tasks.add(task)
        self._joined -= 1
        task.add_done_callback(self._tasks.discard)

    async def _joined_failed(self, message: InboundMessage, exc: BaseException) -> None:
        verdict = _Verdict.REQUEUE
        try:
            if isinstance(exc, Exception):
                verdict = await self._poisoned(message, exc)
        finally:
            self._metrics.prefetch_used.set(self.held - 1)
            self._finish(message, verdict)

    async def handle(self, message: InboundMessage) -> None:
        """The consumer callback of the parking queues (the work queue's deliveries come
        through `take`). Owns the ack or requeue of ``message``."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        # (try, not suppress(): no context manager per message)
        try:  # noqa: SIM105
            self.acks.received(message.channel, message.delivery_tag)
        except ChannelInvalidStateError:
            pass  # closed already: whatever happens here, the broker redelivers it
        await self._run(message)

    async def _run(
        self,
        message: InboundMessage,
        parsed: tuple[Event, tuple[SubscriberConfig, ...]] | None = None,
    ) -> None:
        """One held message's task (registered with the acks and counted in ``_tasks``
        already), to its ack or requeue. ``parsed``: the event and its subscribers, if `take`
        worked them out already."""
        self._metrics.prefetch_used.set(self.held)
        verdict = _Verdict.REQUEUE
        try:
            verdict = await self._process(message, parsed)
        except asyncio.CancelledError:
            log.warning("message_handed_back", reason="shutdown", message_id=message.message_id)
        except Exception as exc:  # a bug or a broker failure: hand the message back
            log.error(
                "message_failed",
                error=f"{type(exc).__name__}: {exc}",
                message_id=message.message_id,
                exc_info=not isinstance(exc, AMQPError),
            )
            verdict = await self._poisoned(message, exc)
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._metrics.prefetch_used.set(self.held)
            self._finish(message, verdict)

    async def _poisoned(self, message: InboundMessage, exc: Exception) -> _Verdict:
        """A message that breaks the pipeline twice is dead-lettered, not requeued forever.

        Broker and connection errors are transient: those messages always go back. So does a
        message whose channel closed while it was processed, whatever the error: the link broke
        under it, and the broker hands it out again anyway.
        """
        transient = isinstance(exc, AMQPError | ConnectionError | ChannelInvalidStateError)
        if transient or _channel_lost(message):
            # The broker link is down (a retry or park could not be confirmed): hand back, but
            # not at once. An immediate hand-back comes straight back and fails again, several
            # times a second, and on a quorum work queue each time counts toward its delivery
            # limit: healthy events would be dead-lettered during a long outage.
            await asyncio.sleep(_TRANSIENT_HOLD)
            return _Verdict.REQUEUE
        if not message.redelivered:
            return _Verdict.REQUEUE
        reason = f"dispatch_error: {type(exc).__name__}: {exc}"
        try:
            await self._settlement.dead_letter(
                message.body,
                reason=reason,
                event_id=_safe_id(message.message_id),
                event_type=None,
                delivery=Delivery.from_headers(dict(message.headers or {}), self._clock()),
                carry={},
            )
        except Exception:
            return _Verdict.REQUEUE
        self._metrics.dead_letters.labels("dispatch_error").inc()
        return _Verdict.ACK

    def _finish(self, message: InboundMessage, verdict: _Verdict) -> None:
        # Frames go out in groups once per loop pass (dispatcher/broker/acks.py); a channel that
        # went away meanwhile (a reconnect) means the broker redelivers the message.
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            return  # closed already: the broker hands the message to a consumer again
        self.acks.settle(channel, message.delivery_tag, verdict is _Verdict.ACK)

    def _carry(
        self, message: InboundMessage, headers: Mapping[str, Any], *, internal: bool
    ) -> dict[str, Any]:
        """What a retry, park or dead letter carries on from the consumed message."""
        carry: dict[str, Any] = {}
        stamp = published_at(headers, message.timestamp)
        if stamp is not None:
            carry[H_PUBLISHED_AT] = int(stamp * 1000)
        routing_key = headers.get(H_ROUTING_KEY) if internal else message.routing_key
        if isinstance(routing_key, str):
            carry[H_ROUTING_KEY] = routing_key[:255]
        return carry

    async def _process(
        self,
        message: InboundMessage,
        parsed: tuple[Event, tuple[SubscriberConfig, ...]] | None = None,
    ) -> _Verdict:
        now = self._clock()
        headers = message.headers or {}
        # Our own headers are trusted only on messages that came back through our own delay
        # tiers or a replay; on anything published to the events exchange they are ignored,
        # so a publisher cannot narrow an event to one subscriber.
        internal = parsed is None and self._is_internal(message.exchange)
        delivery = Delivery.from_headers(headers, now) if internal else None
        carry = self._carry(message, headers, internal=internal)
        if delivery is not None and H_BATCH_ID in headers:
            await self._process_batch(message, headers, delivery, carry, now)
            return _Verdict.ACK

        try:
            event = (
                parsed[0]
                if parsed is not None
                else parse_event(
                    message.body,
                    message_id=message.message_id,
                    max_bytes=self.config.broker.max_event_bytes,
                )
            )
        except InvalidEvent as exc:
            self._metrics.events.labels("invalid").inc()
            reason = f"invalid_event: {exc}"
            await self._settlement.dead_letter(
                message.body,
                reason=reason,
                event_id=_safe_id(message.message_id),
                event_type=None,
                delivery=delivery,
                carry=carry,
            )
            self._metrics.dead_letters.labels("invalid_event").inc()
            log.warning("event_invalid", reason=reason, routing_key=message.routing_key)
            return _Verdict.ACK

        if event.account is not None:
            carry[H_ACCOUNT] = event.account
        patient = False
        if delivery is None:
            self._count_events.inc()
            targets = (
                parsed[1]
                if parsed is not None
                else self._routing.targets(event.account, event.type, event.doc)
            )
            if len(targets) == 1 and targets[0].batch is None:  # the usual case, directly
                only = targets[0]
                await self._deliver(event, only, Delivery(only.id, 1, now), carry)
                return _Verdict.ACK
            if any(s.batch is not None for s in targets):
                await self._fan_out_with_batches(event, targets, carry, now)
                return _Verdict.ACK
            work = [(s, Delivery(s.id, 1, now)) for s in targets]
        else:
            # A parked delivery waits for its lane instead of being parked again: its own
            # consumer's prefetch window bounds how many wait.
            patient = message.exchange == self._parking_exchange
            self._metrics.events.labels("parked" if patient else "retry").inc()
            sub = self.config.subscriber(delivery.subscriber)
            if sub is None or not any(
                s is sub for s in self._routing.targets(event.account, event.type, event.doc)
            ):
                await self._settle(event, None, delivery, DeadLetter("subscriber_removed"), carry)
                return _Verdict.ACK
            if expired(
                first_attempt_at=delivery.first_attempt_at, now=now, policy=self.config.retry
            ):
                await self._settle(event, sub, delivery, DeadLetter("max_age_exceeded"), carry)
                return _Verdict.ACK
            work = [(sub, delivery)]

        if len(work) == 1:
            await self._deliver(event, *work[0], carry, patient)
        elif work:
            await asyncio.gather(*(self._deliver(event, s, d, carry) for s, d in work))
        return _Verdict.ACK

    # --- batches ------------------------------------------------------------------------------

    async def _fan_out_with_batches(
        self,
        event: Event,
        targets: tuple[SubscriberConfig, ...],
        carry: dict[str, Any],
        now: float,
    ) -> None:
        """A fresh event: batched subscribers get it through their open batch, the others
        directly; the message is settled when all of them are."""
        waits: list[Any] = []
        for sub in targets:
            if sub.batch is None:
                waits.append(self._deliver(event, sub, Delivery(sub.id, 1, now), carry))
            else:
                waits.append(self._member_of(sub, event, carry))
        if self.held >= self.config.broker.prefetch:
            # No more messages come until something is acked: waiting for a fuller batch
            # would wait forever.
            self._batcher.flush()
        if len(waits) == 1:  # the usual case: one batched subscriber, no gathering future
            await waits[0]
        else:
            await asyncio.gather(*waits)

    def _member_of(
        self, sub: SubscriberConfig, event: Event, carry: dict[str, Any]
    ) -> asyncio.Future[None]:
        """Into ``sub``'s open batch, with a future to wait on for its settling."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settled(exc: BaseException | None) -> None:
            if done.done():
                return  # the task waiting on it was cancelled
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        self._batcher.add(sub, Member(event, carry, settled))
        return done

    def _send_batch(self, sub: SubscriberConfig, members: list[Member]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_batch(sub, members))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, sub: SubscriberConfig, members: list[Member]) -> None:
        """Send one closed batch as a unit and tell each member how it ended."""
        accounts = {m.event.account for m in members}
        account = accounts.pop() if len(accounts) == 1 else None
        batch = Batch(
            new_batch_id(),
            batch_body([m.event.body for m in members]),
            len(members),
            account=account,
        )
        carry: dict[str, Any] = {H_BATCH_ID: batch.id, H_BATCH_SIZE: batch.size}
        stamps = [m.carry[H_PUBLISHED_AT] for m in members if H_PUBLISHED_AT in m.carry]
        if stamps:
            carry[H_PUBLISHED_AT] = min(stamps)
        if account is not None:
            carry[H_ACCOUNT] = account
        try:
            await self._deliver(batch, sub, Delivery(sub.id, 1, self._clock()), carry)
        except BaseException as exc:
            for m in members:
                m.settled(exc)
            if not isinstance(exc, Exception):
                raise
            log.error("batch_failed", subscriber=sub.id, batch=batch.id, error=str(exc))
        else:
            for m in members:
                m.settled(None)

    async def _process_batch(
        self,
        message: InboundMessage,
        headers: Mapping[str, Any],
        delivery: Delivery,
        carry: dict[str, Any],
        now: float,
    ) -> None:
        """A batch back from the retry tiers, its parking queue or a replay: sent as it was."""
        patient = message.exchange == self._parking_exchange
        self._metrics.events.labels("parked" if patient else "retry").inc()
        account = headers.get(H_ACCOUNT)
        batch = Batch(
            str(headers[H_BATCH_ID])[:128],
            message.body,
            max(1, _int_header(headers.get(H_BATCH_SIZE))),
            account=account if isinstance(account, str) else None,
        )
        carry.update({H_BATCH_ID: batch.id, H_BATCH_SIZE: batch.size})
        if batch.account is not None:
            carry[H_ACCOUNT] = batch.account
        sub = self.config.subscriber(delivery.subscriber)
        if sub is None:
            await self._settle(batch, None, delivery, DeadLetter("subscriber_removed"), carry)
        elif expired(first_attempt_at=delivery.first_attempt_at, now=now, policy=self.config.retry):
            await self._settle(batch, sub, delivery, DeadLetter("max_age_exceeded"), carry)
        else:
            await self._deliver(batch, sub, delivery, carry, patient)

    def _is_internal(self, exchange: str | None) -> bool:
        return bool(exchange) and (
            exchange in self._internal or is_delay_exchange(self.config.broker.queue, str(exchange))
        )

    # --- one delivery ------------------------------------------------------------------------

    async def _deliver(
        self,
        event: Event | Batch,
        sub: SubscriberConfig,
        delivery: Delivery,
        carry: dict[str, Any],
        patient: bool = False,
    ) -> None:
        lane = self._lanes.lane(sub)
        slot = await lane.acquire(patient=patient)
        outcome: Outcome | None = None
        turned_away: str | None = None  # why the lane did not admit it
        decision: Delivered | Retry | Park | DeadLetter
        if isinstance(slot, Admitted):
            outcome = await self._attempt(event, sub, delivery, lane_release=(lane, slot))
            now = self._clock()
            decision = decide(
                attempt=delivery.attempt,
                outcome=outcome,
                first_attempt_at=delivery.first_attempt_at,
                now=now,
                policy=self.config.retry,
                rng=self._rng,
            )
        else:  # not attempted: parked (or too old for that), no outcome
            turned_away = slot.why
            now = self._clock()
            decision = deferred(
                first_attempt_at=delivery.first_attempt_at, now=now, policy=self.config.retry
            )
        if isinstance(decision, Delivered):
            m = self._metrics.for_subscriber(sub.id)
            stamp = carry.get(H_PUBLISHED_AT)
            if stamp is not None:
                m.end_to_end.observe(max(0.0, now - stamp / 1000))
            m.delivered.inc(event.size if isinstance(event, Batch) else 1)
            return
        # Only the paths that log pay for binding the delivery's context.
        with structlog.contextvars.bound_contextvars(
            event_id=event.id, subscriber=sub.id, attempt=delivery.attempt
        ):
            await self._settle(event, sub, delivery, decision, carry, outcome, turned_away)

    async def _attempt(
        self,
        event: Event | Batch,
        sub: SubscriberConfig,
        delivery: Delivery,
        lane_release: tuple[Any, Admitted],
    ) -> Outcome:
        lane, slot = lane_release
        verdict: bool | None = None
        m = self._metrics.for_subscriber(sub.id)
        m.started()
        try:
            size = event.size if isinstance(event, Batch) else None
            headers = self._headers.build(sub, event.id, event.body, size)
            started = self._elapsed()
            outcome = await self._sender.post(sub.url, event.body, headers, sub.timeout)
            m.request_time.observe(self._elapsed() - started)
            m.attempt(outcome.label).inc()
            verdict = _breaker_verdict(outcome)
            return outcome
        finally:
            m.finished()
            lane.release(slot, verdict)

    async def _settle(
        self,
        event: Event | Batch,
        sub: SubscriberConfig | None,
        delivery: Delivery,
        decision: Retry | Park | DeadLetter,
        carry: dict[str, Any],
        outcome: Outcome | None = None,
        turned_away: str | None = None,
    ) -> None:
        """Have the settlement publish the retry, parked delivery or dead letter a decision calls
        for (it returns once the broker confirmed it), then count and log it. ``outcome`` is the
        attempt's, when there was one; ``turned_away`` why the lane deferred the delivery."""
        parking = self.parking if isinstance(decision, Park) else None
        if parking is not None:
            await parking.ensure(delivery.subscriber)
        elif outcome is not None:
            delivery = replace(delivery, last_status=outcome.status, last_error=outcome.error)
        try:
            dead_id = await self._settlement.settle(
                decision,
                event.body,
                event_id=event.id,
                event_type=event.type,
                delivery=delivery,
                carry=carry,
            )
        except Exception:
            if parking is not None:
                parking.forget(delivery.subscriber)
            raise
        if isinstance(decision, Park):
            why = turned_away or "deferred"
            self._metrics.parked.labels(delivery.subscriber, why).inc()
            log.debug("delivery_parked", why=why, deferrals=delivery.deferrals + 1)
        elif isinstance(decision, Retry):
            self._metrics.retries.labels(delivery.subscriber).inc()
            log.info(
                "delivery_retry_scheduled",
                why="failed",
                delay=round(decision.delay, 3),
                next_attempt=decision.next_attempt,
                status=delivery.last_status,
                error=delivery.last_error,
            )
        else:
            self._metrics.dead_letters.labels(decision.reason).inc()
            self._metrics.deliveries.labels(delivery.subscriber, "dead_lettered").inc(
                event.size if isinstance(event, Batch) else 1
            )
            log.warning(
                "delivery_dead_lettered",
                reason=decision.reason,
                dead_letter=dead_id,
                subscriber=delivery.subscriber,
                status=delivery.last_status,
                error=delivery.last_error,
            )

    def _breaker_changed(self, lane: Lane, old: BreakerState, new: BreakerState, why: str) -> None:
        sub_id = lane.sub.id
        self._metrics.breaker_changed(sub_id, new.value)
        log.warning(
            "breaker_state_changed",
            subscriber=sub_id,
            old=old.name.lower(),
            new=new.name.lower(),
            why=why,
        )


def _int_header(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return 0


def _safe_id(value: str | None) -> str | None:
    if value and len(value) <= 128 and value.isprintable():
        return value
    return None
