"""The cluster's decisions as tables: shares, budgets, views, and the breaker across processes.

The decisions (dispatcher/decisions/cluster_shares.py) run with a fake clock and heartbeats handed
from one view to another by hand; membership on the real broker is in
tests/integration/test_cluster.py.
"""

from __future__ import annotations

import math

import pytest

from dispatcher.config import BreakerConfig, SubscriberConfig
from dispatcher.decisions.circuit_breaker import BreakerState, Signal
from dispatcher.decisions.cluster_shares import (
    ALONE,
    DISCOVER,
    GONE,
    ISOLATED,
    MemberView,
    Standing,
    in_flight_share,
    rate_share,
)
from dispatcher.decisions.endpoint_limits import LaneSet

# --- shares -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "members", "shares"),
    [
        (4, 1, [4]),
        (4, 4, [1, 1, 1, 1]),
        (64, 4, [16, 16, 16, 16]),
        (5, 3, [2, 2, 1]),
        (7, 2, [4, 3]),
        (2, 4, [1, 1, 0, 0]),  # fewer slots than processes: the first ranks get one each
        (1, 3, [1, 0, 0]),
    ],
)
def test_in_flight_shares_sum_to_the_limit(limit: int, members: int, shares: list[int]) -> None:
    assert [in_flight_share(limit, members, r) for r in range(members)] == shares
    assert sum(shares) == limit


def test_shares_only_shrink_when_a_member_joins_and_only_grow_when_one_leaves() -> None:
    for limit in range(1, 40):
        for n in range(1, 12):
            for rank in range(n):
                now = in_flight_share(limit, n, rank)
                # One more member, sorted before or after this one.
                assert in_flight_share(limit, n + 1, rank) <= now
                assert in_flight_share(limit, n + 1, rank + 1) <= now
                if n > 1 and rank > 0:  # one fewer, before this one: its rank moves down
                    assert in_flight_share(limit, n - 1, rank - 1) >= now


@pytest.mark.parametrize(
    ("rate", "members", "shares"),
    [
        (50, 1, [50]),
        (50, 4, [13, 13, 12, 12]),  # whole requests per second: the caps sum to 50, not 52
        (50.5, 4, [13, 13, 12.5, 12]),
        (2.5, 4, [1, 1, 0.5, 0]),  # less than one each: some processes get none
        (0.5, 3, [0.5, 0, 0]),
    ],
)
def test_rate_shares_sum_to_the_rate_and_so_do_their_caps(
    rate: float, members: int, shares: list[float]
) -> None:
    got = [rate_share(rate, members, r) for r in range(members)]
    assert got == shares and sum(got) == rate
    assert sum(math.ceil(s) for s in got) == math.ceil(rate)  # per-second caps, rounded up
    assert rate_share(50, 0, 0) == 0


# --- budgets ----------------------------------------------------------------------------------

AGREED_4 = Standing(members=4, rank=1, agreed=True, settled=(4, 1))
UNSETTLED_2_TO_4 = Standing(members=4, rank=1, agreed=False, settled=(2, 1))


@pytest.mark.parametrize(
    ("standing", "held", "budget", "why"),
    [
        (ALONE, None, 8, "alone: the whole limit"),
        (Standing(holding=False), None, 0, "joining or cut off: nothing"),
        (Standing(holding=False), 8, 0, "joining or cut off: nothing, whatever it held"),
        (AGREED_4, None, 2, "agreed: the share in this view"),
        (AGREED_4, 1, 2, "agreed: grows to the share"),
        (AGREED_4, 5, 2, "agreed: shrinks to the share"),
        (Standing(members=4, rank=1, blocked=frozenset({"s"})), 1, 1, "blocked: never grows"),
        (Standing(members=4, rank=1, blocked=frozenset({"s"})), None, 0, "blocked: new lane"),
        (Standing(members=4, rank=1, blocked=None), 1, 1, "everything blocked"),
        (Standing(members=4, rank=1, blocked=frozenset({"other"})), 1, 2, "another's block"),
        (UNSETTLED_2_TO_4, 4, 2, "not agreed: shrinks at once"),
        (UNSETTLED_2_TO_4, 1, 1, "not agreed: never grows"),
        (UNSETTLED_2_TO_4, None, 2, "not agreed, new lane: min(last agreed, now)"),
        (Standing(members=2, rank=1, agreed=False, settled=(4, 3)), None, 2, "min(2, 4)"),
    ],
)
def test_in_flight_budget(standing: Standing, held: int | None, budget: int, why: str) -> None:
    assert standing.in_flight("s", 8, held) == budget, why


@pytest.mark.parametrize(
    ("standing", "held", "budget"),
    [
        (ALONE, None, 50.0),
        (Standing(holding=False), 50.0, 0.0),
        (AGREED_4, 25.0, 13.0),
        (Standing(members=4, rank=3, agreed=True, settled=(4, 3)), 25.0, 12.0),
        (Standing(members=2, rank=0, agreed=False, settled=(4, 0)), 13.0, 13.0),
        (Standing(members=2, rank=0, agreed=False, settled=(4, 0)), None, 13.0),
        (Standing(members=2, rank=0, agreed=True, settled=(2, 0)), 13.0, 25.0),
    ],
)
def test_rate_budget(standing: Standing, held: float | None, budget: float) -> None:
    assert standing.rate(50.0, held) == budget


