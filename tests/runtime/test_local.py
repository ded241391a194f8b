"""Tests for LocalEngine: lazy virtual nodes, seeding, deadlines, hangs and fault injection."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from shoal.errors import ConfigError, PrivacyBudgetExceeded
from shoal.runtime import (
    DECLINED_DETAIL,
    FETCH_TASK,
    DispatchResult,
    Engine,
    FailureKind,
    Faults,
    LocalEngine,
    NodeApp,
    Task,
    TaskContext,
)
from shoal.wire import decode, encode

EMPTY = encode({})


def tasks(
    node_ids: Sequence[str], name: str = "ping", payload: Any = EMPTY, **kw: Any
) -> list[Task]:
    return [
        Task(node_id=n, name=name, payload=payload, task_id=f"{name}/{n}", **kw) for n in node_ids
    ]


def ids(n: int) -> list[str]:
    return [f"n{i}" for i in range(n)]


def run_bounded(engine: LocalEngine, work: list[Task], deadline_s: float) -> DispatchResult:
    """Dispatch on a helper thread so a broken deadline fails the test instead of hanging it."""
    out: list[DispatchResult] = []
    thread = threading.Thread(
        target=lambda: out.append(engine.dispatch(work, deadline_s=deadline_s))
    )
    thread.start()
    thread.join(timeout=120)  # a safety net against a hung suite, not a timing assertion
    assert out, "dispatch did not return: the engine failed to abandon a late task"
    return out[0]


def kinds(result: DispatchResult) -> dict[str, FailureKind]:
    return {node: f.kind for node, f in result.failures.items()}


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Blocks 'hanging' tasks until the test ends, so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def app(release: threading.Event) -> NodeApp:
    app = NodeApp()

    @app.task("ping")
    def ping(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"node": ctx.node_id}

    @app.task("draw")
    def draw(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"r": ctx.rng.random(4)}

    @app.task("data")
    def data(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"data": ctx.data}

    @app.task("count")
    def count(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        return {"calls": ctx.state["calls"]}

    @app.task("hang")
    def hang(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        if ctx.node_id in payload["slow"]:
            release.wait()
        return {}

    @app.task("boom")
    def boom(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError(f"disk full on {ctx.node_id}")

    return app


# -- construction and node data ------------------------------------------------------------


def test_is_an_engine(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=3)
    assert isinstance(engine, Engine)
    assert list(engine.node_ids()) == ["n0", "n1", "n2"]
    assert list(LocalEngine(app, nodes=["a", "b"]).node_ids()) == ["a", "b"]


def test_sequence_data_gives_node_i_item_i(app: NodeApp) -> None:
    engine = LocalEngine(app, data=[10, 20, 30])
    result = engine.dispatch(tasks(["n2", "n0"], "data"), deadline_s=30)
    assert {n: decode(r.payload)["data"] for n, r in result.replies.items()} == {"n2": 30, "n0": 10}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"data": lambda node: 1},
        {"nodes": 0},
        {"nodes": []},
        {"nodes": ["a", "a"]},
        {"nodes": 3, "data": [1, 2]},
        {"nodes": 3, "workers": 0},
        {"nodes": 3, "cache_size": -1},
    ],
)
def test_bad_configuration_is_a_config_error(app: NodeApp, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LocalEngine(app, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"drop": -0.1}, {"straggle": 1.5}, {"error": 2.0}, {"drop": float("nan")}, {"straggle_s": -1}],
)
def test_bad_faults_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Faults(**kwargs)


class NodeData:
    """A stand-in for one node's data set; instances are tracked to count how many are alive."""

    live: ClassVar[weakref.WeakSet[NodeData]] = weakref.WeakSet()

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        NodeData.live.add(self)


