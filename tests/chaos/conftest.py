"""Chaos suite fixtures, and the scenario table printed at the end of every run.

Run the smoke set (CI, under three minutes):   .venv/bin/pytest tests/chaos
Run the full set (tens of thousands of events):
    CHAOS_SCALE=full .venv/bin/pytest tests/chaos -p no:randomly -s      (or: make chaos)
"""

from __future__ import annotations

import atexit
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from chaos_broker import restore_if_stopped
from chaos_ledger import SCOREBOARD, render_markdown, render_text
from chaos_process import chaos_doc, config_of
from chaos_scale import SCALE, SEED

from dispatcher.config import Config
from tests.support.harness import BROKER_URL, Names, cleanup_topology, require_broker

TABLE_PATH = Path(__file__).with_name("last_run.md")


atexit.register(restore_if_stopped)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    restore_if_stopped()


def pytest_report_header(config: pytest.Config) -> str:
    return f"chaos: CHAOS_SCALE={SCALE} CHAOS_SEED={SEED}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not SCOREBOARD:
        return
    terminalreporter.section("chaos scenarios")
    terminalreporter.write_line(render_text(SCOREBOARD))
    try:
        TABLE_PATH.write_text(render_markdown(SCOREBOARD), encoding="utf-8")
        terminalreporter.write_line(f"(table written to {TABLE_PATH})")
    except OSError as exc:  # a read-only checkout must not fail the run
        terminalreporter.write_line(f"(could not write {TABLE_PATH}: {exc})")


@pytest.fixture(scope="session", autouse=True)
def _require_broker() -> None:
    require_broker()


Doc = dict[str, Any]


@pytest.fixture
async def chaos_config(
    names: Names, keys_dir: str
) -> AsyncIterator[Callable[..., tuple[Doc, Config]]]:
    """Build (document, Config) pairs with the test's unique broker names. The document is
    what the dispatcher gets (as TOML for a subprocess; ``broker_url`` may point at a proxy);
    the Config is the test's own view, always through the direct broker URL (publisher, dead
    letters, queue depths). The topology is deleted afterwards."""
    made: list[Doc] = []

    def factory(
        subscribers: list[dict[str, Any]],
        *,
        env: dict[str, str] | None = None,
        broker_url: str = BROKER_URL,
        **sections: Any,
    ) -> tuple[Doc, Config]:
        doc = chaos_doc(names, keys_dir, subscribers, broker_url=broker_url, **sections)
        made.append(doc)
        direct = chaos_doc(names, keys_dir, subscribers, broker_url=BROKER_URL, **sections)
        return doc, config_of(direct, env)

    yield factory
    if made:
        direct = chaos_doc(names, keys_dir, [], broker_url=BROKER_URL)
        await cleanup_topology(config_of(direct))
