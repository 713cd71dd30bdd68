"""Configuration: every bad input is refused with one line naming the key."""

from __future__ import annotations

import base64
import os
import re
from dataclasses import fields
from pathlib import Path

import pytest

from dispatcher.config import (
    Config,
    ConfigError,
    IncludeCache,
    SubscriberConfig,
    load_config,
    parse_config,
    parse_duration,
)

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
GOOD_SUB = {"id": "acme", "url": "https://hooks.acme.example/email"}


def parse(doc: dict, env: dict | None = None):
    return parse_config(doc, env or {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5),
        ("2m", 120),
        ("1h", 3600),
        ("1.5s", 1.5),
        (30, 30),
    ],
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text, "k") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10 sec", "5", "-1s", "1d", "", True, "s"])
def test_bad_durations_name_the_key(bad) -> None:
    with pytest.raises(ConfigError, match=r"^retry.max_age: bad duration"):
        parse({"retry": {"max_age": bad}})


BAD_DOCS = [
    ({"brokr": {}}, "brokr: unknown key"),
    ({"broker": {"prefetch": 0}}, "broker.prefetch: must be between"),
    ({"broker": {"queue_type": "stream"}}, "broker.queue_type: must be"),
    ({"broker": {"url": "http://x"}}, "broker.url: bad broker URL"),
    ({"broker": {"exchange": 5}}, "broker.exchange: expected str"),
    ({"http": {"listen": "nowhere"}}, "http.listen: expected host:port"),
    ({"signing": {"algorithm": "HS256"}}, "signing.algorithm: must be"),
    ({"signing": {"token_ttl": "2h"}}, "signing.token_ttl: must be between"),
    ({"signing": {"token_ttl": "16m"}}, "signing.token_ttl: must be between 10s and 15m"),
    ({"retry": {"jitter": 1.5}}, "retry.jitter: must be between"),
    ({"retry": {"schedule": ["5s", "x"]}}, r"retry.schedule\[1\]: bad duration"),
    ({"subscribers": [{"id": "a"}]}, r"subscribers\[0\].url: bad URL"),
    ({"subscribers": [{**GOOD_SUB, "url": "ftp://x/y"}]}, r"subscribers\[0\].url: bad URL"),
    (
        {"subscribers": [{**GOOD_SUB, "events": ["Message.Exploded"]}]},
        r"subscribers\[0\].events\[0\]: unknown event type",
    ),
    ({"subscribers": [{**GOOD_SUB, "events": ["Mess*"]}]}, r"subscribers\[0\].events\[0\]: bad"),
    ({"subscribers": [{**GOOD_SUB, "auth": "basic"}]}, r"subscribers\[0\].auth: must be"),
    (
        {"subscribers": [{**GOOD_SUB, "auth": "hmac"}]},
        r"subscribers\[0\].hmac_secret_env: required",
    ),
    (
        {"subscribers": [{**GOOD_SUB, "auth": "hmac", "hmac_secret_env": "NOPE"}]},
        r"subscribers\[0\].hmac_secret_env: environment variable NOPE is not set",
    ),
    ({"subscribers": [GOOD_SUB, GOOD_SUB]}, r"subscribers\[1\].id: duplicate subscriber id"),
    ({"subscribers": [{**GOOD_SUB, "timeout": "0s"}]}, r"subscribers\[0\].timeout: must be"),
    ({"subscribers": [{**GOOD_SUB, "colour": "red"}]}, r"subscribers\[0\].colour: unknown key"),
    (
        {"subscribers": [{**GOOD_SUB, "url": "http://127.0.0.1:9000/x"}]},
        r"subscribers\[0\].url: 127.0.0.1 is not a public address",
    ),
    ({"subscribers": [{**GOOD_SUB, "url": "http://10.1.2.3/x"}]}, "is not a public address"),
    ({"subscribers": [{**GOOD_SUB, "url": "http://[::1]/x"}]}, "is not a public address"),
    ({"subscribers": [{**GOOD_SUB, "url": "http://169.254.169.254/x"}]}, "not a public address"),
    ({"subscribers": [{**GOOD_SUB, "url": "http://localhost:9000/x"}]}, "loopback name"),
    (
        {"retry": {"overflow_delay": "1s"}, "subscribers": [GOOD_SUB]},
        r"^retry.overflow_delay: no longer used .*parking queue.*: remove it$",
    ),
    (
        {"subscribers": [{**GOOD_SUB, "url": "https://user:pw@hooks.acme.example/"}]},
        "credentials in the URL",
    ),
]