def test_node_data_is_created_lazily_and_only_a_bounded_cache_is_kept(app: NodeApp) -> None:
    calls: list[str] = []
    peak = [0]

    def factory(node_id: str) -> NodeData:
        calls.append(node_id)
        peak[0] = max(peak[0], len(NodeData.live) + 1)
        return NodeData(node_id)

    @app.task("size")
    def size(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        assert ctx.data.node_id == ctx.node_id
        return {}

    engine = LocalEngine(app, data=factory, nodes=10_000, cache_size=16)
    assert calls == []  # building the federation loads nothing
    engine.dispatch(tasks(["n5", "n9"], "size"), deadline_s=60)
    engine.dispatch(tasks(["n9", "n5"], "size"), deadline_s=60)
    assert calls == ["n5", "n9"]  # the second dispatch hit the cache

    result = engine.dispatch(tasks(ids(10_000), "size"), deadline_s=60)
    assert len(result.replies) == 10_000 and not result.failures
    assert len(calls) == 2 + 9_998
    assert peak[0] <= 16 + engine.workers  # the cache plus the data of the running task
    assert len(NodeData.live) <= 16
    engine.close()
    assert len(NodeData.live) == 0


def test_tasks_that_never_touch_the_data_never_load_it(app: NodeApp) -> None:
    calls: list[str] = []

    def factory(node_id: str) -> int:
        calls.append(node_id)
        return 5

    engine = LocalEngine(app, data=factory, nodes=3, cache_size=0)
    result = engine.dispatch(tasks(ids(3), "data", keep_as="v"), deadline_s=30)
    assert len(result.replies) == 3 and sorted(calls) == ids(3)
    fetch = encode({"handle": "v", "fields": ["data"]})
    result = engine.dispatch(tasks(ids(3), FETCH_TASK, fetch), deadline_s=30)
    assert {n: decode(r.payload)["data"] for n, r in result.replies.items()} == dict.fromkeys(
        ids(3), 5
    )
    engine.dispatch(tasks(ids(3), "ping"), deadline_s=30)
    assert len(calls) == 3  # neither the fetch nor a data-free task loaded anything


def test_a_node_whose_data_fails_to_load_fails_alone(app: NodeApp) -> None:
    def factory(node_id: str) -> int:
        if node_id == "n1":
            raise FileNotFoundError("hospital1.csv")
        return 1

    engine = LocalEngine(app, data=factory, nodes=3)
    result = run_bounded(engine, tasks(ids(3), "data"), deadline_s=600)
    assert set(result.replies) == {"n0", "n2"}
    failure = result.failures["n1"]
    assert failure.kind is FailureKind.ERROR
    assert "FileNotFoundError" in failure.detail and "hospital1.csv" in failure.detail


# -- seeding ---------------------------------------------------------------------------------


def draws(engine: LocalEngine, rounds: int = 2) -> list[dict[str, list[float]]]:
    out = []
    for _ in range(rounds):
        result = engine.dispatch(tasks(ids(5), "draw"), deadline_s=30)
        out.append({n: decode(r.payload)["r"].tolist() for n, r in result.replies.items()})
    return out


def test_task_randomness_is_deterministic_per_seed(app: NodeApp) -> None:
    first = draws(LocalEngine(app, nodes=5, seed=7))
    assert first == draws(LocalEngine(app, nodes=5, seed=7))
    assert first != draws(LocalEngine(app, nodes=5, seed=8))
    # Nodes differ from each other, and a node differs from one dispatch to the next.
    assert len({tuple(v) for v in first[0].values()}) == 5
    assert first[0]["n0"] != first[1]["n0"]


def dropped(engine: LocalEngine, rounds: int = 3) -> list[set[str]]:
    return [set(engine.dispatch(tasks(ids(200)), deadline_s=30).failures) for _ in range(rounds)]


def test_fault_draws_are_deterministic_per_seed(app: NodeApp) -> None:
    faults = Faults(drop=0.5, seed=1)
    first = dropped(LocalEngine(app, nodes=200, seed=3, faults=faults))
    assert first == dropped(LocalEngine(app, nodes=200, seed=3, faults=faults))
    assert first != dropped(LocalEngine(app, nodes=200, seed=4, faults=faults))
    assert first != dropped(LocalEngine(app, nodes=200, seed=3, faults=Faults(drop=0.5, seed=2)))
    assert first[0] != first[1]  # each dispatch draws anew


# -- deadlines and hangs ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_that_hangs_is_abandoned_and_the_others_reply(
    app: NodeApp, release: threading.Event, workers: int
) -> None:
    engine = LocalEngine(app, nodes=8, workers=workers)
    slow = ["n0", "n5"]  # n0 first, so a single worker is stuck before the others start
    result = run_bounded(engine, tasks(ids(8), "hang", encode({"slow": slow})), deadline_s=0.5)
    assert kinds(result) == {"n0": FailureKind.TIMEOUT, "n5": FailureKind.TIMEOUT}
    assert set(result.replies) == set(ids(8)) - set(slow)
    assert "0.5" in result.failures["n0"].detail
    release.set()
    # The engine is still usable afterwards, including for the nodes that hung.
    result = run_bounded(engine, tasks(ids(8), "ping"), deadline_s=30)
    assert len(result.replies) == 8


