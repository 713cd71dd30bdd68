"""The `dispatcher` command line. Exit codes: 0 success, 2 bad usage or config, 1 runtime failure.

Every error is one clear line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson

from dispatcher import __version__
from dispatcher.config import Config, ConfigError, load_config
from dispatcher.names import dead_queue

__all__ = ["main"]

_T = TypeVar("_T")
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"dispatcher: {message} (see dispatcher --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


_CONFIG_HELP = "config file (default: $DISPATCHER_CONFIG or config/dispatcher.toml)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dispatcher", description="Webhook dispatcher for email delivery events.")
    p.add_argument("--version", action="version", version=f"dispatcher {__version__}")
    p.add_argument("--config", help=_CONFIG_HELP)
    # `--config` is accepted after the command too (`dispatcher run --config c.toml`): every
    # subcommand takes it, without a default of its own, so one given earlier stays.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    sub = _Subcommands(
        p.add_subparsers(dest="command", required=True, parser_class=_Parser), common
    )

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: [dispatcher].workers, 0 = one per core)",
    )
    run.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="run the whole local loop once and print a summary")
    demo.add_argument("--events", type=int, default=20, help="sample events to publish")
    demo.add_argument("--keep", action="store_true", help="keep the demo's queues afterwards")

    sub.add_parser("check-config", help="validate and print the effective config")

    pub = sub.add_parser("publish", help="publish event JSON (an object or JSON lines)")
    pub.add_argument("file", nargs="?", default="-", help="a file, or - for stdin (default)")

    keys = sub.add_parser("keys", help="manage signing keys")
    ksub = _Subcommands(
        keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser), common
    )
    gen = ksub.add_parser("generate", help="create a signing key (active at once)")
    rot = ksub.add_parser(
        "rotate",
        help="publish a new key now; it signs after the JWKS "
        "cache age; the old one (same algorithm) retires after token_ttl + cache age",
    )
    for with_alg in (gen, rot):
        with_alg.add_argument(
            "--algorithm",
            choices=["EdDSA", "ES256", "RS256"],
            default=None,
            help="the key's algorithm (default: [signing].algorithm)",
        )
    rot.add_argument(
        "--publish-lead",
        default=None,
        help="how long the new key is published before it signs (default: [signing].jwks_max_age)",
    )
    ksub.add_parser("jwks", help="print the public key set")
    ksub.add_parser("prune", help="remove keys whose retirement time has passed")

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters")
    dsub = _Subcommands(
        dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser), common
    )
    ls = dsub.add_parser("list", help="list dead letters (nothing is removed)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument("--limit", type=int, default=None, help="at most N records")
    _filters(ls)
    show = dsub.add_parser("show", help="one dead letter, with its body")
    show.add_argument("id")
    rep = dsub.add_parser("replay", help="deliver dead letters again")
    rep.add_argument("ids", nargs="*", metavar="ID")
    rep.add_argument("--all", action="store_true", help="every dead letter (that matches)")
    _filters(rep)
    purge = dsub.add_parser("purge", help="delete dead letters (every one, or those that match)")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    _filters(purge)
    exp = dsub.add_parser("export", help="write dead letters as JSON lines, bodies included")
    exp.add_argument("file")
    _filters(exp)

    mig = sub.add_parser(
        "migrate-queues",
        help="the RabbitMQ policies that give queues declared by an older version today's "
        "delivery limits and dead-letter exchanges",
    )
    mig.add_argument("--apply", action="store_true", help="set them now, with rabbitmqctl")
    mig.add_argument(
        "--rabbitmqctl",
        default="rabbitmqctl",
        metavar="COMMAND",
        help="how to run rabbitmqctl for --apply (default: rabbitmqctl)",
    )
    mig.add_argument("--json", action="store_true", help="as JSON (definitions / HTTP API)")
    return p


class _Subcommands:
    """``add_subparsers`` whose parsers all take the common options (``--config``)."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self._action, self._common = action, common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(
            name, parents=[self._common], **kwargs
        )
        return parser


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscriber", metavar="S", help="only dead letters of this subscriber")
    parser.add_argument("--account", metavar="A", help="only dead letters of this account")
    parser.add_argument(
        "--reason", metavar="R", help="only dead letters whose reason starts with R"
    )


