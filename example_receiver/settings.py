"""The receiver's configuration: one frozen dataclass, validated when it is built."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

from signing import parse_secrets

__all__ = [
    "DatabaseUrl",
    "ReceiverSettings",
    "SettingsError",
    "parse_duration",
    "parse_listen",
    "parse_size",
]


class SettingsError(ValueError):
    """A setting is wrong; the message is one line naming it."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB)?\s*$")
_UNIT_BYTES = {"B": 1, "KiB": 1024, "MiB": 1024 * 1024}
_MAX_BODY = 64 * 1024 * 1024  # the dispatcher's largest batch max_bytes


def parse_duration(text: str) -> timedelta:
    """`500ms`, `45s`, `30m`, `12h`, `7d`; a bare number is seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise SettingsError(f"bad duration {text!r} (use e.g. 30s, 10m, 12h, 7d)")
    value, unit = match.groups()
    return timedelta(seconds=float(value) * _UNIT_SECONDS[unit or "s"])


def parse_size(text: str) -> int:
    """`1MiB`, `512KiB`, `4096` (bytes) -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise SettingsError(f"bad size {text!r} (use e.g. 1MiB, 512KiB, 65536)")
    value, unit = match.groups()
    return int(value) * _UNIT_BYTES[unit or "B"]


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9000` for IPv6) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SettingsError(f"bad listen address {text!r} (use HOST:PORT)")
    return host, int(port_text)


@dataclass(frozen=True)
class DatabaseUrl:
    """`sqlite:///relative.sqlite3`, `sqlite:////absolute/path.sqlite3` or `postgresql://...`."""

    kind: Literal["sqlite", "postgresql"]
    target: str  # the SQLite file path, or the PostgreSQL DSN

    @classmethod
    def parse(cls, url: str) -> DatabaseUrl:
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
            if not path:
                raise SettingsError(f"bad database url {url!r}: no file path")
            return cls("sqlite", path)
        if url.startswith(("postgresql://", "postgres://")):
            if not urlsplit(url).hostname and "host=" not in url:
                raise SettingsError(f"bad database url {url!r}: no host")
            return cls("postgresql", url)
        raise SettingsError(
            f"bad database url {url!r} (use sqlite:///path.sqlite3 or postgresql://...)"
        )

    def describe(self) -> str:
        """The url without a password, for logs."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.target}"
        parts = urlsplit(self.target)
        if parts.password is None:
            return self.target
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class ReceiverSettings:
    db_url: str = "sqlite:///receiver.sqlite3"
    host: str = "127.0.0.1"
    port: int = 9000
    path: str = "/webhooks/email"
    # Agent tokens (JWT): keys come from jwks_url; audience is this endpoint's public URL.
    jwks_url: str | None = None
    audience: str | None = None
    issuer: str | None = None
    account: str | None = None  # the token's account claim must be this (the sender's account)
    # Standard Webhooks secrets, "whsec_<base64>" each; with jwks_url both must verify.
    hmac_secrets: tuple[str, ...] = field(default=(), repr=False)
    leeway: float = 30.0
    soft_bounce_limit: int = 3
    soft_bounce_window: timedelta = timedelta(days=7)
    db_schema: str | None = None  # PostgreSQL schema for the tables (created if missing)
    # The largest request body taken: at least the subscriber's batch max_bytes (default 1 MiB).
    max_body: int = 1024 * 1024

    def __post_init__(self) -> None:
        database = DatabaseUrl.parse(self.db_url)
        if not self.path.startswith("/"):
            raise SettingsError(f"path must start with '/': {self.path!r}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port out of range: {self.port}")
        if self.jwks_url is None and not self.hmac_secrets:
            raise SettingsError(
                "nothing to verify webhooks with: give a JWKS url or an HMAC secret"
            )
        if self.jwks_url is not None:
            if urlsplit(self.jwks_url).scheme not in ("http", "https"):
                raise SettingsError(f"jwks url must be http(s): {self.jwks_url!r}")
            if not self.audience:
                raise SettingsError("audience is required with a JWKS url (this endpoint's URL)")
        if self.account is not None:
            if self.jwks_url is None:
                raise SettingsError("an account is checked in the agent token: give a JWKS url")
            if not self.account:
                raise SettingsError("account must not be empty")
        for secret in self.hmac_secrets:
            try:
                parse_secrets(secret)
            except ValueError as exc:
                raise SettingsError(f"bad HMAC secret: {exc}") from None
        if self.soft_bounce_limit < 1:
            raise SettingsError(f"soft bounce limit must be >= 1: {self.soft_bounce_limit}")
        if self.soft_bounce_window <= timedelta(0):
            raise SettingsError("soft bounce window must be positive")
        if self.leeway < 0:
            raise SettingsError(f"leeway must be >= 0: {self.leeway}")
        if not 1024 <= self.max_body <= _MAX_BODY:
            raise SettingsError(f"max body must be 1KiB to 64MiB: {self.max_body}")
        if self.db_schema is not None:
            if database.kind != "postgresql":
                raise SettingsError("a database schema only applies to postgresql")
            if not _SCHEMA_NAME.match(self.db_schema):
                raise SettingsError(f"bad schema name {self.db_schema!r}")

    @property
    def database(self) -> DatabaseUrl:
        return DatabaseUrl.parse(self.db_url)
