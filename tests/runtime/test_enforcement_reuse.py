"""What the node works out once per round (a request's parse, floor check, charge terms,
policy routes) gives the same answers as working it out for each node, and never lets a
different request ride on an earlier one's acceptance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from shoal.errors import ConfigError, ReleaseRefused
from shoal.privacy.guard import (
    DPRequest,
    NoiseFloor,
    budget_guard,
    charge_owner_terms,
    charge_terms,
    owner_budget,
)
from shoal.runtime import TaskContext
from shoal.runtime.audit import canonical, verify_chain
from shoal.runtime.nodestate import Charge, NodeState, NodeStateFile
from shoal.runtime.policy import ReleasePolicy

TERMS = {"sample_rate": 0.25, "noise_multiplier": 1.1, "steps": 5, "mechanism": "gaussian"}


@pytest.mark.parametrize("task", ["train", 'q"uo\\te', "tâche", ""])
@pytest.mark.parametrize("task_id", ["r1n7", "ü\n\u2028", '"', "x" * 300])
def test_a_charge_entry_is_the_canonical_text_of_its_detail(task: str, task_id: str) -> None:
    charge = Charge.of({**TERMS, "level": "example", "node_noise_multiplier": None})
    expected = canonical({"task_id": task_id, "task": task, "charge": dict(charge.terms)})
    assert charge.entry_text(task=task, task_id=task_id) == expected
    assert charge.entry_text(task=task, task_id=task_id) == expected  # from the cached head


def test_charge_terms_are_a_private_frozen_copy() -> None:
    terms = dict(TERMS)
    charge = Charge.of(terms)
    terms["noise_multiplier"] = 0.0  # the caller's dict changes; the charge does not
    assert charge.terms["noise_multiplier"] == 1.1
    assert json.loads(charge.text)["noise_multiplier"] == 1.1
    with pytest.raises(TypeError):
        charge.terms["steps"] = 1  # type: ignore[index]
    with pytest.raises(ValueError):  # what cannot be stored fails when the terms are made
        Charge.of({"noise_multiplier": math.nan})


def test_shared_terms_write_the_same_chain_as_a_mapping(tmp_path: Path) -> None:
    shared, own = NodeState(node_id="a"), NodeState(node_id="a")
    charge = charge_terms(sample_rate=0.25, noise_multiplier=1.1, steps=5, clip=1.0)
    for i in range(3):
        shared.charge(task_id=f"r{i}", task="train", charge=charge)
        own.charge(task_id=f"r{i}", task="train", charge=dict(charge.terms))
    assert [e.detail_text for e in shared.entries] == [e.detail_text for e in own.entries]
    assert verify_chain(shared.entries).ok and shared.charges() == own.charges()
    with pytest.raises(ReleaseRefused, match="already"):
        shared.charge(task_id="r1", task="train", charge=charge)
    with NodeStateFile(tmp_path / "s.db", owner="sim") as file:
        node = file.state("n0")
        node.charge(task_id="r0", task="train", charge=charge)
        node.audit("refused", task_id="r9", reason="x")
        assert file.verify().ok
        assert file.read("n0")[0].detail_text == shared.entries[0].detail_text
        with pytest.raises(ReleaseRefused):
            node.charge(task_id="r0", task="train", charge=charge)


def test_a_request_is_parsed_once_per_content_and_each_change_is_seen() -> None:
    raw = DPRequest(clip=1.0, noise_multiplier=1.0, sample_rate=0.2, steps=5).to_json()
    first = DPRequest.from_payload({"dp": dict(raw)})
    assert DPRequest.from_payload({"dp": dict(raw)}) is first  # another node's copy
    lower = DPRequest.from_payload({"dp": {**raw, "noise_multiplier": 0.5}})
    assert lower is not None and lower.noise_multiplier == 0.5
    mutated = dict(raw)
    assert DPRequest.from_payload({"dp": mutated}) is not None
    mutated["steps"] = 50  # the same dict, changed after it was parsed
    again = DPRequest.from_payload({"dp": mutated})
    assert again is not None and again.steps == 50
    for _ in range(2):  # a NaN equals nothing: refused every time, never served from a cache
        with pytest.raises(ConfigError):
            DPRequest.from_payload({"dp": {**raw, "noise_multiplier": math.nan}})


def test_an_accepted_request_does_not_let_a_weaker_one_through() -> None:
    floor = NoiseFloor(level="example", noise_multiplier=1.0, sample_rate=0.2, steps=5)
    guard = budget_guard(max_epsilon=None, tasks={"train"}, floor=floor)
    good = DPRequest(clip=1.0, noise_multiplier=1.0, sample_rate=0.2, steps=5).to_json()
    state: dict[str, object] = {}
    for i in range(3):  # the same request at several nodes: each charged, each bound
        ctx = TaskContext(node_id=f"n{i}", state={}, task_id="t1")
        guard("train", ctx, {"dp": dict(good)})
        assert ctx.noise is not None and ctx.noise.std == 1.0 and ctx.noise.applied
        assert len(ctx.node_state.charges()) == 1
    for weaker in ({"noise_multiplier": 0.9}, {"sample_rate": 0.3}, {"steps": 6}):
        ctx = TaskContext(node_id="n0", state=state, task_id=f"w{weaker}")
        with pytest.raises(ReleaseRefused, match="less privacy"):
            guard("train", ctx, {"dp": {**good, **weaker}})
        assert ctx.node_state.charges() == []
    ctx = TaskContext(node_id="n0", state=state, task_id="t2")
    guard("train", ctx, {"dp": dict(good)})  # the plan's own request is still accepted
    with pytest.raises(ReleaseRefused, match="already"):  # and a replay still refused
        guard("train", TaskContext(node_id="n0", state=state, task_id="t2"), {"dp": good})
    assert len(ctx.node_state.charges()) == 1


def test_a_route_is_each_fields_own_kind() -> None:
    policy = ReleasePolicy(
        {"n": "clear", "d/*": "secure", "m": "noised", "enc": "sealed:host", "x": "never"},
        task="t",
    )
    fields = ("n", "d/w", "m", "enc", "x")
    expected = {
        "clear": ((("d/w", "secure"), ("enc", "sealed:host"), ("x", "never")), ("m",), ()),
        "secure": ((("enc", "sealed:host"), ("x", "never")), ("m",), ("d/w",)),
        "forward": ((("d/w", "secure"), ("m", "noised"), ("x", "never")), (), ()),
    }
    for use, (refused, noised, secure) in expected.items():
        for _ in range(2):  # worked out, then from the cache
            route = policy.route(fields, use=use, role="host")  # type: ignore[arg-type]
            assert (route.refused, route.noised, route.secure) == (refused, noised, secure)
    other_role = policy.route(("enc",), use="forward", role="arbiter")
    assert other_role.refused == (("enc", "sealed:host"),)
    with pytest.raises(ReleaseRefused):
        policy.check_clear(("n", "m"), path="a reply")
    policy.check_clear(("n", "m"), path="a reply", noised=True)  # the task noised m in full
    with pytest.raises(ReleaseRefused):  # and that allowance is not remembered for the rest
        policy.check_clear(("n", "m"), path="a reply")


def test_a_charge_without_a_budget_refuses_replays_and_still_counts_in_a_built_budget() -> None:
    ctx = TaskContext(node_id="n0", state={}, task_id="r1")
    charge = charge_terms(sample_rate=1.0, noise_multiplier=1.0, steps=1, clip=1.0)
    charge_owner_terms(ctx, None, task="train", charge=charge)
    with pytest.raises(ReleaseRefused, match="charged to this node's privacy ledger already"):
        charge_owner_terms(ctx, None, task="train", charge=charge)
    # Another guard builds the owner's budget from the ledger (one charge so far) ...
    budget = owner_budget(ctx, max_epsilon=100.0, max_delta=1e-5)
    once = budget.spent()
    # ... and a charge made without a limit still counts in it, and in the chain.
    charge_owner_terms(
        TaskContext(node_id="n0", state=ctx.state, task_id="r2"), None, task="train", charge=charge
    )
    assert budget.spent() > once
    assert len(ctx.node_state.charges()) == 2 and ctx.node_state.verify().ok


def test_a_node_state_that_holds_nothing_reads_as_empty() -> None:
    state = NodeState(node_id="idle")
    assert state.entries == () and state.charges() == [] and not state.charged("r1")
    assert state.cached("anything") is None and state.verify().ok
    state.audit("refused", task_id="r0", reason="x")
    state.charge(task_id="r1", task="train", charge=dict(TERMS))
    assert [e.action for e in state.entries] == ["refused", "privacy.charge"]
    assert state.charged("r1") and verify_chain(state.entries).ok
