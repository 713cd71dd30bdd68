"""Fixtures every tier may use, and the `broker` mark.

The tiers: tests/unit needs nothing but this process (it passes with RabbitMQ unreachable);
tests/integration and tests/chaos run against the real broker, and fail at once, with how to
start it, when it does not answer (their conftest files). What they share is tests/support.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import Config
from tests.support.harness import (
    Names,
    ReceiverServer,
    cleanup_topology,
    config_doc,
    make_config,
    unique_names,
)
from tests.support.toml_files import write_toml

# What marks a test as one that talks to the broker (`-m broker`, which `make test-rabbitmq4`
# runs): a broker fixture, or a module that uses the harness's broker side.
_BROKER_FIXTURES = {"make", "names", "chaos_config"}
_BROKER_NAMES = (
    "BROKER_URL",
    "broker_url",
    "Publisher",
    "running",
    "Dispatcher",
    "DispatcherProcess",
    "dead_letters",
    "cleanup_topology",
    "aio_pika",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "broker: talks to RabbitMQ (DISPATCHER_TEST_BROKER_URL); set automatically"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        names = vars(module) if module is not None else {}
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())) or any(
            n in names for n in _BROKER_NAMES
        ):
            item.add_marker(pytest.mark.broker)


@pytest.fixture
def names() -> Names:
    return unique_names()


@pytest.fixture
def keys_dir(tmp_path: Path) -> str:
    return str(tmp_path / "keys")


@pytest.fixture
async def receivers() -> AsyncIterator[ReceiverServer]:
    async with ReceiverServer() as server:
        yield server


@pytest.fixture
async def make(names: Names, keys_dir: str) -> AsyncIterator[Callable[..., Config]]:
    """Build a config with unique broker names; its topology is deleted after the test."""
    made: list[Config] = []

    def factory(
        subscribers: list[dict[str, Any]],
        *,
        toml: Path | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Config:
        """The validated config; with ``toml``, also written there for a subprocess."""
        cfg = make_config(names, keys_dir, subscribers, env=env, **kwargs)
        if toml is not None:
            write_toml(toml, config_doc(names, keys_dir, subscribers, **kwargs))
        made.append(cfg)
        return cfg

    yield factory
    if made:
        await cleanup_topology(made[-1], {s.id for cfg in made for s in cfg.subscribers})
