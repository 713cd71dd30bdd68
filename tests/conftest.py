from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    BROKER_HOST,
    BROKER_PORT,
    Names,
    ReceiverServer,
    cleanup_topology,
    config_doc,
    make_config,
    unique_names,
    write_toml,
)

from dispatcher.config import Config

# What marks a test as one that talks to the broker (`-m broker`, which `make test-rabbitmq4`
# runs): a broker fixture, or a module that uses the harness's broker side.
_BROKER_FIXTURES = {"make", "names", "chaos_config"}
_BROKER_NAMES = ("BROKER_URL", "broker_url", "Publisher", "running", "Dispatcher",
                 "DispatcherProcess", "dead_letters", "cleanup_topology", "aio_pika")


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


def _broker_up() -> bool:
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _require_broker() -> None:
    if not _broker_up():
        pytest.fail(
            f"RabbitMQ is not answering on {BROKER_HOST}:{BROKER_PORT} (DISPATCHER_TEST_BROKER_URL;"
            " start it: scripts/ensure-broker, or scripts/ensure-rabbitmq4 for 5673)"
        )


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
