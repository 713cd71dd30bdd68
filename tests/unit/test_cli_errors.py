"""The one line the command line prints when a command fails: it names what failed."""

from __future__ import annotations

from dispatcher.cli import _describe


def test_a_missing_file_is_not_blamed_on_the_broker() -> None:
    missing = FileNotFoundError(2, "No such file or directory", "/var/lib/dispatcher/x.db")
    assert _describe(missing) == (
        "FileNotFoundError: [Errno 2] No such file or directory: '/var/lib/dispatcher/x.db'"
    )
    refused = ConnectionRefusedError(111, "Connection refused")
    assert _describe(refused).startswith("broker: ") and "is RabbitMQ running" in _describe(refused)
