"""Accounting: every published event is delivered to each matching subscriber or dead-lettered.

A valid event owes one delivery to every subscriber whose patterns match its type (the
dispatcher's own `pattern_matches`) and whose account takes the event's account (contract
section 7: no account on the subscriber = only events without one, ``"*"`` = every event, else
only that account's events); the debt is paid by a 2xx receipt at that subscriber or by a dead
letter for (event, subscriber), or for the event as a whole. A deliberately invalid event is paid
only by a dead letter without a subscriber. Whatever is left unpaid is lost. A second 2xx receipt
of the same event at the same subscriber is a duplicate (allowed by at-least-once, counted). A
receipt nobody owes is unexpected; one of another account's events is also a cross-account
delivery (must never happen).

Subscribers are indexed by account, so an event costs the few subscribers of its own account,
not all of them (the ``accounts`` scenario accounts for 50,000).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatcher.decisions.routing import pattern_matches
from loadtest.generator import Published

__all__ = ["Accounting", "DeadRecord", "Owed", "SubscriberSpec", "account"]

ANY_ACCOUNT = "*"


@dataclass(frozen=True, slots=True)
class SubscriberSpec:
    id: str
    events: tuple[str, ...] = ("*",)
    account: str | None = None  # None: events without an account; "*": every event

    def wants(self, event_type: str) -> bool:
        return any(pattern_matches(p, event_type) for p in self.events)

    def takes_account(self, account: str | None) -> bool:
        return self.account == ANY_ACCOUNT or self.account == account


class Owed:
    """Which subscribers (by index) an event is owed to: type patterns and account."""

    def __init__(self, subscribers: Sequence[SubscriberSpec]) -> None:
        self.subscribers = subscribers
        self._by_account: dict[str | None, list[int]] = {}
        self._everyone: list[int] = []
        for i, sub in enumerate(subscribers):
            if sub.account == ANY_ACCOUNT:
                self._everyone.append(i)
            else:
                self._by_account.setdefault(sub.account, []).append(i)

    def targets(self, event: Published) -> list[int]:
        if not event.valid:
            return []
        candidates = self._by_account.get(event.account, [])
        if self._everyone:
            candidates = sorted(candidates + self._everyone)
        return [i for i in candidates if self.subscribers[i].wants(event.type)]

    def per_subscriber(self, published: Iterable[Published]) -> list[int]:
        """How many deliveries each subscriber is owed."""
        owed = [0] * len(self.subscribers)
        for event in published:
            for i in self.targets(event):
                owed[i] += 1
        return owed


@dataclass(frozen=True, slots=True)
class DeadRecord:
    event_id: str | None
    subscriber: str | None
    reason: str


@dataclass
class Accounting:
    published: int = 0
    invalid_published: int = 0
    expected_deliveries: int = 0
    delivered: int = 0  # expected deliveries paid by a receipt
    dead_lettered: int = 0  # expected deliveries (or invalid events) paid by a dead letter
    dead_letters: int = 0  # records read from the dead-letter queue
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    pending: int = 0  # owed deliveries still in the broker (work queue, retry tiers)
    lost: int = 0
    lost_sample: list[str] = field(default_factory=list)
    duplicates: int = 0
    unexpected: int = 0
    cross_account: int = 0  # unexpected receipts of an event of another account
    complete_events: int = 0  # valid events received by every subscriber they were owed to

    @property
    def complete(self) -> bool:
        return self.lost == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "invalid_published": self.invalid_published,
            "expected_deliveries": self.expected_deliveries,
            "delivered": self.delivered,
            "dead_lettered": self.dead_lettered,
            "dead_letters": self.dead_letters,
            "dead_letter_reasons": self.dead_letter_reasons,
            "pending": self.pending,
            "lost": self.lost,
            "lost_sample": self.lost_sample,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "cross_account": self.cross_account,
            "complete_events": self.complete_events,
        }


def _reason_family(reason: str) -> str:
    return reason.split(":", 1)[0]


def account(
    published: Iterable[Published],
    subscribers: Sequence[SubscriberSpec],
    received: Sequence[Sequence[str]],
    dead: Iterable[DeadRecord] = (),
    *,
    pending: Iterable[DeadRecord] = (),
    sample: int = 20,
) -> Accounting:
    """``received[i]`` lists the event ids subscriber ``i`` answered 2xx, duplicates included.

    ``pending``: deliveries found still waiting in the broker when a phase gave up waiting
    (a retry names its subscriber; a message in the work queue owes every subscriber). They
    are not lost, and not delivered either: the phase did not settle.
    """
    acc = Accounting()
    got: list[set[str]] = []
    for ids in received[: len(subscribers)]:
        unique = set(ids)
        acc.duplicates += len(ids) - len(unique)
        got.append(unique)
    while len(got) < len(subscribers):
        got.append(set())
    dead_pairs: set[tuple[str | None, str | None]] = set()
    reasons: Counter[str] = Counter()
    for d in dead:
        dead_pairs.add((d.event_id, d.subscriber))
        reasons[_reason_family(d.reason)] += 1
        acc.dead_letters += 1
    acc.dead_letter_reasons = dict(reasons)

    waiting = {(p.event_id, p.subscriber) for p in pending}
    routing = Owed(subscribers)
    owed: list[set[str]] = [set() for _ in subscribers]
    accounts: dict[str, str | None] = {}
    for event in published:
        acc.published += 1
        accounts[event.id] = event.account
        if not event.valid:
            acc.invalid_published += 1
            if (event.id, None) in dead_pairs:
                acc.dead_lettered += 1
            else:
                acc.lost += 1
                if len(acc.lost_sample) < sample:
                    acc.lost_sample.append(f"{event.id} (invalid, not dead-lettered)")
            continue
        whole_event_dead = (event.id, None) in dead_pairs
        complete = True
        for i in routing.targets(event):
            sub = subscribers[i]
            acc.expected_deliveries += 1
            owed[i].add(event.id)
            if event.id in got[i]:
                acc.delivered += 1
                continue
            complete = False
            if whole_event_dead or (event.id, sub.id) in dead_pairs:
                acc.dead_lettered += 1
            elif (event.id, sub.id) in waiting or (event.id, None) in waiting:
                acc.pending += 1
            else:
                acc.lost += 1
                if len(acc.lost_sample) < sample:
                    acc.lost_sample.append(f"{event.id} -> {sub.id}")
        acc.complete_events += complete
    for i, unique in enumerate(got):
        extra = unique - owed[i]
        acc.unexpected += len(extra)
        sub = subscribers[i]
        acc.cross_account += sum(
            1
            for event_id in extra
            if event_id in accounts and not sub.takes_account(accounts[event_id])
        )
    return acc
