"""Accounts and filters: each customer's events reach only that customer's endpoints.

Pure tables and a property test for the routing decision; config tables for accounts, filters
and include files; then the real pipeline, broker and receivers.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.config import ConfigError, SubscriberConfig, load_config, parse_config
from dispatcher.decisions.events import KNOWN_EVENT_TYPES
from dispatcher.decisions.routing import RoutingTable, filter_passes, pattern_matches
from signing import VerificationError, WebhookVerifier
from tests.support.harness import (
    Publisher,
    ReceiverServer,
    always,
    dead_letters,
    event_body,
    running,
    settle,
    wait_for_dead_letters,
    wait_until,
)

# --- the routing decision (pure) ---------------------------------------------------------------


def sub(sub_id: str, account: str | None = None, events=("*",), rules=None) -> SubscriberConfig:
    return SubscriberConfig(
        id=sub_id,
        url=f"https://{sub_id}.example/h",
        events=tuple(events),
        account=account,
        filter=tuple((tuple(p.split(".")), frozenset(v)) for p, v in (rules or {}).items()),
    )


TABLE = RoutingTable(
    [
        sub("plain"),
        sub("acme-1", "acme"),
        sub("acme-2", "acme", events=["Message.Bounced"]),
        sub("globex", "globex"),
        sub("provider", "*"),
        sub("provider-bounces", "*", events=["Message.Bounced"]),
    ]
)


@pytest.mark.parametrize(
    ("account", "event_type", "expected"),
    [
        ("acme", "Message.Bounced", ["acme-1", "acme-2", "provider", "provider-bounces"]),
        ("acme", "Message.Delivered", ["acme-1", "provider"]),
        ("globex", "Message.Bounced", ["globex", "provider", "provider-bounces"]),
        (None, "Message.Bounced", ["plain", "provider", "provider-bounces"]),
        (None, "Message.Complained", ["plain", "provider"]),
        ("initech", "Message.Bounced", ["provider", "provider-bounces"]),
    ],
)
def test_an_event_reaches_its_account_and_the_provider_only(account, event_type, expected):
    got = [s.id for s in TABLE.targets(account, event_type, {})]
    assert got == expected
    assert got == [s.id for s in TABLE.targets(account, event_type, {})]  # cached, same answer


@pytest.mark.parametrize(
    ("rules", "doc", "passes"),
    [
        (
            {"data.bounce_type": ["HardBounce", "Blocked"]},
            {"data": {"bounce_type": "Blocked"}},
            True,
        ),
        ({"data.bounce_type": ["HardBounce"]}, {"data": {"bounce_type": "SoftBounce"}}, False),
        ({"data.bounce_type": ["HardBounce"]}, {"data": {}}, False),  # missing: no pass
        ({"data.bounce_type": ["HardBounce"]}, {"data": "x"}, False),
        ({"data.tags": ["vip"]}, {"data": {"tags": ["news", "vip"]}}, True),  # any element
        ({"data.tags": ["vip"]}, {"data": {"tags": ["news"]}}, False),
        ({"data.tags": ["vip"]}, {"data": {"tags": []}}, False),
        ({"data.tags": ["1"]}, {"data": {"tags": [1]}}, False),  # not a string
        ({"data.n": ["1"]}, {"data": {"n": 1}}, False),
        # AND across keys, OR within one.
        (
            {"event": ["Message.Bounced"], "data.bounce_type": ["HardBounce"]},
            {"event": "Message.Bounced", "data": {"bounce_type": "HardBounce"}},
            True,
        ),
        (
            {"event": ["Message.Bounced"], "data.bounce_type": ["HardBounce"]},
            {"event": "Message.Deferred", "data": {"bounce_type": "HardBounce"}},
            False,
        ),
    ],
)
def test_filter_table(rules, doc, passes) -> None:
    compiled = tuple((tuple(p.split(".")), frozenset(v)) for p, v in rules.items())
    assert filter_passes(compiled, doc) is passes


ACCOUNTS = st.sampled_from(["acme", "globex", "initech", "a.b-c_1"])
SUB_ACCOUNTS = st.one_of(st.none(), st.just("*"), ACCOUNTS)
PATTERNS = st.lists(st.sampled_from(["*", "Message.*", *KNOWN_EVENT_TYPES]), min_size=1, max_size=3)
BOUNCE = st.sampled_from(["HardBounce", "SoftBounce", "Blocked", "Undetermined"])


@settings(max_examples=300, deadline=None)
@given(
    subs=st.lists(
        st.tuples(SUB_ACCOUNTS, PATTERNS, st.one_of(st.none(), st.lists(BOUNCE, min_size=1))),
        max_size=12,
    ),
    events=st.lists(
        st.tuples(st.one_of(st.none(), ACCOUNTS), st.sampled_from(KNOWN_EVENT_TYPES), BOUNCE),
        min_size=1,
        max_size=10,
    ),
)
def test_no_event_ever_reaches_another_accounts_endpoint(subs, events) -> None:
    configs = [
        sub(f"s{i}", account, patterns, {"data.bounce_type": bounce} if bounce else {})
        for i, (account, patterns, bounce) in enumerate(subs)
    ]
    table = RoutingTable(configs)
    for account, event_type, bounce in events:
        doc = {"event": event_type, "data": {"bounce_type": bounce}}
        if account is not None:
            doc["account"] = account
        got = table.targets(account, event_type, doc)
        for s in got:
            # The account rule: the event's own account, or the provider's "*".
            assert s.account == "*" or s.account == account
            if account is None:
                assert s.account in (None, "*")
        # And nothing that should get it is left out (a brute-force answer, config order).
        expected = [
            s
            for s in configs
            if (s.account == "*" or s.account == account)
            and any(pattern_matches(p, event_type) for p in s.events)
            and (not s.filter or filter_passes(s.filter, doc))
        ]
        assert list(got) == expected


# --- configuration -----------------------------------------------------------------------------

X = '[[subscribers]]\nid = "x"\nurl = "http://127.0.0.1:9/x"\n'
BASE = """
allow_private_networks = true
include = ["subscribers.d/*.toml"]