def test_a_task_that_outlives_the_deadline_times_out(app: NodeApp) -> None:
    @app.task("slow")
    def slow(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        if ctx.node_id == "n1":
            threading.Event().wait(timeout=3.0)  # sleeps past the 0.5 s deadline, then answers
        return {}

    engine = LocalEngine(app, nodes=4)
    result = run_bounded(engine, tasks(ids(4), "slow"), deadline_s=0.5)
    assert kinds(result) == {"n1": FailureKind.TIMEOUT}
    assert set(result.replies) == {"n0", "n2", "n3"}


def test_nonpositive_deadline_is_a_config_error(app: NodeApp) -> None:
    with pytest.raises(ConfigError):
        LocalEngine(app, nodes=1).dispatch(tasks(["n0"]), deadline_s=0)


# -- failures reported by nodes ------------------------------------------------------------------


def test_task_errors_unknown_tasks_bad_payloads_and_declines(app: NodeApp) -> None:
    def guard(name: str, ctx: TaskContext, payload: Any) -> None:
        if name == "ping" and ctx.node_id == "n3":
            raise PrivacyBudgetExceeded("budget of n3 is spent")

    app.add_guard(guard)
    engine = LocalEngine(app, nodes=4)
    work = [
        Task(node_id="n0", name="boom", payload=EMPTY, task_id="a"),
        Task(node_id="n1", name="exfiltrate", payload=EMPTY, task_id="b"),
        Task(node_id="n2", name="ping", payload=b"\x00garbage", task_id="c"),
        Task(node_id="n3", name="ping", payload=EMPTY, task_id="d"),
    ]
    result = engine.dispatch(work, deadline_s=30)
    assert not result.replies
    assert kinds(result) == {
        "n0": FailureKind.ERROR,
        "n1": FailureKind.REJECTED,
        "n2": FailureKind.REJECTED,
        "n3": FailureKind.DECLINED,
    }
    assert "disk full on n0" in result.failures["n0"].detail
    assert "exfiltrate" in result.failures["n1"].detail
    # the coordinator learns only that n3 declined, not its owner's budget or spending
    assert result.failures["n3"].detail == DECLINED_DETAIL
    assert {f.task_id for f in result.failures.values()} == {"a", "b", "c", "d"}


def test_replies_carry_the_task_id_and_encoded_results(app: NodeApp) -> None:
    result = LocalEngine(app, nodes=2).dispatch(tasks(["n1"]), deadline_s=30)
    reply = result.replies["n1"]
    assert reply.task_id == "ping/n1" and reply.node_id == "n1"
    assert decode(reply.payload) == {"node": "n1"}


def test_duplicate_or_unknown_nodes_in_one_dispatch(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=3)
    with pytest.raises(ConfigError, match="two tasks"):
        engine.dispatch(tasks(["n0", "n1", "n0"]), deadline_s=30)
    with pytest.raises(ConfigError, match="no node 'n9'"):
        engine.dispatch(tasks(["n9"]), deadline_s=30)
    assert engine.dispatch([], deadline_s=30) == DispatchResult()


def test_offline_nodes_are_dropped_until_back(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=4)
    engine.set_offline(["n1", "n2"])
    assert list(engine.node_ids()) == ["n0", "n3"]
    result = engine.dispatch(tasks(ids(4), "count"), deadline_s=30)
    assert kinds(result) == {"n1": FailureKind.DROPPED, "n2": FailureKind.DROPPED}
    engine.set_offline(["n1"], offline=False)
    assert list(engine.node_ids()) == ["n0", "n1", "n3"]
    assert set(engine.dispatch(tasks(ids(4), "count"), deadline_s=30).replies) == {
        "n0",
        "n1",
        "n3",
    }
    assert engine.node_state("n2") == {}  # an offline node ran nothing


def test_state_persists_per_node_across_dispatches(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=2)
    for expected in (1, 2, 3):
        result = engine.dispatch(tasks(["n0"], "count"), deadline_s=30)
        assert decode(result.replies["n0"].payload) == {"calls": expected}
    assert engine.node_state("n0")["calls"] == 3
    assert engine.node_state("n1") == {}


def test_keep_as_leaves_the_result_at_the_node(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=1)
    result = engine.dispatch(tasks(["n0"], "draw", keep_as="v0"), deadline_s=30)
    receipt = decode(result.replies["n0"].payload)
    assert receipt == {"kept": "v0", "fields": {"r": "<f8:4"}}


# -- fault injection ----------------------------------------------------------------------------


def test_drop_probability_gives_about_that_fraction(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=4000, faults=Faults(drop=0.3, seed=5))
    result = engine.dispatch(tasks(ids(4000)), deadline_s=60)
    assert set(kinds(result).values()) == {FailureKind.DROPPED}
    # Binomial(4000, 0.3) has sd ~0.007 in fraction: 0.05 is 7 sd.
    assert abs(len(result.failures) / 4000 - 0.3) < 0.05
    assert len(result.replies) + len(result.failures) == 4000


def test_dropped_and_errored_nodes_never_run_the_task(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=100, faults=Faults(drop=0.3, error=0.3, seed=2))
    result = engine.dispatch(tasks(ids(100), "count"), deadline_s=30)
    assert {FailureKind.DROPPED, FailureKind.ERROR} == set(kinds(result).values())
    for node in ids(100):
        assert (engine.node_state(node).get("calls") == 1) == (node in result.replies)


def test_error_injection(app: NodeApp) -> None:
    result = LocalEngine(app, nodes=20, faults=Faults(error=1.0)).dispatch(
        tasks(ids(20)), deadline_s=30
    )
    assert set(kinds(result).values()) == {FailureKind.ERROR} and len(result.failures) == 20
    assert all("simulated" in f.detail for f in result.failures.values())


def test_stragglers_past_the_deadline_time_out(app: NodeApp) -> None:
    faults = Faults(straggle=0.5, straggle_s=10.0, seed=3)
    result = LocalEngine(app, nodes=200, faults=faults).dispatch(tasks(ids(200)), deadline_s=5)
    assert set(kinds(result).values()) == {FailureKind.TIMEOUT}
    assert 50 < len(result.failures) < 150
    assert all("straggler" in f.detail for f in result.failures.values())


def test_stragglers_within_the_deadline_answer_late_on_the_virtual_clock(app: NodeApp) -> None:
    faults = Faults(straggle=1.0, straggle_s=3.0)
    result = LocalEngine(app, nodes=10, faults=faults).dispatch(tasks(ids(10)), deadline_s=5)
    assert len(result.replies) == 10
    # the injected delay is on the virtual clock, so every reply carries it
    virtual_latency = [r.elapsed_s for r in result.replies.values()]
    assert min(virtual_latency) >= 3.0


def test_faults_limited_to_named_tasks_and_nodes(app: NodeApp) -> None:
    faults = Faults(drop=1.0, tasks=frozenset({"draw"}), nodes=frozenset({"n1", "n2"}))
    engine = LocalEngine(app, nodes=4, faults=faults)
    assert not engine.dispatch(tasks(ids(4), "ping"), deadline_s=30).failures
    result = engine.dispatch(tasks(ids(4), "draw"), deadline_s=30)
    assert kinds(result) == {"n1": FailureKind.DROPPED, "n2": FailureKind.DROPPED}


def test_always_drop(app: NodeApp) -> None:
    engine = LocalEngine(app, nodes=5, faults=Faults(always_drop=frozenset({"n3"})))
    for _ in range(3):
        result = engine.dispatch(tasks(ids(5)), deadline_s=30)
        assert kinds(result) == {"n3": FailureKind.DROPPED}
    # Scoped to a task, an always-dropping node answers every other task.
    scoped = Faults(always_drop=frozenset({"n3"}), tasks=frozenset({"draw"}))
    engine = LocalEngine(app, nodes=5, faults=scoped)
    assert not engine.dispatch(tasks(ids(5), "ping"), deadline_s=30).failures
    assert kinds(engine.dispatch(tasks(ids(5), "draw"), deadline_s=30)) == {
        "n3": FailureKind.DROPPED
    }


# -- threads --------------------------------------------------------------------------------------


def scenario(app: NodeApp, workers: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
    faults = Faults(drop=0.2, error=0.1, straggle=0.1, straggle_s=100.0, seed=9)
    engine = LocalEngine(app, nodes=60, seed=11, workers=workers, faults=faults)
    out = []
    for name in ("draw", "count", "draw", "ping"):
        result = engine.dispatch(tasks(ids(60), name), deadline_s=30)
        replies = {
            n: {k: np.asarray(v).tolist() for k, v in decode(r.payload).items()}
            for n, r in result.replies.items()
        }
        out.append((replies, {n: f.kind.value for n, f in result.failures.items()}))
    return out


def test_two_workers_give_the_same_results_as_one(app: NodeApp) -> None:
    one = scenario(app, workers=1)
    assert one == scenario(app, workers=2)
    assert all(replies and failures for replies, failures in one)
