"""Integration tests: the dispatcher against the real RabbitMQ, real receivers on loopback."""

from __future__ import annotations

import pytest

from tests.support.harness import require_broker


@pytest.fixture(scope="session", autouse=True)
def _require_broker() -> None:
    require_broker()
