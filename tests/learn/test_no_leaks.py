"""No per-node value leaves a node in the clear except through the round's own aggregate.

A spy wraps the engine and decodes every reply of every dispatch: receipts with the fields
sent along, fetches, protocol messages. For every algorithm under every private plan it
checks which data-derived fields reached the coordinator in the clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Clip, Mean, Median
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.data import load_digits, partition
from shoal.errors import AggregationError, ConfigError
from shoal.learn import (
    ALGORITHMS,
    EVALUATE,
    TRAIN,
    Algorithm,
    ExampleDP,
    LocalData,
    NodeDP,
    SoftmaxRegression,
    Trainer,
    learning_app,
)
from shoal.learn.tasks import UPLOAD
from shoal.runtime import FETCH_TASK, SENT_PREFIX, DispatchResult, LocalEngine, Task
from shoal.wire import decode

# Every field the learning tasks compute from a node's data.
DATA_FIELDS = ("d/", "dc/", "loss", "n", "steps", "dp_unclipped", "accuracy", "metrics")


def data_derived(name: str) -> bool:
    return any(name == f or (f.endswith("/") and name.startswith(f)) for f in DATA_FIELDS)


class Spy:
    """An engine wrapper that records, per task name, every data field seen in the clear."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.clear: dict[str, set[str]] = {}
        self.tasks: list[str] = []

    def node_ids(self) -> Sequence[str]:
        return self.engine.node_ids()

    def close(self) -> None:
        self.engine.close()

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        result = self.engine.dispatch(tasks, deadline_s=deadline_s)
        names = {t.task_id: t.name for t in tasks}
        for reply in result.replies.values():
            task = names[reply.task_id]
            self.tasks.append(task)
            payload = decode(reply.payload)
            if "kept" in payload:  # a receipt: shapes only, plus any fields sent along
                fields = [k[len(SENT_PREFIX) :] for k in payload if k.startswith(SENT_PREFIX)]
            else:
                fields = list(payload)
            seen = {f for f in fields if data_derived(f)}
            if seen:
                self.clear.setdefault(task, set()).update(seen)
        return result

    def fields(self) -> set[str]:
        return {
            f.split("/")[0] + ("/*" if "/" in f else "") for s in self.clear.values() for f in s
        }


@pytest.fixture(scope="module")
def nodes() -> list[LocalData]:
    train, _ = load_digits(test_fraction=0.2, seed=0)
    parts = partition(train, nodes=6, scheme="iid", seed=0)
    return [LocalData(train=p, test=p) for p in parts]


def run(algorithm: Algorithm, nodes: list[LocalData]) -> Spy:
    model = SoftmaxRegression(features=64, classes=10)
    app = learning_app(model, plan=algorithm.plan)  # the nodes enforce the plan's policies
    app.install(algorithm.node_tasks())
    spy = Spy(LocalEngine(app, data=nodes, seed=0))
    federation = Federation(spy, min_nodes=1, seed=0)  # type: ignore[arg-type]
    try:
        Trainer(
            federation=federation, algorithm=algorithm, model=model, federated_eval_every=1
        ).run()
    finally:
        spy.close()
    return spy


TOTAL = 1437  # digits' training split: public in distributed DP (its normalizer)
PLANS: dict[str, dict[str, Any]] = {
    "secure": {"aggregator": Clip(1.0) | SecureSum() | Mean()},
    "node_dp": {"privacy": NodeDP(noise_multiplier=1.0, clip=1.0)},
    "node_dp_secure": {"privacy": NodeDP(noise_multiplier=1.0, clip=1.0, secure=True)},
    "example_dp_secure": {
        "privacy": ExampleDP(
            noise_multiplier=1.0, distributed=True, total_examples=TOTAL, secure=True
        )
    },
    "example_dp_local": {"privacy": ExampleDP(noise_multiplier=1.0, steps_per_round=2)},
}
# What each plan lets the coordinator read in the clear, and why: a central DP aggregate
# (the server adds the noise) reads the clipped updates it noises; local DP releases
# updates each noised by their node. Losses, example counts and raw metrics: never.
ALLOWED = {
    "secure": set(),
    "node_dp": {"d/*", "dc/*", "metrics"},
    "node_dp_secure": set(),
    "example_dp_secure": set(),
    "example_dp_local": {"d/*", "metrics"},
}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_nothing_per_node_leaves_in_the_clear(name: str, plan: str, nodes: list[LocalData]) -> None:
    cls = ALGORITHMS[name]
    options = {"rounds": 2, "nodes_per_round": 4, "lr": 0.1, "max_steps": 3, **PLANS[plan]}
    if cls.hooks and plan.startswith("example_dp"):
        # FedProx and SCAFFOLD add a gradient term DP-SGD's noised step cannot take.
        with pytest.raises(ConfigError, match="DP-SGD"):
            cls(**options)
        return
    if name == "fedbuff" and plan.startswith("example_dp"):
        # Asynchronous buffers are accounted at node level only (DP-FedBuff).
        with pytest.raises(ConfigError, match="node-level DP"):
            cls(**options)
        return
    spy = run(cls(**options), nodes)
    assert TRAIN in spy.tasks and EVALUATE in spy.tasks  # the run did train and evaluate
    if name == "fedbuff":  # its updates leave through upload, under train's policy
        assert UPLOAD in spy.tasks
    leaked = spy.fields() - ALLOWED[plan]
    assert not leaked, f"{name} under {plan} released {sorted(leaked)} in the clear"
    if "secure" in plan:
        assert FETCH_TASK not in spy.clear