@pytest.mark.parametrize(("doc", "message"), BAD_DOCS)
def test_bad_config_is_one_line_naming_the_key(doc, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse(doc)
    assert "\n" not in str(info.value)


def test_private_targets_allowed_when_opted_in() -> None:
    cfg = parse(
        {
            "allow_private_networks": True,
            "subscribers": [{**GOOD_SUB, "url": "http://127.0.0.1:9000/x"}],
        }
    )
    assert cfg.subscribers[0].url == "http://127.0.0.1:9000/x"


def test_env_overrides_and_secrets_are_masked() -> None:
    cfg = parse(
        {"subscribers": [{**GOOD_SUB, "auth": "jwt+hmac", "hmac_secret_env": "ACME"}]},
        env={"DISPATCHER_BROKER_URL": "amqp://u:hunter2@broker:5672/", "ACME": SECRET},
    )
    assert cfg.broker.url == "amqp://u:hunter2@broker:5672/"
    masked = repr(cfg.masked())
    assert "hunter2" not in masked and SECRET not in masked and "MfKQ9r8" not in masked
    assert cfg.subscribers[0].hmac_secrets and "hmac_secrets=" not in repr(cfg.subscribers[0])


def test_defaults_follow_the_contract() -> None:
    cfg = parse({})
    assert cfg.broker.queue == "webhooks.dispatch" and cfg.broker.queue_type == "quorum"
    assert cfg.broker.max_event_bytes == 256 * 1024
    assert cfg.retry.schedule == (5, 30, 120, 600, 1800, 3600, 10800, 21600)
    assert cfg.signing.algorithm == "EdDSA" and cfg.signing.token_ttl == 300


def test_example_configs_load(monkeypatch) -> None:
    assert load_config("config/dispatcher.toml", env={}).subscribers
    cfg = load_config("config/production.toml", env={"GLOBEX_WEBHOOK_SECRET": SECRET})
    assert cfg.broker.queue_type == "quorum" and not cfg.allow_private_networks


def test_missing_and_broken_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad, env={})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost./x", "localhost. is a loopback name"),
        ("http://localhost.localdomain/x", "localhost.localdomain is a loopback name"),
        ("http://api.localhost/x", "api.localhost is a loopback name"),
        ("http://[::ffff:10.0.0.1]/x", "::ffff:10.0.0.1 is not a public address"),
        ("http://224.0.0.1/x", "224.0.0.1 is not a public address"),
    ],
)
def test_private_and_loopback_urls_are_refused_as_the_sender_would(url, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse({"subscribers": [{**GOOD_SUB, "url": url}]})
    assert str(info.value).startswith("subscribers[0].url: ")
    assert str(info.value).endswith("(set allow_private_networks = true for local targets)")


def test_public_names_and_addresses_pass() -> None:
    for url in ("https://hooks.acme.example/x", "https://8.8.8.8/x", "https://[2001:4860::8888]/"):
        assert parse({"subscribers": [{**GOOD_SUB, "url": url}]}).subscribers[0].url == url


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("whsec_!!!", r"webhook secret is not valid base64 \(expected whsec_<base64>\)"),
        ("whsec_c2hvcnQ=", "secret is shorter than 16 bytes"),
        (f"{SECRET} whsec_c2hvcnQ=", "secret is shorter than 16 bytes"),
        ("   ", r"no webhook secret given \(expected whsec_<base64>\)"),
    ],
)
def test_bad_hmac_secrets_name_the_key(value, message) -> None:
    sub = {**GOOD_SUB, "auth": "hmac", "hmac_secret_env": "ACME"}
    with pytest.raises(ConfigError, match=rf"^subscribers\[0\]\.hmac_secret_env: {message}$"):
        parse({"subscribers": [sub]}, env={"ACME": value})


def test_hmac_secrets_decode_like_the_verifier() -> None:
    # Several for rotation; unpadded base64 is accepted, as `signing.parse_secrets` does.
    unpadded = "whsec_" + base64.b64encode(b"x" * 20).decode().rstrip("=")
    sub = {**GOOD_SUB, "auth": "hmac", "hmac_secret_env": "ACME"}
    cfg = parse({"subscribers": [sub]}, env={"ACME": f"{SECRET} {unpadded}"})
    assert cfg.subscribers[0].hmac_secrets == (
        base64.b64decode(SECRET.removeprefix("whsec_")),
        b"x" * 20,
    )


