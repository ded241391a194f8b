"""A LocalEngine prepares a shared request's guard work once per dispatch (NodeApp.prepare):
each node must still refuse, decline and audit exactly as it does when it checks the request
alone, and a preparation never stands in for another task, app or guard list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from shoal.errors import PrivacyBudgetExceeded, ReleaseRefused
from shoal.privacy import NodeBudget
from shoal.privacy.guard import BudgetGuard, DPRequest, NoiseFloor, budget_guard
from shoal.runtime import FETCH_TASK, LocalEngine, NodeApp, TaskContext
from shoal.runtime.app import KEPT_STATE_KEY, NodeCheck
from shoal.runtime.engine import DECLINED_DETAIL, FailureKind, Task
from shoal.runtime.roles import NodeApps
from shoal.wire import decode, encode

REQUEST = DPRequest(clip=1.0, noise_multiplier=1.0, sample_rate=1.0, steps=1, level="node")
_one = NodeBudget(max_epsilon=1e9, max_delta=1e-5)
_one.charge(sample_rate=1.0, noise_multiplier=1.0, steps=1)
ROOM_FOR_ONE = _one.spent() * 1.0001  # one request fits, a second does not
NODES = ("n0", "n1", "n2", "n3", "n4")


class Counting:
    """A budget guard that counts how it was used: in full per node, or prepared."""

    def __init__(self, guard: BudgetGuard) -> None:
        self.guard = guard
        self.full = 0
        self.prepared = 0

    def __call__(self, task: str, ctx: TaskContext, payload: Mapping[str, Any]) -> None:
        self.full += 1
        self.guard(task, ctx, payload)

    def prepare(self, task: str, payload: Mapping[str, Any]) -> NodeCheck | None:
        self.prepared += 1
        return self.guard.prepare(task, payload)


def learning(floor: float) -> tuple[NodeApp, Counting]:
    app = NodeApp()

    @app.task("train", release={"delta": "noised", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.full(4, 0.1), "n": 5}

    guard = Counting(
        budget_guard(
            max_epsilon=ROOM_FOR_ONE,
            tasks={"train"},
            floor=NoiseFloor(level="node", noise_multiplier=floor),
        )
    )
    app.add_guard(guard)
    return app, guard


def scenario(shared: bool) -> dict[str, Any]:
    """Four nodes share one app (the plan's floor at noise 1); n3 runs its own app, whose
    plan asks for noise 2. Before the dispatch n1 spent its whole budget and n2 was charged
    for request 'old-n2'. Then one training request reaches all five nodes, n2's under the
    id it was already charged for (a replay). ``shared``: one payload object for every
    task (the engine prepares it once); else a copy each (each node checks it alone)."""
    common, common_guard = learning(floor=1.0)
    strict, strict_guard = learning(floor=2.0)
    engine = LocalEngine(NodeApps({n: strict if n == "n3" else common for n in NODES}), nodes=NODES)
    payload = encode({"dp": REQUEST.to_json()})
    for node, task_id in (("n1", "old-n1"), ("n2", "old-n2")):  # one task: checked alone
        done = engine.dispatch(
            [Task(node_id=node, name="train", payload=payload, task_id=task_id, keep_as="h0")],
            deadline_s=60,
        )
        assert node in done.replies
    common_guard.full = common_guard.prepared = strict_guard.full = 0
    ids = {"n0": "r-n0", "n1": "r-n1", "n2": "old-n2", "n3": "r-n3", "n4": "r-n4"}
    tasks = [
        Task(
            node_id=node,
            name="train",
            payload=payload if shared else bytes(bytearray(payload)),
            task_id=ids[node],
            keep_as="h1",
        )
        for node in NODES
    ]
    result = engine.dispatch(tasks, deadline_s=60)
    guards = (common_guard.full, common_guard.prepared, strict_guard.full)
    held = {node: engine.node_state(node)[KEPT_STATE_KEY]["h1"].noise for node in result.replies}
    # The binding each node made holds at release: the noise it charged, not less.
    fetch = encode({"handle": "h1", "fields": ["delta", "n"], "noise": {"clip": 1.0, "std": 0.5}})
    weak = engine.dispatch(
        [Task(node_id=n, name=FETCH_TASK, payload=fetch, task_id=f"f-{n}") for n in held],
        deadline_s=60,
    )
    ok = encode({"handle": "h1", "fields": ["delta", "n"], "noise": {"clip": 1.0, "std": 1.0}})
    released = engine.dispatch(
        [Task(node_id=n, name=FETCH_TASK, payload=ok, task_id=f"g-{n}") for n in held],
        deadline_s=60,
    )
    state = {n: engine.node_state(n)["shoal.node_state"] for n in NODES}
    return {
        "replies": sorted(result.replies),
        "failures": {n: (f.kind, f.detail) for n, f in result.failures.items()},
        "held": held,
        "weak": {n: (f.kind, f.detail) for n, f in weak.failures.items()},
        "released": sorted(released.replies),
        "values": {n: decode(r.payload)["n"] for n, r in released.replies.items()},
        # Each node's chain: what it charged, refused and declined, in order (timestamps
        # and hashes differ between runs).
        "audit": {n: [(e.action, e.detail) for e in state[n].entries] for n in NODES},
        "chains_ok": all(state[n].verify().ok for n in NODES),
        "charges": {n: state[n].charges() for n in NODES},
        "guards": guards,
    }


def test_a_batched_dispatch_refuses_per_node_exactly_as_each_node_alone() -> None:
    batched, alone = scenario(shared=True), scenario(shared=False)
    assert batched["failures"] == {
        "n1": (FailureKind.DECLINED, DECLINED_DETAIL),  # over its budget
        "n2": (FailureKind.REJECTED, batched["failures"]["n2"][1]),  # a replay
        "n3": (FailureKind.REJECTED, batched["failures"]["n3"][1]),  # its own plan
    }
    assert (
        "'old-n2' was charged to this node's privacy ledger already"
        in (batched["failures"]["n2"][1])
    )
    assert "noise multiplier 1 < 2" in batched["failures"]["n3"][1]
    assert batched["replies"] == ["n0", "n4"]
    for key in ("replies", "failures", "held", "weak", "released", "audit", "charges"):
        assert batched[key] == alone[key], key
    assert batched["chains_ok"] and alone["chains_ok"]
    # n1's and n2's chains: the earlier charge, then the decline / the refused replay; n3
    # refused without charging; n0 and n4 charged once and released once.
    actions = {n: [a for a, _ in batched["audit"][n]] for n in NODES}
    assert actions["n1"] == ["privacy.charge", "declined"]
    assert actions["n2"] == ["privacy.charge", "refused"]
    assert actions["n3"] == ["refused"]
    assert actions["n0"] == actions["n4"] == ["privacy.charge", "refused", "release.noised"]
    assert [c["noise_multiplier"] for c in batched["charges"]["n0"]] == [1.0]
    assert all(b is not None and b.std == 1.0 for b in batched["held"].values())
    assert set(batched["weak"]) == {"n0", "n4"}  # less noise than charged: refused
    assert batched["values"]["n0"] == 5
    # Batched: the shared app's guard prepared the request once and ran no full check at
    # any node; n3's app could not prepare a request its plan refuses, so n3 checked it in
    # full (and refused it itself). Alone: every node ran the full guard.
    assert batched["guards"] == (0, 1, 1)
    assert alone["guards"] == (4, 0, 1)


def test_a_preparation_serves_only_its_own_app_task_and_guards() -> None:
    app, guard = learning(floor=1.0)

    @app.task("other", release={"*": "clear"})
    def other(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"ok": 1}

    request = {"dp": REQUEST.to_json()}
    prepared = app.prepare("other", request)  # the guard does not concern "other"
    assert prepared.checks == () and guard.prepared == 1

    def ctx(task_id: str) -> TaskContext:
        return TaskContext(node_id="n0", state={}, task_id=task_id)

    # A preparation for "other" handed to "train": "train" is checked in full and charged.
    node = ctx("t1")
    app.handle(
        node, "train", encode(request), keep_as="h", decoded=dict(request), prepared=prepared
    )
    assert guard.full == 1 and node.node_state.charges()
    # Prepared by another app (same tasks, no guard): the node's own guards run in full.
    bare = NodeApp()
    bare.register("train", lambda c, p: {"n": 1})
    app.handle(
        ctx("t2"), "train", encode(request), keep_as="h", prepared=bare.prepare("train", request)
    )
    assert guard.full == 2
    # A guard added after the preparation: both guards run in full, the new one refuses.
    prepared = app.prepare("train", request)

    def refuse(task: str, c: TaskContext, payload: Mapping[str, Any]) -> None:
        raise ReleaseRefused("the owner closed this node")

    app.add_guard(refuse)
    with pytest.raises(ReleaseRefused, match="closed"):
        app.handle(ctx("t3"), "train", encode(request), keep_as="h", prepared=prepared)
    assert guard.full == 3


def test_a_preparation_that_fails_leaves_each_node_to_fail_alone() -> None:
    app, guard = learning(floor=1.0)
    weak = {"dp": {**REQUEST.to_json(), "noise_multiplier": 0.5}}
    prepared = app.prepare("train", weak)  # the floor refuses: nothing prepared
    assert guard.prepared == 1 and len(prepared.checks) == 1
    node = TaskContext(node_id="n0", state={}, task_id="t1")
    with pytest.raises(ReleaseRefused, match="less privacy"):
        app.handle(node, "train", encode(weak), keep_as="h", prepared=prepared)
    assert guard.full == 1  # refused by the full guard, at the node, into its audit log
    assert [e.action for e in node.node_state.entries] == ["refused"]
    # No DP request and no floor, only the owner's limit: declined at the node, the same way.
    plain = NodeApp()
    plain.register("train", lambda c, p: {"n": 1}, release={"n": "clear"})
    plain.add_guard(budget_guard(max_epsilon=1.0, tasks={"train"}))
    node = TaskContext(node_id="n0", state={}, task_id="t2")
    with pytest.raises(PrivacyBudgetExceeded):
        plain.handle(node, "train", encode({}), prepared=plain.prepare("train", {}))
    assert [e.action for e in node.node_state.entries] == ["declined"]