def _fail(message: str, code: int) -> int:
    print(f"dispatcher: {message}", file=sys.stderr)
    return code


def _run_async(coro_fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    import uvloop

    return uvloop.run(coro_fn())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_USAGE)
    try:
        return _dispatch(args, config)
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_RUNTIME)
    except Exception as exc:
        return _fail(_describe(exc), EXIT_RUNTIME)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{name}: {text}"  # a file, not the network: the path is in the text
    if isinstance(exc, ConnectionError | OSError) or "AMQP" in name or "Connection" in name:
        return f"broker: {text} (is RabbitMQ running and [broker].url right?)"
    return f"{name}: {text}"


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    from dispatcher.process.log import configure_logging

    cmd = args.command
    if cmd not in ("run", "demo"):
        # One-shot tools speak for themselves: one line on failure, no library log chatter.
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if cmd == "check-config":
        sys.stdout.write(orjson.dumps(config.masked(), option=orjson.OPT_INDENT_2).decode() + "\n")
        print(f"config OK: {config.source}, {len(config.subscribers)} subscribers", file=sys.stderr)
        return EXIT_OK
    if cmd == "run":
        configure_logging(config.dispatcher.log_level, config.dispatcher.log_format)
        return _cmd_run(args, config)
    if cmd == "demo":
        return _cmd_demo(args, config)
    if cmd == "publish":
        return _cmd_publish(args, config)
    if cmd == "keys":
        return _cmd_keys(args, config)
    if cmd == "dlq":
        return _cmd_dlq(args, config)
    if cmd == "migrate-queues":
        return _cmd_migrate_queues(args, config)
    return _fail(f"unknown command {cmd}", EXIT_USAGE)  # pragma: no cover


def _cmd_run(args: argparse.Namespace, config: Config) -> int:
    workers = args.workers if args.workers is not None else config.dispatcher.workers
    if workers < 0:
        return _fail("--workers must be 0 (one per core) or more", EXIT_USAGE)
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers > 1 and not args.worker_child:
        from dispatcher.process.supervisor import supervise

        return supervise(config, workers=workers, config_path=args.config)
    from dispatcher.process.daemon import serve

    return _run_async(
        lambda: serve(config, config_path=args.config, serve_ops=not args.worker_child)
    )


def _cmd_demo(args: argparse.Namespace, config: Config) -> int:
    """Run the demo, which lives beside the package in a source checkout, not in the wheel.

    The demo drives the example receiver and reads its SQLite store, so it is the top-level `demo`
    package of the checkout rather than part of `dispatcher`. It is found on the import path, or
    else next to this package when the dispatcher runs from a checkout (an editable install).
    """
    from dispatcher.process.log import configure_logging

    try:
        from demo.loop import run_demo
    except ImportError:
        checkout = Path(__file__).resolve().parent.parent
        if not (checkout / "demo" / "loop.py").is_file():
            return _fail(
                "demo: the demo ships with the source checkout, not the installed package "
                "(run it from a checkout: make demo)",
                EXIT_RUNTIME,
            )
        sys.path.append(str(checkout))
        from demo.loop import run_demo

    configure_logging("warning", "console")
    return _run_async(lambda: run_demo(config, events=args.events, keep=args.keep))