def test_masked_shows_every_field_of_every_section() -> None:
    cfg = parse(
        {
            "broker": {"url": "amqp://u:hunter2@broker:5672/"},
            "subscribers": [
                {
                    **GOOD_SUB,
                    "auth": "jwt+hmac",
                    "hmac_secret_env": "ACME",
                    "filter": {"data.tags": ["b", "a"]},
                    "batch": {"max_events": 5},
                },
                {"id": "globex", "url": "https://globex.example/", "algorithm": "ES256"},
            ],
        },
        env={"ACME": SECRET},
    )
    shown = cfg.masked()
    public = {f.name for f in fields(Config) if not f.name.startswith("_")}
    assert set(shown) == public
    for name in ("broker", "http", "signing", "retry", "breaker", "dispatcher"):
        assert set(shown[name]) == {f.name for f in fields(getattr(cfg, name))}, name
    assert shown["broker"]["url"] == "amqp://u:***@broker:5672/"
    assert shown["retry"]["schedule"] == list(cfg.retry.schedule)
    acme, globex = shown["subscribers"]
    assert set(acme) == {f.name for f in fields(SubscriberConfig)} - {"source"}
    assert acme["hmac_secrets"] == ["***"] and acme["hmac_secret_env"] == "ACME"
    assert acme["filter"] == {"data.tags": ["a", "b"]} and acme["events"] == ["*"]
    assert acme["batch"] == {"max_events": 5, "max_wait": 1.0, "max_bytes": 1024 * 1024}
    assert acme["algorithm"] == "EdDSA" and globex["algorithm"] == "ES256"
    assert globex["batch"] is None and "file" not in globex
    assert SECRET.removeprefix("whsec_")[:8] not in repr(shown)


# --- included files: the cache a reload goes through ------------------------------------------

MAIN = 'allow_private_networks = true\ninclude = ["subs.d/*.toml"]\n'


def sub_file(*ids: str, extra: str = "") -> str:
    return "".join(
        f'[[subscribers]]\nid = "{i}"\nurl = "http://127.0.0.1:9/{i}"\n{extra}\n' for i in ids
    )


def included(tmp_path: Path, files: dict[str, str], main: str = MAIN) -> Path:
    (tmp_path / "subs.d").mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp_path / "subs.d" / name).write_text(text)
    (tmp_path / "d.toml").write_text(main)
    return tmp_path / "d.toml"


def by_id(cfg: Config) -> dict[str, SubscriberConfig]:
    return {s.id: s for s in cfg.subscribers}


def test_cache_reads_only_changed_and_new_files(tmp_path: Path) -> None:
    main = included(tmp_path, {"a.toml": sub_file("a1", "a2"), "b.toml": sub_file("b1")})
    cache = IncludeCache()
    first = load_config(main, env={}, cache=cache)
    assert cache.parsed == 2 and len(cache) == 2
    again = load_config(main, env={}, cache=cache)
    assert cache.parsed == 2  # nothing changed: nothing parsed
    assert again == first
    assert all(x is y for x, y in zip(again.subscribers, first.subscribers, strict=True))

    included(tmp_path, {"b.toml": sub_file("b1", "b2"), "c.toml": sub_file("c1")})
    changed = load_config(main, env={}, cache=cache)
    assert cache.parsed == 4  # b (changed) and c (new); a came from the cache
    assert [s.id for s in changed.subscribers] == ["a1", "a2", "b1", "b2", "c1"]
    old, new = by_id(first), by_id(changed)
    assert new["a1"] is old["a1"] and new["b1"] is not old["b1"] and new["b1"] == old["b1"]
    assert new["c1"].source == str(tmp_path / "subs.d" / "c.toml")


