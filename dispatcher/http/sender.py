"""One HTTP attempt: build the request, POST it, and translate what happened into an `Outcome`.

aiohttp's exceptions stop here. Redirects are never followed; response bodies are read only up
to a cap (they matter only as a hint in the dead-letter record).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from dispatcher import __version__
from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.decisions.retry_policy import Outcome, OutcomeKind
from dispatcher.http.ssrf import BlockedDestination, GuardedResolver, check_literal

__all__ = ["USER_AGENT", "HttpSender", "parse_retry_after"]

USER_AGENT = f"bounce-dispatcher/{__version__}"
_ERROR_SNIPPET = 200
_URL_CACHE_LIMIT = 100_000  # parsed subscriber URLs kept (a provider's endpoints, with room)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, or an HTTP date counted from ``now``,
    unix seconds); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 10**7))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


class HttpSender:
    """Owns the one aiohttp session every delivery goes through."""

    def __init__(
        self,
        *,
        allow_private_networks: bool,
        max_response_bytes: int = 64 * 1024,
        resolver: AbstractResolver | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._guard = not allow_private_networks
        self._wall = clock.wall  # what a Retry-After date is counted from
        self._resolver = resolver
        self._max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        # Each subscriber URL parsed (and, with the guard, checked for a forbidden literal)
        # once, not per request: the answer depends on the URL alone.
        self._urls: dict[str, URL | _Blocked] = {}

    async def __aenter__(self) -> HttpSender:
        connector = aiohttp.TCPConnector(
            limit=0,  # bounded per subscriber by the endpoint lanes, not here
            ttl_dns_cache=60,
            resolver=GuardedResolver(self._resolver) if self._guard else self._resolver,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Outcome:
        """POST ``body`` and classify the result; never raises for network or HTTP failures."""
        assert self._session is not None, "HttpSender used outside its context"
        try:
            target = self._urls.get(url) or self._parse(url)
            if isinstance(target, _Blocked):
                raise BlockedDestination(target.why)
            async with self._session.post(
                target,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout(timeout),
            ) as resp:
                snippet = await self._read_capped(resp)
                return _classify(resp.status, resp.headers, snippet, self._wall)
        except BlockedDestination as exc:
            return Outcome(OutcomeKind.BLOCKED, error=f"blocked_destination: {exc}")
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedDestination):
                return Outcome(OutcomeKind.BLOCKED, error=f"blocked_destination: {exc.os_error}")
            return Outcome(OutcomeKind.FAILED, error=f"dns: {exc.os_error}")
        except TimeoutError:
            return Outcome(OutcomeKind.FAILED, error=f"timeout: no response within {timeout:g}s")
        except aiohttp.ClientConnectorError as exc:
            return Outcome(OutcomeKind.FAILED, error=f"connection: {exc.os_error}")
        except aiohttp.ServerDisconnectedError:
            return Outcome(OutcomeKind.FAILED, error="connection: server disconnected")
        except aiohttp.ClientPayloadError as exc:
            return Outcome(OutcomeKind.FAILED, error=f"connection: {_one_line(str(exc))}")
        except aiohttp.ClientResponseError as exc:
            return Outcome(
                OutcomeKind.FAILED,
                status=exc.status or None,
                error=f"protocol: {_one_line(exc.message)}",
            )
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(
                OutcomeKind.FAILED, error=f"connection: {_one_line(str(exc)) or type(exc).__name__}"
            )

    def _parse(self, url: str) -> URL | _Blocked | str:
        """The URL to send to, or why it is refused; a URL that does not parse is left to
        aiohttp (which reports it as a client error) and not kept."""
        target: URL | _Blocked
        try:
            if self._guard:
                check_literal(urlsplit(url).hostname or "")
            target = URL(url)
        except BlockedDestination as exc:
            target = _Blocked(str(exc))
        except ValueError:
            return url
        if len(self._urls) >= _URL_CACHE_LIMIT:
            self._urls.clear()
        self._urls[url] = target
        return target

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        found = self._timeouts.get(seconds)
        if found is None:
            found = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return found

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> str:
        """Up to the cap of the body, for the dead-letter record; the rest is discarded."""
        cap = self._max_response_bytes
        chunks: list[bytes] = []
        got = 0
        while got < cap:
            chunk = await resp.content.read(cap - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got >= cap and not resp.content.at_eof():
            resp.close()  # do not download an enormous body; drop the connection instead
        return b"".join(chunks)[:_ERROR_SNIPPET].decode("utf-8", "replace")


class _Blocked:
    """A URL the guard refuses, and why (a fresh exception is raised for each attempt)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_ERROR_SNIPPET]


def _classify(
    status: int, headers: Mapping[str, str], snippet: str, wall: Callable[[], float]
) -> Outcome:
    """What a response means; the clock is read only for a throttling one (429, 503)."""
    if 200 <= status < 300:
        return Outcome(OutcomeKind.DELIVERED, status=status)
    if status == 410:
        return Outcome(OutcomeKind.GONE, status=status, error="endpoint_gone: 410 Gone")
    retry_after = (
        parse_retry_after(headers.get("Retry-After"), wall()) if status in (429, 503) else None
    )
    if 300 <= status < 400:
        where = headers.get("Location", "")
        error = f"redirect: {status} to {where[:100]} (redirects are not followed)"
    else:
        error = f"http {status}: {_one_line(snippet)}" if snippet.strip() else f"http {status}"
    return Outcome(OutcomeKind.FAILED, status=status, error=error, retry_after=retry_after)
