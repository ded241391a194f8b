"""The pending-connection limiter's policy (limits.py), checked against a model of it: the
bounds hold after any sequence of admissions, progress, completions and expiries; the one
that goes is always among the least advanced (a newcomer included; progress counts for a
connection's grace period only); among equals the choice is uniform and unpredictable, never
the oldest by rule."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.runtime.grpc.limits import CALL, PREFIX, PROVEN, SILENT, PendingLimiter

LEVELS = (SILENT, PREFIX, CALL, PROVEN)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 2), st.sampled_from(LEVELS)),
        st.tuples(st.just("admit"), st.integers(0, 2), st.sampled_from(LEVELS)),
        st.tuples(st.just("advance"), st.integers(0, 200), st.sampled_from(LEVELS)),
        st.tuples(st.just("done"), st.integers(0, 200), st.just(0)),
        st.tuples(st.just("tick"), st.integers(0, 4), st.just(0)),
    ),
    min_size=20,  # long enough to fill the bounds many times over
    max_size=120,
)


@given(
    per_peer=st.integers(1, 4),
    extra=st.integers(0, 4),
    ops=operations,
    rng=st.randoms(use_true_random=False),
)
def test_the_limiter_follows_its_policy(
    per_peer: int, extra: int, ops: list[tuple[str, int, int]], rng: random.Random
) -> None:
    now = [0.0]
    limiter = PendingLimiter(
        per_peer=per_peer,
        total=per_peer + extra,
        max_age_s=4.0,
        grace_s=2.0,
        rng=rng,
        clock=lambda: now[0],
    )

    def rank(ticket: int) -> int:
        _, level, since = model[ticket]
        return level if now[0] - since < 2.0 else SILENT

    model: dict[int, tuple[str, int, float]] = {}  # ticket -> host, level, admitted at
    drops: list[tuple[int, str]] = []
    issued: list[int] = []
    for op, arg, level in ops:
        if op == "admit":
            host = f"10.0.0.{arg}"
            mine = [t for t, m in model.items() if m[0] == host]
            if len(mine) >= limiter.per_peer:
                candidates = mine
            elif len(model) >= limiter.total:
                candidates = list(model)
            else:
                candidates = []
            before = len(drops)
            index = len(issued)
            ticket = limiter.admit(host, lambda why, t=index: drops.append((t, why)), level=level)
            new_drops = drops[before:]
            if not candidates:  # room: nobody goes
                assert ticket is not None and not new_drops
            else:
                lowest = min(map(rank, candidates))
                if ticket is None:  # the newcomer went: it had shown no more than any
                    assert level <= lowest and not new_drops
                else:  # one candidate went, one of the least advanced, never above the newcomer
                    assert len(new_drops) == 1 and new_drops[0][1] == "evicted"
                    victim = issued[new_drops[0][0]]
                    assert victim in candidates
                    assert rank(victim) == lowest <= level
                    del model[victim]
            if ticket is not None:
                model[ticket] = (host, level, now[0])
            issued.append(ticket if ticket is not None else -1)
        elif op in ("advance", "done") and issued:
            ticket = issued[arg % len(issued)]
            if op == "advance":
                limiter.advance(ticket, level)
                if ticket in model and level > model[ticket][1]:
                    model[ticket] = (model[ticket][0], level, model[ticket][2])
            else:
                limiter.done(ticket)
                model.pop(ticket, None)
        elif op == "tick":
            now[0] += arg
            before = len(drops)
            limiter.expire()
            late = {t for t, m in model.items() if now[0] - m[2] >= 4.0}
            assert {issued[i] for i, _ in drops[before:]} == late
            assert all(why == "expired" for _, why in drops[before:])
            for t in late:
                del model[t]
        # The bounds, and the limiter's view equal to the model's.
        assert len(limiter) == len(model) <= limiter.total
        for host in {m[0] for m in model.values()}:
            levels = sorted(m[1] for m in model.values() if m[0] == host)
            assert len(levels) <= limiter.per_peer
            assert sorted(limiter.levels(host)) == levels
    assert len({i for i, _ in drops}) == len(drops)  # nobody is dropped twice


def test_a_node_that_proved_itself_outlives_any_flood_from_its_own_address() -> None:
    limiter = PendingLimiter(per_peer=4, total=8)
    dropped: list[str] = []
    node = limiter.admit("10.0.0.1", lambda why: dropped.append("node"))
    limiter.advance(node, PROVEN)
    for i in range(10_000):
        limiter.admit("10.0.0.1", lambda why: dropped.append("flood"), level=LEVELS[i % 3])
    assert "node" not in dropped and limiter.level(node) == PROVEN
    assert limiter.evicted + limiter.refused == 10_000 - 3  # 3 flood connections found room
    assert len(limiter.levels("10.0.0.1")) == 4


def test_a_silent_newcomer_never_displaces_one_that_sent_a_prefix() -> None:
    limiter = PendingLimiter(per_peer=2, total=2)
    dropped: list[str] = []
    for name in ("a", "b"):
        limiter.admit("h", lambda why, n=name: dropped.append(n), level=PREFIX)
    assert limiter.admit("h", lambda why: dropped.append("silent")) is None
    assert dropped == [] and limiter.refused == 1
    # A newcomer further along takes the place of one of them.
    assert limiter.admit("h", lambda why: dropped.append("c"), level=CALL) is not None
    assert len(dropped) == 1 and dropped[0] in "ab"


def test_among_equals_the_choice_is_uniform_the_newcomer_included() -> None:
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    for _ in range(5000):
        limiter = PendingLimiter(per_peer=4, total=16, rng=rng)
        for i in range(4):
            limiter.admit("h", lambda why, i=i: outcomes.update([f"old{i}"]), level=PREFIX)
        if limiter.admit("h", lambda why: None, level=PREFIX) is None:
            outcomes["newcomer"] += 1
    assert set(outcomes) == {"old0", "old1", "old2", "old3", "newcomer"}
    for count in outcomes.values():  # 1000 each expected; 5 sigma is ~140
        assert 850 < count < 1150, outcomes


def test_by_default_the_choice_comes_from_the_operating_system() -> None:
    """An attacker who knows the order of the connections cannot know which one goes: not
    the oldest (as before), not the newest, and not a sequence a seed would repeat."""
    victims = []
    for _ in range(200):
        limiter = PendingLimiter(per_peer=3, total=3)
        for i in range(3):
            limiter.admit("h", lambda why, i=i: victims.append(i))
        limiter.admit("h", lambda why: None)
    assert len(set(victims)) == 3  # all of them went sometimes: (2/3)**200 odds otherwise
    assert isinstance(limiter._rng, random.SystemRandom)


def test_the_total_bound_takes_the_least_advanced_of_any_address() -> None:
    limiter = PendingLimiter(per_peer=4, total=4)
    dropped: list[str] = []
    for host, level in (("a", PROVEN), ("b", CALL), ("c", SILENT), ("d", PREFIX)):
        limiter.admit(host, lambda why, h=host: dropped.append(h), level=level)
    limiter.admit("e", lambda why: None, level=PREFIX)
    assert dropped == ["c"]


def test_progress_counts_for_the_grace_period_only() -> None:
    """An attacker who can reach a level cannot hold its slots at it until the deadline:
    after its grace, a stalled connection ranks as silent and a newcomer with a prefix (the
    node's) takes its place."""
    now = [0.0]
    limiter = PendingLimiter(per_peer=2, total=2, grace_s=1.0, clock=lambda: now[0])
    dropped: list[str] = []
    for name in ("a", "b"):
        limiter.admit("h", lambda why, n=name: dropped.append(n), level=CALL)
    assert limiter.admit("h", lambda why: None, level=PREFIX) is None  # within their grace
    now[0] = 1.0
    assert limiter.admit("h", lambda why: dropped.append("node"), level=PREFIX) is not None
    assert len(dropped) == 1 and dropped[0] in "ab"
    # The newcomer is within its own grace: silent ones cannot displace it (they draw
    # with the stale one left, and with each other).
    for _ in range(50):
        limiter.admit("h", lambda why: dropped.append("silent"))
    assert "node" not in dropped and set(dropped) == {"a", "b", "silent"}


@pytest.mark.parametrize(
    "bad",
    [{"per_peer": 0}, {"per_peer": 5, "total": 4}, {"max_age_s": 0}, {"grace_s": 0}],
)
def test_the_limiter_rejects_bad_bounds(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"per_peer|max_age_s"):
        PendingLimiter(**bad)  # type: ignore[arg-type]
