"""`python -m example_receiver`: run the example subscriber.

Exit codes: 0 after SIGINT/SIGTERM, 2 bad arguments, 1 the database could not be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import structlog
from aiohttp import web

from signing import parse_secrets

from .app import create_app
from .settings import (
    ReceiverSettings,
    SettingsError,
    parse_duration,
    parse_listen,
    parse_size,
)
from .store import StoreUnavailable

PROG = "example_receiver"
log = structlog.get_logger(PROG)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(code)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description="Example webhook subscriber.")
    p.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (default %(default)s)")
    p.add_argument("--path", default="/webhooks/email", help="webhook path (default %(default)s)")
    p.add_argument("--jwks-url", help="where the dispatcher publishes its public keys")
    p.add_argument("--audience", help="this endpoint's URL as the dispatcher knows it")
    p.add_argument("--issuer", help="expected token issuer, e.g. https://mail.example.com")
    p.add_argument("--account", help="accept only tokens whose account claim is this account")
    p.add_argument("--db", default="sqlite:///receiver.sqlite3", help="sqlite:///FILE or DSN")
    p.add_argument("--db-schema", help="PostgreSQL schema for the tables")
    p.add_argument("--hmac-secret-env", metavar="NAME", help="env var holding whsec_ secret(s)")
    p.add_argument("--soft-bounce-limit", type=int, default=3)
    p.add_argument("--soft-bounce-window", default="7d", help="e.g. 7d, 12h (default 7d)")
    p.add_argument("--leeway", default="30s", help="clock skew allowed on tokens")
    p.add_argument(
        "--max-body",
        default="1MiB",
        help="largest request body; at least the subscriber's batch max_bytes (default 1MiB)",
    )
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> ReceiverSettings:
    """Parse and validate; any problem exits 2 with one line on stderr."""
    args = _parser().parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
        hmac_secrets: tuple[str, ...] = ()
        if args.hmac_secret_env:
            raw = os.environ.get(args.hmac_secret_env)
            if not raw:
                _fail(f"--hmac-secret-env: environment variable {args.hmac_secret_env} is not set")
            try:
                parse_secrets(raw)
            except ValueError as exc:
                _fail(f"--hmac-secret-env: {args.hmac_secret_env}: {exc}")
            hmac_secrets = tuple(raw.split())  # space-separated during a rotation
        audience = args.audience
        if args.jwks_url and not audience:
            audience = f"http://{args.listen}{args.path}"
        return ReceiverSettings(
            db_url=args.db,
            host=host,
            port=port,
            path=args.path,
            jwks_url=args.jwks_url,
            audience=audience,
            issuer=args.issuer,
            account=args.account,
            hmac_secrets=hmac_secrets,
            leeway=parse_duration(args.leeway).total_seconds(),
            soft_bounce_limit=args.soft_bounce_limit,
            soft_bounce_window=parse_duration(args.soft_bounce_window),
            db_schema=args.db_schema,
            max_body=parse_size(args.max_body),
        )
    except SettingsError as exc:
        _fail(str(exc))


def _configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def serve(settings: ReceiverSettings) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()  # opens the database; StoreUnavailable propagates
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info(
            "listening",
            url=f"http://{settings.host}:{settings.port}{settings.path}",
            db=settings.database.describe(),
            jwt=settings.jwks_url is not None,
            hmac=bool(settings.hmac_secrets),
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    _configure_logging()
    try:
        asyncio.run(serve(settings))
    except StoreUnavailable as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except OSError as exc:  # e.g. the port is taken
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