[[subscribers]]
id = "suppression"
url = "http://127.0.0.1:9/all"
account = "*"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_include_files_add_subscribers_with_accounts_and_filters(tmp_path: Path) -> None:
    main = write(tmp_path / "dispatcher.toml", BASE)
    write(
        tmp_path / "subscribers.d" / "acme.toml",
        """
[[subscribers]]
id = "acme-hooks"
url = "http://127.0.0.1:9/acme"
account = "acme"
events = ["Message.Bounced"]
filter = { "data.bounce_type" = ["HardBounce", "Blocked"] }
""",
    )
    write(
        tmp_path / "subscribers.d" / "globex.toml",
        '[[subscribers]]\nid = "globex"\nurl = "http://127.0.0.1:9/g"\naccount = "globex"\n',
    )
    cfg = load_config(main, env={})
    assert [s.id for s in cfg.subscribers] == ["suppression", "acme-hooks", "globex"]
    acme = cfg.subscriber("acme-hooks")
    assert acme is not None and acme.account == "acme"
    assert acme.filter == ((("data", "bounce_type"), frozenset({"HardBounce", "Blocked"})),)
    assert acme.source.endswith("acme.toml")
    shown = cfg.masked()
    assert shown["include"] == ["subscribers.d/*.toml"]
    assert shown["subscribers"][1]["filter"] == {"data.bounce_type": ["Blocked", "HardBounce"]}


