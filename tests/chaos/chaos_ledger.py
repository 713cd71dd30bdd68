"""Counting every event: what each scenario owes, what arrived, and the table of results.

A scenario tells the `Ledger` what the contract owes: each valid event is owed to each matching
subscriber (a *delivery*), each invalid one is owed a dead letter. After the faults, `account`
matches the receivers' receipts (by ``webhook-id``) and the dead-letter queue (by event id and
subscriber, or by body for invalid events) against that debt:

    delivered      owed deliveries the subscriber received at least once
    dead-lettered  owed deliveries (or invalid events) found only in the dead-letter queue
    lost           owed and found nowhere: must be 0
    duplicated     receipts beyond the first, dead letters beyond the first, and deliveries
                   that were both received and dead-lettered
    unexpected     receipts or dead letters nobody owed (a forged id, a misrouted event)

Every scenario adds its `Tally` to `SCOREBOARD`; ``conftest.py`` prints the table at the end of
the session and writes it to ``tests/chaos/last_run.md``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chaos_scale import SCALE, SEED

__all__ = ["SCOREBOARD", "Ledger", "Tally", "record", "render_markdown", "render_text"]


@dataclass
class Tally:
    scenario: str
    events: int
    due: int
    delivered: int
    dead_lettered: int
    lost: int
    duplicated: int
    unexpected: int
    faults: str = ""
    seconds: float = 0.0
    missing: list[tuple[str, str]] = field(default_factory=list)  # a few lost deliveries
    strays: list[str] = field(default_factory=list)  # a few unexpected receipts

    def holds(self, *, max_duplicates: int) -> None:
        """Assert the scenario's books balance: nothing lost, nothing unexpected, duplicates
        within the bound the scenario's faults allow."""
        assert self.lost == 0, (
            f"{self.scenario}: {self.lost} of {self.due} owed deliveries lost, e.g. "
            f"{self.missing[:5]} ({self.summary()})"
        )
        assert self.unexpected == 0, (
            f"{self.scenario}: {self.unexpected} unexpected receipts or dead letters, e.g. "
            f"{self.strays[:5]} ({self.summary()})"
        )
        assert self.delivered + self.dead_lettered == self.due, self.summary()
        assert self.duplicated <= max_duplicates, (
            f"{self.scenario}: {self.duplicated} duplicates, more than the bound "
            f"{max_duplicates} ({self.summary()})"
        )

    def summary(self) -> str:
        return (
            f"events={self.events} due={self.due} delivered={self.delivered} "
            f"dead-lettered={self.dead_lettered} lost={self.lost} "
            f"duplicated={self.duplicated} unexpected={self.unexpected}"
        )


SCOREBOARD: list[Tally] = []


