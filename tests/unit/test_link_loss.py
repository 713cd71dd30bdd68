"""A broker link that breaks while a message is processed: the message goes back, it is never
dead-lettered for the broken link. Pure, with fakes for the channel and the settlement."""

from __future__ import annotations

import types
from typing import Any

import aiormq
import pytest

from dispatcher.broker.topology import side_channel
from dispatcher.process import pipeline as pipeline_module
from dispatcher.process.pipeline import Pipeline, _Verdict


class _ClosedConnection:
    async def channel(self, **_: Any) -> Any:
        raise RuntimeError("<Connection: 'amqp://127.0.0.1:5672/'> closed")


class _OpenConnection:
    def __init__(self) -> None:
        self.opened: list[dict[str, Any]] = []

    async def channel(self, **kwargs: Any) -> str:
        self.opened.append(kwargs)
        return "side"


class _RobustChannel:
    def __init__(self, connection: Any) -> None:
        self._raw = types.SimpleNamespace(connection=connection)

    async def get_underlay_channel(self) -> Any:
        return self._raw


async def test_a_side_channel_on_a_closed_connection_is_a_broker_error() -> None:
    with pytest.raises(aiormq.exceptions.ConnectionClosed, match="closed"):
        await side_channel(_RobustChannel(_ClosedConnection()))  # type: ignore[arg-type]


async def test_a_side_channel_opens_without_confirms_on_a_live_connection() -> None:
    connection = _OpenConnection()
    assert await side_channel(_RobustChannel(connection)) == "side"  # type: ignore[arg-type]
    assert connection.opened == [{"publisher_confirms": False}]


class _Settlement:
    def __init__(self) -> None:
        self.dead: list[str] = []

    async def dead_letter(self, body: bytes, *, reason: str, **_: Any) -> None:
        self.dead.append(reason)


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def labels(self, *_: str) -> _Counter:
        return self

    def inc(self) -> None:
        self.n += 1


def _pipeline() -> Any:
    settlement = _Settlement()
    metrics = types.SimpleNamespace(dead_letters=_Counter())
    fake = types.SimpleNamespace(_settlement=settlement, _metrics=metrics, _clock=lambda: 0.0)
    return fake, settlement


def _message(*, channel_closed: bool) -> Any:
    return types.SimpleNamespace(
        body=b'{"event":"Message.Bounced"}',
        message_id="m-1",
        redelivered=True,
        headers={},
        channel=types.SimpleNamespace(is_closed=channel_closed),
        delivery_tag=7,
    )


@pytest.fixture(autouse=True)
def _no_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "_TRANSIENT_HOLD", 0.0)


@pytest.mark.parametrize(
    "exc",
    [
        aiormq.exceptions.ConnectionClosed(320, "closed"),
        ConnectionResetError("reset"),
        aiormq.exceptions.ChannelInvalidStateError("closed"),
    ],
)
async def test_a_broker_error_hands_the_message_back(exc: Exception) -> None:
    fake, settlement = _pipeline()
    verdict = await Pipeline._poisoned(fake, _message(channel_closed=False), exc)
    assert verdict is _Verdict.REQUEUE and settlement.dead == []


async def test_any_error_on_a_channel_that_closed_hands_the_message_back() -> None:
    fake, settlement = _pipeline()
    verdict = await Pipeline._poisoned(fake, _message(channel_closed=True), RuntimeError("x"))
    assert verdict is _Verdict.REQUEUE and settlement.dead == []


async def test_a_redelivered_message_that_breaks_the_pipeline_again_is_dead_lettered() -> None:
    fake, settlement = _pipeline()
    verdict = await Pipeline._poisoned(fake, _message(channel_closed=False), KeyError("bug"))
    assert verdict is _Verdict.ACK
    assert settlement.dead == ["dispatch_error: KeyError: 'bug'"]
    assert fake._metrics.dead_letters.n == 1