def _cmd_publish(args: argparse.Namespace, config: Config) -> int:
    from dispatcher.broker.publisher import PublishError, publish_events, read_events

    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as fh:
                data = fh.read()
    except OSError as exc:
        return _fail(f"publish: cannot read {args.file}: {exc.strerror}", EXIT_USAGE)
    try:
        bodies = read_events(data)
    except PublishError as exc:
        return _fail(f"publish: {exc}", EXIT_USAGE)
    n = _run_async(lambda: publish_events(config, bodies))
    print(f"published {n} events to exchange {config.broker.exchange}", file=sys.stderr)
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace, config: Config) -> int:
    from dispatcher.config import parse_duration
    from signing import KeyRing, KeyRingError, generate_key, prune, rotate

    s = config.signing
    try:
        algorithm = getattr(args, "algorithm", None) or s.algorithm
        if args.keys_command == "generate":
            key = generate_key(s.keys_dir, algorithm)
            print(f"generated {key.alg} key {key.kid} in {s.keys_dir}")
        elif args.keys_command == "rotate":
            lead = (
                parse_duration(args.publish_lead, "--publish-lead")
                if args.publish_lead is not None
                else s.jwks_max_age
            )
            new, retiring = rotate(
                s.keys_dir,
                algorithm,
                publish_lead=lead,
                retire_after=s.token_ttl + s.jwks_max_age,
            )
            print(f"new {new.alg} key {new.kid}: published now, signs from +{lead:g}s")
            for old in retiring:
                print(f"key {old.kid}: stays published until its tokens and caches expire")
        elif args.keys_command == "prune":
            removed = prune(s.keys_dir)
            print(f"retired {len(removed)} keys" + (f": {', '.join(removed)}" if removed else ""))
        else:
            ring = KeyRing.load(s.keys_dir, s.algorithm, create_if_empty=False)
            sys.stdout.write(orjson.dumps(ring.jwks(), option=orjson.OPT_INDENT_2).decode() + "\n")
    except KeyRingError as exc:
        return _fail(f"keys: {exc}", EXIT_RUNTIME)
    return EXIT_OK


def _cmd_dlq(args: argparse.Namespace, config: Config) -> int:
    from aiormq.exceptions import ChannelNotFoundEntity

    try:
        return _dlq(args, config)
    except ChannelNotFoundEntity:
        return _fail(
            f"dlq: there is no queue {dead_queue(config.broker.queue)} on the broker "
            "(the dispatcher declares it when it first starts with this config)",
            EXIT_RUNTIME,
        )


def _dlq(args: argparse.Namespace, config: Config) -> int:
    from dispatcher.broker.dead_letters import DeadLetterTool, Filter

    tool = DeadLetterTool(config)
    cmd = args.dlq_command
    where = Filter(
        subscriber=getattr(args, "subscriber", None),
        account=getattr(args, "account", None),
        reason=getattr(args, "reason", None),
    )
    if cmd == "list":
        if args.limit is not None and args.limit < 1:
            return _fail("dlq list: --limit must be at least 1", EXIT_USAGE)
        _run_async(lambda: _stream_list(tool, args.limit, where, as_json=args.json))
        return EXIT_OK
    if cmd == "show":
        found = _run_async(lambda: tool.show(args.id))
        if found is None:
            return _fail(f"dlq show: no dead letter with id {args.id}", EXIT_RUNTIME)
        out: dict[str, Any] = found.export()
        out["headers"] = found.headers
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
        return EXIT_OK
    if cmd == "replay":
        if bool(args.ids) == bool(args.all):
            return _fail("dlq replay: give dead-letter IDs or --all (not both)", EXIT_USAGE)
        ids = None if args.all else args.ids
        replayed, missing, kept = _run_async(lambda: tool.replay(ids, where=where))
        print(f"replayed {replayed} dead letters")
        if kept:
            print(
                f"kept {len(kept)} whose subscriber is no longer configured: "
                f"{', '.join(sorted(kept))}",
                file=sys.stderr,
            )
        if missing:
            return _fail(f"dlq replay: not found: {', '.join(sorted(missing))}", EXIT_RUNTIME)
        return EXIT_OK
    if cmd == "purge":
        if not args.yes:
            count = _run_async(lambda: tool.count(where))
            which = "" if where.everything else " matching the filters"
            if not sys.stdin.isatty():
                return _fail(
                    f"dlq purge: refusing to delete {count} dead letters{which} without --yes "
                    "(stdin is not a terminal)",
                    EXIT_USAGE,
                )
            answer = input(
                f"Delete {count} dead letters{which} from {dead_queue(config.broker.queue)}? [y/N] "
            )
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return EXIT_OK
        purged = _run_async(lambda: tool.purge(where))
        print(f"purged {purged} dead letters")
        return EXIT_OK
    if cmd == "export":
        try:
            n = _run_async(lambda: tool.export(args.file, where))
        except OSError as exc:
            if exc.filename != args.file:
                raise
            return _fail(f"dlq export: cannot write {args.file}: {exc.strerror}", EXIT_RUNTIME)
        print(f"exported {n} dead letters to {args.file}")
        return EXIT_OK
    return _fail(f"unknown dlq command {cmd}", EXIT_USAGE)  # pragma: no cover


