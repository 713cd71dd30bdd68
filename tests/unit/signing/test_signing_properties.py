"""Property tests: whatever arrives, the verifier either accepts the untouched webhook or raises
VerificationError; a mutated token or body is never accepted. `verify` and `verify_sync` give
the same answer every time."""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signing_helpers import AUDIENCE, BODY, ISSUER, WEBHOOK_ID, headers_for, make_minter

from signing import KeyRing, TokenMinter, VerificationError, WebhookVerifier, sign_hmac
from signing.errors import REASONS


class _RememberNothing:
    """A replay cache that records nothing, so one token can be checked many times."""

    async def seen(self, jti: str, expires_at: float) -> bool:
        return False

    def seen_sync(self, jti: str, expires_at: float) -> bool:
        return False


@pytest.fixture(scope="module", params=["EdDSA", "ES256", "RS256"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[KeyRing, TokenMinter, bytes]]:
    with tempfile.TemporaryDirectory() as keys_dir:
        ring = KeyRing.load(keys_dir, request.param)
        yield ring, make_minter(ring), os.urandom(32)


def _verifier(ring: KeyRing, secret: bytes | None = None) -> WebhookVerifier:
    return WebhookVerifier(
        jwks=ring.jwks(),
        audience=AUDIENCE,
        issuer=ISSUER,
        replay_cache=_RememberNothing(),
        hmac_secrets=None if secret is None else "whsec_" + base64.b64encode(secret).decode(),
    )


def _refused(runner: asyncio.Runner, verifier: WebhookVerifier, headers: Any, body: bytes) -> str:
    try:
        runner.run(verifier.verify(headers, body))
    except VerificationError as exc:
        assert exc.reason in REASONS
        reason = exc.reason
    else:
        raise AssertionError("accepted")
    with pytest.raises(VerificationError) as caught:
        verifier.verify_sync(headers, body)
    assert caught.value.reason == reason
    return reason


_PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_PROPERTY
@given(token=st.text(max_size=400), webhook_id=st.text(max_size=40))
def test_random_text_is_refused(
    setup: tuple[KeyRing, TokenMinter, bytes], token: str, webhook_id: str
) -> None:
    ring, _, _ = setup
    with asyncio.Runner() as runner:
        _refused(runner, _verifier(ring), headers_for(token, webhook_id), BODY)


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@_PROPERTY
@given(segments=st.lists(st.text(alphabet=_B64URL, max_size=120), min_size=3, max_size=3))
def test_random_base64url_segments_are_refused(
    setup: tuple[KeyRing, TokenMinter, bytes], segments: list[str]
) -> None:
    ring, _, _ = setup
    with asyncio.Runner() as runner:
        _refused(runner, _verifier(ring), headers_for(".".join(segments)), BODY)


@_PROPERTY
@given(headers=st.dictionaries(st.text(max_size=30), st.text(max_size=200), max_size=6))
def test_random_headers_are_refused(
    setup: tuple[KeyRing, TokenMinter, bytes], headers: dict[str, str]
) -> None:
    ring, _, secret = setup
    with asyncio.Runner() as runner:
        _refused(runner, _verifier(ring, secret), headers, BODY)


def _flip(data: bytes, index: int, mask: int) -> bytes:
    if not data:
        return data
    index %= len(data)
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("swap"), st.sampled_from([(0, 1), (0, 2), (1, 2)])),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.characters()),
    st.tuples(st.just("body"), st.integers(0, 10_000), st.integers(1, 255)),
)


def _unchanged(mutated: str, body: bytes, token: str) -> bool:
    """The request still carries the token and body. In ``Bearer <token>`` only spaces may
    stand between the scheme and the token (RFC 7235: ``1*SP``); spaces or tabs after it are
    the header value's own white space. A tab before the token makes it malformed."""
    return (mutated.lstrip(" ").rstrip(" \t"), body) == (token, BODY)


