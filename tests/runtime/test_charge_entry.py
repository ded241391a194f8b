"""A charge prepared once for many nodes (``Charge.entry`` + ``NodeState.charge_entry``) keeps
every guarantee of ``NodeState.charge``: the same chain, replays refused, a budget built from
the ledger counting it, and a subclass's own way of keeping entries."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ReleaseRefused
from shoal.privacy.guard import NoiseFloor, budget_guard, charge_terms, owner_budget
from shoal.runtime import TaskContext
from shoal.runtime.audit import verify_chain
from shoal.runtime.nodestate import NodeState, NodeStateFile

CHARGE = charge_terms(sample_rate=1.0, noise_multiplier=1.1, steps=1, clip=1.0, level="node")
TASK_IDS = st.sampled_from(["r1", "r2", "ü\n\u2028", '"q"', "x" * 70, "\\", ""])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("charge"), TASK_IDS),
        st.tuples(st.just("audit"), st.text(max_size=5)),
        st.tuples(st.just("read"), st.just("")),
    ),
    max_size=12,
)


def apply(state: NodeState, ops: list[tuple[str, str]], *, prepared: bool) -> list[bool]:
    """Run ``ops`` on ``state``; for each charge, whether it was refused as a replay."""
    entry = CHARGE.entry("train")
    refused = []
    for op, arg in ops:
        if op == "charge":
            try:
                if prepared:
                    state.charge_entry(arg, entry, None)
                else:
                    state.charge(task_id=arg, task="train", charge=dict(CHARGE.terms))
                refused.append(False)
            except ReleaseRefused:
                refused.append(True)
        elif op == "audit":
            state.audit("refused", task_id="t", reason=arg)
        else:
            assert verify_chain(state.entries).ok  # linked midway, more entries after
    return refused


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_a_prepared_charge_writes_the_chain_a_charge_writes(ops: list[tuple[str, str]]) -> None:
    lazy, plain = NodeState(node_id="n0"), NodeState(node_id="n0")
    with tempfile.TemporaryDirectory() as tmp, NodeStateFile(Path(tmp) / "s", owner="s") as file:
        durable = file.state("n0")
        refused = apply(lazy, ops, prepared=True)
        assert apply(plain, ops, prepared=False) == refused
        assert apply(durable, ops, prepared=True) == refused
        # A replay is refused exactly when the request id was charged before.
        ids = [arg for op, arg in ops if op == "charge"]
        assert refused == [task_id in ids[:i] for i, task_id in enumerate(ids)]
        texts = [(e.action, e.detail_text) for e in lazy.entries]
        assert texts == [(e.action, e.detail_text) for e in plain.entries]
        assert texts == [(e.action, e.detail_text) for e in durable.entries]
        assert texts == [(e.action, e.detail_text) for e in file.read("n0")]
        assert lazy.verify().ok and file.verify().ok
        assert lazy.charges() == plain.charges() == durable.charges()
        assert all(lazy.charged(task_id) for task_id in ids)


def test_a_task_id_that_cannot_be_stored_fails_the_charge_not_a_later_read() -> None:
    state = NodeState(node_id="n0")
    with pytest.raises(TypeError):
        state.charge_entry(7, CHARGE.entry("train"), None)  # type: ignore[arg-type]
    assert state.entries == () and not state.charged(7)  # type: ignore[arg-type]
    state.charge_entry("r1", CHARGE.entry("train"), None)
    assert state.verify().ok and len(state.charges()) == 1


def test_then_runs_under_the_lock_and_only_for_a_node_with_a_cache() -> None:
    state = NodeState(node_id="n0")
    seen: list[bool] = []

    def then(cache: Mapping[str, Any]) -> None:
        seen.append(state.lock._is_owned())  # type: ignore[attr-defined]

    state.charge_entry("r1", CHARGE.entry("train"), then)
    assert seen == []  # no cache: nothing was built from the ledger to update
    state.cache["something"] = object()
    state.charge_entry("r2", CHARGE.entry("train"), then)
    assert seen == [True]
    with pytest.raises(ReleaseRefused, match="already"):
        state.charge_entry("r2", CHARGE.entry("train"), then)
    assert seen == [True]  # a refused replay changes nothing


def test_a_prepared_guard_charges_counts_in_a_built_budget_and_refuses_replays() -> None:
    floor = NoiseFloor(level="node", noise_multiplier=1.0)
    guard = budget_guard(max_epsilon=None, tasks={"train"}, floor=floor)
    request = {"clip": 1.0, "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1}
    payload = {"dp": {**request, "level": "node"}}
    check = guard.prepare("train", payload)
    assert check is not None
    state: dict[str, Any] = {}
    ctx = TaskContext(node_id="n0", state=state, task_id="r1")
    check(ctx, payload)
    assert ctx.noise is not None and ctx.noise.std == 1.0 and not ctx.noise.applied
    with pytest.raises(ReleaseRefused, match="already"):
        check(TaskContext(node_id="n0", state=state, task_id="r1"), payload)
    # Another guard builds the owner's budget from the ledger (one charge so far) ...
    budget = owner_budget(ctx, max_epsilon=100.0, max_delta=1e-5)
    once = budget.spent()
    # ... and the next prepared charge counts in it too.
    check(TaskContext(node_id="n0", state=state, task_id="r2"), payload)
    assert budget.spent() > once
    node = ctx.node_state
    assert [c["noise_multiplier"] for c in node.charges()] == [1.0, 1.0] and node.verify().ok
    # The same request the floor refuses is refused when prepared and at each node alike.
    weaker = {"dp": {**payload["dp"], "noise_multiplier": 0.5}}
    with pytest.raises(ReleaseRefused, match="less privacy"):
        guard.prepare("train", weaker)
    with pytest.raises(ReleaseRefused, match="less privacy"):
        guard("train", TaskContext(node_id="n0", state=state, task_id="r3"), weaker)
    assert len(node.charges()) == 2


class _OwnChain(NodeState):
    """A subclass keeping its entries its own way (as the datasite's node state does)."""

    __slots__ = ("kept",)

    def __init__(self) -> None:
        super().__init__(node_id="site")
        self.kept: list[tuple[str, dict[str, Any]]] = []

    def _append(self, action: str, detail: Mapping[str, Any]) -> None:
        self.kept.append((action, dict(detail)))


def test_a_subclass_with_its_own_entries_gets_prepared_charges_its_way() -> None:
    state = _OwnChain()
    state.charge_entry("r1", CHARGE.entry("train"), None)
    with pytest.raises(ReleaseRefused, match="already"):
        state.charge_entry("r1", CHARGE.entry("train"), None)
    assert state.kept == [
        ("privacy.charge", {"task_id": "r1", "task": "train", "charge": dict(CHARGE.terms)})
    ]
    assert state.charged("r1")
