"""Tests for the composable aggregation stages: every chain against the rules and NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.aggregate import (
    Chain,
    Clip,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    Stage,
    Sum,
    TrimmedMean,
    WeightedMean,
    rules,
)
from shoal.core import Aggregator, Federation, NodeValues
from shoal.errors import AggregationError, ConfigError
from shoal.runtime import LocalEngine, NodeApp, TaskContext


def mapped(results: list[dict[str, Any]]) -> NodeValues:
    app = NodeApp()

    @app.task("update")
    def update(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return ctx.data  # type: ignore[no-any-return]

    return Federation(LocalEngine(app, data=results)).all().map("update")


@pytest.fixture(scope="module")
def case() -> tuple[NodeValues, np.ndarray, np.ndarray]:
    """Seven nodes: five honest updates near 1, two outliers, and per-node example counts."""
    rng = np.random.default_rng(42)
    rows = rng.normal(1.0, 0.3, size=(7, 6))
    rows[5] = 40.0
    rows[6] = -25.0
    counts = np.array([10, 3, 7, 1, 12, 2, 5])
    results = [{"u": row, "n": int(c)} for row, c in zip(rows, counts)]
    return mapped(results), rows, counts


def clipped(rows: np.ndarray, l2: float) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, l2 / norms)


def test_stages_are_aggregators() -> None:
    assert isinstance(Mean(), Aggregator)
    assert isinstance(Clip(1.0) | Mean(), Aggregator)


def test_clip_sum_mean(case: Any) -> None:
    values, rows, _ = case
    expected = clipped(rows, 2.0)
    np.testing.assert_allclose((Clip(2.0) | Sum()).aggregate(values["u"]), expected.sum(axis=0))
    np.testing.assert_allclose(
        (Clip(2.0) | Sum() | Mean()).aggregate(values["u"]), expected.mean(axis=0)
    )
    np.testing.assert_allclose((Clip(2.0) | Mean()).aggregate(values["u"]), expected.mean(axis=0))
    # The chain's node transform uses the rule itself.
    np.testing.assert_allclose(rules.clip_l2(rows, 2.0)[0], expected)


def test_plain_sum_and_mean(case: Any) -> None:
    values, rows, _ = case
    np.testing.assert_allclose(Sum().aggregate(values["u"]), rows.sum(axis=0))
    np.testing.assert_allclose(values["u"].aggregate(Mean()), rows.mean(axis=0))
    np.testing.assert_allclose((Sum() | Mean()).aggregate(values["u"]), rows.mean(axis=0))


def test_weighted_means(case: Any) -> None:
    values, rows, counts = case
    expected = np.average(rows, axis=0, weights=counts)
    u, n = values["u"], values["n"]
    np.testing.assert_allclose(Mean().aggregate(u, weights=n), expected)
    np.testing.assert_allclose(WeightedMean().aggregate(u, weights=n), expected)
    np.testing.assert_allclose(u.aggregate(Mean(), weights=n), expected)
    # A weighted Sum carries the weights, so Sum | Mean is the weighted mean too.
    np.testing.assert_allclose(Sum().aggregate(u, weights=n), counts @ rows)
    np.testing.assert_allclose((Sum() | Mean()).aggregate(u, weights=n), expected)
    np.testing.assert_allclose(
        (Clip(2.0) | Sum() | Mean()).aggregate(u, weights=n),
        np.average(clipped(rows, 2.0), axis=0, weights=counts),
    )


def test_weighted_mean_without_weights_is_an_error(case: Any) -> None:
    values, _, _ = case
    with pytest.raises(AggregationError, match="weights"):
        WeightedMean().aggregate(values["u"])
    with pytest.raises(AggregationError, match="weights"):
        (Clip(1.0) | WeightedMean()).aggregate(values["u"])


def test_median_and_trimmed_mean(case: Any) -> None:
    values, rows, _ = case
    np.testing.assert_allclose(Median().aggregate(values["u"]), np.median(rows, axis=0))
    trimmed = np.sort(rows, axis=0)[1:-1].mean(axis=0)  # floor(0.2 * 7) = 1 from each end
    np.testing.assert_allclose(TrimmedMean(0.2).aggregate(values["u"]), trimmed)
    np.testing.assert_allclose(TrimmedMean(0.0).aggregate(values["u"]), rows.mean(axis=0))
    np.testing.assert_allclose(
        (Clip(2.0) | Median()).aggregate(values["u"]), np.median(clipped(rows, 2.0), axis=0)
    )


def test_krum_and_multi_krum(case: Any) -> None:
    values, rows, _ = case
    best = rules.krum(rows, 2)
    assert best < 5  # an honest node
    np.testing.assert_allclose(Krum(f=2).aggregate(values["u"]), rows[best])
    reduced = Chain.of(Krum(f=2)).reduce(values["u"])
    assert reduced.node_ids == (f"n{best}",) and reduced.count == 7

    vector, chosen = rules.multi_krum(rows, 2, 3)
    assert set(chosen.tolist()) <= set(range(5))
    np.testing.assert_allclose(MultiKrum(f=2, m=3).aggregate(values["u"]), vector)
    np.testing.assert_allclose(vector, rows[chosen].mean(axis=0))
    reduced = Chain.of(MultiKrum(f=2, m=3)).reduce(values["u"])
    assert reduced.node_ids == tuple(f"n{i}" for i in chosen)


def test_geometric_median(case: Any) -> None:
    values, rows, counts = case
    np.testing.assert_allclose(
        GeometricMedian().aggregate(values["u"]), rules.geometric_median(rows, eps=1e-8)
    )
    np.testing.assert_allclose(
        GeometricMedian().aggregate(values["u"], weights=values["n"]),
        rules.geometric_median(rows, counts, eps=1e-8),
    )
    # Robust: the two outliers barely move it, where they drag the mean far away.
    honest = rows[:5].mean(axis=0)
    robust = GeometricMedian().aggregate(values["u"])
    assert np.linalg.norm(robust - honest) < 0.5 < np.linalg.norm(rows.mean(axis=0) - honest)


def test_robust_rules_need_enough_nodes(case: Any) -> None:
    values, _, _ = case
    with pytest.raises(AggregationError, match="2f\\+3"):
        Krum(f=3).aggregate(values["u"])
    with pytest.raises(AggregationError):
        MultiKrum(f=1, m=7).aggregate(values["u"])


def test_chains_over_several_fields_restore_them() -> None:
    rng = np.random.default_rng(3)
    results = [
        {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=2), "n": i + 1}
        for i in range(5)
    ]
    values = mapped(results).select("w", "b")
    rows = np.stack([np.concatenate([r["w"].ravel(), r["b"]]) for r in results])
    for stage, reference in [
        (Clip(1.0) | Mean(), clipped(rows, 1.0).mean(axis=0)),
        (Median(), np.median(rows, axis=0)),
        (Krum(f=1), rows[rules.krum(rows, 1)]),
    ]:
        out = stage.aggregate(values)
        assert set(out) == {"w", "b"}
        assert out["w"].shape == (2, 3) and out["w"].dtype == np.float32
        assert out["b"].shape == (2,) and out["b"].dtype == np.float64
        np.testing.assert_allclose(out["w"].ravel(), reference[:6], rtol=1e-6)
        np.testing.assert_allclose(out["b"], reference[6:])


def test_chain_bookkeeping(case: Any) -> None:
    values, _, counts = case
    reduced = (Clip(1.0) | Sum()).reduce(values["u"], weights=values["n"])
    assert reduced.count == 7 and reduced.weight == counts.sum() and not reduced.averaged
    assert reduced.node_ids == tuple(f"n{i}" for i in range(7)) and reduced.excluded == {}
    averaged = (Clip(1.0) | Sum() | Mean()).reduce(values["u"])
    assert averaged.averaged and averaged.weight == 7


def test_excluded_nodes_are_left_out_of_chains() -> None:
    results = [{"u": np.full(2, float(i))} for i in range(4)] + [{"u": np.array([np.nan, 1.0])}]
    values = mapped(results)
    reduced = (Sum() | Mean()).reduce(values["u"])
    assert set(reduced.excluded) == {"n4"} and reduced.count == 4
    np.testing.assert_allclose(reduced.vector, np.full(2, 1.5))


# -- chain structure ---------------------------------------------------------------------------


def test_chains_flatten() -> None:
    chain = Clip(1.0) | (Sum() | Mean())
    assert isinstance(chain, Chain) and len(chain.stages) == 3
    assert (Clip(1.0) | Sum()) | Mean() == chain


@pytest.mark.parametrize(
    "chain",
    [
        Chain.of(Clip(1.0)),
        Clip(1.0),
        Clip(1.0) | Clip(2.0),
        Chain.of(),
    ],
)
def test_a_chain_without_a_reducer_is_a_config_error(case: Any, chain: Stage) -> None:
    values, _, _ = case
    with pytest.raises(ConfigError, match="reducer"):
        chain.aggregate(values["u"])


@pytest.mark.parametrize(
    "chain",
    [
        Mean() | Clip(1.0),
        Sum() | Clip(1.0),
        Sum() | Median(),
        Median() | Krum(),
        Sum() | Mean() | Clip(1.0),
    ],
)
def test_stages_after_the_reducer_must_be_server_transforms(case: Any, chain: Chain) -> None:
    values, _, _ = case
    with pytest.raises(ConfigError, match="cannot follow the reducer"):
        chain.aggregate(values["u"])


def test_only_stages_chain() -> None:
    with pytest.raises(ConfigError, match="cannot chain"):
        Clip(1.0) | "Mean"  # type: ignore[operator]
    with pytest.raises(ConfigError):
        Chain.of(Sum(), np.mean)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stage", "value"),
    [
        (Clip, 0.0),
        (Clip, -1.0),
        (Clip, float("nan")),
        (Clip, float("inf")),
        (TrimmedMean, 0.5),
        (TrimmedMean, -0.1),
    ],
)
def test_stage_parameters_are_checked(stage: Any, value: float) -> None:
    with pytest.raises(ConfigError):
        stage(value)


def test_clip_spec_is_json() -> None:
    assert Clip(0.5).spec() == {"clip_l2": 0.5}


# -- FedAvg of equal updates is the update ------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=4),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=8),
)
@example(update=np.array([5.135e-40], dtype=np.float32), counts=[1, 1, 1])  # a subnormal
def test_fedavg_of_equal_updates_is_the_update(update: np.ndarray, counts: list[int]) -> None:
    values = mapped([{"delta": update, "n": c} for c in counts])
    tol = 1e-6 if update.dtype == np.float32 else 1e-12
    # Subnormals keep an absolute, not a relative, precision: a weighted mean rounds each
    # product to their grid, so allow a few of its steps there.
    tiny = 4 * np.finfo(update.dtype).smallest_subnormal
    for stage in (Mean(), WeightedMean(), Sum() | Mean()):
        out = stage.aggregate(values["delta"], weights=values["n"])
        assert out.shape == update.shape and out.dtype == update.dtype
        np.testing.assert_allclose(out, update, rtol=tol, atol=tiny)
