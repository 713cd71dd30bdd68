"""The report of a run: a table on the terminal, a JSON document, and a PNG plot over time."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import orjson

from loadtest.scenarios import ScenarioResult

__all__ = ["document", "plot", "table", "write_json"]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def checkout() -> dict[str, Any]:
    """The commit the dispatcher ran from, and whether its code had uncommitted changes."""
    import subprocess

    from loadtest.processes import REPO_ROOT

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_changes": git("status", "--porcelain", "dispatcher", "signing") != "",
    }


def document(
    scenario: str,
    command: str,
    started_at: str,
    options: dict[str, Any],
    result: ScenarioResult,
    source: str | None = None,
) -> dict[str, Any]:
    lost = sum(p.accounting.lost for p in result.phases)
    return {
        "scenario": scenario,
        "command": command,
        "started_at": started_at,
        "machine": machine(),
        "checkout": {"path": source} if source else checkout(),
        "options": options,
        "ok": lost == 0 and all(p.settled for p in result.phases),
        "targets_met": all(c.ok is not False for c in result.checks),
        "lost": lost,
        "duplicates": sum(p.accounting.duplicates for p in result.phases),
        "summary": result.summary,
        "checks": [c.as_dict() for c in result.checks],
        "phases": [p.as_dict() for p in result.phases],
    }


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _grid(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def _extras(p: dict[str, Any]) -> str:
    """One line of a phase's start-up time, /metrics size, broker census and reload."""
    bits = []
    if p.get("startup_s") is not None:
        bits.append(f"ready after {p['startup_s']:.2f}s")
    sizes = {k: v for k, v in (p.get("metrics_bytes") or {}).items() if v is not None}
    if sizes and p.get("broker"):
        bits.append("/metrics " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    for c in p.get("broker") or []:
        bits.append(f"{c['when']}: {c['queues']} queues, {c['consumers']} consumers")
    r = p.get("reload")
    if r:
        bits.append(
            f"SIGHUP +{r['subscribers_added']} subscribers: effective after "
            f"{_fmt(r['effective_s'], 2)}s ({r['delivered']}/{r['probes']} probes)"
        )
    w = p.get("process", {}).get("peak_rss_per_worker_mib")
    if w and p.get("broker"):
        bits.append(f"peak RSS per worker {w} MiB")
    return f"  {p['name']}: " + "; ".join(bits) if len(bits) > 1 or r else ""


def table(doc: dict[str, Any]) -> str:
    phases = doc["phases"]
    headers = [
        "phase",
        "consumer",
        "subs",
        "published",
        "deliveries",
        "deliv/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "lost",
        "dup",
        "dead",
        "cpu %",
        "cpu ms/1k",
        "peak MiB",
    ]
    rows = []
    for p in phases:
        acc, lat, proc = p["accounting"], p["latency_ms"], p["process"]
        rows.append(
            [
                p["name"],
                p["consumer"],
                str(p["spec"]["subscribers"]),
                str(acc["published"]),
                str(p["throughput"]["deliveries"]),
                _fmt(p["throughput"]["deliveries_per_s"], 0),
                _fmt(lat["p50"]),
                _fmt(lat["p90"]),
                _fmt(lat["p99"]),
                _fmt(lat["max"]),
                str(acc["lost"]),
                str(acc["duplicates"]),
                str(acc["dead_lettered"]),
                _fmt(proc["cpu_percent"], 0),
                _fmt(proc["cpu_ms_per_1k_deliveries"], 0),
                _fmt(proc["peak_rss_mib"]),
            ]
        )
    where = (
        doc["checkout"].get("path")
        or doc["checkout"].get("commit")
        or "a copy that is not a git checkout (commit unknown)"
    )
    dirty = " (with uncommitted changes)" if doc["checkout"].get("uncommitted_changes") else ""
    parts = [
        f"scenario {doc['scenario']}: {doc['command']}",
        f"machine: {doc['machine'].get('cpus')} CPUs, {doc['machine'].get('cpu_model', '?')}; "
        f"dispatcher from {where}{dirty}",
        "",
        _grid(headers, rows),
        "",
    ]
    sub_rows = []
    for p in phases:
        for sub, s in p["per_subscriber"].items():
            beh = ",".join(f"{k}={v}" for k, v in s["behaviour"].items() if v) or "healthy"
            sub_rows.append(
                [
                    p["name"],
                    sub,
                    beh,
                    str(s["received"]),
                    str(s["unique"]),
                    str(s["duplicates"]),
                    str(s["failed_answers"]),
                    str(s["verify_failures"]),
                    _fmt(s["deliveries_per_s"], 0),
                    _fmt(s["latency_ms"]["p50"]),
                    _fmt(s["latency_ms"]["p99"]),
                ]
            )
    parts += [
        _grid(
            [
                "phase",
                "subscriber",
                "behaviour",
                "2xx",
                "unique",
                "dup",
                "non-2xx",
                "verify fail",
                "deliv/s",
                "p50 ms",
                "p99 ms",
            ],
            sub_rows,
        ),
        "",
    ]
    others = [
        [p["name"], *(f"{k} {v:.0f}%" for k, v in p["others_cpu_percent"].items())] for p in phases
    ]
    parts.append("CPU of the rest of the box during each phase (100% = one core):")
    parts += ["  " + "  ".join(o) for o in others]
    parts.append("")
    extras = [line for p in phases if (line := _extras(p))]
    if extras:
        parts += ["Start-up, /metrics, broker, reload:", *extras, ""]
    for c in doc["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "info"}[c["ok"]]
        val = _fmt(c["value"], 3)
        detail = f"  ({c['detail']})" if c["detail"] else ""
        parts.append(f"[{mark}] {c['name']}: {val} (target {c['target']}){detail}")
    for p in phases:
        for note in p["notes"]:
            parts.append(f"note: {p['name']}: {note}")
        prof = p.get("profile")
        if prof:
            parts.append(
                f"profile of {p['name']}: {prof['raw']} ({prof['samples']} samples); top self time:"
            )
            for row in prof["self"][:12]:
                parts.append(f"  {100 * row['share']:5.1f}%  {row['frame']}")
            parts.append(
                "  by package: "
                + ", ".join(
                    f"{r['frame']} {100 * r['share']:.0f}%" for r in prof["packages_self"][:8]
                )
            )
    parts.append(
        f"\nresult: {'OK' if doc['ok'] else 'INCOMPLETE'}; lost {doc['lost']}, "
        f"duplicates {doc['duplicates']}; targets "
        f"{'met' if doc['targets_met'] else 'NOT all met'}"
    )
    return "\n".join(parts)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput, latency p50/p99 and consumer RSS over time, one line per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l, ax_m) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    for i, p in enumerate(doc["phases"]):
        color = f"C{i % 10}"
        tl = p["timeline"]
        t = [row["t"] for row in tl]
        ax_t.plot(t, [row["deliveries_per_s"] for row in tl], color=color, label=p["name"])
        lt = [row for row in tl if "p50_ms" in row]
        ax_l.plot(
            [r["t"] for r in lt], [r["p50_ms"] for r in lt], color=color, label=f"{p['name']} p50"
        )
        ax_l.plot(
            [r["t"] for r in lt],
            [r["p99_ms"] for r in lt],
            color=color,
            linestyle="--",
            label=f"{p['name']} p99",
        )
        rss = p["rss_timeline_mib"]
        ax_m.plot([x for x, _ in rss], [y for _, y in rss], color=color, label=p["name"])
    ax_t.set_ylabel("deliveries/s (1 s buckets)")
    ax_t.legend(fontsize=7, ncol=2)
    ax_l.set_ylabel("publish-to-receipt ms")
    ax_l.set_yscale("log")
    ax_l.legend(fontsize=6, ncol=2)
    ax_m.set_ylabel("consumer RSS MiB")
    ax_m.set_xlabel("seconds since the phase started")
    ax_m.legend(fontsize=7, ncol=2)
    fig.suptitle(f"loadtest {doc['scenario']}: {doc['command']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
