"""`dispatcher keys generate|rotate --algorithm`: one active key per algorithm, rotated alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from signing import KeyRing


def _keys(toml: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "--config", str(toml), "keys", *args],
        capture_output=True,
        timeout=120,
        env=dict(os.environ),
    )


def test_generate_and_rotate_per_algorithm(make, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    cfg = make([], toml=toml)
    for algorithm in ("EdDSA", "ES256", "RS256"):
        gen = _keys(toml, "generate", "--algorithm", algorithm)
        assert gen.returncode == 0, gen.stderr
        assert f"generated {algorithm} key".encode() in gen.stdout
    jwks = orjson.loads(_keys(toml, "jwks").stdout)["keys"]
    assert sorted(k["alg"] for k in jwks) == ["ES256", "EdDSA", "RS256"]
    before = KeyRing.load(cfg.signing.keys_dir)

    rot = _keys(toml, "rotate", "--algorithm", "ES256", "--publish-lead", "0s")
    assert rot.returncode == 0, rot.stderr
    assert b"new ES256 key" in rot.stdout

    after = KeyRing.load(cfg.signing.keys_dir)
    retiring = {k.alg for k in after.keys if k.retires_at is not None}
    assert retiring == {"ES256"}  # EdDSA and RS256 keys were left alone
    assert after.signing_key(algorithm="ES256").kid != before.signing_key(algorithm="ES256").kid
    assert after.signing_key(algorithm="EdDSA").kid == before.signing_key(algorithm="EdDSA").kid


def test_unknown_algorithm_is_a_usage_error(make, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    make([], toml=toml)
    result = _keys(toml, "rotate", "--algorithm", "HS256")
    assert result.returncode == 2
    assert b"--algorithm" in result.stderr