def test_the_spy_sees_what_a_plain_aggregate_reads(nodes: list[LocalData]) -> None:
    # The control: without privacy, losses and example counts do travel in the clear.
    spy = run(ALGORITHMS["scaffold"](rounds=1, nodes_per_round=4, max_steps=2), nodes)
    assert {"d/*", "dc/*", "loss", "n", "accuracy"} <= spy.fields()


def test_scaffold_control_variates_go_through_the_secure_sum(nodes: list[LocalData]) -> None:
    algorithm = ALGORITHMS["scaffold"](
        rounds=2, nodes_per_round=6, max_steps=3, aggregator=Clip(50.0) | SecureSum() | Mean()
    )
    spy = run(algorithm, nodes)
    assert not spy.clear
    # ... and the server still learns the mean control-variate change (c moved).
    model = SoftmaxRegression(features=64, classes=10)
    app = learning_app(model)
    app.install(algorithm.node_tasks())
    federation = Federation(LocalEngine(app, data=nodes, seed=0), min_nodes=1, seed=0)
    state = algorithm.init(model.get_weights())
    state = algorithm.round(federation, state, seed=1).state
    assert np.abs(state.slots["c"]["W"]).max() > 0


def test_private_rounds_report_no_training_loss(nodes: list[LocalData]) -> None:
    algorithm = ALGORITHMS["fedavg"](
        rounds=1, nodes_per_round=4, max_steps=2, aggregator=Clip(1.0) | SecureSum() | Mean()
    )
    model = SoftmaxRegression(features=64, classes=10)
    app = learning_app(model)
    app.install(algorithm.node_tasks())
    federation = Federation(LocalEngine(app, data=nodes, seed=0), min_nodes=1, seed=0)
    result = algorithm.round(federation, algorithm.init(model.get_weights()), seed=0)
    assert np.isnan(result.train_loss)
    assert len(result.participants) == 4  # the count of participants is public


def test_dp_federated_evaluation_is_noised_and_accounted(nodes: list[LocalData]) -> None:
    plain = ALGORITHMS["fedavg"](rounds=2, nodes_per_round=4, privacy=NodeDP(noise_multiplier=1.0))
    model = SoftmaxRegression(features=64, classes=10)
    app = learning_app(model)
    app.install(plain.node_tasks())

    def trained(every: int) -> Any:
        federation = Federation(LocalEngine(app, data=nodes, seed=0), min_nodes=1, seed=0)
        return Trainer(
            federation=federation, algorithm=plain, model=model, federated_eval_every=every
        ).run()

    without, with_eval = trained(0), trained(1)
    # Two evaluations over all nodes cost privacy, and the ledger says so.
    assert with_eval.state.meta["dp_evaluations"] == 2
    assert with_eval.metrics["epsilon"] > without.metrics["epsilon"]
    accuracies = {r.federated_accuracy for r in with_eval.history}
    assert all(a is not None and np.isfinite(a) for a in accuracies)


def test_reducers_that_cannot_weight_refuse_weights(nodes: list[LocalData]) -> None:
    app = learning_app(SoftmaxRegression(features=64, classes=10))
    federation = Federation(LocalEngine(app, data=nodes, seed=0), min_nodes=1, seed=0)
    group = federation.all()
    weights = {"w/W": np.zeros((64, 10)), "w/b": np.zeros(10)}
    out = group.map(TRAIN, group.broadcast(**weights, max_steps=1))
    for reducer in (Median(), Clip(1.0) | SecureSum() | Mean()):
        with pytest.raises(AggregationError, match="cannot weight"):
            out["d/b"].aggregate(reducer, weights=out["n"])
