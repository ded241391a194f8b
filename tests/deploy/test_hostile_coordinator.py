"""A hostile coordinator against real node processes on 127.0.0.1.

The coordinator here holds valid credentials (the federation's own store and engine) and
tries what a curious or modified coordinator would: fetch a secure field, reveal after a
secure sum, release a DP value with less noise than was charged, replay a charged request,
draw a second noisy sample, pull per-node evaluation metrics under DP, run a task the node
never registered, ask for less DP noise than the node's own plan, lie about the size of a
secure sum's group. Each attempt is refused by the node (REJECTED, with the reason), recorded
in the node's own audit log and in the coordinator's trail, and the honest parts of the run
still work. The nodes' ledgers survive kill -9.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Clip
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.errors import NotEnoughNodes, ProtocolError
from shoal.learn import EVALUATE, TRAIN
from shoal.privacy.guard import DPRequest
from shoal.privacy.stages import DistributedNoise
from shoal.runtime import FETCH_TASK, FailureKind, NodeStateFile, Task
from shoal.runtime.request import request_digest
from shoal.wire import encode

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("policy_node.py")
NODES = ("n0", "n1", "n2", "n3")  # SecAgg+ with its default dropout tolerance needs 4
CLIP = 1.0
Z = 1.0  # the noise multiplier the nodes are charged for


def share() -> DistributedNoise:
    """The honest distributed noise: each of the nodes adds its share of Z * CLIP."""
    return DistributedNoise(total_std=Z * CLIP, nodes=len(NODES))


def dp_request() -> dict[str, Any]:
    return DPRequest(
        clip=CLIP,
        noise_multiplier=Z,
        sample_rate=1.0,
        steps=1,
        level="node",
        node_noise_multiplier=share().per_node_std / CLIP,
    ).to_json()


@dataclass
class Nodes:
    root: Path
    port: int
    keys: dict[str, Path]
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def _log_path(self, name: str) -> Path:
        return self.root / f"{name}-{self.starts.get(name, 1)}.log"

    def state_path(self, name: str) -> Path:
        return self.root / f"{name}-state.db"

    def start(self, name: str, *extra: str) -> subprocess.Popen[str]:
        self.starts[name] = self.starts.get(name, 0) + 1
        log = open(self._log_path(name), "w")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "--port",
                str(self.port),
                "--key",
                str(self.keys[name]),
                "--state",
                str(self.state_path(name)),
                "--value",
                str(NODES.index(name) + 1) if name in NODES else "1",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def audit(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """The node's own audit log, read from its state file (the node may be running)."""
        with NodeStateFile(self.state_path(name), owner=None) as file:
            assert file.verify().ok
            return [(e.action, dict(e.detail)) for e in file.read("")]

    def refusals(self, name: str, task: str) -> list[str]:
        return [d["reason"] for a, d in self.audit(name) if a == "refused" and d["task"] == task]

    def log(self, name: str) -> str:
        """The output of the node's latest start."""
        return self._log_path(name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def nodes(federation: Any) -> Iterator[tuple[Nodes, Federation, Any]]:
    engine = federation.engine()
    fleet = Nodes(
        root=federation.root,
        port=engine.port,
        keys={name: federation.root / f"{name}.key" for name in federation.keys},
    )
    try:
        for name in NODES:
            fleet.start(name)
        if engine.wait_for_nodes(len(NODES), timeout_s=120) < len(NODES):
            raise AssertionError("nodes did not connect:\n" + fleet.log("n0"))
        fed = Federation(engine, min_nodes=1, deadline_s=60, audit=federation.store.audit_trail())
        yield fleet, fed, federation.store
    finally:
        fleet.stop()


def coordinator_refusals(store: Any, task: str) -> list[str]:
    return [
        r.detail["node"]
        for r in store.audit_log(limit=10_000)
        if r.action == "node.rejected" and r.detail["task"] == task
    ]


def test_secure_fields_leave_only_through_the_secure_sum(nodes: Any) -> None:
    fleet, fed, store = nodes
    out = fed.all().map("train")
    # Honest: the secure sum of the updates and the clear count.
    total = out["delta"].aggregate(Clip(10.0) | SecureSum())
    np.testing.assert_allclose(total, np.full(4, 10.0), atol=1e-3)
    assert out["n"].sum() == 4
    # Hostile: fetch the secure field; reveal it after the secure sum.
    delta = out["delta"]
    with pytest.raises(NotEnoughNodes):
        delta.mean()
    assert {f.kind for f in delta.failures.values()} == {FailureKind.REJECTED}
    assert all("'delta' as secure" in f.detail for f in delta.failures.values())
    again = out["delta"]
    assert again.reveal() == {}
    for name in NODES:
        reasons = fleet.refusals(name, FETCH_TASK)
        assert len(reasons) == 2 and all("'delta' as secure" in r for r in reasons)
    assert sorted(coordinator_refusals(store, FETCH_TASK)) == sorted(NODES * 2)
    assert store.verify_audit().ok


def test_dp_release_needs_the_charged_noise_once_and_replays_are_refused(nodes: Any) -> None:
    fleet, fed, _ = nodes
    out = fed.all().map("dp_train", dp=dp_request())
    # Hostile: a secure sum whose node noise is a tenth of what the charge assumed.
    weak = DistributedNoise(total_std=Z * CLIP / 10, nodes=len(NODES))
    with pytest.raises(ProtocolError):
        out["delta"].aggregate(Clip(CLIP) | weak | SecureSum())
    # Hostile: the noised field in the clear.
    plain = out["delta"]
    with pytest.raises(NotEnoughNodes):
        plain.mean()
    # Honest: the charged noise, added by the nodes, inside the secure sum.
    fresh = fed.all().map("dp_train", dp=dp_request())
    total = fresh["delta"].aggregate(Clip(CLIP) | share() | SecureSum())
    assert total.shape == (4,) and np.all(np.isfinite(total))
    # Hostile: a second noisy sample of the same value.
    with pytest.raises(ProtocolError):
        fresh["delta"].aggregate(Clip(CLIP) | share() | SecureSum())
    # Hostile: replay a charged request, same task id, to double-spend or re-sample.
    payload = encode({"dp": dp_request()})
    tasks = [
        Task(node_id=n, name="dp_train", payload=payload, task_id=f"replay/{n}", keep_as="r")
        for n in NODES
    ]
    first = fed.engine.dispatch(tasks, deadline_s=60)
    assert set(first.replies) == set(NODES)
    second = fed.engine.dispatch(tasks, deadline_s=60)
    assert not second.replies
    assert all("charged" in f.detail for f in second.failures.values())
    for name in NODES:
        audit = fleet.audit(name)
        charges = [d for a, d in audit if a == "privacy.charge"]
        assert len(charges) == 3  # two maps and one replayed request: no double spend
        assert [d["task_id"] for d in charges].count(f"replay/{name}") == 1
        masked = fleet.refusals(name, "shoal.secagg.masked_input")
        assert any("less noise than it charged" in r for r in masked)
        assert any("second noisy sample" in r for r in masked)
        assert any("charged" in r for r in fleet.refusals(name, "dp_train"))
        assert any("holds noised fields" in r for r in fleet.refusals(name, FETCH_TASK))


def test_per_node_metrics_under_dp_are_refused_in_the_clear(nodes: Any) -> None:
    fleet, fed, _ = nodes
    out = fed.all().map("evaluate", dp=dp_request())
    assert out["n"].sum() == 40  # the clear count is public
    accuracy = out["accuracy"]
    with pytest.raises(NotEnoughNodes):
        accuracy.mean(weights=out["n"])
    # Hostile: only this node's share of distributed noise, for a release on its own.
    _, failures = fed.request(
        list(NODES),
        FETCH_TASK,
        common={
            "handle": out.handle,
            "fields": ["accuracy", "loss"],
            "noise": {"clip": CLIP, "std": share().per_node_std},
        },
    )
    assert set(failures) == set(NODES)
    assert all("outside a secure sum needs the full std" in f.detail for f in failures.values())
    # Honest: the node adds the full charged noise to its own metrics, once.
    std = Z * CLIP
    replies, failures = fed.request(
        list(NODES),
        FETCH_TASK,
        common={
            "handle": out.handle,
            "fields": ["accuracy", "loss"],
            "noise": {"clip": CLIP, "std": std},
        },
    )
    assert not failures and set(replies) == set(NODES)
    assert all(isinstance(r["accuracy"], float) for r in replies.values())
    for name in NODES:
        assert any("holds noised fields" in r for r in fleet.refusals(name, FETCH_TASK))
        assert any(a == "release.noised" for a, _ in fleet.audit(name))


LEARN_WEIGHTS = {"w/W": np.zeros((4, 2)), "w/b": np.zeros(2)}
# What the nodes' own plan allows (tests/deploy/policy_node.py PLAN).
PLAN_DP = DPRequest(clip=1.0, noise_multiplier=1.0, sample_rate=0.5, steps=2).to_json()


def test_the_noise_is_the_nodes_own_plan_over_the_group_it_sees(nodes: Any) -> None:
    fleet, fed, _ = nodes
    _group_lie(fleet, fed)  # one fixture (four node processes) for both attacks
    # Hostile: a tenth of the plan's noise; no DP request at all; more steps than a round.
    for dp, words in (
        ({**PLAN_DP, "noise_multiplier": 0.1}, "noise multiplier 0.1 < 1"),
        (None, "without a DP request"),
        ({**PLAN_DP, "steps": 50}, "50 steps > 2"),
        ({**PLAN_DP, "level": "node"}, "level 'node'"),
    ):
        payload = {**LEARN_WEIGHTS, **({} if dp is None else {"dp": dp})}
        replies, failures = fed.request(list(NODES), TRAIN, common=payload)
        assert not replies and set(failures) == set(NODES)
        assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
        assert all(words in f.detail for f in failures.values()), failures
    # Honest: the plan's own request trains, is charged, and the DP-SGD update leaves.
    honest = {**LEARN_WEIGHTS, "dp": PLAN_DP, "shoal.send": ["d/W", "d/b"]}
    replies, failures = fed.request(list(NODES), TRAIN, common=honest, keep_as="learn")
    assert not failures and all(r["sent/d/W"].shape == (4, 2) for r in replies.values())
    # Hostile: evaluation asking for no noise. Each node adds its plan's noise anyway and
    # charges its own ledger, so two evaluations of the same model differ.
    ask = {**LEARN_WEIGHTS, "private": True, "noise_std": 0.0}
    first, _ = fed.request(list(NODES), EVALUATE, common=ask)
    second, _ = fed.request(list(NODES), EVALUATE, common=ask)
    assert set(first) == set(second) == set(NODES)
    for name in NODES:
        assert not np.allclose(first[name]["metrics"], second[name]["metrics"])
        charges = [d["charge"] for a, d in fleet.audit(name) if a == "privacy.charge"]
        learned = [c for c in charges if c["level"] in ("example", "evaluation")]
        assert [c["level"] for c in learned] == ["example", "evaluation", "evaluation"]
        assert all(c["noise_multiplier"] == 1.0 for c in learned)
        assert len(fleet.refusals(name, TRAIN)) == 4


def _group_lie(fleet: Nodes, fed: Federation) -> None:
    # Hostile: the coordinator says the group has 100 members, so each node's share of the
    # charged std may be a tenth of it; the SecAgg+ round the nodes validate has 4.
    liar = DistributedNoise(total_std=Z * CLIP, nodes=100, min_survivors=100)
    out = fed.all().map("dp_train", dp=dp_request())
    with pytest.raises(ProtocolError):
        out["delta"].aggregate(Clip(CLIP) | liar | SecureSum())
    # Honest: the total is stated and each node derives its share from the 4 it sees, even
    # when the coordinator's count is off (nodes=100 here changes nothing).
    fresh = fed.all().map("dp_train", dp=dp_request())
    honest = DistributedNoise(total_std=Z * CLIP, nodes=100)
    total = fresh["delta"].aggregate(Clip(CLIP) | honest | SecureSum())
    assert total.shape == (4,) and np.all(np.isfinite(total))
    for name in NODES:
        masked = fleet.refusals(name, "shoal.secagg.masked_input")
        assert any("4 participant(s) this node sees" in r for r in masked), masked


def test_a_task_the_node_never_registered_is_refused_and_recorded(nodes: Any) -> None:
    fleet, fed, store = nodes
    replies, failures = fed.request(list(NODES), "export_all_data")
    assert not replies
    assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
    assert all("no task named" in f.detail for f in failures.values())
    for name in NODES:
        assert fleet.refusals(name, "export_all_data")
    assert sorted(coordinator_refusals(store, "export_all_data")) == sorted(NODES)
    out = fed.all().map("train")  # and the node goes on serving honest requests
    assert out["n"].sum() == 4


def test_the_ledger_survives_kill_minus_9_exactly(nodes: Any) -> None:
    fleet, fed, _ = nodes
    for _ in range(2):
        fed.all().map("dp_train", dp=dp_request())
    before = {
        name: len([a for a, _ in fleet.audit(name) if a == "privacy.charge"]) for name in NODES
    }
    assert before == dict.fromkeys(NODES, 2)
    victim = fleet.procs["n1"]
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    # Restart with the same state and a budget with room for exactly one more charge.
    one = _epsilon_of_charges(3) * 1.0001
    fleet.start("n1", "--max-epsilon", str(one))
    deadline = time.monotonic() + 120
    while "ready" not in fleet.log("n1") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "spent 2 charge(s)" in fleet.log("n1")
    fed.engine.wait_for_nodes(len(NODES), timeout_s=120)
    group = fed.group(["n1"])
    assert len(group.map("dp_train", dp=dp_request(), min_nodes=1)) == 1  # the third fits
    with pytest.raises(NotEnoughNodes, match="declined"):  # the fourth would not
        group.map("dp_train", dp=dp_request(), min_nodes=1)
    actions = [a for a, _ in fleet.audit("n1")]
    assert actions.count("privacy.charge") == 3 and actions[-1] == "declined"


def test_a_state_file_of_another_node_is_refused_at_start(nodes: Any) -> None:
    fleet = nodes[0]
    # n4 started with n0's state file: refused before it connects; n0's file is untouched.
    before = fleet.audit("n0")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--port",
            str(fleet.port),
            "--key",
            str(fleet.keys["n4"]),
            "--state",
            str(fleet.state_path("n0")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "belongs to" in proc.stderr and "refused rather than reset" in proc.stderr
    assert fleet.audit("n0") == before


def _epsilon_of_charges(count: int) -> float:
    from shoal.privacy import NodeBudget

    budget = NodeBudget(max_epsilon=1e9, max_delta=1e-5)
    for _ in range(count):
        budget.charge(sample_rate=1.0, noise_multiplier=Z, steps=1)
    return budget.spent()


def _per_node_secure_sum(
    fed: Federation,
    handle: str,
    clips: dict[str, float],
    *,
    request: str | None,
    fields: tuple[str, ...] = ("delta",),
    length: int = 4,
) -> Any:
    """A modified coordinator's secure sum: SecAgg+ run by hand, each node told its own clip
    (the others' 0, so that the "sum" would be the victim's value alone), every node told
    that its value came from ``request`` (the digest of the producing request)."""
    from shoal.crypto.secagg import (
        ADVERTISE_TASK,
        MASKED_INPUT_TASK,
        SHARE_TASK,
        UNMASK_TASK,
        AdvertiseReply,
        MaskedInputReply,
        SecAggParams,
        SecAggServer,
        ShareKeysReply,
        UnmaskReply,
        input_context,
        parse_replies,
        quantizer_for,
    )

    def extra(node: str) -> dict[str, Any]:
        transforms = [{"clip_l2": clips[node]}]
        return {
            "handle": handle,
            "fields": list(fields),
            "clip": 10.0,
            "transforms": transforms,
            "request": request,
        }

    ids = list(clips)
    # The parameters name the victim's input context, as an honest round would.
    params = SecAggParams.create(
        ids, vector_length=length, dropout_fraction=0.0, context=input_context(extra(ids[0]))
    )
    server = SecAggServer(params=params)

    def phase(task: str, kind: type[Any], per_node: dict[str, Any]) -> Any:
        replies, failures = fed.request(list(per_node), task, per_node=per_node)
        if failures:
            return failures
        return parse_replies(kind, replies)[0]

    advertise = server.advertise_request().to_dict()
    keys = phase(ADVERTISE_TASK, AdvertiseReply, dict.fromkeys(ids, advertise))
    shares = phase(
        SHARE_TASK, ShareKeysReply, {v: r.to_dict() for v, r in server.collect_keys(keys).items()}
    )
    requests = server.collect_shares(shares)
    masked = phase(
        MASKED_INPUT_TASK,
        MaskedInputReply,
        {v: {**r.to_dict(), **extra(v)} for v, r in requests.items()},
    )
    if any(not isinstance(r, MaskedInputReply) for r in masked.values()):
        return masked  # the failures
    unmask = {v: r.to_dict() for v, r in server.collect_masked(masked).items()}
    total = server.finish(phase(UNMASK_TASK, UnmaskReply, unmask))
    return quantizer_for(10.0, nodes=len(ids), bits=params.bits).dequantize_sum(total, count=4)


def test_every_node_of_a_secure_sum_prepares_its_input_alike(nodes: Any) -> None:
    fleet, fed, _ = nodes
    out = fed.all().map("train")
    # Hostile: n0 clips its update to 10 (it stays as it is), every other node to 0; the
    # "sum" would be n0's secure value. The others refuse: their request is not the round's.
    victim = dict.fromkeys(NODES, 0.0) | {"n0": 10.0}
    failures = _per_node_secure_sum(fed, out.handle, victim, request=out.request)
    assert isinstance(failures, dict) and set(failures) == set(NODES[1:]), failures
    assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
    for name in NODES[1:]:
        reasons = fleet.refusals(name, "shoal.secagg.masked_input")
        assert any("differently from the round's parameters" in r for r in reasons), reasons
    # Honest: the same request at every node sums all four (1 + 2 + 3 + 4 in each entry).
    fresh = fed.all().map("train")
    total = _per_node_secure_sum(
        fed, fresh.handle, dict.fromkeys(NODES, 10.0), request=fresh.request
    )
    np.testing.assert_allclose(total, np.full(4, 10.0), atol=1e-3)


def test_every_node_of_a_secure_sum_computed_its_input_from_the_same_request(nodes: Any) -> None:
    fleet, fed, _ = nodes

    # Hostile, before the sum: every node but n0 trains with a learning rate of ~0 (0 itself
    # is refused; 1e-12 makes the update 0 but for rounding, the DP-SGD noise that lr scales
    # included), n0 with the real one; all keep the result under one handle, and the round
    # states n0's request.
    def request(lr: float) -> dict[str, Any]:
        return {**LEARN_WEIGHTS, "dp": PLAN_DP, "lr": lr}

    tasks = [
        Task(
            node_id=n,
            name=TRAIN,
            payload=encode(request(0.5 if n == "n0" else 1e-12)),
            task_id=f"split/{n}",
            keep_as="split",
        )
        for n in NODES
    ]
    result = fed.engine.dispatch(tasks, deadline_s=60)
    assert set(result.replies) == set(NODES), result.failures
    victim = request_digest(TRAIN, encode(request(0.5)))
    everyone = dict.fromkeys(NODES, 10.0)
    failures = _per_node_secure_sum(
        fed, "split", everyone, request=victim, fields=("d/W", "d/b"), length=10
    )
    assert isinstance(failures, dict) and set(failures) == set(NODES[1:]), failures
    assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
    assert all("request digest mismatch" in f.detail for f in failures.values())
    for name in NODES[1:]:
        reasons = fleet.refusals(name, "shoal.secagg.masked_input")
        assert any("request digest mismatch" in r for r in reasons), reasons
    assert not fleet.refusals("n0", "shoal.secagg.masked_input")
    # Honest: one request at every node (one map), its digest in the round: the sum works.
    out = fed.all().map(TRAIN, **request(0.5))
    total = _per_node_secure_sum(
        fed, out.handle, everyone, request=out.request, fields=("d/W", "d/b"), length=10
    )
    assert isinstance(total, np.ndarray) and total.shape == (10,) and np.all(np.isfinite(total))
