"""Per-call cost of signing and verifying, against PyJWT's `jwt.encode` as the baseline.

    python -m loadtest.bench_signing [--iterations 20000] [--json]

Minting per algorithm (EdDSA, ES256, RS256) from one key ring holding a key of each, as the
dispatcher does with `algorithm=` per subscriber; verifying per algorithm through
`WebhookVerifier.verify` (async) and `verify_sync`.

Also runnable under pytest-benchmark: ``pytest loadtest/bench_signing.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signing import KeyRing, TokenMinter, WebhookVerifier, sign_hmac
from signing.tokens import body_sha256

ISSUER = "https://mail.example.com"
SUBJECT = "agent:webhook-dispatcher"
AUDIENCE = "https://subscriber.example.net/hooks/bounces"
WEBHOOK_ID = "evt_01HV8Z3K4Q2M5N6P7R8S9T0UVW"
BODY = orjson.dumps(
    {
        "event": "Message.Bounced",
        "timestamp": "2026-03-12T09:14:02Z",
        "data": {
            "messageid": "0100018e2c6f1d2a-5b7c9d3e-4f6a-4b8c-9d0e-1f2a3b4c5d6e-000000",
            "recipient": "nobody@example.org",
            "bounce_type": "HardBounce",
            "diagnostic_code": "smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected",
            "mta": "mx1.example.org",
        },
    }
)
BASELINE = "jwt.encode EdDSA"


@dataclass(frozen=True)
class Result:
    name: str
    iterations: int
    median_us: float
    p99_us: float
    mean_us: float


def _summarise(name: str, samples_ns: list[int]) -> Result:
    samples = sorted(samples_ns)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return Result(
        name,
        len(samples),
        statistics.median(samples) / 1000,
        p99 / 1000,
        statistics.fmean(samples) / 1000,
    )


def _samples(fn: Callable[[], object], iterations: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * iterations
    for i in range(iterations):
        start = clock()
        fn()
        samples[i] = clock() - start
    return samples


def _measure_interleaved(
    cases: list[tuple[str, Callable[[], object]]], iterations: int, rounds: int = 5
) -> list[Result]:
    """Run the cases in turns, so drift in CPU speed is shared rather than hitting one case."""
    for _, fn in cases:
        _samples(fn, min(1000, iterations))
    collected: dict[str, list[int]] = {name: [] for name, _ in cases}
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, fn in cases:
            gc.collect()
            collected[name] += _samples(fn, per_round)
    return [_summarise(name, samples) for name, samples in collected.items()]


async def _measure_async(
    name: str, make: Callable[[int], Callable[[], Awaitable[object]]], iterations: int
) -> Result:
    calls = [make(i) for i in range(iterations + min(1000, iterations))]
    for call in calls[iterations:]:
        await call()
    gc.collect()
    clock = time.perf_counter_ns
    samples = [0] * iterations
    for i in range(iterations):
        call = calls[i]
        start = clock()
        await call()
        samples[i] = clock() - start
    return _summarise(name, samples)


def _minter(keys_dir: Path, algorithm: str) -> tuple[KeyRing, TokenMinter]:
    ring = KeyRing.load(keys_dir / algorithm, algorithm)
    return ring, TokenMinter(ring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=300)


def _pyjwt_encode(ring: KeyRing, algorithm: str = "EdDSA") -> Callable[[], str]:
    key = ring.signing_key(algorithm=algorithm)
    headers = {"kid": key.kid, "typ": "webhook+jwt"}

    def encode() -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": SUBJECT,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "jti": base64.urlsafe_b64encode(os.urandom(12)).decode(),
            "scope": "webhooks:deliver",
            "webhook_id": WEBHOOK_ID,
            "body_sha256": body_sha256(BODY),
        }
        return jwt.encode(claims, key.private_key, algorithm=algorithm, headers=headers)

    return encode


def _requests(minter: TokenMinter, algorithm: str, n: int) -> list[dict[str, str]]:
    tokens = [
        minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY, algorithm=algorithm)
        for _ in range(n)
    ]
    return [{"authorization": f"Bearer {t}", "webhook-id": WEBHOOK_ID} for t in tokens]


async def _verify_case(
    ring: KeyRing, minter: TokenMinter, algorithm: str, iterations: int
) -> Result:
    requests = _requests(minter, algorithm, iterations + min(1000, iterations))
    async with WebhookVerifier(jwks=ring.jwks(), audience=AUDIENCE, issuer=ISSUER) as verifier:

        def make(i: int) -> Callable[[], Awaitable[object]]:
            headers = requests[i]
            return lambda: verifier.verify(headers, BODY)

        return await _measure_async(f"WebhookVerifier.verify {algorithm}", make, iterations)


def _verify_sync_case(
    ring: KeyRing, minter: TokenMinter, algorithm: str, iterations: int
) -> Result:
    warmup = min(1000, iterations)
    requests = iter(_requests(minter, algorithm, 5 * (iterations // 5) + warmup))
    verifier = WebhookVerifier(jwks=ring.jwks(), audience=AUDIENCE, issuer=ISSUER)
    name = f"WebhookVerifier.verify_sync {algorithm}"
    return _measure_interleaved(
        [(name, lambda: verifier.verify_sync(next(requests), BODY))], iterations
    )[0]


def run(iterations: int) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = Path(tmp)
        ring = KeyRing.load(keys_dir / "all", "EdDSA", algorithms=["ES256", "RS256"])
        minter = TokenMinter(ring, issuer=ISSUER, subject=SUBJECT, ttl_seconds=300)
        ed_key = ring.signing_key(algorithm="EdDSA").private_key
        assert isinstance(ed_key, Ed25519PrivateKey)
        signing_input = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
        signing_input_bytes = signing_input.rsplit(".", 1)[0].encode()
        secret = os.urandom(32)

        def mint(algorithm: str | None, account: str | None = None) -> Callable[[], str]:
            return lambda: minter.mint(
                audience=AUDIENCE,
                webhook_id=WEBHOOK_ID,
                body=BODY,
                algorithm=algorithm,
                account=account,
            )

        cases: list[tuple[str, Callable[[], object]]] = [
            ("TokenMinter.mint EdDSA", mint(None)),
            ("TokenMinter.mint EdDSA+account", mint("EdDSA", "acme")),
            ("TokenMinter.mint ES256", mint("ES256")),
            ("TokenMinter.mint RS256", mint("RS256")),
            (BASELINE, _pyjwt_encode(ring)),
            ("jwt.encode ES256", _pyjwt_encode(ring, "ES256")),
            ("jwt.encode RS256", _pyjwt_encode(ring, "RS256")),
            ("raw Ed25519 sign", lambda: ed_key.sign(signing_input_bytes)),
            (
                "HMAC sign (1 secret)",
                lambda: sign_hmac([secret], WEBHOOK_ID, int(time.time()), BODY),
            ),
        ]
        results = _measure_interleaved(cases, iterations)
        for algorithm in ("EdDSA", "ES256", "RS256"):
            results.append(asyncio.run(_verify_case(ring, minter, algorithm, iterations)))
            results.append(_verify_sync_case(ring, minter, algorithm, iterations))
        return results


def _table(results: list[Result]) -> str:
    baseline = next(r for r in results if r.name == BASELINE).median_us
    lines = [f"{'case':<34} {'median us':>10} {'p99 us':>10} {'mean us':>10} {'vs baseline':>12}"]
    for r in results:
        ratio = r.median_us / baseline
        figures = f"{r.median_us:>10.1f} {r.p99_us:>10.1f} {r.mean_us:>10.1f} {ratio:>11.2f}x"
        lines.append(f"{r.name:<34} {figures}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    results = run(args.iterations)
    if args.json:
        document: dict[str, Any] = {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "baseline": BASELINE,
            "results": [asdict(r) for r in results],
        }
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(_table(results))
    return 0


# -- pytest-benchmark entry points (collected only when this file is named on the command line) --


def test_bench_mint_eddsa(benchmark: Any, tmp_path: Path) -> None:
    _, minter = _minter(tmp_path, "EdDSA")
    benchmark(lambda: minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY))


def test_bench_pyjwt_encode_eddsa(benchmark: Any, tmp_path: Path) -> None:
    ring, _ = _minter(tmp_path, "EdDSA")
    benchmark(_pyjwt_encode(ring))


if __name__ == "__main__":
    raise SystemExit(main())
