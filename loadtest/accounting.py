"""Accounting: every published event is delivered to each matching subscriber or dead-lettered.

A valid event owes one delivery to every subscriber whose patterns match its type (the
dispatcher's own `pattern_matches`); the debt is paid by a 2xx receipt at that subscriber or by a
dead letter for (event, subscriber), or for the event as a whole. A deliberately invalid event is
paid only by a dead letter without a subscriber. Whatever is left unpaid is lost. A second 2xx
receipt of the same event at the same subscriber is a duplicate (allowed by at-least-once,
counted). A receipt nobody owes is unexpected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatcher.routing import pattern_matches
from loadtest.generator import Published

__all__ = ["Accounting", "DeadRecord", "SubscriberSpec", "account"]


@dataclass(frozen=True, slots=True)
class SubscriberSpec:
    id: str
    events: tuple[str, ...] = ("*",)

    def wants(self, event_type: str) -> bool:
        return any(pattern_matches(p, event_type) for p in self.events)


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
    owed: list[set[str]] = [set() for _ in subscribers]
    for event in published:
        acc.published += 1
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
        for i, sub in enumerate(subscribers):
            if not sub.wants(event.type):
                continue
            acc.expected_deliveries += 1
            owed[i].add(event.id)
            if event.id in got[i]:
                acc.delivered += 1
            elif whole_event_dead or (event.id, sub.id) in dead_pairs:
                acc.dead_lettered += 1
            elif (event.id, sub.id) in waiting or (event.id, None) in waiting:
                acc.pending += 1
            else:
                acc.lost += 1
                if len(acc.lost_sample) < sample:
                    acc.lost_sample.append(f"{event.id} -> {sub.id}")
    for i, unique in enumerate(got):
        acc.unexpected += len(unique - owed[i])
    return acc
