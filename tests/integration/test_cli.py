"""The command line, run as a user would: exit codes, one-line errors, and each command working."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.support.harness import (
    BROKER_URL,
    ReceiverServer,
    broker_url,
    event_body,
    running,
    wait_until,
)

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


def dispatcher(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        capture_output=True,
        timeout=120,
        input=stdin,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_check_config_masks_secrets(make, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    make(
        [
            {
                "id": "h",
                "url": "https://hooks.example.com/x",
                "auth": "hmac",
                "hmac_secret_env": "H_SECRET",
            }
        ],
        toml=toml,
        env={"H_SECRET": SECRET},
    )
    url = broker_url(password="topsecret").replace("guest:", "u:", 1)
    result = dispatcher(
        "--config",
        str(toml),
        "check-config",
        env={"H_SECRET": SECRET, "DISPATCHER_BROKER_URL": url},
    )
    assert result.returncode == 0, result.stderr
    shown = orjson.loads(result.stdout)
    assert shown["broker"]["url"] == url.replace("topsecret", "***")
    assert shown["subscribers"][0]["hmac_secrets"] == ["***"]
    assert b"topsecret" not in result.stdout and SECRET.encode() not in result.stdout


def test_bad_config_and_usage_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[subscribers]]\nid = "a"\nurl = "https://x.example/h"\ntimeout = "10 sec"\n')
    result = dispatcher("--config", str(bad), "check-config")
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "dispatcher: config: subscribers[0].timeout: bad duration '10 sec' (use ms, s, m or h, "
        'e.g. "30s")'
    )
    missing = dispatcher("--config", str(tmp_path / "none.toml"), "run")
    assert missing.returncode == 2 and "config file not found" in one_line(missing.stderr)
    usage = dispatcher("frobnicate")
    assert usage.returncode == 2 and "invalid choice" in one_line(usage.stderr)


def test_unreachable_broker_is_a_runtime_failure_in_one_line(make, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    make([], toml=toml)
    result = dispatcher(
        "--config",
        str(toml),
        "publish",
        "-",
        stdin=event_body(),
        env={"DISPATCHER_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"},
    )
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("dispatcher: broker: ")


async def test_publish_file_and_stdin(make, receivers: ReceiverServer, tmp_path: Path) -> None:
    rec = receivers.add("r")
    toml = tmp_path / "c.toml"
    cfg = make([{"id": "r", "url": rec.url}], toml=toml)
    lines = tmp_path / "events.jsonl"
    lines.write_bytes(b"\n".join(event_body(n=i, event_id=f"p{i}") for i in range(5)) + b"\n")
    async with running(cfg):
        from_file = await asyncio.to_thread(
            dispatcher, "--config", str(toml), "publish", str(lines)
        )
        assert from_file.returncode == 0 and b"published 5 events" in from_file.stderr
        pretty = orjson.dumps(
            orjson.loads(event_body(n=9, event_id="p9")), option=orjson.OPT_INDENT_2
        )
        from_stdin = await asyncio.to_thread(
            dispatcher, "--config", str(toml), "publish", "-", stdin=pretty
        )
        assert from_stdin.returncode == 0
        assert await wait_until(lambda: rec.count == 6)
    assert sorted(rec.ids()) == ["p0", "p1", "p2", "p3", "p4", "p9"]
    assert pretty in [r.body for r in rec.requests]  # published exactly as given
    broken = await asyncio.to_thread(
        dispatcher,
        "--config",
        str(toml),
        "publish",
        "-",
        stdin=b'{"event": "Message.Bounced"}\nnot json\n',
    )
    assert broken.returncode == 2
    assert one_line(broken.stderr) == "dispatcher: publish: line 2: not valid JSON"


def test_keys_generate_rotate_jwks_prune(make, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    cfg = make([], toml=toml)
    gen = dispatcher("--config", str(toml), "keys", "generate")
    assert gen.returncode == 0 and b"generated EdDSA key" in gen.stdout
    first = orjson.loads(dispatcher("--config", str(toml), "keys", "jwks").stdout)["keys"]
    assert len(first) == 1 and first[0]["kty"] == "OKP" and "d" not in first[0]
    rot = dispatcher("--config", str(toml), "keys", "rotate", "--publish-lead", "0s")
    assert rot.returncode == 0, rot.stderr
    both = orjson.loads(dispatcher("--config", str(toml), "keys", "jwks").stdout)["keys"]
    assert len(both) == 2  # the old key stays published until its tokens have expired
    pruned = dispatcher("--config", str(toml), "keys", "prune")
    assert pruned.returncode == 0 and b"retired 0 keys" in pruned.stdout
    pems = sorted(p.name for p in Path(cfg.signing.keys_dir).glob("*.pem"))
    assert len(pems) == 2
    assert all((Path(cfg.signing.keys_dir) / p).stat().st_mode & 0o077 == 0 for p in pems)


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "config" / "dispatcher.toml"
    # The demo's own config, on the broker the tests use (the daemon honours the env override).
    result = dispatcher(
        "--config",
        str(config),
        "demo",
        cwd=str(tmp_path),
        env={"DISPATCHER_BROKER_URL": BROKER_URL},
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "demo OK" in out and "forged webhook              401 refused" in out
    assert "dead letters                0" in out


def test_config_is_accepted_before_or_after_the_command(make, names, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    make([], toml=toml)
    before = dispatcher("--config", str(toml), "check-config")
    after = dispatcher("check-config", "--config", str(toml))
    assert before.returncode == after.returncode == 0, after.stderr
    assert before.stdout == after.stdout
    nested = dispatcher("keys", "generate", "--config", str(toml))
    assert nested.returncode == 0, nested.stderr
    assert dispatcher("keys", "--config", str(toml), "jwks").returncode == 0
    # Given after the command it is the one used, not the default file.
    missing = dispatcher("run", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "config file not found" in one_line(missing.stderr)
    listed = dispatcher("dlq", "list", "--config", str(toml))
    assert listed.returncode == 1 and one_line(listed.stderr) == (  # not declared yet
        f"dispatcher: dlq: there is no queue {names.queue}.dead on the broker (the dispatcher "
        "declares it when it first starts with this config)"
    )
    policies = dispatcher("migrate-queues", "--config", str(toml))
    assert policies.returncode == 0 and policies.stdout.startswith(b"rabbitmqctl set_policy")