def _mutate(token: str, body: bytes, mutation: tuple[Any, ...]) -> tuple[str, bytes]:
    kind = mutation[0]
    if kind == "flip":
        return _flip(token.encode(), mutation[1], mutation[2]).decode("latin-1"), body
    if kind == "swap":
        parts = token.split(".")
        i, j = mutation[1]
        if j < len(parts):
            parts[i], parts[j] = parts[j], parts[i]
        return ".".join(parts), body
    if kind == "truncate":
        return token[: mutation[1] % max(len(token), 1)], body
    if kind == "insert":
        at = mutation[1] % (len(token) + 1)
        return token[:at] + mutation[2] + token[at:], body
    return token, _flip(body, mutation[1], mutation[2])


@_PROPERTY
@given(mutation_list=st.lists(mutations, min_size=1, max_size=3))
def test_mutated_token_or_body_is_never_accepted(
    setup: tuple[KeyRing, TokenMinter, bytes], mutation_list: list[tuple[Any, ...]]
) -> None:
    ring, minter, _ = setup
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    mutated, body = token, BODY
    for mutation in mutation_list:
        mutated, body = _mutate(mutated, body, mutation)
    verifier = _verifier(ring)
    with asyncio.Runner() as runner:
        if _unchanged(mutated, body, token):
            assert isinstance(runner.run(verifier.verify(headers_for(token), BODY)), dict)
        else:
            _refused(runner, verifier, headers_for(mutated), body)


@_PROPERTY
@given(mutation=mutations)
def test_mutated_request_with_token_and_hmac_is_never_accepted(
    setup: tuple[KeyRing, TokenMinter, bytes], mutation: tuple[Any, ...]
) -> None:
    ring, minter, secret = setup
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    timestamp = int(time.time())
    mutated, body = _mutate(token, BODY, mutation)
    headers = headers_for(mutated)
    headers["webhook-timestamp"] = str(timestamp)
    headers["webhook-signature"] = sign_hmac([secret], WEBHOOK_ID, timestamp, BODY)
    verifier = _verifier(ring, secret)
    with asyncio.Runner() as runner:
        if _unchanged(mutated, body, token):
            assert isinstance(runner.run(verifier.verify(headers, body)), dict)
        else:
            _refused(runner, verifier, headers, body)


def test_only_spaces_separate_the_scheme_from_the_token(
    setup: tuple[KeyRing, TokenMinter, bytes],
) -> None:
    """``Bearer  <token>`` and a tab or space after the token are HTTP's white space; a tab
    between the scheme and the token is not (RFC 7235 allows only spaces there)."""
    ring, minter, _ = setup
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    with asyncio.Runner() as runner:
        for fine in ("  " + token, token + "\t", token + " \t "):
            assert isinstance(runner.run(_verifier(ring).verify(headers_for(fine), BODY)), dict)
        assert _refused(runner, _verifier(ring), headers_for("\t" + token), BODY) == (
            "malformed_token"
        )


@pytest.mark.parametrize("around", ["\r", "\n", "\x0b", "\x0c", "\xa0", "\u2003"])
def test_a_token_with_other_white_space_beside_it_is_refused(
    setup: tuple[KeyRing, TokenMinter, bytes], around: str
) -> None:
    ring, minter, _ = setup
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    with asyncio.Runner() as runner:
        for mutated in (around + token, token + around):
            assert _refused(runner, _verifier(ring), headers_for(mutated), BODY) == (
                "malformed_token"
            )


def test_spaces_and_tabs_around_the_token_are_http_white_space(
    setup: tuple[KeyRing, TokenMinter, bytes],
) -> None:
    ring, minter, _ = setup
    token = minter.mint(audience=AUDIENCE, webhook_id=WEBHOOK_ID, body=BODY)
    with asyncio.Runner() as runner:
        for mutated in (" " + token, token + " ", token + "\t", "  " + token + " \t"):
            claims = runner.run(_verifier(ring).verify(headers_for(mutated), BODY))
            assert claims["webhook_id"] == WEBHOOK_ID
