"""``python -m loadtest``: the load tests and micro-benchmarks of the dispatcher.

    python -m loadtest run [--scenario NAME] [--events N] [--rate R] [--duration S]
                           [--subscribers K] [--json PATH] [--plot PATH] [--baseline/--no-baseline]
                           [--workers N] [--verify/--no-verify] [--rounds N] [--profile]
    python -m loadtest list
    python -m loadtest bench [--iterations N] [--json]

``run`` starts the receivers, then for each phase of the scenario the dispatcher (or the bare
baseline) and the generator; it shows progress on stderr and ends with a table, a JSON report
and a PNG plot (default under loadtest/out/). Exit status: 0 when every event was accounted for,
1 when something was lost or a phase did not settle, 2 on bad usage. Missed performance targets
are reported, and fail the exit status only with --strict.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

__all__ = ["main"]

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def _parser() -> argparse.ArgumentParser:
    from loadtest.scenarios import SCENARIOS
    from loadtest.scenarios import __doc__ as scenarios_doc

    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a load-test scenario",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=scenarios_doc,
    )
    run.add_argument("--scenario", default="custom", choices=sorted(SCENARIOS))
    run.add_argument("--events", type=int, help="events per phase")
    run.add_argument("--rate", type=float, help="events/s (default: as fast as possible)")
    run.add_argument("--duration", type=float, help="seconds to publish for (with --rate)")
    run.add_argument(
        "--subscribers", type=int, help="subscribers (custom; accounts: all of them, 2 per account)"
    )
    run.add_argument(
        "--active-accounts",
        type=int,
        help="accounts the events are spread over (accounts; default 1000)",
    )
    run.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the bare pipeline (custom, fanout3)",
    )
    run.add_argument("--workers", type=int, default=1, help="dispatcher worker processes")
    run.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="receivers verify every agent token (scenario default)",
    )
    run.add_argument("--rounds", type=int, help="alternating rounds (compare, fanout3)")
    run.add_argument("--hang-timeout", default="10s", help="subscriber timeout in hol")
    run.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="the dispatcher's [broker].prefetch (hol: default 256; batch: default 1024)",
    )
    run.add_argument(
        "--candidate", type=Path, help="another checkout to compare against (ab scenario)"
    )
    run.add_argument(
        "--source", type=Path, help="run the dispatcher from this checkout instead of this one"
    )
    run.add_argument(
        "--reference",
        type=Path,
        help="the 'before' checkout of the ab scenario (default: this one)",
    )
    run.add_argument(
        "--profile",
        action="store_true",
        help="record the dispatcher with py-spy (one phase) and summarise",
    )
    run.add_argument("--json", type=Path, help="JSON report path")
    run.add_argument("--plot", type=Path, help="PNG plot path")
    run.add_argument("--out", type=Path, default=Path("loadtest/out"), help="output directory")
    run.add_argument("--broker-url", default=os.environ.get("LOADTEST_BROKER_URL", DEFAULT_BROKER))
    run.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--keep-tmp", action="store_true", help="keep the generated configs and keys")
    sub.add_parser("list", help="list the scenarios")
    bench = sub.add_parser("bench", help="micro-benchmarks of the hot path")
    bench.add_argument("--iterations", type=int, default=20_000)
    bench.add_argument("--json", action="store_true")
    return p


async def _run(args: argparse.Namespace, command: str) -> int:
    from loadtest.report import document, plot, table, write_json
    from loadtest.runner import PhaseFailed, Run, RunOptions
    from loadtest.scenarios import SCENARIOS, ScenarioOptions

    fn, endpoints = SCENARIOS[args.scenario]
    opts = ScenarioOptions(
        events=args.events,
        rate=args.rate,
        duration=args.duration,
        subscribers=args.subscribers,
        baseline=args.baseline,
        workers=args.workers,
        verify=args.verify,
        rounds=args.rounds,
        profile=args.profile,
        hang_timeout=args.hang_timeout,
        prefetch=args.prefetch,
        active_accounts=args.active_accounts,
        candidate=str(args.candidate.resolve()) if args.candidate else None,
        reference=str(args.reference.resolve()) if args.reference else None,
    )
    if args.scenario != "accounts":  # there --subscribers are path endpoints, not servers
        endpoints = max(endpoints, args.subscribers or 0)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_opts = RunOptions(
        broker_url=args.broker_url,
        out_dir=args.out,
        endpoints=endpoints,
        keep_tmp=args.keep_tmp,
        quiet=args.quiet,
        source=str(args.source.resolve()) if args.source else None,
    )
    try:
        async with Run(run_opts) as run:
            result = await fn(run, opts)
    except PhaseFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    options = {k: v for k, v in asdict(opts).items()}
    doc = document(
        args.scenario,
        command,
        started.isoformat(timespec="seconds"),
        options,
        result,
        source=run_opts.source,
    )
    json_path = args.json or args.out / f"{args.scenario}-{stamp}.json"
    plot_path = args.plot or args.out / f"{args.scenario}-{stamp}.png"
    write_json(doc, json_path)
    plot(doc, plot_path)
    print(table(doc))
    print(f"report: {json_path}\nplot:   {plot_path}")
    if not doc["ok"]:
        return 1
    return 1 if args.strict and not doc["targets_met"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "list":
        from loadtest.scenarios import __doc__ as scenarios_doc

        print(scenarios_doc)
        return 0
    if args.command == "bench":
        from loadtest.bench_hot_path import main as bench_main

        extra = ["--json"] if args.json else []
        return bench_main(["--iterations", str(args.iterations), *extra])
    command = "python -m loadtest " + shlex.join(argv)
    try:
        import uvloop

        return uvloop.run(_run(args, command))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
