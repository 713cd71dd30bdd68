"""Signing keys on disk: generation, loading, rotation and pruning.

Layout of a keys directory::

    <kid>.pem       PKCS8 private key, unencrypted, mode 0600
    keyring.json    schedule per kid: created_at, activates_at, retires_at (unix seconds)
    retired/        PEMs moved out by `prune`

A key is published (in the JWKS) from creation until `retires_at`, and signs from `activates_at`
until a newer key activates. A PEM with no manifest entry is active from its file mtime and never
retires, so a key placed by hand just works. Writers record the schedule before the PEM appears,
so a reader never mistakes a key scheduled for later for a hand-placed one.

Each JWS algorithm (EdDSA, ES256, RS256) has its own active key: a ring signs with the newest
active key of the algorithm asked for, rotation replaces the keys of one algorithm, and the JWKS
publishes the keys of every algorithm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .jose import ALGORITHMS, PublicKey, b64url_encode

__all__ = [
    "ALGORITHMS",
    "KeyRing",
    "KeyRingError",
    "SigningKey",
    "generate_key",
    "jwk_thumbprint",
    "prune",
    "rotate",
]

RSA_KEY_BITS = 2048  # new RS256 keys; hand-placed ones may be larger
_MIN_RSA_BITS = 2048
MANIFEST_NAME = "keyring.json"
RETIRED_DIR = "retired"
_LOCK_NAME = ".keyring.lock"

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyRingError(Exception):
    """A keys directory or key file cannot be used; the message says which and why."""


def _public_members(public_key: PublicKey) -> dict[str, str]:
    """The RFC 7638 required members of a public JWK, in lexicographic order."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        return {
            "e": b64url_encode(_int_bytes(rsa_numbers.e)),
            "kty": "RSA",
            "n": b64url_encode(_int_bytes(rsa_numbers.n)),
        }
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }


def _int_bytes(value: int) -> bytes:
    """Big-endian bytes of a positive integer, without leading zeros (JWA base64urlUInt)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of a public key."""
    members = json.dumps(_public_members(public_key), sort_keys=True, separators=(",", ":"))
    return b64url_encode(hashlib.sha256(members.encode("utf-8")).digest())