@pytest.mark.parametrize(
    ("included", "message"),
    [
        (
            '[[subscribers]]\nid = "suppression"\nurl = "http://127.0.0.1:9/x"\n',
            r"bad\.toml: subscribers\[0\]\.id: duplicate subscriber id 'suppression' \(first in",
        ),
        (
            '[[subscribers]]\nid = "x"\nurl = "ftp://h/x"\n',
            r"bad\.toml: subscribers\[0\]\.url: bad URL",
        ),
        (
            X + 'account = "a b"\n',
            r'bad\.toml: subscribers\[0\]\.account: must be "\*" or 1-64 characters',
        ),
        (X + 'account = ""\n', r"bad\.toml: subscribers\[0\]\.account: must not be empty"),
        (
            X + 'filter = { "data.tags" = [] }\n',
            r'bad\.toml: subscribers\[0\]\.filter\."data\.tags": an empty list can never match',
        ),
        (
            X + 'filter = { "data..x" = ["a"] }\n',
            r'bad\.toml: subscribers\[0\]\.filter\."data\.\.x": bad path',
        ),
        (
            X + 'filter = { "event.x" = ["a"] }\n',
            r"filter\.\"event\.x\": can never match: 'event' is a string",
        ),
        (X + 'filter = { "data.n" = [1] }\n', r'filter\."data\.n": expected a list of strings'),
        (X + "filter = {}\n", r"subscribers\[0\]\.filter: must name at least one field"),
        (
            X + 'algorithm = "HS256"\n',
            r"subscribers\[0\]\.algorithm: must be one of EdDSA, ES256, RS256",
        ),
        (
            '[broker]\nqueue = "x"\n',
            r"bad\.toml: broker: unknown key \(an included file holds only",
        ),
        ("[[subscribers]\n", r"bad\.toml: invalid TOML"),
    ],
)
def test_include_mistakes_are_one_line_naming_file_and_key(tmp_path, included, message) -> None:
    main = write(tmp_path / "dispatcher.toml", BASE)
    write(tmp_path / "subscribers.d" / "bad.toml", included)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(main, env={})
    assert "\n" not in str(info.value)


def test_an_included_path_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    main = write(tmp_path / "d.toml", 'include = ["customers.toml"]\n')
    missing = r"include\[0\]: included file 'customers.toml' not found"
    with pytest.raises(ConfigError, match=missing):
        load_config(main, env={})
    # A glob that matches nothing yet is fine: the automation has not written a file so far.
    write(tmp_path / "d.toml", 'include = ["customers/*.toml"]\n')
    assert load_config(tmp_path / "d.toml", env={}).subscribers == ()


def test_subscriber_batch_config() -> None:
    doc = {
        "allow_private_networks": True,
        "subscribers": [
            {
                "id": "b",
                "url": "http://127.0.0.1:9/b",
                "batch": {"max_events": 50, "max_wait": "250ms", "max_bytes": "512KiB"},
            },
        ],
    }
    batch = parse_config(doc, env={}).subscribers[0].batch
    assert batch is not None and (batch.max_events, batch.max_wait, batch.max_bytes) == (
        50,
        0.25,
        512 * 1024,
    )
    doc["subscribers"][0]["batch"] = {"max_events": 0}
    with pytest.raises(ConfigError, match=r"subscribers\[0\]\.batch\.max_events: must be 1 to"):
        parse_config(doc, env={})
    doc["subscribers"][0]["batch"] = {"max_bytes": "lots"}
    with pytest.raises(ConfigError, match=r"subscribers\[0\]\.batch\.max_bytes: bad size"):
        parse_config(doc, env={})


# --- end to end --------------------------------------------------------------------------------


async def test_each_account_gets_its_own_events_and_the_provider_gets_all(
    make, receivers: ReceiverServer
) -> None:
    acme = receivers.add("acme")
    acme_bounces = receivers.add("acme-bounces")
    globex = receivers.add("globex")
    plain = receivers.add("plain")
    provider = receivers.add("provider")
    cfg = make(
        [
            {"id": "acme", "url": acme.url, "account": "acme"},
            {
                "id": "acme-bounces",
                "url": acme_bounces.url,
                "account": "acme",
                "events": ["Message.Bounced"],
            },
            {"id": "globex", "url": globex.url, "account": "globex"},
            {"id": "plain", "url": plain.url},
            {"id": "provider", "url": provider.url, "account": "*"},
        ]
    )
    events = [
        event_body(event_id="a1", account="acme"),
        event_body("Message.Delivered", n=2, event_id="a2", account="acme"),
        event_body(event_id="g1", account="globex"),
        event_body(event_id="n1"),  # no account
        event_body(event_id="i1", account="initech"),  # an account nobody else registered
    ]
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many(events)
        assert await wait_until(lambda: provider.count == 5)
        await settle()
    assert sorted(acme.ids()) == ["a1", "a2"]
    assert acme_bounces.ids() == ["a1"]
    assert globex.ids() == ["g1"]
    assert plain.ids() == ["n1"]
    assert sorted(provider.ids()) == ["a1", "a2", "g1", "i1", "n1"]
    # What each endpoint got belongs to its account, byte for byte.
    for rec, account in ((acme, "acme"), (acme_bounces, "acme"), (globex, "globex")):
        for got in rec.requests:
            assert orjson.loads(got.body)["account"] == account
    assert all("account" not in orjson.loads(r.body) for r in plain.requests)


