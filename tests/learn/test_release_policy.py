"""The learning tasks' release policies follow from the job the node holds.

A node whose job aggregates securely releases updates and control variates only into the
secure sum, and losses, example counts and raw metrics never: a coordinator that asks for
them in the clear is refused by the node, while the honest secure round still runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Clip, Mean
from shoal.cli.job import parse_job
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.data import load_digits, partition
from shoal.errors import NotEnoughNodes
from shoal.learn import (
    EVALUATE,
    TRAIN,
    ExampleDP,
    FedAvg,
    NodeDP,
    SoftmaxRegression,
    learning_app,
)
from shoal.runtime import FETCH_TASK, FailureKind, LocalEngine


@pytest.fixture(scope="module")
def nodes() -> list[Any]:
    train, _ = load_digits(test_fraction=0.2, seed=0)
    return partition(train, nodes=4, scheme="iid", seed=0)


def model() -> SoftmaxRegression:
    return SoftmaxRegression(features=64, classes=10)


def kinds(app: Any, task: str, fields: list[str]) -> dict[str, str]:
    policy = app.policy(task)
    return {f: policy.kind_of(f).kind for f in fields}


TRAIN_FIELDS = ["d/W", "dc/b", "loss", "n", "steps", "dp_unclipped"]
EVAL_FIELDS = ["metrics", "accuracy", "loss", "n"]


@pytest.mark.parametrize(
    ("plan", "update", "metrics"),
    [
        (FedAvg(aggregator=Clip(1.0) | SecureSum() | Mean()).plan, "secure", "secure"),
        (NodeDP(noise_multiplier=1.0, secure=True), "secure", "secure"),
        (
            ExampleDP(noise_multiplier=1.0, distributed=True, total_examples=9, secure=True),
            "secure",
            "secure",
        ),
        (NodeDP(noise_multiplier=1.0), "clear", "clear"),  # central DP: the job's choice
        (
            ExampleDP(noise_multiplier=1.0, distributed=True, total_examples=9),
            "clear",
            "clear",
        ),
        # Local DP-SGD: only with the node's own noise, charged to its ledger first.
        (ExampleDP(noise_multiplier=1.0), "noised", "noised"),
    ],
)
def test_private_plans_never_release_losses_or_counts(plan: Any, update: str, metrics: str) -> None:
    app = learning_app(model(), plan=plan)
    train = kinds(app, TRAIN, TRAIN_FIELDS)
    assert train == {
        "d/W": update,
        "dc/b": update,
        "dp_unclipped": update,
        "loss": "never",
        "n": "never",
        "steps": "never",
    }
    assert kinds(app, EVALUATE, EVAL_FIELDS) == {
        "metrics": metrics,
        "accuracy": "never",
        "loss": "never",
        "n": "never",
    }


def test_without_privacy_everything_may_leave_in_the_clear() -> None:
    app = learning_app(model(), plan=FedAvg().plan)
    assert set(kinds(app, TRAIN, TRAIN_FIELDS).values()) == {"clear"}
    assert set(kinds(app, EVALUATE, EVAL_FIELDS).values()) == {"clear"}


def test_a_job_with_secure_true_builds_a_node_that_refuses_clear_reads(nodes: list[Any]) -> None:
    raw = {
        "data": {"dataset": "digits", "partition": {"nodes": 4}},
        "algorithm": {"name": "scaffold", "rounds": 1, "nodes_per_round": 4, "max_steps": 2},
        "aggregate": {"secure": True, "clip": 50.0},
    }
    algorithm = parse_job(raw).build_algorithm()
    app = learning_app(model(), plan=algorithm.plan)  # what `shoal node` builds from its job
    app.install(algorithm.node_tasks())
    federation = Federation(LocalEngine(app, data=nodes, seed=0), min_nodes=1, seed=0)
    group = federation.all()
    weights = {"w/W": np.zeros((64, 10)), "w/b": np.zeros(10)}
    c = {"c/W": np.zeros((64, 10)), "c/b": np.zeros(10)}
    out = group.map(TRAIN, group.broadcast(**weights, **c, max_steps=2, track_loss=True))
    for fields in (["d/W"], ["dc/W"], ["loss"], ["n"]):
        replies, failures = federation.request(
            list(out.node_ids), FETCH_TASK, common={"handle": out.handle, "fields": fields}
        )
        assert not replies, fields
        assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
    # Asking for the fields along with the receipts is refused the same way.
    with pytest.raises(NotEnoughNodes, match="rejected"):
        group.map(TRAIN, group.broadcast(**weights, **c, max_steps=2), send=["d/W", "loss"])
    # The honest secure round runs, control variates and all.
    state = algorithm.round(federation, algorithm.init(model().get_weights()), seed=0).state
    assert np.abs(state.slots["c"]["W"]).max() > 0