def test_cache_rereads_a_rewrite_of_the_same_size_and_time(tmp_path: Path) -> None:
    main = included(tmp_path, {"a.toml": sub_file("a1")})
    path = tmp_path / "subs.d" / "a.toml"
    cache = IncludeCache()
    assert [s.id for s in load_config(main, env={}, cache=cache).subscribers] == ["a1"]
    stat = path.stat()
    path.write_text(sub_file("a2"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert [s.id for s in load_config(main, env={}, cache=cache).subscribers] == ["a2"]


def test_cache_forgets_a_deleted_file(tmp_path: Path) -> None:
    main = included(tmp_path, {"a.toml": sub_file("a1"), "b.toml": sub_file("b1")})
    cache = IncludeCache()
    load_config(main, env={}, cache=cache)
    (tmp_path / "subs.d" / "b.toml").unlink()
    cfg = load_config(main, env={}, cache=cache)
    assert [s.id for s in cfg.subscribers] == ["a1"] and cfg.subscriber("b1") is None
    assert len(cache) == 1 and tmp_path / "subs.d" / "b.toml" not in cache
    # Back again: parsed anew, and its id is not taken by a leftover.
    included(tmp_path, {"b.toml": sub_file("b1")})
    assert [s.id for s in load_config(main, env={}, cache=cache).subscribers] == ["a1", "b1"]
    assert cache.parsed == 3


def test_cache_reports_a_mistake_in_a_changed_file_every_time(tmp_path: Path) -> None:
    main = included(tmp_path, {"a.toml": sub_file("a1"), "b.toml": sub_file("b1")})
    cache = IncludeCache()
    load_config(main, env={}, cache=cache)
    included(tmp_path, {"b.toml": sub_file("b1", extra='colour = "red"')})
    bad = str(tmp_path / "subs.d" / "b.toml")
    for _ in range(2):  # not kept: the second load finds it again
        with pytest.raises(ConfigError) as info:
            load_config(main, env={}, cache=cache)
        assert str(info.value) == f"{bad}: subscribers[0].colour: unknown key"
    included(tmp_path, {"b.toml": '[[subscribers]]\nid = "b1"\nurl = "ftp://x/"\n'})
    with pytest.raises(ConfigError, match=rf"^{re.escape(bad)}: subscribers\[0\]\.url: bad URL"):
        load_config(main, env={}, cache=cache)
    # A duplicate across files names the later file and the earlier one, cached or not.
    included(tmp_path, {"b.toml": sub_file("b1", "a1")})
    with pytest.raises(ConfigError) as info:
        load_config(main, env={}, cache=cache)
    assert str(info.value) == (
        f"{bad}: subscribers[1].id: duplicate subscriber id 'a1' "
        f"(first in {tmp_path / 'subs.d' / 'a.toml'})"
    )
    included(tmp_path, {"b.toml": sub_file("b1")})
    assert [s.id for s in load_config(main, env={}, cache=cache).subscribers] == ["a1", "b1"]


def test_cache_validates_again_when_a_secret_or_the_private_switch_changes(
    tmp_path: Path,
) -> None:
    extra = 'auth = "hmac"\nhmac_secret_env = "A_SECRET"'
    main = included(tmp_path, {"a.toml": sub_file("a1", extra=extra)})
    cache = IncludeCache()
    other = "whsec_" + base64.b64encode(b"y" * 24).decode()
    first = load_config(main, env={"A_SECRET": SECRET}, cache=cache)
    rotated = load_config(main, env={"A_SECRET": other}, cache=cache)
    assert rotated.subscribers[0].hmac_secrets == (b"y" * 24,) != first.subscribers[0].hmac_secrets
    where = f"{tmp_path / 'subs.d' / 'a.toml'}: subscribers[0].hmac_secret_env"
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: environment variable A_SECRET"):
        load_config(main, env={}, cache=cache)
    # The file and its secret are as last validated, but its loopback URL is refused once
    # private networks are off.
    assert load_config(main, env={"A_SECRET": other}, cache=cache).subscribers
    (tmp_path / "d.toml").write_text(MAIN.replace("true", "false"))
    with pytest.raises(ConfigError, match=r"a\.toml: subscribers\[0\]\.url: 127\.0\.0\.1 is not"):
        load_config(main, env={"A_SECRET": other}, cache=cache)


def test_without_a_cache_every_file_is_read(tmp_path: Path) -> None:
    main = included(tmp_path, {"a.toml": sub_file("a1")})
    first = load_config(main, env={}, cache=None)
    again = load_config(main, env={}, cache=None)
    assert again == first and again.subscribers[0] is not first.subscribers[0]