def _algorithm_of(private_key: object) -> str | None:
    if isinstance(private_key, Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return "ES256"
    if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size >= _MIN_RSA_BITS:
        return "RS256"
    return None


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        choices = ", ".join(ALGORITHMS[:-1]) + " or " + ALGORITHMS[-1]
        raise KeyRingError(f"unsupported algorithm {algorithm!r}; use {choices}")


@dataclass(frozen=True)
class SigningKey:
    """A private key with its JWS algorithm and publication schedule."""

    kid: str
    alg: str
    private_key: PrivateKey = field(repr=False, compare=False)
    created_at: float
    activates_at: float
    retires_at: float | None

    def sign(self, data: bytes) -> bytes:
        """JWS signature over `data` (ES256: raw r||s, 64 bytes, not DER)."""
        key = self.private_key
        if isinstance(key, Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK, ready for a JWKS document."""
        members = _public_members(self.private_key.public_key())
        return {**members, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def is_retired(self, now: float) -> bool:
        return self.retires_at is not None and self.retires_at <= now

    def _manifest_entry(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "created_at": self.created_at,
            "activates_at": self.activates_at,
            "retires_at": self.retires_at,
        }


@dataclass(frozen=True)
class _KeyFile:
    key: SigningKey
    path: Path


# -- manifest -------------------------------------------------------------------------------------


def _read_manifest(keys_dir: Path) -> dict[str, dict[str, Any]]:
    path = keys_dir / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyRingError(f"cannot read {path}: {exc.strerror}") from None
    try:
        document = json.loads(raw)
        entries = document["keys"]
        if not isinstance(entries, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise KeyRingError(f"{path} is not a valid keyring manifest") from None
    for kid, entry in entries.items():
        if not _valid_entry(entry):
            raise KeyRingError(f"{path} has an invalid entry for kid {kid}")
    return dict(entries)


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or entry.get("alg") not in ALGORITHMS:
        return False
    numbers = [entry.get("created_at"), entry.get("activates_at")]
    if entry.get("retires_at") is not None:
        numbers.append(entry["retires_at"])
    return all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)


def _write_manifest(keys_dir: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    document = {"keys": {kid: dict(entries[kid]) for kid in sorted(entries)}}
    _write_atomic(keys_dir / MANIFEST_NAME, json.dumps(document, indent=2).encode() + b"\n", 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except PermissionError:
        raise KeyRingError(f"keys_dir {path.parent} is not writable") from None
    except OSError as exc:
        raise KeyRingError(f"cannot write {path}: {exc.strerror}") from None


# -- loading --------------------------------------------------------------------------------------


def _load_key_file(path: Path) -> _KeyFile:
    """Load one PEM; its schedule defaults to active from the file's mtime, never retiring."""
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            mode = oct(st.st_mode & 0o777)[2:]
            raise KeyRingError(
                f"key file {path.name} is readable by other users (mode 0{mode}); chmod 600 it"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise KeyRingError(f"cannot read key file {path.name}: {exc.strerror}") from None
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private_key = None
    alg = _algorithm_of(private_key)
    if alg is None:
        raise KeyRingError(
            f"key file {path.name} is not a PKCS8 Ed25519, P-256 or RSA (2048+ bits) private key"
        )
    assert isinstance(
        private_key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    )
    kid = jwk_thumbprint(private_key.public_key())
    return _KeyFile(SigningKey(kid, alg, private_key, st.st_mtime, st.st_mtime, None), path)


def _with_schedule(loaded: _KeyFile, entry: Mapping[str, Any]) -> _KeyFile:
    key = loaded.key
    if entry["alg"] != key.alg:
        raise KeyRingError(
            f"key file {loaded.path.name} is {key.alg} but {MANIFEST_NAME} says {entry['alg']}"
        )
    retires_at = entry.get("retires_at")
    scheduled = replace(
        key,
        created_at=float(entry["created_at"]),
        activates_at=float(entry["activates_at"]),
        retires_at=None if retires_at is None else float(retires_at),
    )
    return _KeyFile(scheduled, loaded.path)


def _scan(keys_dir: Path) -> list[_KeyFile]:
    """Every key in the directory, deduplicated by kid, in file-name order."""
    manifest = _read_manifest(keys_dir)
    found: dict[str, _KeyFile] = {}
    for path in sorted(keys_dir.glob("*.pem")):
        if not path.is_file():
            continue
        # The kid is the thumbprint of the key, whatever the file is called.
        loaded = _load_key_file(path)
        entry = manifest.get(loaded.key.kid)
        found.setdefault(loaded.key.kid, loaded if entry is None else _with_schedule(loaded, entry))
    return list(found.values())


def _stamp(keys_dir: Path) -> tuple[object, ...]:
    """Cheap fingerprint of the directory: changes whenever keys or the schedule change."""
    try:
        dir_mtime = keys_dir.stat().st_mtime_ns
        names = frozenset(e.name for e in os.scandir(keys_dir) if e.name.endswith(".pem"))
    except OSError:
        return (None,)
    try:
        m = (keys_dir / MANIFEST_NAME).stat()
        manifest: tuple[int, int, int] | None = (m.st_mtime_ns, m.st_ino, m.st_size)
    except OSError:
        manifest = None
    return (dir_mtime, names, manifest)


def _ensure_dir(keys_dir: str | Path) -> Path:
    path = Path(keys_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except PermissionError:
        raise KeyRingError(f"keys_dir {path} is not writable") from None
    except OSError as exc:
        raise KeyRingError(f"cannot create keys_dir {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise KeyRingError(f"keys_dir {path} is not writable")
    return path


@contextlib.contextmanager
def _locked(keys_dir: Path) -> Iterator[None]:
    """Serialise writers (the daemon's first start, a rotation, a prune) on one keys_dir."""
    import fcntl  # POSIX only, and only writers need it: receivers may run anywhere

    try:
        fd = os.open(keys_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        raise KeyRingError(f"keys_dir {keys_dir} is not writable") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the ring -------------------------------------------------------------------------------------


class KeyRing:
    """The keys of one directory: which of them signs, per algorithm, and which are published.

    `default_algorithm` is what `signing_key()` and a minter use when no algorithm is asked for.
    """

    def __init__(
        self,
        keys_dir: Path,
        keys: Sequence[SigningKey],
        stamp: tuple[object, ...],
        *,
        default_algorithm: str = "EdDSA",
    ):
        _check_algorithm(default_algorithm)
        self._keys_dir = keys_dir
        self._keys = tuple(keys)
        self._stamp = stamp
        self._default_algorithm = default_algorithm

    @classmethod
    def load(
        cls,
        keys_dir: str | Path,
        algorithm: str = "EdDSA",
        *,
        create_if_empty: bool = True,
        algorithms: Iterable[str] = (),
    ) -> KeyRing:
        """Load every key in `keys_dir`, `algorithm` being the default one.

        With `create_if_empty` (the default), each of `algorithm` and `algorithms` that has no
        unretired key gets one, active now. Without it nothing is written, and a directory with
        no key at all is an error.
        """
        wanted = dict.fromkeys([algorithm, *algorithms])
        for alg in wanted:
            _check_algorithm(alg)
        path = Path(keys_dir)
        if create_if_empty:
            path = _ensure_dir(path)
        elif not path.is_dir():
            raise KeyRingError(f"keys_dir {path} does not exist")
        stamp = _stamp(path)
        files = _scan(path)
        if not create_if_empty:
            if not files:
                raise KeyRingError(f"keys_dir {path} has no keys")
        elif _missing((f.key for f in files), wanted, time.time()):
            _create_missing(path, wanted)
            stamp = _stamp(path)
            files = _scan(path)
        return cls(path, [f.key for f in files], stamp, default_algorithm=algorithm)

    @property
    def keys_dir(self) -> Path:
        return self._keys_dir

    @property
    def default_algorithm(self) -> str:
        return self._default_algorithm

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """Every loaded key, retired or not."""
        return self._keys

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms that have an unretired key."""
        now = time.time()
        return frozenset(k.alg for k in self._keys if not k.is_retired(now))

    def signing_key(self, now: float | None = None, algorithm: str | None = None) -> SigningKey:
        """The active, unretired key of `algorithm` (default: the ring's) that activated last."""
        t = time.time() if now is None else now
        alg = self._default_algorithm if algorithm is None else algorithm
        candidates = [
            k for k in self._keys if k.alg == alg and k.activates_at <= t and not k.is_retired(t)
        ]
        if not candidates:
            _check_algorithm(alg)
            raise KeyRingError(f"keys_dir {self._keys_dir} has no active {alg} signing key")
        return max(candidates, key=lambda k: (k.activates_at, k.created_at, k.kid))

    def ensure(self, algorithm: str) -> SigningKey:
        """Make sure `algorithm` has a key, creating one active now if it has none; returns it.

        Safe to call from several processes at once on one keys_dir (one of them creates it).
        """
        _check_algorithm(algorithm)
        if _missing(self._keys, [algorithm], time.time()):
            _create_missing(self._keys_dir, [algorithm])
            self._keys = tuple(f.key for f in _scan(self._keys_dir))
            self._stamp = _stamp(self._keys_dir)
        return self.signing_key(algorithm=algorithm)

    def published(self, now: float | None = None) -> list[SigningKey]:
        """Every key that may still verify a live token, including keys not yet signing."""
        t = time.time() if now is None else now
        return [k for k in self._keys if not k.is_retired(t)]

    def jwks(self, now: float | None = None) -> dict[str, list[dict[str, str]]]:
        """The JWKS document to serve at /.well-known/jwks.json."""
        return {"keys": [k.public_jwk() for k in self.published(now)]}

    def reload_if_changed(self) -> bool:
        """Reload when the directory or manifest changed; True if it did.

        On a broken directory (say, a key copied in with the wrong mode) this raises KeyRingError
        and keeps the keys it had, and tries again on the next call.
        """
        stamp = _stamp(self._keys_dir)
        if stamp == self._stamp:
            return False
        self._keys = tuple(f.key for f in _scan(self._keys_dir))
        self._stamp = stamp
        return True


def _missing(keys: Iterable[SigningKey], wanted: Iterable[str], now: float) -> list[str]:
    """The wanted algorithms without an unretired key (active now or scheduled)."""
    have = {k.alg for k in keys if not k.is_retired(now)}
    return [alg for alg in wanted if alg not in have]


def _create_missing(keys_dir: Path, wanted: Iterable[str]) -> None:
    """Under the lock, look again and create a key, active now, for each algorithm still missing."""
    with _locked(keys_dir):
        now = time.time()
        for alg in _missing((f.key for f in _scan(keys_dir)), wanted, now):
            manifest = _read_manifest(keys_dir)
            _create_key(keys_dir, alg, manifest, now=now, activates_at=math.floor(now))


# -- writers --------------------------------------------------------------------------------------


def _new_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "EdDSA":
        return Ed25519PrivateKey.generate()
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _create_key(
    keys_dir: Path,
    algorithm: str,
    manifest: dict[str, dict[str, Any]],
    *,
    now: float,
    activates_at: float,
) -> SigningKey:
    """Record the new key's schedule, then write its PEM. Caller holds the lock."""
    private_key = _new_private_key(algorithm)
    kid = jwk_thumbprint(private_key.public_key())
    key = SigningKey(kid, algorithm, private_key, now, activates_at, None)
    manifest[kid] = key._manifest_entry()
    _write_manifest(keys_dir, manifest)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(keys_dir / f"{kid}.pem", pem, 0o600)
    return key


def generate_key(
    keys_dir: str | Path, algorithm: str = "EdDSA", *, activates_at: float | None = None
) -> SigningKey:
    """Create a key in `keys_dir`, signing from `activates_at` (default: the current second)."""
    _check_algorithm(algorithm)
    path = _ensure_dir(keys_dir)
    now = time.time()
    with _locked(path):
        manifest = _read_manifest(path)
        return _create_key(
            path,
            algorithm,
            manifest,
            now=now,
            activates_at=math.floor(now) if activates_at is None else activates_at,
        )


def rotate(
    keys_dir: str | Path,
    algorithm: str = "EdDSA",
    *,
    publish_lead: float,
    retire_after: float,
    now: float | None = None,
) -> tuple[SigningKey, list[SigningKey]]:
    """Publish a new `algorithm` key now that signs from now + publish_lead; retire the old ones.

    Every unretired older key of the same algorithm retires at new.activates_at + retire_after
    (pass token TTL plus the JWKS cache max-age), or earlier if it was already scheduled to; keys
    of other algorithms are left alone. Returns (new key, retiring).
    """
    _check_algorithm(algorithm)
    if publish_lead < 0 or retire_after < 0:
        raise KeyRingError("publish_lead and retire_after must not be negative")
    t = time.time() if now is None else now
    path = _ensure_dir(keys_dir)
    with _locked(path):
        manifest = _read_manifest(path)
        activates_at = t + publish_lead
        retires_at = activates_at + retire_after
        retiring: list[SigningKey] = []
        for old in (f.key for f in _scan(path)):
            if old.alg != algorithm or old.is_retired(t):
                continue
            when = retires_at if old.retires_at is None else min(old.retires_at, retires_at)
            scheduled = replace(old, retires_at=when)
            manifest[old.kid] = scheduled._manifest_entry()
            retiring.append(scheduled)
        new = _create_key(path, algorithm, manifest, now=t, activates_at=activates_at)
    return new, retiring


def prune(keys_dir: str | Path, now: float | None = None) -> list[str]:
    """Move the PEMs of retired keys to `retired/` and forget them; returns their kids."""
    t = time.time() if now is None else now
    path = _ensure_dir(keys_dir)
    with _locked(path):
        manifest = _read_manifest(path)
        retired = [f for f in _scan(path) if f.key.is_retired(t)]
        if not retired:
            return []
        archive = path / RETIRED_DIR
        try:
            archive.mkdir(mode=0o700, exist_ok=True)
            # Move the PEM first: a PEM without its manifest entry would count as hand-placed.
            for f in retired:
                os.replace(f.path, archive / f.path.name)
        except OSError as exc:
            raise KeyRingError(f"cannot move retired keys to {archive}: {exc.strerror}") from None
        for f in retired:
            manifest.pop(f.key.kid, None)
        _write_manifest(path, manifest)
    return [f.key.kid for f in retired]
