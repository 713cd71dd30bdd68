"""Configuration: TOML in, frozen and validated objects out.

Everything is checked here, once, before any socket opens. Each problem becomes a
`ConfigError` whose message is one line naming the key, e.g.
``subscribers[1].timeout: bad duration "10 sec" (use ms, s, m or h)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from dispatcher.decisions.events import ACCOUNT_PATTERN, KNOWN_EVENT_TYPES
from dispatcher.http.ssrf import BlockedDestination, check_literal
from signing import ALGORITHMS, parse_secrets

__all__ = [
    "BatchConfig",
    "BreakerConfig",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "DispatcherConfig",
    "HttpConfig",
    "IncludeCache",
    "RetryConfig",
    "SigningConfig",
    "SubscriberConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

DEFAULT_CONFIG_PATH = "config/dispatcher.toml"
_T = TypeVar("_T")


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, key: str) -> float:
    """Parse "250ms", "5s", "2m", "1h" (or a bare number of seconds) into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: bad duration {value!r} (use ms, s, m or h, e.g. "30s")')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ConfigError(f'{key}: bad duration {value!r} (use ms, s, m or h, e.g. "30s")')
    if seconds < 0:
        raise ConfigError(f"{key}: duration must not be negative")
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|KB|MB)?\s*$")
_UNIT_BYTES = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024 * 1024, "KB": 1000, "MB": 1000 * 1000}


def parse_size(value: object, key: str) -> int:
    """Parse "512KiB", "1MiB", "64000" (or a bare integer) into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _UNIT_BYTES[m.group(2)]
    else:
        raise ConfigError(f'{key}: bad size {value!r} (use B, KiB or MiB, e.g. "1MiB")')
    return size


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchange: str = "email.events"
    queue: str = "webhooks.dispatch"
    binding_keys: tuple[str, ...] = ("Message.#",)
    prefetch: int = 256
    queue_type: str = "quorum"
    max_event_bytes: int = 256 * 1024

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dead"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:8088"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True, slots=True)
class SigningConfig:
    issuer: str = "https://mail.example.com"
    subject: str = "agent:webhook-dispatcher"
    keys_dir: str = "keys"
    algorithm: str = "EdDSA"
    token_ttl: float = 300.0
    jwks_max_age: float = 300.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    schedule: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 10800, 21600)
    jitter: float = 0.2
    max_age: float = 86400.0
    park_ttl: float = 600.0  # a parked delivery nobody consumed returns to the work queue

    @property
    def max_attempts(self) -> int:
        return len(self.schedule) + 1


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    cooldown: float = 30.0
    max_cooldown: float = 600.0


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    drain_timeout: float = 30.0
    workers: int = 0  # 0 = one per core
    log_level: str = "info"
    log_format: str = "auto"  # json | console | auto (console on a terminal)
    max_response_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """Opt-in batching for one subscriber: up to max_events (or max_bytes) per POST."""

    max_events: int = 100
    max_wait: float = 1.0
    max_bytes: int = 1024 * 1024


ALL_ACCOUNTS = "*"


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    id: str
    url: str
    events: tuple[str, ...] = ("*",)
    auth: str = "jwt"
    hmac_secret_env: str | None = None
    hmac_secrets: tuple[bytes, ...] = field(default=(), repr=False)
    timeout: float = 10.0
    max_in_flight: int = 64
    rate_limit: float = 0.0
    # None: only events without an account; "*": every event; else that account's events.
    account: str | None = None
    # (dotted path, accepted strings) pairs: every path must hold one of its strings.
    filter: tuple[tuple[tuple[str, ...], frozenset[str]], ...] = ()
    algorithm: str | None = None  # None: [signing].algorithm
    batch: BatchConfig | None = None
    source: str = field(default="", compare=False, repr=False)  # the file it was read from

    @property
    def uses_jwt(self) -> bool:
        return "jwt" in self.auth

    @property
    def uses_hmac(self) -> bool:
        return "hmac" in self.auth

    def masked(self, default_algorithm: str) -> dict[str, Any]:
        """As plain data: secrets masked, the effective algorithm, the file it came from."""
        out = {
            f.name: _plain(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("hmac_secrets", "source")
        }
        out["hmac_secrets"] = ["***"] * len(self.hmac_secrets)
        out["filter"] = {".".join(path): sorted(values) for path, values in self.filter}
        out["algorithm"] = self.algorithm or default_algorithm
        if self.source:
            out["file"] = self.source
        return out


@dataclass(frozen=True, slots=True)
class Config:
    broker: BrokerConfig = BrokerConfig()
    http: HttpConfig = HttpConfig()
    signing: SigningConfig = SigningConfig()
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    dispatcher: DispatcherConfig = DispatcherConfig()
    subscribers: tuple[SubscriberConfig, ...] = ()
    allow_private_networks: bool = False
    source: str = "<defaults>"
    include: tuple[str, ...] = ()
    _by_id: dict[str, SubscriberConfig] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {s.id: s for s in self.subscribers})

    def subscriber(self, subscriber_id: str) -> SubscriberConfig | None:
        return self._by_id.get(subscriber_id)

    @property
    def algorithms(self) -> frozenset[str]:
        """Every signing algorithm a token may be minted with under this config."""
        return frozenset(
            {self.signing.algorithm}
            | {s.algorithm for s in self.subscribers if s.algorithm and s.uses_jwt}
        )

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, with secrets masked."""
        out = _plain_fields(self)
        out["broker"]["url"] = _mask_url(self.broker.url)
        out["subscribers"] = [s.masked(self.signing.algorithm) for s in self.subscribers]
        return out


