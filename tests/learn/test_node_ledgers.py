"""Each node's own ledger under a DP plan: its noise floor, its evaluation charges, and
(with ``simulate(node_state=...)``) its spending kept in a file across simulate() calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.core import Federation
from shoal.data import load_digits, partition
from shoal.errors import NotEnoughNodes
from shoal.learn import EVALUATE, TRAIN, FedAvg, SoftmaxRegression, learning_app, simulate
from shoal.privacy import NodeBudget
from shoal.privacy.guard import DPRequest
from shoal.privacy.plans import ExampleDP
from shoal.runtime import FailureKind, LocalEngine, NodeStateFile

PLAN = ExampleDP(noise_multiplier=1.5, clip=1.0, sample_rate=0.2, steps_per_round=2)


@pytest.fixture(scope="module")
def parts() -> list:
    train, _ = load_digits(test_fraction=0.5, seed=0)
    return partition(train.subset(np.arange(240)), nodes=3, scheme="iid", seed=0)


def run(parts: list, rounds: int = 2, **options: object) -> object:
    return simulate(
        model=SoftmaxRegression(features=64, classes=10),
        nodes=parts,
        algorithm=FedAvg(rounds=rounds, nodes_per_round=3, lr=0.1, max_steps=2, privacy=PLAN),
        holdout=0.25,
        federated_eval_every=1,
        **options,  # type: ignore[arg-type]
    )


def ledgers(path: Path) -> dict[str, list[dict]]:
    with NodeStateFile(path, owner=None) as file:
        assert file.verify().ok
        return {
            node: [
                dict(e.detail["charge"]) for e in file.read(node) if e.action == "privacy.charge"
            ]
            for node in file.nodes()
        }


def spent(charges: list[dict]) -> float:
    budget = NodeBudget(max_epsilon=1e9, max_delta=1e-5)
    for c in charges:
        budget.charge(
            sample_rate=c["sample_rate"], noise_multiplier=c["noise_multiplier"], steps=c["steps"]
        )
    return budget.spent()


def test_training_and_evaluation_are_charged_at_each_node_and_kept_across_calls(
    tmp_path: Path, parts: list
) -> None:
    path = tmp_path / "nodes.db"
    result = run(parts, node_state=path)
    assert result.history[-1].federated_accuracy is not None  # type: ignore[attr-defined]
    first = ledgers(path)
    assert sorted(first) == ["n0", "n1", "n2"]
    for charges in first.values():
        # Two DP-SGD rounds (the plan's own request) and two federated evaluations, each
        # charged at the plan's noise multiplier, whatever the coordinator's payload said.
        assert [c["level"] for c in charges] == ["example", "evaluation"] * 2
        assert all(c["noise_multiplier"] == PLAN.noise_multiplier for c in charges)
    # The owners' limit: less than each has spent already, more than one round and one
    # evaluation cost. Fresh ledgers (in memory) run a round; the file's ledgers decline.
    limit = 0.999 * min(spent(c) for c in first.values())
    assert spent(first["n0"][:2]) < limit
    run(parts, rounds=1, max_epsilon=limit)  # in memory: nothing spent before
    with pytest.raises(NotEnoughNodes, match="budget"):
        run(parts, rounds=1, node_state=path, max_epsilon=limit)
    again = ledgers(path)
    assert again == first  # the declined call spent nothing


def test_in_simulation_the_nodes_refuse_less_noise_than_their_plan(parts: list) -> None:
    app = learning_app(SoftmaxRegression(features=64, classes=10), plan=PLAN)
    fed = Federation(LocalEngine(app, data=parts, seed=0), min_nodes=1)
    weights = {"w/W": np.zeros((64, 10)), "w/b": np.zeros(10)}
    honest = DPRequest(clip=1.0, noise_multiplier=1.5, sample_rate=0.2, steps=2).to_json()
    for dp in ({**honest, "noise_multiplier": 0.5}, {**honest, "sample_rate": 1.0}):
        replies, failures = fed.request(list(fed.node_ids), TRAIN, common={**weights, "dp": dp})
        assert not replies
        assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
        assert all("less privacy than the job" in f.detail for f in failures.values())
    # Evaluation: the raw metrics never leave; the noised vector does, noised at the node.
    replies, failures = fed.request(list(fed.node_ids), EVALUATE, common=weights)
    assert not failures and all(set(r) == {"metrics"} for r in replies.values())
