"""Cluster-wide subscriber limits, the decisions: who is in the cluster, and what each process
may take of every subscriber's limits. No I/O and no clock of its own: dispatcher/broker/cluster.py
feeds it the heartbeats it hears and the time, and hands the resulting `Standing` to the lanes.

**Shares.** The *view* is the sorted list of the member ids a process hears; n is its size and a
process's rank its index in it. A subscriber's limits are split so that they sum to the limit:

    in-flight share of limit L   L // n + (1 if rank < L % n else 0)   (0 for ranks >= L when L < n)
    rate share of rate R         the in-flight share of floor(R), plus R's fraction for the
                                 rank floor(R) % n

A process never sends more in any one second than its rate share rounded up, so the rounded-up
shares summing to R (rounded up) keeps the whole cluster within R in every second, not just on
average (R / n each would allow n - 1 more: 52 in a second at 50/s over four processes).

A member that joins only ever makes the others' shares smaller; one that leaves only ever makes
them larger (a rank never moves up when a member leaves, and `L // n` never grows when n does).

**Views.** Every member publishes a heartbeat every `HEARTBEAT` seconds: its id, and for each
member it hears (itself included) that member's *view number*, which a member bumps whenever its
own view changes. A member not heard for `GONE` seconds is gone (a goodbye removes it at once).
A view is *agreed* when every other member in it reports exactly that view and has seen this
member's latest view number, i.e. wrote its report after this member's last change.

**Budgets** (what one lane may use in this process), one row per rule, first match wins:

    this process                                   budget for subscriber S
    is joining, or is cut off (it has not heard    0
      its own heartbeat for ISOLATED seconds)
    view agreed, no member over its share of S     its share of S in this view
    a lane made now, while some member is over S   0
    a lane made now, view not agreed               min(share in the last agreed view, share now)
    otherwise                                      min(budget it holds, share now): shrink only

So a budget grows only once every member has taken the same view on board and none of them
still uses more of S than its share in it (a heartbeat lists those subscribers, ``over``). A
process that joins therefore waits for the others to shrink, and for their requests beyond
their new share to end, before it takes anything; survivors of a member that died grow as soon
as they agree on it (within `GONE` plus one exchange of heartbeats).

**Joining.** A process that starts, or rejoins after being cut off, holds nothing until its view
is agreed; and while it has heard no other member, until it knows there is none: the broker
counts the processes registered on the queue (``expect``), or `DISCOVER` seconds passed. Since
`ISOLATED` < `DISCOVER`, any member that may be sending has published a heartbeat within that
time, so a newcomer hears it before it takes a share. `ISOLATED` < `GONE`: a member that is cut
off stops starting requests before the others count it gone and take over its share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "ALONE",
    "DISCOVER",
    "GONE",
    "HEARTBEAT",
    "ISOLATED",
    "Heartbeat",
    "MemberView",
    "Standing",
    "in_flight_share",
    "rate_share",
]

# Safe in this order: ISOLATED < GONE (a member cut off stops before the others take over its
# share) and ISOLATED < DISCOVER (a newcomer hears every member that may be sending). Generous
# against a busy event loop: a worker that takes in a full prefetch window at once on a loaded
# machine was measured to miss its own heartbeat for up to two seconds.
HEARTBEAT = 0.5  # seconds between heartbeats
ISOLATED = 2.0  # own heartbeat not heard back for this long: cut off, hold nothing
GONE = 3.0  # a member not heard for this long is gone
DISCOVER = 2.25  # a newcomer that hears nobody waits this long (unless the broker says alone)


def in_flight_share(limit: int, members: int, rank: int) -> int:
    """This rank's part of an in-flight limit; the parts of ranks 0..members-1 sum to it."""
    if members <= 0 or not 0 <= rank < members:
        return 0
    return limit // members + (1 if rank < limit % members else 0)


def rate_share(rate: float, members: int, rank: int) -> float:
    """This rank's part of a rate limit (requests/s); the parts of all ranks sum to it."""
    if members <= 0 or not 0 <= rank < members:
        return 0.0
    whole = math.floor(rate)
    share = float(in_flight_share(whole, members, rank))
    return share + (rate - whole if rank == whole % members else 0.0)


@dataclass(frozen=True, slots=True)
class Standing:
    """What this process may take, as its view of the cluster says (see the budget table)."""

    holding: bool = True  # False while joining or cut off: every budget is 0
    members: int = 1
    rank: int = 0
    agreed: bool = True
    settled: tuple[int, int] = (1, 0)  # (members, rank) of the last agreed view
    blocked: frozenset[str] | None = frozenset()  # subscribers a member is over on; None: all

    @property
    def alone(self) -> bool:
        return self.holding and self.members == 1 and self.agreed

    @property
    def prober(self) -> bool:
        """Does this process probe open breakers? The first member of the view does."""
        return self.holding and self.rank == 0

    def is_blocked(self, sub: str) -> bool:
        return self.blocked is None or sub in self.blocked

    def target(self, limit: int) -> int:
        """The in-flight share of ``limit`` in the current view (what ``over`` compares with)."""
        return in_flight_share(limit, self.members, self.rank) if self.holding else 0

    def in_flight(self, sub: str, limit: int, held: int | None) -> int:
        """The in-flight budget; ``held`` is the lane's current budget (None: a new lane)."""
        if not self.holding:
            return 0
        now = in_flight_share(limit, self.members, self.rank)
        if self.agreed and not self.is_blocked(sub):
            return now
        if held is None:
            if self.is_blocked(sub):
                return 0
            held = in_flight_share(limit, *self.settled)
        return min(held, now)

    def rate(self, rate: float, held: float | None) -> float:
        """The rate budget (requests/s) of a rate limit; ``held`` as for `in_flight`."""
        if not self.holding:
            return 0.0
        now = rate_share(rate, self.members, self.rank)
        if self.agreed:
            return now
        if held is None:
            held = rate_share(rate, *self.settled)
        return min(held, now)