class Ledger:
    """What one scenario owes. Keys are (event id, subscriber id); invalid events by body."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.owed: set[tuple[str, str]] = set()
        self.owed_invalid: Counter[bytes] = Counter()
        self.events = 0
        self.faults: Counter[str] = Counter()
        self._started = time.monotonic()

    def expect(self, event_id: str, subscribers: Iterable[str]) -> None:
        """A valid event was published; each of ``subscribers`` is owed it."""
        self.events += 1
        for sub in subscribers:
            key = (event_id, sub)
            assert key not in self.owed, f"event id {event_id} published twice"
            self.owed.add(key)

    def expect_invalid(self, body: bytes) -> None:
        """An invalid message was published; it is owed a dead letter (no subscriber)."""
        self.events += 1
        self.owed_invalid[body] += 1

    def fault(self, what: str) -> None:
        self.faults[what] += 1

    @property
    def due(self) -> int:
        return len(self.owed) + sum(self.owed_invalid.values())

    def account(self, receipts: Mapping[str, Iterable[str]], letters: Iterable[Any]) -> Tally:
        """``receipts``: subscriber id -> the webhook-ids its endpoint answered 2xx (one per
        receipt). ``letters``: `DeadLetter` objects read from the dead-letter queue."""
        got: Counter[tuple[str, str]] = Counter()
        strays: list[str] = []
        for sub, ids in receipts.items():
            for event_id in ids:
                key = (event_id, sub)
                if key in self.owed:
                    got[key] += 1
                else:
                    strays.append(f"receipt {event_id!r} at {sub}")
        dead: Counter[tuple[str, str]] = Counter()
        dead_invalid: Counter[bytes] = Counter()
        for letter in letters:
            record = letter.record
            if record.subscriber is None:
                if self.owed_invalid.get(letter.body, 0):
                    dead_invalid[letter.body] += 1
                else:
                    strays.append(f"dead letter {record.reason!r} for body {letter.body[:60]!r}")
                continue
            key = (record.event_id or "", record.subscriber)
            if key in self.owed:
                dead[key] += 1
            else:
                strays.append(f"dead letter {record.reason!r} for {key}")

        delivered = len(got)
        only_dead = sum(1 for key in dead if key not in got)
        invalid_dead = sum(min(n, self.owed_invalid[b]) for b, n in dead_invalid.items())
        lost_pairs = [key for key in self.owed if key not in got and key not in dead]
        lost_invalid = sum(max(0, n - dead_invalid.get(b, 0)) for b, n in self.owed_invalid.items())
        duplicated = (
            sum(n - 1 for n in got.values())
            + sum(n - 1 for n in dead.values())
            + sum(1 for key in dead if key in got)
            + sum(max(0, n - self.owed_invalid[b]) for b, n in dead_invalid.items())
        )
        missing = sorted(lost_pairs)[:20]
        if lost_invalid:
            missing.append(("<invalid events>", f"{lost_invalid} without a dead letter"))
        return Tally(
            scenario=self.scenario,
            events=self.events,
            due=self.due,
            delivered=delivered,
            dead_lettered=only_dead + invalid_dead,
            lost=len(lost_pairs) + lost_invalid,
            duplicated=duplicated,
            unexpected=len(strays),
            faults=", ".join(f"{what} x{n}" if n > 1 else what for what, n in self.faults.items()),
            seconds=time.monotonic() - self._started,
            missing=missing,
            strays=strays[:20],
        )

    def outstanding(self, receipts: Mapping[str, Iterable[str]]) -> int:
        """Owed deliveries not yet received (a cheap progress check; ignores dead letters)."""
        got = {(event_id, sub) for sub, ids in receipts.items() for event_id in ids}
        return len(self.owed - got)


def record(tally: Tally) -> Tally:
    SCOREBOARD.append(tally)
    return tally


_COLUMNS = (
    "scenario",
    "events",
    "due",
    "delivered",
    "dead-lettered",
    "lost",
    "duplicated",
    "faults",
    "seconds",
)


def _cells(t: Tally) -> list[str]:
    return [
        t.scenario,
        str(t.events),
        str(t.due),
        str(t.delivered),
        str(t.dead_lettered),
        str(t.lost),
        str(t.duplicated),
        t.faults or "-",
        f"{t.seconds:.1f}",
    ]


def render_text(rows: list[Tally]) -> str:
    cells = [list(_COLUMNS)] + [_cells(t) for t in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    numeric = {1, 2, 3, 4, 5, 6, 8}
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                v.rjust(w) if i in numeric and n else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lost = sum(t.lost for t in rows)
    lines.append(
        f"{len(rows)} scenarios, CHAOS_SCALE={SCALE}, CHAOS_SEED={SEED}, lost {lost} in total"
    )
    return "\n".join(lines)


def render_markdown(rows: list[Tally]) -> str:
    out = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" if i in (0, 7) else "---:" for i in range(len(_COLUMNS))) + "|",
    ]
    for t in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(t)) + " |")
    out.append("")
    out.append(
        f"CHAOS_SCALE={SCALE}, CHAOS_SEED={SEED}; columns: events published, deliveries "
        "due (event x matching subscriber, plus one dead letter per invalid event), "
        "delivered, dead-lettered, lost (must be 0), duplicated (extra receipts)."
    )
    return "\n".join(out) + "\n"
