"""The load test's smoke scenario end to end, small accounts and batch runs, the receivers'
batch and account checks, and the accounting rules as tables.

The smoke run starts the real receivers, the bare baseline and the dispatcher as processes
against the real broker: a few hundred events, with retries (a receiver failing 10%), dead
letters (410s and invalid events) and token verification. The accounts run puts 200
subscribers in included files and reloads one more file while traffic flows; the batch run
compares a batched subscriber with the same one unbatched. Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.accounting import DeadRecord, SubscriberSpec, account
from loadtest.accounts import AccountLayout, Probe, reload_effect
from loadtest.generator import Published

REPO = Path(__file__).resolve().parents[2]


def _loadtest(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest <args>`` in its own process group, so that a run that overstays
    its timeout is stopped together with the dispatcher and receivers it started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(
            f"loadtest overstayed {timeout:g}s: {out[-2000:]}{err[-2000:]}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(90)
def test_smoke_scenario_accounts_for_every_event(tmp_path: Path) -> None:
    report, png = tmp_path / "smoke.json", tmp_path / "smoke.png"
    proc = _loadtest(
        [
            "run",
            "--scenario",
            "smoke",
            "--quiet",
            "--json",
            str(report),
            "--plot",
            str(png),
            "--out",
            str(tmp_path),
        ],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert png.stat().st_size > 10_000

    assert doc["ok"] is True
    assert doc["lost"] == 0
    for key in ("scenario", "command", "machine", "checks", "phases", "duplicates"):
        assert key in doc
    assert [p["consumer"] for p in doc["phases"]] == ["baseline", "dispatcher"]
    for phase in doc["phases"]:
        assert phase["settled"] is True
        acc = phase["accounting"]
        assert acc["lost"] == 0
        assert acc["published"] > 0
        assert acc["delivered"] + acc["dead_lettered"] == (
            acc["expected_deliveries"] + acc["invalid_published"]
        )
        assert set(phase["latency_ms"]) >= {"p50", "p90", "p99", "max", "count"}
        assert phase["throughput"]["deliveries_per_s"] > 0
        assert set(phase["process"]) >= {
            "cpu_percent",
            "cpu_seconds_window",
            "peak_rss_mib",
            "cpu_ms_per_1k_deliveries",
        }
        assert phase["process"]["peak_rss_mib"] > 0
        assert phase["timeline"]
        assert phase["per_subscriber"]
        for sub in phase["per_subscriber"].values():
            assert {"received", "unique", "duplicates", "deliveries_per_s"} <= set(sub)
    dispatcher = doc["phases"][1]
    assert dispatcher["accounting"]["dead_lettered"] > 0  # 410s and invalid events
    reasons = set(dispatcher["accounting"]["dead_letter_reasons"])
    assert {"invalid_event", "endpoint_gone"} <= reasons
    assert sum(s["verify_failures"] for s in dispatcher["per_subscriber"].values()) == 0
    assert all(c["ok"] is not False for c in doc["checks"]), doc["checks"]


@pytest.mark.timeout(120)
def test_accounts_scenario_small(tmp_path: Path) -> None:
    """The accounts scenario at 200 subscribers: included files, account routing, the broker
    census, /metrics sizes and a reload while traffic flows. Timings are reported, not
    asserted; isolation and accounting are."""
    report = tmp_path / "accounts.json"
    proc = _loadtest(
        [
            "run",
            "--scenario",
            "accounts",
            "--quiet",
            "--subscribers",
            "200",
            "--active-accounts",
            "20",
            "--events",
            "600",
            "--rounds",
            "1",
            "--duration",
            "4",
            "--json",
            str(report),
            "--plot",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path),
        ],
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["ok"] is True and doc["lost"] == 0
    assert [p["name"] for p in doc["phases"]] == [
        "2-subscribers-1",
        "200-subscribers-1",
        "200-subscribers-reload",
    ]
    checks = {c["name"].split(" (")[0]: c for c in doc["checks"]}
    assert checks["cross-account deliveries"]["ok"] is True
    assert checks["events that missed one of their account's two endpoints"]["ok"] is True
    assert checks["dispatcher ran with --workers 1"]["ok"] is True
    for phase in doc["phases"]:
        assert phase["settled"] is True
        assert phase["accounting"]["lost"] == 0
        assert phase["accounting"]["cross_account"] == 0
        assert phase["account_endpoints"]["cross_account"] == 0
        assert phase["startup_s"] > 0
        assert phase["metrics_bytes"]["end"] > 0
        assert phase["broker"] and all(c["consumers"] >= 1 for c in phase["broker"])
        assert sum(s["verify_failures"] for s in phase["per_subscriber"].values()) == 0
    many = doc["phases"][1]
    assert set(many["per_subscriber"]) == {"*.0", "*.1"}
    assert many["per_subscriber"]["*.0"]["subscribers_reached"] == 20
    reload = doc["phases"][2]["reload"]
    assert reload["subscribers_added"] == 4 and reload["file"] == "part-51.toml"
    assert reload["effective_s"] is not None  # the new subscribers got their events
    assert reload["undelivered_after_first"] == 0  # once it took effect, it stayed


@pytest.mark.timeout(90)
def test_batch_scenario_small(tmp_path: Path) -> None:
    """The batch scenario at 1,000 events: every event to the batched subscriber arrives in a
    batch (verified once over the array, counted per member), none to the unbatched one."""
    report = tmp_path / "batch.json"
    proc = _loadtest(
        [
            "run",
            "--scenario",
            "batch",
            "--quiet",
            "--events",
            "1000",
            "--rounds",
            "1",
            "--json",
            str(report),
            "--plot",
            str(tmp_path / "b.png"),
            "--out",
            str(tmp_path),
        ],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["ok"] is True and doc["lost"] == 0 and doc["duplicates"] == 0
    unbatched, batched = doc["phases"]
    assert (unbatched["name"], batched["name"]) == ("unbatched-1", "batched-1")
    one = unbatched["per_subscriber"]["sub0"]
    many = batched["per_subscriber"]["sub0"]
    assert one["unique"] == many["unique"] == 1000
    assert one["batched"] == 0 and one["requests"] == 1000
    assert many["batched"] == 1000 and many["requests"] < 1000
    assert one["verify_failures"] == many["verify_failures"] == 0
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["batched phases got every event in a batch, unbatched none"]["ok"] is True


def _pub(
    event_id: str, event_type: str = "Message.Bounced", valid: bool = True, acct: str | None = None
) -> Published:
    return Published(event_id, event_type, 0.0, valid, acct)


SUBS = [SubscriberSpec("all", ("*",)), SubscriberSpec("bounces", ("Message.Bounced",))]


@pytest.mark.parametrize(
    ("published", "received", "dead", "expect"),
    [
        # Delivered everywhere it is owed; a Delivered event is owed to "all" only.
        (
            [_pub("a"), _pub("b", "Message.Delivered")],
            [["a", "b"], ["a"]],
            [],
            {"expected_deliveries": 3, "delivered": 3, "lost": 0},
        ),
        # A missing delivery is lost unless a dead letter for that subscriber pays for it.
        ([_pub("a")], [["a"], []], [], {"lost": 1, "lost_sample": ["a -> bounces"]}),
        (
            [_pub("a")],
            [["a"], []],
            [DeadRecord("a", "bounces", "endpoint_gone: 410 Gone")],
            {"lost": 0, "dead_lettered": 1, "dead_letter_reasons": {"endpoint_gone": 1}},
        ),
        # A dead letter for another subscriber does not pay.
        ([_pub("a")], [[], ["a"]], [DeadRecord("a", "bounces", "attempts_exhausted")], {"lost": 1}),
        # An invalid event is paid only by a dead letter without a subscriber.
        (
            [_pub("x", valid=False)],
            [[], []],
            [DeadRecord("x", None, "invalid_event: bad")],
            {"lost": 0, "invalid_published": 1, "expected_deliveries": 0},
        ),
        ([_pub("x", valid=False)], [[], []], [], {"lost": 1}),
        # Duplicates are counted, receipts nobody owes are unexpected.
        (
            [_pub("a", "Message.Delivered")],
            [["a", "a", "zzz"], ["a"]],
            [],
            {"duplicates": 1, "unexpected": 2, "lost": 0},
        ),
    ],
)
def test_accounting_rules(
    published: list[Published],
    received: list[list[str]],
    dead: list[DeadRecord],
    expect: dict[str, object],
) -> None:
    got = account(published, SUBS, received, dead).as_dict()
    assert {k: got[k] for k in expect} == expect


ACCOUNT_SUBS = [
    SubscriberSpec("a.0", account="a"),
    SubscriberSpec("a.1", account="a"),
    SubscriberSpec("b.0", account="b"),
    SubscriberSpec("none"),
    SubscriberSpec("all", account="*"),
]


@pytest.mark.parametrize(
    ("published", "received", "expect"),
    [
        # An account's event is owed to its own endpoints and to "*", not to others.
        (
            [_pub("e", acct="a")],
            [["e"], ["e"], [], [], ["e"]],
            {"expected_deliveries": 3, "delivered": 3, "lost": 0, "complete_events": 1},
        ),
        # An event without an account is owed to subscribers without one (and "*").
        (
            [_pub("e")],
            [[], [], [], ["e"], ["e"]],
            {"expected_deliveries": 2, "lost": 0, "cross_account": 0},
        ),
        # Another account's event at an endpoint is unexpected and cross-account.
        (
            [_pub("e", acct="a")],
            [["e"], ["e"], ["e"], ["e"], ["e"]],
            {"unexpected": 2, "cross_account": 2, "lost": 0},
        ),
        # One endpoint of the account missing: lost, and the event is not complete.
        (
            [_pub("e", acct="a")],
            [["e"], [], [], [], ["e"]],
            {"lost": 1, "complete_events": 0, "lost_sample": ["e -> a.1"]},
        ),
    ],
)
def test_accounting_by_account(
    published: list[Published], received: list[list[str]], expect: dict[str, object]
) -> None:
    got = account(published, ACCOUNT_SUBS, received).as_dict()
    assert {k: got[k] for k in expect} == expect


def test_account_layout_files_and_reload_file() -> None:
    layout = AccountLayout(accounts=10, endpoints=2, files=5, active=4)
    tables = layout.tables([8001, 8002, 8003])
    assert len(tables) == 20
    assert tables[3] == {
        "id": "acct-00001.1",
        "account": "acct-00001",
        "url": "http://127.0.0.1:8001/a/acct-00001/1",
    }
    files = layout.files_of(tables)
    assert list(files) == [f"part-0{i}.toml" for i in range(1, 6)]
    assert all(len(t) == 4 for t in files.values())
    assert layout.active_accounts() == ("acct-00000", "acct-00002", "acct-00005", "acct-00007")
    name, extra = layout.extra_file([8001])
    assert name == "part-06.toml"
    assert [t["account"] for t in extra] == ["acct-00010"] * 2 + ["acct-00011"] * 2


def test_reload_takes_effect_from_the_first_probe_after_the_last_miss() -> None:
    probes = [Probe(f"p{i}", "n", 100.0 + i / 10) for i in range(6)]
    both = {"/a/n/0": {}, "/a/n/1": {}}
    for i, (a, b) in enumerate(
        [
            (None, None),
            (100.15, None),
            (None, None),
            (100.35, 100.36),
            (100.45, 100.47),
            (100.55, 100.55),
        ]
    ):
        if a is not None:
            both["/a/n/0"][f"p{i}"] = a
        if b is not None:
            both["/a/n/1"][f"p{i}"] = b
    effect = reload_effect(100.0, probes, both, endpoints=2)
    assert effect["effective_s"] == 0.36  # probe 3, the later of its two arrivals
    assert effect["first_delivered_s"] == 0.36
    assert effect["delivered"] == 3 and effect["probes"] == 6
    assert reload_effect(100.0, probes[:3], both, endpoints=2)["effective_s"] is None


async def test_receivers_verify_batches_and_account_endpoints(tmp_path: Path) -> None:
    """A batch is verified once over the whole array and counted per member; an account
    endpoint refuses another account's token and counts another account's event."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from loadtest.receivers import ReceiverApp
    from signing import KeyRing, TokenMinter

    ring = KeyRing.load(tmp_path, "EdDSA")
    minter = TokenMinter(ring, issuer="iss", subject="sub", ttl_seconds=300)

    async def jwks_doc(_: web.Request) -> web.Response:
        return web.json_response(ring.jwks())

    keys = web.Application()
    keys.router.add_get("/jwks", jwks_doc)
    receiver = ReceiverApp(1)
    async with TestServer(keys) as jwks, TestClient(TestServer(receiver.app)) as client:
        receiver.endpoints[0].url = str(client.make_url("/hooks/0"))
        await client.post(
            "/control/phase",
            json={"verify": True, "jwks_url": str(jwks.make_url("/jwks")), "issuer": "iss"},
        )

        def headers(
            url: str, wid: str, body: bytes, account: str | None = None, size: int | None = None
        ) -> dict[str, str]:
            token = minter.mint(audience=url, webhook_id=wid, body=body, account=account)
            h = {
                "Authorization": f"Bearer {token}",
                "webhook-id": wid,
                "Content-Type": "application/json",
            }
            if size is not None:
                h["webhook-batch-size"] = str(size)
            return h

        members = [json.dumps({"id": f"e{i}", "published_at": 1.0}).encode() for i in range(3)]
        batch = b"[" + b",".join(members) + b"]"
        url = receiver.endpoints[0].url
        r = await client.post("/hooks/0", data=batch, headers=headers(url, "b1", batch, size=3))
        assert r.status == 204
        r = await client.post("/hooks/0", data=batch, headers=headers(url, "b2", batch, size=2))
        assert r.status == 400
        stats = (await (await client.get("/control/stats")).json())[0]
        assert (stats["received"], stats["unique"], stats["requests"], stats["batched"]) == (
            3,
            3,
            1,
            3,
        )
        assert stats["verify_failures"] == 1

        path = "/a/acct-1/0"
        aurl = f"http://{client.host}:{client.port}{path}"
        other = json.dumps({"id": "x1", "account": "acct-2"}).encode()
        r = await client.post(path, data=other, headers=headers(aurl, "x1", other, "acct-1"))
        assert r.status == 204  # the token is right; the event is another account's
        r = await client.post(path, data=other, headers=headers(aurl, "x2", other, "acct-2"))
        assert r.status == 401
        paths = await (await client.get("/control/paths")).json()
        assert paths["cross_account"] == 1 and paths["own_unique"] == 0
        assert paths["reasons"] == {"wrong_account": 1}
        await receiver.close()


def test_hot_path_bench_runs_every_case() -> None:
    """The no-I/O bench drives `Pipeline.handle` through stubs; it fails (RuntimeError) when the
    stubs no longer match what the pipeline reads, so it must run here to stay usable."""
    from loadtest import bench_hot_path

    results = bench_hot_path.run(iterations=300, ablation=True)
    names = [r.name for r in results]
    assert any(n.startswith("Pipeline.handle, 1 subscriber") for n in names), names
    assert any("no token" in n for n in names), names
    assert all(r.median_us > 0 for r in results)


def test_intake_bench_takes_every_delivery_both_ways() -> None:
    """The intake bench on a small backlog: aiormq's reader puts every delivery together in
    the tap, the dispatcher's takes every one from the bytes; both see all of them."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.bench_intake",
            "--events",
            "600",
            "--rounds",
            "1",
            "--broker-url",
            os.environ.get("DISPATCHER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = {line.split()[2]: line for line in out.stdout.splitlines() if " us CPU " in line}
    assert lines["aiormq"].endswith(" 0 taken from the bytes"), out.stdout
    assert lines["dispatcher"].endswith(" 600 taken from the bytes"), out.stdout
    assert "median CPU per delivery" in out.stdout
