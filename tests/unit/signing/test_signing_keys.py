"""Keys on disk: generation, loading, the kid, rotation and pruning."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwcrypto import jwk

from signing import KeyRing, KeyRingError, generate_key, prune, rotate


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_pem(path: Path, private_key: object, mode: int = 0o600) -> None:
    pem = private_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, mode)


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_load_creates_one_private_active_key(tmp_path: Path, algorithm: str) -> None:
    keys_dir = tmp_path / "keys"
    ring = KeyRing.load(keys_dir, algorithm)

    key = ring.signing_key()
    assert key.alg == algorithm
    assert ring.keys_dir == keys_dir
    assert _mode(keys_dir) == 0o700
    pem = keys_dir / f"{key.kid}.pem"
    assert _mode(pem) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    manifest = json.loads((keys_dir / "keyring.json").read_text())
    entry = manifest["keys"][key.kid]
    assert entry == {
        "kid": key.kid,
        "alg": algorithm,
        "created_at": key.created_at,
        "activates_at": key.activates_at,
        "retires_at": None,
    }
    assert [k.kid for k in KeyRing.load(keys_dir, algorithm).keys] == [key.kid]


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_kid_is_the_rfc7638_thumbprint(tmp_path: Path, algorithm: str) -> None:
    key = generate_key(tmp_path, algorithm)
    pem = (tmp_path / f"{key.kid}.pem").read_bytes()
    assert key.kid == jwk.JWK.from_pem(pem).thumbprint()
    public = key.public_jwk()
    assert jwk.JWK(**public).thumbprint() == key.kid
    assert public["kid"] == key.kid
    assert public["alg"] == algorithm
    assert public["use"] == "sig"
    assert "d" not in public


def test_ed25519_jwk_members(tmp_path: Path) -> None:
    public = generate_key(tmp_path).public_jwk()
    assert set(public) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (public["kty"], public["crv"]) == ("OKP", "Ed25519")


def test_es256_signature_is_raw_r_s(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "ES256")
    public = key.public_jwk()
    assert set(public) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    signature = key.sign(b"payload")
    assert len(signature) == 64
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    public_key = key.private_key.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(encode_dss_signature(r, s), b"payload", ec.ECDSA(hashes.SHA256()))


def test_rotation_publishes_before_signing_and_retires_after(tmp_path: Path) -> None:
    old = generate_key(tmp_path, activates_at=1000)
    new, retiring = rotate(tmp_path, publish_lead=60, retire_after=360, now=2000)

    assert new.activates_at == 2060
    assert [k.kid for k in retiring] == [old.kid]
    assert retiring[0].retires_at == 2060 + 360

    ring = KeyRing.load(tmp_path)
    assert {k.kid for k in ring.published(2000)} == {old.kid, new.kid}
    assert ring.signing_key(2000).kid == old.kid
    assert ring.signing_key(2059).kid == old.kid
    assert ring.signing_key(2060).kid == new.kid
    assert {k["kid"] for k in ring.jwks(2419)["keys"]} == {old.kid, new.kid}
    assert [k.kid for k in ring.published(2420)] == [new.kid]

    assert prune(tmp_path, now=2419) == []
    assert prune(tmp_path, now=2420) == [old.kid]
    assert (tmp_path / "retired" / f"{old.kid}.pem").exists()
    assert not (tmp_path / f"{old.kid}.pem").exists()
    assert old.kid not in json.loads((tmp_path / "keyring.json").read_text())["keys"]
    assert ring.reload_if_changed()
    assert [k.kid for k in ring.keys] == [new.kid]


def test_second_rotation_does_not_extend_an_earlier_retirement(tmp_path: Path) -> None:
    first = generate_key(tmp_path, activates_at=1000)
    second, _ = rotate(tmp_path, publish_lead=60, retire_after=360, now=2000)
    third, retiring = rotate(tmp_path, publish_lead=60, retire_after=360, now=2010)

    schedule = {k.kid: k.retires_at for k in retiring}
    assert schedule == {first.kid: 2420, second.kid: 2070 + 360}
    ring = KeyRing.load(tmp_path)
    assert ring.signing_key(2065).kid == second.kid
    assert ring.signing_key(2070).kid == third.kid


def test_rotation_replaces_only_the_keys_of_its_algorithm(tmp_path: Path) -> None:
    ed = generate_key(tmp_path, activates_at=1000)
    es = generate_key(tmp_path, "ES256", activates_at=1000)
    new, retiring = rotate(tmp_path, "ES256", publish_lead=60, retire_after=360, now=2000)
    assert [k.kid for k in retiring] == [es.kid]

    ring = KeyRing.load(tmp_path, "ES256")
    assert ring.signing_key(2059).kid == es.kid
    assert ring.signing_key(2060).kid == new.kid
    assert ring.signing_key(2060, "EdDSA").kid == ed.kid
    assert {k.kid for k in ring.published(2420)} == {ed.kid, new.kid}
    assert prune(tmp_path, now=2420) == [es.kid]


def test_default_algorithm_decides_what_signs(tmp_path: Path) -> None:
    ed = generate_key(tmp_path, activates_at=1000)
    es = generate_key(tmp_path, "ES256", activates_at=1000)
    assert KeyRing.load(tmp_path).signing_key().kid == ed.kid
    ring = KeyRing.load(tmp_path, "ES256")
    assert (ring.default_algorithm, ring.signing_key().kid) == ("ES256", es.kid)
    assert ring.algorithms == {"EdDSA", "ES256"}


def test_load_creates_a_key_for_each_algorithm_asked_for(tmp_path: Path) -> None:
    ed = generate_key(tmp_path, activates_at=1000)
    ring = KeyRing.load(tmp_path, "EdDSA", algorithms=["ES256", "RS256"])
    assert ring.signing_key().kid == ed.kid
    assert {k.alg for k in ring.keys} == {"EdDSA", "ES256", "RS256"}
    assert {k["kty"] for k in ring.jwks()["keys"]} == {"OKP", "EC", "RSA"}
    again = KeyRing.load(tmp_path, "RS256", algorithms=["ES256"])
    assert {k.kid for k in again.keys} == {k.kid for k in ring.keys}  # nothing new


def test_load_without_create_adds_nothing(tmp_path: Path) -> None:
    generate_key(tmp_path)
    ring = KeyRing.load(tmp_path, "ES256", create_if_empty=False)
    assert [k.alg for k in ring.keys] == ["EdDSA"]
    with pytest.raises(KeyRingError, match="no active ES256 signing key"):
        ring.signing_key()


def test_ensure_creates_once_and_other_rings_agree(tmp_path: Path) -> None:
    first = KeyRing.load(tmp_path)
    second = KeyRing.load(tmp_path)
    created = first.ensure("ES256")
    assert created.alg == "ES256"
    assert second.ensure("ES256").kid == created.kid  # found on disk, not created again
    assert first.ensure("ES256").kid == created.kid
    assert [k.alg for k in KeyRing.load(tmp_path).keys].count("ES256") == 1
    assert first.signing_key().alg == "EdDSA"  # the default is unchanged
    with pytest.raises(KeyRingError, match="unsupported algorithm 'HS256'"):
        first.ensure("HS256")


def test_ensure_replaces_an_algorithm_whose_keys_all_retired(tmp_path: Path) -> None:
    old = generate_key(tmp_path, "ES256", activates_at=1000)
    manifest_path = tmp_path / "keyring.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["keys"][old.kid]["retires_at"] = 1500
    manifest_path.write_text(json.dumps(manifest))
    ring = KeyRing.load(tmp_path, "ES256")
    new = ring.signing_key()
    assert new.kid != old.kid and new.alg == "ES256"
    assert ring.ensure("ES256").kid == new.kid


def test_rs256_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "RS256")
    public = key.public_jwk()
    assert set(public) == {"kty", "n", "e", "kid", "alg", "use"}
    assert (public["kty"], public["alg"], public["e"]) == ("RSA", "RS256", "AQAB")
    pem = (tmp_path / f"{key.kid}.pem").read_bytes()
    assert key.kid == jwk.JWK.from_pem(pem).thumbprint()
    signature = key.sign(b"payload")
    assert len(signature) == 256
    public_key = key.private_key.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, b"payload", padding.PKCS1v15(), hashes.SHA256())


def test_hand_placed_rsa_key_loads_as_rs256(tmp_path: Path) -> None:
    _write_pem(tmp_path / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=3072))
    ring = KeyRing.load(tmp_path, "RS256")
    assert [(k.alg, k.private_key.key_size) for k in ring.keys] == [("RS256", 3072)]  # type: ignore[union-attr]


def test_hand_placed_pem_is_active_from_its_mtime_and_never_retires(tmp_path: Path) -> None:
    private_key = Ed25519PrivateKey.generate()
    path = tmp_path / "from-the-vault.pem"
    _write_pem(path, private_key)
    os.utime(path, (1500, 1500))

    ring = KeyRing.load(tmp_path, create_if_empty=False)
    key = ring.signing_key(1500)
    assert key.kid == jwk.JWK.from_pem(path.read_bytes()).thumbprint()
    assert (key.activates_at, key.retires_at) == (1500, None)
    with pytest.raises(KeyRingError, match="no active EdDSA signing key"):
        ring.signing_key(1499)

    # Rotation gives the hand-placed key a schedule like any other.
    new, retiring = rotate(tmp_path, publish_lead=10, retire_after=20, now=2000)
    assert [k.kid for k in retiring] == [key.kid]
    assert ring.reload_if_changed()
    assert [k.kid for k in ring.published(2030)] == [new.kid]


def test_hand_placed_sec1_p256_key_loads(tmp_path: Path) -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    ring = KeyRing.load(tmp_path, "ES256")
    assert [k.alg for k in ring.keys] == ["ES256"]  # the hand-placed key; nothing created


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        ),
    ],
    ids=["garbage", "bad-der", "rsa1024", "p384", "encrypted"],
)
def test_unusable_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(
        KeyRingError,
        match=r"^key file bad.pem is not a PKCS8 Ed25519, P-256 or RSA \(2048\+ bits\)",
    ):
        KeyRing.load(tmp_path)


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    _write_pem(tmp_path / "loose.pem", Ed25519PrivateKey.generate(), mode=0o644)
    with pytest.raises(KeyRingError) as caught:
        KeyRing.load(tmp_path)
    assert str(caught.value) == (
        "key file loose.pem is readable by other users (mode 0644); chmod 600 it"
    )


def test_manifest_alg_must_match_the_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path)
    manifest_path = tmp_path / "keyring.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["keys"][key.kid]["alg"] = "ES256"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(KeyRingError, match=r"is EdDSA but keyring\.json says ES256"):
        KeyRing.load(tmp_path)


def test_corrupt_manifest_is_refused(tmp_path: Path) -> None:
    generate_key(tmp_path)
    (tmp_path / "keyring.json").write_text("{not json")
    with pytest.raises(KeyRingError, match="not a valid keyring manifest"):
        KeyRing.load(tmp_path)


def test_empty_dir_without_create(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="has no keys"):
        KeyRing.load(tmp_path, create_if_empty=False)
    with pytest.raises(KeyRingError, match="does not exist"):
        KeyRing.load(tmp_path / "missing", create_if_empty=False)


def test_unsupported_algorithm(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="unsupported algorithm 'HS256'"):
        KeyRing.load(tmp_path, "HS256")
    with pytest.raises(KeyRingError, match="unsupported algorithm 'none'"):
        KeyRing.load(tmp_path, algorithms=["none"])


def test_unwritable_keys_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyRingError, match="keys_dir"):
        KeyRing.load(tmp_path / "file" / "keys")


def test_reload_if_changed(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path)
    assert not ring.reload_if_changed()
    added = generate_key(tmp_path, activates_at=ring.signing_key().activates_at + 1)
    assert ring.reload_if_changed()
    assert not ring.reload_if_changed()
    assert ring.signing_key(added.activates_at).kid == added.kid


def test_reload_keeps_the_old_keys_while_the_directory_is_broken(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path)
    before = ring.keys
    _write_pem(tmp_path / "copied.pem", Ed25519PrivateKey.generate(), mode=0o644)
    with pytest.raises(KeyRingError, match="readable by other users"):
        ring.reload_if_changed()
    assert ring.keys == before
    (tmp_path / "copied.pem").chmod(0o600)
    assert ring.reload_if_changed()
    assert len(ring.keys) == 2


def test_rotation_without_lead_switches_at_once(tmp_path: Path) -> None:
    generate_key(tmp_path, activates_at=1000)
    rotate(tmp_path, publish_lead=0, retire_after=0, now=2000)
    ring = KeyRing.load(tmp_path)
    assert len(ring.published(2000)) == 1
    assert ring.signing_key(2000).activates_at == 2000


def test_signing_key_repr_hides_the_private_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path)
    assert "private_key" not in repr(key)
