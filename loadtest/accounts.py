"""Subscribers by account (contract sections 2 and 7), laid out for the ``accounts`` scenario.

A mail provider's customers each register a few endpoints: ``accounts`` accounts with
``endpoints`` subscribers each, written as ``files`` included files
``subscribers.d/part-NN.toml`` (the main file says ``include = ["subscribers.d/*.toml"]``).
Account ``k`` is ``acct-<k>``; its endpoint ``n`` is subscriber ``acct-<k>.<n>`` at
``http://127.0.0.1:<port>/a/acct-<k>/<n>``, the ports of a few receiver servers taken in turn.
Events name one of ``active`` accounts spread evenly over the whole range, so they reach every
included file.

A reload appends one more file of the same size (the accounts after the last one) and sends
SIGHUP. Probe events for the new accounts are published every 100 ms from then on; the reload
has taken effect when a probe, and every probe after it, reached both endpoints of its account
(`reload_effect`). Everything here is pure except `write_files`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.accounting import SubscriberSpec
from tests.support.toml_files import to_toml

__all__ = ["AccountLayout", "Probe", "reload_effect", "write_files"]

INCLUDE_DIR = "subscribers.d"


@dataclass(frozen=True)
class AccountLayout:
    accounts: int = 25_000
    endpoints: int = 2  # subscribers per account
    files: int = 50  # included files the subscribers are written to
    active: int = 1_000  # accounts the events are spread over

    def __post_init__(self) -> None:
        if self.accounts < 1 or self.endpoints < 1 or self.files < 1:
            raise ValueError("accounts, endpoints and files must be at least 1")
        if not 1 <= self.active <= self.accounts:
            raise ValueError("active accounts must be between 1 and the accounts configured")

    @property
    def subscribers(self) -> int:
        return self.accounts * self.endpoints

    @property
    def accounts_per_file(self) -> int:
        return -(-self.accounts // self.files)

    @staticmethod
    def account_id(k: int) -> str:
        return f"acct-{k:05d}"

    def active_accounts(self) -> tuple[str, ...]:
        step = self.accounts / self.active
        return tuple(self.account_id(int(i * step)) for i in range(self.active))

    def tables(
        self, ports: Sequence[int], first: int = 0, count: int | None = None
    ) -> list[dict[str, Any]]:
        """``[[subscribers]]`` tables (id, url, account) of accounts ``first`` .. +count."""
        count = self.accounts - first if count is None else count
        out = []
        for k in range(first, first + count):
            account = self.account_id(k)
            for n in range(self.endpoints):
                port = ports[(k * self.endpoints + n) % len(ports)]
                out.append(
                    {
                        "id": f"{account}.{n}",
                        "url": f"http://127.0.0.1:{port}/a/{account}/{n}",
                        "account": account,
                    }
                )
        return out

    def files_of(self, tables: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
        """The included files (name -> tables): ``files`` parts of whole accounts."""
        per = self.accounts_per_file * self.endpoints
        width = max(2, len(str(self.files + 1)))
        return {
            f"part-{i // per + 1:0{width}d}.toml": list(tables[i : i + per])
            for i in range(0, len(tables), per)
        }

    def extra_file(self, ports: Sequence[int]) -> tuple[str, list[dict[str, Any]]]:
        """The file a reload appends: the next ``accounts_per_file`` accounts."""
        width = max(2, len(str(self.files + 1)))
        return (
            f"part-{self.files + 1:0{width}d}.toml",
            self.tables(ports, self.accounts, self.accounts_per_file),
        )


def specs_of(tables: Sequence[Mapping[str, Any]]) -> list[SubscriberSpec]:
    return [
        SubscriberSpec(t["id"], tuple(t.get("events", ("*",))), t.get("account")) for t in tables
    ]


def write_files(
    config_dir: Path,
    files: Mapping[str, Sequence[Mapping[str, Any]]],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write included subscriber files into ``<config_dir>/subscribers.d`` (each atomically:
    a reload never reads half a file), every table completed with ``extra`` keys."""
    target = config_dir / INCLUDE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name, tables in files.items():
        doc = {"subscribers": [{**t, **(extra or {})} for t in tables]}
        tmp = target / f".{name}.tmp"
        tmp.write_text(to_toml(doc), encoding="utf-8")
        os.replace(tmp, target / name)


@dataclass(frozen=True)
class Probe:
    id: str
    account: str
    published: float  # unix seconds


def reload_effect(
    sighup_at: float,
    probes: Sequence[Probe],
    arrivals: Mapping[str, Mapping[str, float]],
    endpoints: int,
) -> dict[str, Any]:
    """When the reload took effect: the first probe from which on every probe reached every
    endpoint of its account, and when it did (the later of its arrivals) after the SIGHUP.

    ``arrivals``: path (``/a/<account>/<n>``) -> event id -> first arrival (unix seconds).
    """

    def delivered(p: Probe) -> float | None:
        times = [arrivals.get(f"/a/{p.account}/{n}", {}).get(p.id) for n in range(endpoints)]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)

    ordered = sorted(probes, key=lambda p: p.published)
    done = [delivered(p) for p in ordered]
    first = next((t for t in done if t is not None), None)
    missing = [i for i, t in enumerate(done) if t is None]
    tail = (missing[-1] + 1) if missing else 0
    effective = done[tail] if tail < len(done) else None
    first_at = next((i for i, t in enumerate(done) if t is not None), len(done))
    return {
        "probes": len(ordered),
        "delivered": sum(t is not None for t in done),
        "first_delivered_s": None if first is None else round(first - sighup_at, 3),
        "effective_s": None if effective is None else round(effective - sighup_at, 3),
        "effective_probe_published_s": (
            None if effective is None else round(ordered[tail].published - sighup_at, 3)
        ),
        "undelivered_after_first": sum(1 for i in missing if i > first_at),
    }