# Text columns and their widths: fixed, so rows are printed as they are read (constant memory,
# however many dead letters). Ids are never cut; longer values of other columns are.
_COLUMNS = (
    ("id", 32),
    ("event", 20),
    ("subscriber", 16),
    ("account", 12),
    ("attempts", 8),
    ("reason", 40),
    ("last_status", 11),
    ("dead_lettered_at", 24),
)


async def _stream_list(tool: Any, limit: int | None, where: Any, *, as_json: bool) -> None:
    from contextlib import aclosing

    out = sys.stdout
    n = 0
    try:
        async with aclosing(tool.iterate(limit, where)) as letters:
            async for dl in letters:
                record = dl.record.as_dict()
                if as_json:
                    out.write(orjson.dumps(record).decode() + "\n")
                else:
                    if n == 0:
                        out.write(_row({c: c for c, _ in _COLUMNS}))
                    out.write(_row(record))
                n += 1
        if not as_json:
            out.write(f"{n} dead letters\n" if n else "no dead letters\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (`dispatcher dlq list | head`): the rest is handed back; say
        # nothing more on a closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _row(record: dict[str, Any]) -> str:
    cells = []
    for name, width in _COLUMNS:
        value = record.get(name)
        text = "-" if value is None else str(value)
        cells.append(text.ljust(width) if name == "id" else text[:width].ljust(width))
    return "  ".join(cells).rstrip() + "\n"


def _cmd_migrate_queues(args: argparse.Namespace, config: Config) -> int:
    import shlex
    import subprocess
    from urllib.parse import unquote, urlsplit

    from dispatcher.broker.topology import migration_policies

    vhost = unquote(urlsplit(config.broker.url).path[1:]) or "/"
    policies = migration_policies(config.broker)
    if args.json:
        doc = [
            {
                "vhost": vhost,
                "name": p.name,
                "pattern": p.pattern,
                "apply-to": p.apply_to,
                "priority": p.priority,
                "definition": p.definition,
            }
            for p in policies
        ]
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    if not args.apply:
        for p in policies:
            print(shlex.join(["rabbitmqctl", *p.rabbitmqctl(vhost)]))
        return EXIT_OK
    ctl = shlex.split(args.rabbitmqctl)
    if not ctl:
        return _fail("migrate-queues: --rabbitmqctl is empty", EXIT_USAGE)
    for p in policies:
        try:
            done = subprocess.run(
                [*ctl, *p.rabbitmqctl(vhost)],
                capture_output=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return _fail(f"migrate-queues: cannot run {ctl[0]}: {exc}", EXIT_RUNTIME)
        if done.returncode != 0:
            why = " ".join((done.stderr or done.stdout).decode(errors="replace").split())
            return _fail(f"migrate-queues: policy {p.name}: {why[:300]}", EXIT_RUNTIME)
        print(f"policy {p.name} set on {p.pattern} (vhost {vhost})")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