# --- views ------------------------------------------------------------------------------------


class Bus:
    """Heartbeats handed from view to view by hand, at a clock the test moves."""

    def __init__(self, *ids: str) -> None:
        self.now = 100.0
        self.views = {i: MemberView(i) for i in ids}
        self.over: dict[str, frozenset[str] | None] = {i: frozenset() for i in ids}
        for view in self.views.values():
            view.begin(self.now)

    def add(self, member: str) -> MemberView:
        view = self.views[member] = MemberView(member)
        self.over[member] = frozenset()
        view.begin(self.now)
        return view

    def round(self, *senders: str, to: tuple[str, ...] | None = None) -> None:
        """Each sender's heartbeat reaches every view in ``to`` (default: all), itself included."""
        beats = [self.views[s].heartbeat(self.over[s]) for s in senders or tuple(self.views)]
        for beat in beats:
            for member in to or tuple(self.views):
                self.views[member].heard(beat, self.now)

    def settle(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.round()

    def standing(self, member: str) -> Standing:
        return self.views[member].standing


def test_alone_holds_everything_once_the_broker_says_nobody_else_is_there() -> None:
    bus = Bus("a")
    view = bus.views["a"]
    assert not view.standing.holding
    bus.round()  # its own heartbeat came back: connected, but it may not be alone
    assert not view.standing.holding
    view.expect(1, bus.now)
    assert view.standing == Standing(holding=True, members=1, rank=0, agreed=True)
    assert view.standing.alone and view.fresh_until() == bus.now + ISOLATED


def test_without_a_count_a_newcomer_waits_before_it_believes_it_is_alone() -> None:
    bus = Bus("a")
    bus.round()
    bus.now += DISCOVER - 0.1
    bus.round()
    assert not bus.standing("a").holding
    bus.now += 0.1
    bus.round()
    assert bus.standing("a").holding


def test_two_processes_agree_and_split_by_rank() -> None:
    bus = Bus("b", "a")
    for view in bus.views.values():
        view.expect(2, bus.now)
    bus.round("a")  # b hears a (a is not yet sure of b): nobody holds yet
    assert not bus.standing("a").holding and not bus.standing("b").holding
    bus.settle()
    a, b = bus.standing("a"), bus.standing("b")
    assert (a.holding, a.members, a.rank, a.agreed) == (True, 2, 0, True)
    assert (b.holding, b.members, b.rank, b.agreed) == (True, 2, 1, True)
    assert a.prober and not b.prober
    assert (a.in_flight("s", 5, None), b.in_flight("s", 5, None)) == (3, 2)


def test_a_newcomer_takes_nothing_until_the_others_shrank_and_drained() -> None:
    bus = Bus("a", "c")
    for view in bus.views.values():
        view.expect(2, bus.now)
    bus.settle()
    budget_a = bus.standing("a").in_flight("s", 4, None)
    assert budget_a == 2
    bus.add("b").expect(3, bus.now)
    bus.round("b")  # a and c hear the newcomer: they shrink at once, before it takes anything
    a = bus.standing("a")
    assert not a.agreed and a.members == 3
    budget_a = a.in_flight("s", 4, budget_a)
    assert budget_a == 2  # rank 0 of 3 keeps 2 (4 = 2 + 1 + 1)
    budget_c = bus.standing("c").in_flight("s", 4, 2)
    assert budget_c == 1
    assert bus.standing("b").in_flight("s", 4, None) == 0
    # c still has two requests running, one over its new share: it says so, and b waits.
    bus.over["c"] = frozenset({"s"})
    bus.settle()
    b = bus.standing("b")
    assert b.holding and b.agreed and b.is_blocked("s")
    assert b.in_flight("s", 4, None) == 0 and b.in_flight("t", 4, None) == 1
    bus.over["c"] = frozenset()
    bus.settle()
    assert bus.standing("b").in_flight("s", 4, 0) == 1


def test_a_member_gone_silent_is_dropped_and_the_survivors_grow() -> None:
    bus = Bus("a", "b", "c")
    for view in bus.views.values():
        view.expect(3, bus.now)
    bus.settle()
    assert bus.standing("b").in_flight("s", 6, None) == 2
    survivors = ("a", "b")
    bus.now += GONE / 2
    bus.round(*survivors, to=survivors)
    bus.now += GONE / 2 + 0.01
    for m in survivors:
        bus.views[m].tick(bus.now)
    assert bus.standing("b").members == 2 and not bus.standing("b").agreed
    assert bus.standing("b").in_flight("s", 6, 2) == 2  # not agreed yet: no growth
    bus.round(*survivors, to=survivors)
    bus.round(*survivors, to=survivors)
    assert bus.standing("b").agreed and bus.standing("b").in_flight("s", 6, 2) == 3


def test_a_goodbye_removes_a_member_at_once() -> None:
    bus = Bus("a", "b")
    for view in bus.views.values():
        view.expect(2, bus.now)
    bus.settle()
    bus.views["b"].left("a", bus.now)
    bus.round("b", to=("b",))
    assert bus.standing("b").members == 1 and bus.standing("b").agreed
    assert bus.standing("b").prober


def test_a_process_cut_off_holds_nothing_then_rejoins() -> None:
    bus = Bus("a", "b")
    for view in bus.views.values():
        view.expect(2, bus.now)
    bus.settle()
    assert bus.standing("a").holding
    bus.now += ISOLATED + 0.01  # a hears nothing, not even itself
    bus.views["a"].tick(bus.now)
    a = bus.standing("a")
    assert not a.holding and a.in_flight("s", 4, 2) == 0 and a.rate(50, 25) == 0
    assert bus.views["a"].fresh_until() == float("-inf")
    bus.views["a"].expect(2, bus.now)
    bus.settle()
    assert bus.standing("a").holding and bus.standing("a").agreed


def test_a_joining_member_is_sent_the_breaker_states_once() -> None:
    bus = Bus("a")
    bus.views["a"].expect(1, bus.now)
    bus.settle()
    bus.add("b")
    bus.round("b")
    assert bus.views["a"].take_joiners() == ["b"]
    bus.round("b")
    assert bus.views["a"].take_joiners() == []


# --- the breaker across processes, through a lane set -------------------------------------------

SUB = SubscriberConfig(id="s", url="https://s.example/h", max_in_flight=2)


def lanes_for(*subs: SubscriberConfig, **policy: float) -> LaneSet:
    lanes = LaneSet(BreakerConfig(**policy), prefetch=64)  # type: ignore[arg-type]
    lanes.retain({s.id for s in subs}, {s.id: s for s in subs})
    return lanes


def test_failures_heard_from_others_open_the_breaker_here_too() -> None:
    lanes = lanes_for(SUB, failure_threshold=3, cooldown=10)
    lanes.heard("s", Signal.FAILED)
    lanes.heard("s", Signal.FAILED)
    lane = lanes.get("s")
    assert lane is not None and lane.breaker.failures == 2
    lanes.heard("s", Signal.RECOVERED)
    assert lane.breaker.failures == 0
    for _ in range(3):
        lanes.heard("s", Signal.FAILED)
    assert lane.breaker.state is BreakerState.OPEN
    lanes.heard("s", Signal.CLOSED)
    assert lane.breaker.state is BreakerState.CLOSED and lane.takes_parked
    lanes.heard("unknown", Signal.OPENED, open_for=5)  # not configured here: ignored
    assert lanes.get("unknown") is None


def test_a_joining_process_takes_on_the_others_breaker_states() -> None:
    there = lanes_for(SUB, failure_threshold=3, cooldown=10)
    for _ in range(3):
        there.heard("s", Signal.FAILED)
    [(sub, failures, open_for, cooldown)] = there.unhealthy()
    assert (sub, cooldown) == ("s", 10) and open_for is not None and 9 < open_for <= 10
    joining = lanes_for(SUB, failure_threshold=3, cooldown=10)
    joining.restore(sub, failures, open_for, cooldown)
    lane = joining.get("s")
    assert lane is not None and lane.breaker.state is BreakerState.OPEN
    assert not lane.takes_parked


async def test_a_view_change_recomputes_busy_lanes_now_and_idle_ones_when_next_used() -> None:
    other = SubscriberConfig(id="t", url="https://t.example/h", max_in_flight=2)
    lanes = lanes_for(SUB, other)
    busy, idle = lanes.lane(SUB), lanes.lane(other)
    slot = await busy.acquire()
    lanes.apply(Standing(members=2, rank=1, settled=(2, 1)))
    assert not busy.stale and busy.target == 1 and lanes.over(10) == frozenset()
    assert idle.stale  # nothing to do for it until it is used (50,000 lanes, one pass)
    assert idle.budget == 1 and not idle.stale
    busy.release(slot, True)  # type: ignore[arg-type]
    # An idle lane that catches up while the view is not agreed gets a new lane's budget: the
    # smaller of its share in the last agreed view and its share now.
    lanes.apply(Standing(members=3, rank=2, agreed=False, settled=(2, 1)))
    assert idle.stale and idle.budget == 0  # 2 over 3: ranks 0 and 1 only


def test_a_process_asked_to_take_parked_deliveries_while_it_had_no_share_does_once_it_has() -> None:
    lanes = lanes_for(SUB)
    asked: list[str] = []
    lanes.on_parked_elsewhere = asked.append
    lanes.apply(Standing(holding=False))  # joining
    lanes.parked_elsewhere("s")  # another process parks s for want of room
    assert asked == []
    lanes.apply(Standing(members=2, rank=1, settled=(2, 1)))  # joined: the lane is idle
    assert asked == ["s"]
