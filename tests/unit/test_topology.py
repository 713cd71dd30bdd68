"""Delay routing through the binary tiers, and every queue's arguments (pure)."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st
from pamqp.common import FieldTable

from dispatcher.broker.topology import (
    dead_arguments,
    delay_route,
    migration_policies,
    parking_arguments,
    tier_arguments,
    work_arguments,
)
from dispatcher.config import BrokerConfig
from dispatcher.names import LEVELS, NO_DELIVERY_LIMIT, WORK_DELIVERY_LIMIT


def _ms(key: str) -> int:
    return int(key.replace(".", ""), 2)


def test_exact_delays_spell_their_milliseconds() -> None:
    exchange, key = delay_route("q", 5.0)
    assert _ms(key) == 5000 and len(key.split(".")) == LEVELS
    assert exchange == f"q.delay.{(5000).bit_length() - 1}"  # enters at its highest set bit
    assert _ms(delay_route("q", 0.0)[1]) == 1  # never zero: at least one tier


@given(st.floats(min_value=0.001, max_value=86400))
def test_any_delay_is_exact_to_the_millisecond(seconds: float) -> None:
    exchange, key = delay_route("q", seconds)
    ms = _ms(key)
    assert ms == max(1, round(seconds * 1000))
    assert exchange == f"q.delay.{ms.bit_length() - 1}"


# --- queue arguments: safe on RabbitMQ 3.x and 4.x ------------------------------------------


def _broker(queue_type: str) -> BrokerConfig:
    return BrokerConfig(queue="q", queue_type=queue_type)


def _every_queue(cfg: BrokerConfig) -> dict[str, FieldTable]:
    queues = {
        "work": work_arguments(cfg),
        "dead": dead_arguments(cfg),
        "parked": parking_arguments(cfg),
    }
    queues.update({f"tier{k}": tier_arguments(cfg, k) for k in range(LEVELS)})
    return queues


def test_quorum_queues_declare_their_delivery_limit_and_a_dead_letter_exchange() -> None:
    cfg = _broker("quorum")
    for name, args in _every_queue(cfg).items():
        assert args["x-queue-type"] == "quorum"
        # RabbitMQ 4 would otherwise default to 20 and drop the message at the 21st delivery;
        # -1 ("off" on 4.x) drops on the first return on 3.10.
        assert isinstance(args["x-delivery-limit"], int), name
        assert args["x-delivery-limit"] > 0, name
        assert args.get("x-dead-letter-exchange"), f"{name} has no dead-letter path"
        assert args["x-dead-letter-strategy"] == "at-least-once", name
    queues = _every_queue(cfg)
    assert queues["work"]["x-delivery-limit"] == WORK_DELIVERY_LIMIT == 20
    assert queues["work"]["x-dead-letter-exchange"] == "q.dead"
    assert queues["dead"]["x-dead-letter-exchange"] == "q.dead"  # a rejected one comes back
    for name in ("dead", "parked", "tier0", f"tier{LEVELS - 1}"):
        assert queues[name]["x-delivery-limit"] == NO_DELIVERY_LIMIT == 2**63 - 1, name


def test_classic_queues_have_no_delivery_limit_but_a_dead_letter_path() -> None:
    for name, args in _every_queue(_broker("classic")).items():
        assert args["x-queue-type"] == "classic"
        assert "x-delivery-limit" not in args and "x-dead-letter-strategy" not in args, name
        assert args.get("x-dead-letter-exchange"), f"{name} has no dead-letter path"


def test_migration_policies_carry_what_old_declarations_lack() -> None:
    cfg = _broker("quorum")
    policies = {p.name: p for p in migration_policies(cfg)}
    assert set(policies) == {"q.work", "q.dead", "q.retry", "q.parked"}
    assert policies["q.work"].definition["delivery-limit"] == WORK_DELIVERY_LIMIT
    assert policies["q.work"].definition["dead-letter-exchange"] == "q.dead"
    assert policies["q.dead"].definition["delivery-limit"] == NO_DELIVERY_LIMIT
    assert policies["q.dead"].definition["dead-letter-exchange"] == "q.dead"
    assert "dead-letter-exchange" not in policies["q.retry"].definition  # each tier has its own
    assert policies["q.parked"].definition["delivery-limit"] == NO_DELIVERY_LIMIT
    names = ["q", "q.dead", "q.retry.1ms", f"q.retry.{2 ** (LEVELS - 1)}ms", "q.parked.acme"]
    for name in names:
        matching = [p.name for p in policies.values() if re.fullmatch(p.pattern, name)]
        assert len(matching) == 1, (name, matching)
    assert not any(
        re.fullmatch(p.pattern, "q2") or re.fullmatch(p.pattern, "xq.dead")
        for p in policies.values()
    )
    line = policies["q.dead"].rabbitmqctl("/")
    assert line[:8] == [
        "set_policy",
        "-p",
        "/",
        "--priority",
        "10",
        "--apply-to",
        "queues",
        "q.dead",
    ]
    assert json.loads(line[-1]) == policies["q.dead"].definition
    # Classic queues: no delivery limits to set, dead-letter exchanges only.
    for policy in migration_policies(_broker("classic")):
        assert "delivery-limit" not in policy.definition