async def test_filters_select_exactly(make, receivers: ReceiverServer) -> None:
    hard = receivers.add("hard")
    vip = receivers.add("vip")
    cfg = make(
        [
            {
                "id": "hard",
                "url": hard.url,
                "account": "acme",
                "events": ["Message.Bounced"],
                "filter": {"data.bounce_type": ["HardBounce", "Blocked"]},
            },
            {"id": "vip", "url": vip.url, "account": "acme", "filter": {"data.tags": ["vip"]}},
        ]
    )
    events = [
        event_body(event_id="h", account="acme", bounce_type="HardBounce"),
        event_body(event_id="b", account="acme", bounce_type="Blocked", tags=["vip", "x"]),
        event_body(event_id="s", account="acme", bounce_type="SoftBounce", tags=["news"]),
        event_body("Message.Delivered", event_id="d", account="acme", tags=["vip"]),
        event_body(event_id="o", account="globex", bounce_type="HardBounce", tags=["vip"]),
    ]
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish_many(events)
        assert await wait_until(lambda: hard.count == 2 and vip.count == 2)
        await settle()
    assert sorted(hard.ids()) == ["b", "h"]
    assert sorted(vip.ids()) == ["b", "d"]


async def test_an_invalid_account_is_dead_lettered_naming_it(make, receivers) -> None:
    provider = receivers.add("provider")
    cfg = make([{"id": "provider", "url": provider.url, "account": "*"}])
    async with running(cfg), Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="bad", account="acme; DROP"))
        await pub.publish(event_body(event_id="ok", account="acme"))
        letters = await wait_for_dead_letters(cfg, 1)
        assert await wait_until(lambda: provider.count == 1)
    assert provider.ids() == ["ok"]
    assert letters[0].record.reason == (
        "invalid_event: \"account\" must be 1-64 characters of A-Z a-z 0-9 . _ -, got 'acme; DROP'"
    )


async def test_a_token_names_its_account_and_another_accounts_verifier_refuses_it(
    make, receivers: ReceiverServer
) -> None:
    acme = receivers.add("acme")
    gone = receivers.add("gone", always(410))
    cfg = make(
        [
            {"id": "acme", "url": acme.url, "account": "acme"},
            {"id": "gone", "url": gone.url, "account": "acme"},
        ]
    )
    async with running(cfg) as disp, Publisher(cfg) as pub:
        await pub.publish(event_body(event_id="t1", account="acme"))
        assert await wait_until(lambda: acme.count == 1)
        letters = await wait_for_dead_letters(cfg, 1)
        jwks = disp.keyring.jwks()
    got = acme.requests[0]
    for_acme = WebhookVerifier(
        jwks=jwks, audience=acme.url, issuer=cfg.signing.issuer, account="acme"
    )
    claims = await for_acme.verify(got.headers, got.body)
    assert isinstance(claims, dict) and claims["account"] == "acme"
    for_globex = WebhookVerifier(
        jwks=jwks, audience=acme.url, issuer=cfg.signing.issuer, account="globex"
    )
    with pytest.raises(VerificationError) as info:
        await for_globex.verify(got.headers, got.body)
    assert info.value.reason == "wrong_account"
    # The dead letter names the account its event belongs to.
    assert letters[0].record.account == "acme"
    assert [dl.record.account for dl in await dead_letters(cfg)] == ["acme"]
