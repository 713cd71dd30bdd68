"""Configuration: every bad input is refused with one line naming the key."""

from __future__ import annotations

import pytest

from dispatcher.config import ConfigError, load_config, parse_config, parse_duration

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