ALONE = Standing()  # a process on its own: every limit is its own, exactly as configured


@dataclass(frozen=True, slots=True)
class Heartbeat:
    member: str
    seen: Mapping[str, int]  # member -> its view number, as the sender last heard it
    over: frozenset[str] | None = frozenset()  # subscribers over their share; None: too many
    joining: bool = False


@dataclass(slots=True)
class _Heard:
    at: float
    beat: Heartbeat


@dataclass(slots=True)
class MemberView:
    """One process's view of the members on its queue, and the standing that follows from it."""

    me: str
    gone: float = GONE
    isolated: float = ISOLATED
    discover: float = DISCOVER
    vseq: int = 0
    joining: bool = True
    reply_wanted: bool = False  # something changed that the others should hear soon
    view_changes: int = 0
    _heard: dict[str, _Heard] = field(default_factory=dict)
    _view: tuple[str, ...] = ()
    _began: float = 0.0
    _self_heard: float | None = None
    _expect: int | None = None
    _settled: tuple[int, int] | None = None
    _synced: dict[str, int] = field(default_factory=dict)
    _joiners: list[str] = field(default_factory=list)
    standing: Standing = field(default_factory=lambda: Standing(holding=False))

    # --- events ----------------------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """Start (or restart, after being cut off) joining: hold nothing until agreed again."""
        self.joining = True
        self.vseq += 1
        self._began = now
        self._self_heard = None
        self._expect = None
        self._settled = None
        self.reply_wanted = True
        self._update(now)

    def expect(self, members: int | None, now: float) -> None:
        """The broker's count of processes registered on the queue (this one included)."""
        self._expect = members
        self._update(now)

    def heard(self, beat: Heartbeat, now: float) -> None:
        if beat.member == self.me:
            self._self_heard = now
        else:
            before = self._heard.get(beat.member)
            if before is None or before.beat.seen.get(beat.member) != beat.seen.get(beat.member):
                self.reply_wanted = True  # a newcomer, or a new view number to acknowledge
            self._heard[beat.member] = _Heard(now, beat)
            if beat.joining and self._synced.get(beat.member) != beat.seen.get(beat.member):
                self._synced[beat.member] = beat.seen.get(beat.member, -1)
                self._joiners.append(beat.member)
        self._update(now)

    def left(self, member: str, now: float) -> None:
        """A goodbye: the member stopped cleanly, after its last request ended."""
        if self._heard.pop(member, None) is not None:
            self._synced.pop(member, None)
            self._update(now)

    def tick(self, now: float) -> None:
        """Forget members not heard for `gone`; restart joining when cut off."""
        for member in [m for m, h in self._heard.items() if now - h.at > self.gone]:
            del self._heard[member]
            self._synced.pop(member, None)
        if not self.joining and not self._fresh(now):
            self.begin(now)
            return
        self._update(now)

    # --- what follows ----------------------------------------------------------------------------

    @property
    def members(self) -> tuple[str, ...]:
        return self._view

    def fresh_until(self) -> float:
        """Until when this process may start requests (its own heartbeat heard recently)."""
        if self._self_heard is None or self.joining:
            return float("-inf")
        return self._self_heard + self.isolated

    def take_joiners(self) -> list[str]:
        """Members that started joining since the last call (they want the breaker states)."""
        out, self._joiners = self._joiners, []
        return out

    def heartbeat(self, over: frozenset[str] | None) -> Heartbeat:
        seen = {m: h.beat.seen.get(m, 0) for m, h in self._heard.items()}
        seen[self.me] = self.vseq
        return Heartbeat(self.me, seen, over, self.joining)

    def disagreeing(self) -> list[str]:
        """Members whose latest heartbeat does not (yet) confirm this view."""
        view = set(self._view)
        return sorted(
            m
            for m, h in self._heard.items()
            if set(h.beat.seen) != view or h.beat.seen.get(self.me) != self.vseq
        )

    def _fresh(self, now: float) -> bool:
        return self._self_heard is not None and now - self._self_heard <= self.isolated

    def _update(self, now: float) -> None:
        view = tuple(sorted({self.me, *self._heard}))
        if view != self._view:
            self._view = view
            self.vseq += 1
            self.view_changes += 1
            self.reply_wanted = True
        agreed = not self.disagreeing()
        if self.joining and agreed and self._fresh(now):
            expected = self._expect is not None and len(view) >= self._expect
            if expected or now - self._began >= self.discover:
                self.joining = False
        holding = not self.joining
        rank = view.index(self.me)
        if holding and agreed:
            self._settled = (len(view), rank)
        blocked: set[str] = set()
        everything = False
        for h in self._heard.values():
            if h.beat.over is None:
                everything = True
            else:
                blocked |= h.beat.over
        self.standing = Standing(
            holding=holding,
            members=len(view),
            rank=rank,
            agreed=agreed,
            settled=self._settled or (len(view), rank),
            blocked=None if everything else frozenset(blocked),
        )
