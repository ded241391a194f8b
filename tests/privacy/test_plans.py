"""The privacy plans' math: DP-FedAvg's chain, accounting, evaluation vectors, policies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.core import Federation, NodeValues
from shoal.privacy import epsilon
from shoal.privacy.plans import (
    EVAL_LOSS_BOUND,
    EvaluationPlan,
    ExampleDP,
    NodeDP,
    NoPrivacy,
    metrics_vector,
    unclipped_indicator,
)
from shoal.runtime import LocalEngine, NodeApp, TaskContext


def mapped(results: list[dict[str, Any]]) -> NodeValues:
    app = NodeApp()

    @app.task("update")
    def update(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return ctx.data  # type: ignore[no-any-return]

    return Federation(LocalEngine(app, data=results)).all().map("update")


def test_dp_fedavg_without_noise_is_the_clipped_sum_over_the_expected_count() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 7))
    out = mapped([{"u": row} for row in rows])
    chain = NodeDP(noise_multiplier=0.0, clip=0.5).aggregator(expected=8.0)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    expected = (rows * np.minimum(1.0, 0.5 / norms)).sum(axis=0) / 8
    np.testing.assert_allclose(out["u"].aggregate(chain), expected, rtol=1e-12)


def test_example_dp_epsilon_is_the_most_active_nodes_dp_sgd_steps() -> None:
    plan = ExampleDP(noise_multiplier=1.1, sample_rate=0.2, steps_per_round=3)
    meta = {"dp_participation": {"a": 4, "b": 1}}
    expected = epsilon(sample_rate=0.2, noise_multiplier=1.1, steps=12, delta=1e-5)
    assert plan._spent(meta, rounds=5) == pytest.approx(expected)
    # An evaluation is one more full-participation Gaussian release, so it costs more.
    assert plan._spent({**meta, "dp_evaluations": 1}, rounds=5) > expected


def test_calibrated_plans_meet_their_target() -> None:
    plan = NodeDP.for_target(epsilon=2.0, delta=1e-5, rounds=30, sample_rate=0.1)
    spent = plan._spent({"dp_node_rate": 0.1}, rounds=30)
    assert spent == pytest.approx(2.0, rel=0.02)


def test_evaluation_vectors_are_bounded_and_decode_back() -> None:
    v = metrics_vector(accuracy=0.75, loss=2.5)
    assert np.linalg.norm(v) <= 1.0
    assert EvaluationPlan(aggregator=None).decode(v) == pytest.approx(
        {"federated_accuracy": 0.75, "federated_loss": 2.5}
    )
    worst = metrics_vector(accuracy=1.0, loss=float("inf"))
    assert np.linalg.norm(worst) == pytest.approx(1.0)
    nan_loss = metrics_vector(accuracy=0.5, loss=float("nan"))
    assert EvaluationPlan(aggregator=None).decode(nan_loss)["federated_loss"] == EVAL_LOSS_BOUND


def test_the_adaptive_clip_bit_uses_the_whole_update() -> None:
    update = {"w": np.full(3, 0.5), "b": np.array([0.5])}  # norm 1.0
    assert unclipped_indicator(update, 1.0) == 0.5
    assert unclipped_indicator(update, 0.99) == -0.5


def test_releases_follow_the_plan() -> None:
    assert NoPrivacy().release().public and NoPrivacy().release().update == "clear"
    secure = NodeDP(noise_multiplier=1.0, secure=True).release()
    assert secure.update == "secure" and not secure.public
    assert ExampleDP(noise_multiplier=1.0).release().update == "noised"  # by DP-SGD, charged