def _plain_fields(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain data, field by field (private fields left out)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if not f.name.startswith("_")}


def _plain(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain_fields(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


# --- reading raw TOML tables ------------------------------------------------------------------


class _Table:
    """A TOML table being consumed key by key; leftovers are unknown keys."""

    def __init__(self, data: object, name: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{name}: expected a table")
        self._data = dict(data)
        self._name = name
        self.seen = frozenset(self._data)

    def key(self, k: str) -> str:
        return f"{self._name}.{k}" if self._name else k

    def take(self, k: str, kind: type[_T], default: _T) -> _T:
        if k not in self._data:
            return default
        value = self._data.pop(k)
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # type: ignore[return-value]
        if not ok:
            raise ConfigError(f"{self.key(k)}: expected {kind.__name__}, got {value!r}")
        return value  # type: ignore[no-any-return]

    def take_raw(self, k: str, default: object) -> object:
        return self._data.pop(k, default)

    def take_duration(self, k: str, default: float) -> float:
        if k not in self._data:
            return default
        return parse_duration(self._data.pop(k), self.key(k))

    def take_str_list(self, k: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if k not in self._data:
            return default
        value = self._data.pop(k)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(k)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def finish(self) -> None:
        if self._data:
            unknown = sorted(self._data)[0]
            raise ConfigError(f"{self.key(unknown)}: unknown key")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


# --- sections ---------------------------------------------------------------------------------


def _broker(t: _Table, env: Mapping[str, str]) -> BrokerConfig:
    d = BrokerConfig()
    url = t.take("url", str, d.url)
    url = env.get("DISPATCHER_BROKER_URL", url)
    parts = urlsplit(url)
    _check(
        parts.scheme in ("amqp", "amqps") and bool(parts.hostname),
        t.key("url"),
        f"bad broker URL {_mask_url(url)!r} (expected amqp://user:pass@host:port/vhost)",
    )
    cfg = BrokerConfig(
        url=url,
        exchange=t.take("exchange", str, d.exchange),
        queue=t.take("queue", str, d.queue),
        binding_keys=t.take_str_list("binding_keys", d.binding_keys),
        prefetch=t.take("prefetch", int, d.prefetch),
        queue_type=t.take("queue_type", str, d.queue_type),
        max_event_bytes=t.take("max_event_bytes", int, d.max_event_bytes),
    )
    t.finish()
    _check(bool(cfg.exchange), t.key("exchange"), "must not be empty")
    _check(bool(cfg.queue), t.key("queue"), "must not be empty")
    _check(bool(cfg.binding_keys), t.key("binding_keys"), "must list at least one key")
    _check(1 <= cfg.prefetch <= 65535, t.key("prefetch"), "must be between 1 and 65535")
    _check(
        cfg.queue_type in ("quorum", "classic"),
        t.key("queue_type"),
        f'must be "quorum" or "classic", got {cfg.queue_type!r}',
    )
    _check(cfg.max_event_bytes >= 64, t.key("max_event_bytes"), "must be at least 64")
    return cfg


def _http(t: _Table) -> HttpConfig:
    listen = t.take("listen", str, HttpConfig().listen)
    t.finish()
    host, sep, port = listen.rpartition(":")
    _check(
        bool(sep and host and port.isdigit() and 0 <= int(port) <= 65535),
        t.key("listen"),
        f"expected host:port, got {listen!r}",
    )
    return HttpConfig(listen=listen)


def _signing(t: _Table) -> SigningConfig:
    d = SigningConfig()
    cfg = SigningConfig(
        issuer=t.take("issuer", str, d.issuer),
        subject=t.take("subject", str, d.subject),
        keys_dir=t.take("keys_dir", str, d.keys_dir),
        algorithm=t.take("algorithm", str, d.algorithm),
        token_ttl=t.take_duration("token_ttl", d.token_ttl),
        jwks_max_age=t.take_duration("jwks_max_age", d.jwks_max_age),
    )
    t.finish()
    _algorithm(t, t.key("algorithm"), cfg.algorithm)
    _check(bool(cfg.issuer), t.key("issuer"), "must not be empty")
    _check(bool(cfg.keys_dir), t.key("keys_dir"), "must not be empty")
    _check(
        10 <= cfg.token_ttl <= 900,
        t.key("token_ttl"),
        "must be between 10s and 15m (verifiers refuse tokens that live longer)",
    )
    return cfg


def _retry(t: _Table) -> RetryConfig:
    d = RetryConfig()
    raw = t.take_raw("schedule", None)
    if raw is None:
        schedule = d.schedule
    else:
        _check(isinstance(raw, list), t.key("schedule"), "expected a list of durations")
        assert isinstance(raw, list)
        schedule = tuple(parse_duration(v, f"{t.key('schedule')}[{i}]") for i, v in enumerate(raw))
    jitter = t.take("jitter", float, d.jitter)
    cfg = RetryConfig(
        schedule=schedule,
        jitter=jitter,
        max_age=t.take_duration("max_age", d.max_age),
        park_ttl=t.take_duration("park_ttl", d.park_ttl),
    )
    _check(
        t.take_raw("overflow_delay", None) is None,
        t.key("overflow_delay"),
        "no longer used (deferred deliveries wait in the subscriber's parking queue): remove it",
    )
    t.finish()
    _check(0.0 <= cfg.jitter < 1.0, t.key("jitter"), "must be between 0 and 1 (exclusive)")
    _check(len(cfg.schedule) <= 64, t.key("schedule"), "at most 64 retries")
    _check(
        all(0 < s <= 3 * 86400 for s in cfg.schedule),
        t.key("schedule"),
        "each delay must be more than 0 and at most 72h",
    )
    _check(cfg.max_age > 0, t.key("max_age"), "must be more than 0")
    _check(1 <= cfg.park_ttl <= 86400, t.key("park_ttl"), "must be between 1s and 24h")
    return cfg


def _breaker(t: _Table) -> BreakerConfig:
    d = BreakerConfig()
    cfg = BreakerConfig(
        failure_threshold=t.take("failure_threshold", int, d.failure_threshold),
        cooldown=t.take_duration("cooldown", d.cooldown),
        max_cooldown=t.take_duration("max_cooldown", d.max_cooldown),
    )
    t.finish()
    _check(cfg.failure_threshold >= 1, t.key("failure_threshold"), "must be at least 1")
    _check(cfg.cooldown > 0, t.key("cooldown"), "must be more than 0")
    _check(cfg.max_cooldown >= cfg.cooldown, t.key("max_cooldown"), "must be >= cooldown")
    return cfg


def _dispatcher(t: _Table, env: Mapping[str, str]) -> DispatcherConfig:
    d = DispatcherConfig()
    cfg = DispatcherConfig(
        drain_timeout=t.take_duration("drain_timeout", d.drain_timeout),
        workers=t.take("workers", int, d.workers),
        log_level=env.get("DISPATCHER_LOG_LEVEL", t.take("log_level", str, d.log_level)).lower(),
        log_format=env.get("DISPATCHER_LOG_FORMAT", t.take("log_format", str, d.log_format)),
        max_response_bytes=t.take("max_response_bytes", int, d.max_response_bytes),
    )
    t.finish()
    _check(cfg.workers >= 0, t.key("workers"), "must be 0 (one per core) or more")
    _check(
        cfg.log_level in ("debug", "info", "warning", "error"),
        t.key("log_level"),
        f"must be debug, info, warning or error, got {cfg.log_level!r}",
    )
    _check(
        cfg.log_format in ("auto", "json", "console"),
        t.key("log_format"),
        f"must be auto, json or console, got {cfg.log_format!r}",
    )
    _check(cfg.max_response_bytes >= 0, t.key("max_response_bytes"), "must not be negative")
    return cfg


_SUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PATTERN = re.compile(r"^(\*|[A-Za-z]+\.\*|[A-Za-z]+\.[A-Za-z]+)$")


def _subscriber(
    t: _Table, env: Mapping[str, str], allow_private: bool, source: str
) -> SubscriberConfig:
    sub_id = t.take("id", str, "")
    _check(
        bool(_SUB_ID.match(sub_id)),
        t.key("id"),
        f"must be 1-64 letters, digits, '_', '.', '-', got {sub_id!r}",
    )
    url = t.take("url", str, "")
    _check_subscriber_url(url, t.key("url"), allow_private)
    events = t.take_str_list("events", ("*",))
    for i, pattern in enumerate(events):
        _check(
            bool(_PATTERN.match(pattern)),
            f"{t.key('events')}[{i}]",
            f'bad pattern {pattern!r} (use an exact name, "Message.*" or "*")',
        )
        if "*" not in pattern:
            _check(
                pattern in KNOWN_EVENT_TYPES,
                f"{t.key('events')}[{i}]",
                f"unknown event type {pattern!r} (known: {', '.join(KNOWN_EVENT_TYPES)})",
            )
    _check(bool(events), t.key("events"), "must list at least one pattern")
    auth = t.take("auth", str, "jwt")
    _check(
        auth in ("jwt", "hmac", "jwt+hmac"),
        t.key("auth"),
        f'must be "jwt", "hmac" or "jwt+hmac", got {auth!r}',
    )
    secret_env = t.take("hmac_secret_env", str, "") or None
    secrets: tuple[bytes, ...] = ()
    if "hmac" in auth:
        _check(secret_env is not None, t.key("hmac_secret_env"), f'required when auth = "{auth}"')
        assert secret_env is not None
        value = env.get(secret_env)
        _check(
            bool(value), t.key("hmac_secret_env"), f"environment variable {secret_env} is not set"
        )
        assert value is not None
        secrets = _parse_hmac_secrets(value, t.key("hmac_secret_env"))
    cfg = SubscriberConfig(
        sub_id,
        url,
        events,
        auth,
        hmac_secret_env=secret_env,
        hmac_secrets=secrets,
        timeout=t.take_duration("timeout", 10.0),
        max_in_flight=t.take("max_in_flight", int, 64),
        rate_limit=t.take("rate_limit", float, 0.0),
        account=_account(t),
        filter=_filter(t),
        algorithm=_algorithm(t, t.key("algorithm"), t.take("algorithm", str, "") or None),
        batch=_batch(t),
        source=source,
    )
    t.finish()
    _check(0 < cfg.timeout <= 300, t.key("timeout"), "must be more than 0 and at most 5m")
    _check(1 <= cfg.max_in_flight <= 10000, t.key("max_in_flight"), "must be 1 to 10000")
    _check(cfg.rate_limit >= 0, t.key("rate_limit"), "must be 0 (unlimited) or more")
    return cfg


def _algorithm(t: _Table, key: str, value: str | None) -> str | None:
    _check(
        value is None or value in ALGORITHMS,
        key,
        f"must be one of {', '.join(ALGORITHMS)}, got {value!r}",
    )
    return value


def _account(t: _Table) -> str | None:
    account = t.take("account", str, "") or None
    if account is None and "account" in t.seen:
        raise ConfigError(f'{t.key("account")}: must not be empty (omit it, or use "*")')
    _check(
        account is None or account == ALL_ACCOUNTS or bool(ACCOUNT_PATTERN.match(account)),
        t.key("account"),
        f'must be "*" or 1-64 characters of A-Z a-z 0-9 . _ -, got {account!r}',
    )
    return account


# Fields of an event whose value is a string: a filter path that goes inside one never matches.
_SCALAR_FIELDS = frozenset({"event", "timestamp", "id", "account"})
_PATH_PART = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _filter(t: _Table) -> tuple[tuple[tuple[str, ...], frozenset[str]], ...]:
    raw = t.take_raw("filter", None)
    if raw is None:
        return ()
    key = t.key("filter")
    _check(isinstance(raw, Mapping), key, 'expected a table, e.g. { "data.bounce_type" = [...] }')
    assert isinstance(raw, Mapping)
    _check(bool(raw), key, "must name at least one field (or leave filter out)")
    out = []
    for path, values in raw.items():
        where = f'{key}."{path}"'
        parts = tuple(str(path).split("."))
        _check(
            all(_PATH_PART.match(p) for p in parts),
            where,
            "bad path (dotted names of letters, digits, '_' or '-', e.g. data.bounce_type)",
        )
        _check(
            not (len(parts) > 1 and parts[0] in _SCALAR_FIELDS),
            where,
            f"can never match: {parts[0]!r} is a string, it has no fields",
        )
        _check(
            isinstance(values, list) and all(isinstance(v, str) for v in values),
            where,
            f"expected a list of strings, got {values!r}",
        )
        _check(bool(values), where, "an empty list can never match")
        if parts == ("event",):
            unknown = sorted(set(values) - set(KNOWN_EVENT_TYPES))
            _check(not unknown, where, f"unknown event type {unknown[0]!r}" if unknown else "")
        out.append((parts, frozenset(values)))
    return tuple(out)


def _batch(t: _Table) -> BatchConfig | None:
    raw = t.take_raw("batch", None)
    if raw is None:
        return None
    b = _Table(raw, t.key("batch"))
    d = BatchConfig()
    max_bytes_raw = b.take_raw("max_bytes", None)
    cfg = BatchConfig(
        max_events=b.take("max_events", int, d.max_events),
        max_wait=b.take_duration("max_wait", d.max_wait),
        max_bytes=d.max_bytes
        if max_bytes_raw is None
        else parse_size(max_bytes_raw, b.key("max_bytes")),
    )
    b.finish()
    _check(1 <= cfg.max_events <= 10000, b.key("max_events"), "must be 1 to 10000")
    _check(0 < cfg.max_wait <= 300, b.key("max_wait"), "must be more than 0 and at most 5m")
    _check(
        1024 <= cfg.max_bytes <= 64 * 1024 * 1024,
        b.key("max_bytes"),
        "must be between 1KiB and 64MiB",
    )
    return cfg


def _parse_hmac_secrets(value: str, key: str) -> tuple[bytes, ...]:
    try:
        secrets = parse_secrets(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc} (expected whsec_<base64>)") from None
    _check(all(len(s) >= 16 for s in secrets), key, "secret is shorter than 16 bytes")
    return tuple(secrets)


def _check_subscriber_url(url: str, key: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    _check(
        parts.scheme in ("http", "https") and bool(parts.hostname),
        key,
        f"bad URL {url!r} (expected http(s)://host/path)",
    )
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {url!r}") from None
    _check(not parts.username and not parts.password, key, "credentials in the URL are not allowed")
    if allow_private:
        return
    host = parts.hostname or ""
    try:
        check_literal(host)
        # The one loopback name the guard leaves to the resolver (it maps to 127.0.0.1 there).
        if host.lower().rstrip(".") == "localhost.localdomain":
            raise BlockedDestination(f"{host} is a loopback name")
    except BlockedDestination as exc:
        hint = "set allow_private_networks = true for local targets"
        raise ConfigError(f"{key}: {exc} ({hint})") from None


# --- entry points -----------------------------------------------------------------------------


def parse_config(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    source: str = "<memory>",
    *,
    base_dir: Path | None = None,
    cache: IncludeCache | None = None,
) -> Config:
    """Validate a parsed TOML document into a `Config`; raise `ConfigError` on any problem.

    ``include`` globs are read relative to ``base_dir`` (the main file's directory; the
    current directory for a document from memory). With a ``cache``, an included file read
    before is validated again only if its bytes (or what its subscribers read from ``env``)
    changed.
    """
    env = os.environ if env is None else env
    root = _Table(data, "")
    allow_private = root.take("allow_private_networks", bool, False)
    include = root.take_str_list("include", ())
    broker = _broker(_Table(root.take_raw("broker", {}), "broker"), env)
    http = _http(_Table(root.take_raw("http", {}), "http"))
    signing = _signing(_Table(root.take_raw("signing", {}), "signing"))
    retry = _retry(_Table(root.take_raw("retry", {}), "retry"))
    breaker = _breaker(_Table(root.take_raw("breaker", {}), "breaker"))
    disp = _dispatcher(_Table(root.take_raw("dispatcher", {}), "dispatcher"), env)
    subs = list(_subscribers(root.take_raw("subscribers", []), env, allow_private, ""))
    root.finish()
    files = IncludeCache() if cache is None else cache
    read: list[str] = []
    for i, pattern in enumerate(include):
        for path in _included_files(pattern, base_dir or Path.cwd(), f"include[{i}]"):
            subs.extend(files.subscribers(path, env, allow_private))
            read.append(str(path))
    seen: dict[str, SubscriberConfig] = {}
    for i, s in enumerate(subs):
        first = seen.get(s.id)
        if first is not None:
            where = f"{s.source}: " if s.source else ""
            earlier = f" (first in {first.source or source})" if first.source != s.source else ""
            raise ConfigError(
                f"{where}subscribers[{_index_in_file(subs, i)}].id: "
                f"duplicate subscriber id {s.id!r}{earlier}"
            )
        seen[s.id] = s
    files.retain(read)
    return Config(
        broker=broker,
        http=http,
        signing=signing,
        retry=retry,
        breaker=breaker,
        dispatcher=disp,
        subscribers=tuple(subs),
        allow_private_networks=allow_private,
        source=source,
        include=include,
    )


def _subscribers(
    raw: object, env: Mapping[str, str], allow_private: bool, source: str
) -> list[SubscriberConfig]:
    if not isinstance(raw, list):
        raise ConfigError("subscribers: expected [[subscribers]] tables")
    out = []
    for i, item in enumerate(raw):
        out.append(_subscriber(_Table(item, f"subscribers[{i}]"), env, allow_private, source))
    return out


def _index_in_file(subs: list[SubscriberConfig], i: int) -> int:
    return sum(1 for s in subs[:i] if s.source == subs[i].source)


def _included_files(pattern: str, base: Path, key: str) -> list[Path]:
    """The files an include glob names, sorted; a plain path must exist, a glob may match none."""
    _check(bool(pattern.strip()), key, "must not be empty")
    if not any(c in pattern for c in "*?["):
        path = Path(pattern) if Path(pattern).is_absolute() else base / pattern
        _check(path.is_file(), key, f"included file {pattern!r} not found")
        return [path]
    if Path(pattern).is_absolute():
        found = sorted(Path(pattern).parent.glob(Path(pattern).name))
    else:
        found = sorted(base.glob(pattern))
    return [p for p in found if p.is_file()]


@dataclass(frozen=True, slots=True)
class _IncludedFile:
    digest: bytes  # of the file's bytes
    allow_private: bool
    env: tuple[tuple[str, str | None], ...]  # the variables its subscribers read, and values
    subscribers: tuple[SubscriberConfig, ...]


class IncludeCache:
    """Included files already read and validated, by path.

    A file whose bytes, ``allow_private_networks`` and secret variables are as they were
    gives back the same subscribers without being parsed again, so a reload that adds one
    file to fifty validates one. A file that is not included any more is forgotten after
    the next successful load; a file with a mistake is never kept, so the mistake is
    reported on every load until it is fixed. Safe to use from one thread at a time per
    load (the daemon reloads in a worker thread, one reload after the other).
    """

    def __init__(self) -> None:
        self._files: dict[str, _IncludedFile] = {}
        self._lock = threading.Lock()
        self.parsed = 0  # files parsed and validated (the rest came from the cache)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, path: object) -> bool:
        return str(path) in self._files

    def subscribers(
        self, path: Path, env: Mapping[str, str], allow_private: bool
    ) -> list[SubscriberConfig]:
        """The subscribers of one included file (which holds only ``[[subscribers]]``)."""
        name = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read included file ({exc})") from None
        digest = hashlib.blake2b(raw, digest_size=20).digest()
        with self._lock:
            known = self._files.get(name)
        if (
            known is not None
            and known.digest == digest
            and known.allow_private == allow_private
            and all(env.get(var) == value for var, value in known.env)
        ):
            return list(known.subscribers)
        subs = _included_subscribers(name, raw, env, allow_private)
        used = tuple(
            sorted(
                {
                    (s.hmac_secret_env, env.get(s.hmac_secret_env))
                    for s in subs
                    if s.uses_hmac and s.hmac_secret_env
                }
            )
        )
        with self._lock:
            self.parsed += 1
            self._files[name] = _IncludedFile(digest, allow_private, used, tuple(subs))
        return subs

    def retain(self, paths: Iterable[str]) -> None:
        """Forget every file but these (the ones the last successful load included)."""
        keep = set(paths)
        with self._lock:
            self._files = {k: v for k, v in self._files.items() if k in keep}


# The daemon's: `load_config` uses it unless told otherwise.
INCLUDE_CACHE = IncludeCache()


def _included_subscribers(
    name: str, raw: bytes, env: Mapping[str, str], allow_private: bool
) -> list[SubscriberConfig]:
    try:
        # As a text-mode read would: UTF-8, universal newlines.
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: cannot read included file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML ({exc})") from None
    try:
        root = _Table(data, "")
        subs = _subscribers(root.take_raw("subscribers", []), env, allow_private, name)
        root.finish()
    except ConfigError as exc:
        hint = (
            " (an included file holds only [[subscribers]] tables)"
            if "unknown key" in str(exc) and not str(exc).startswith("subscribers[")
            else ""
        )
        raise ConfigError(f"{name}: {exc}{hint}") from None
    return subs


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    cache: IncludeCache | None = INCLUDE_CACHE,
) -> Config:
    """Read and validate the config file (``--config``, ``DISPATCHER_CONFIG`` or the default).

    Included files go through ``cache`` (the process's own by default; None: read them all)."""
    env = os.environ if env is None else env
    chosen = Path(path or env.get("DISPATCHER_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{chosen}: cannot read config file ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{chosen}: invalid TOML ({exc})") from None
    cfg = parse_config(data, env, source=str(chosen), base_dir=chosen.parent, cache=cache)
    keys_dir = Path(cfg.signing.keys_dir)
    if not keys_dir.is_absolute():
        # keys_dir is relative to the config file's directory's parent project, i.e. the cwd.
        keys_dir = Path.cwd() / keys_dir
    return replace(cfg, signing=replace(cfg.signing, keys_dir=str(keys_dir)))
