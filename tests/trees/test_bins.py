"""Cut placement: ``fit_bins`` puts its cuts where XGBoost's ``hist`` puts them.

XGBoost's weighted quantile summary is exact on up to ``8 * max_bin`` rows, so there the cuts
must agree value for value, and a model trained on raw values must equal XGBoost's trained on
the same raw values, with no cuts handed over (the parties of a vertical federation each cut
their own columns this way, so their trees are the ones XGBoost grows centrally).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_breast_cancer

from shoal.trees import GBDTParams, fit_bins, train
from shoal.trees.bins import quantile_cuts

xgb = pytest.importorskip("xgboost")


def _xgboost_cuts(x: np.ndarray, max_bin: int) -> list[np.ndarray]:
    """The interior cuts XGBoost's hist builds for ``x`` (its minimum and its sentinel past
    the largest value dropped)."""
    label = (np.arange(len(x)) % 2).astype(np.float32)
    dm = xgb.DMatrix(x, label=label, missing=np.nan)
    xgb.train(
        {"tree_method": "hist", "max_bin": max_bin, "nthread": 1},
        dm,
        num_boost_round=1,
    )
    ptr, values = dm.get_quantile_cut()
    return [values[ptr[j] + 1 : ptr[j + 1] - 1] for j in range(x.shape[1])]


@st.composite
def _columns(draw: Any) -> tuple[np.ndarray, int]:
    max_bin = draw(st.sampled_from([2, 3, 4, 16, 64, 256]))
    rows = draw(st.integers(2, 8 * max_bin))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    distinct = draw(st.integers(2, rows))
    # values from a pool of ``distinct`` floats exactly representable in float32, repeats
    # and missing values included, so ties and skewed counts are exercised
    pool = np.unique(rng.normal(size=distinct).astype(np.float32)).astype(np.float64)
    x = rng.choice(pool, size=(rows, 2), p=rng.dirichlet(np.ones(len(pool))))
    x[rng.random(x.shape) < draw(st.sampled_from([0.0, 0.2]))] = np.nan
    x[:2, :] = pool[[0, -1]] if len(pool) > 1 else 0.0  # no column is constant
    return x, max_bin


@settings(max_examples=60, deadline=None)
@given(_columns())
def test_cuts_are_xgboosts_value_for_value(case: tuple[np.ndarray, int]) -> None:
    x, max_bin = case
    if any(len(np.unique(c[~np.isnan(c)])) < 2 for c in x.T):
        return  # a constant column is refused (tested below), XGBoost keeps it
    mine = fit_bins(x, max_bins=max_bin)
    for j, theirs in enumerate(_xgboost_cuts(x, max_bin)):
        np.testing.assert_array_equal(mine.cuts[j].astype(np.float32), theirs)
        assert len(mine.cuts[j]) <= max_bin - 1


def test_breast_cancer_cuts_and_trees_equal_xgboost_on_raw_values(xgbc: SimpleNamespace) -> None:
    """No cuts handed over: shoal on raw values grows XGBoost's trees on raw values."""
    x, y = load_breast_cancer(return_X_y=True)
    params = GBDTParams(n_trees=10, max_depth=5)
    bins = fit_bins(x, max_bins=params.max_bins)
    for j, theirs in enumerate(_xgboost_cuts(x, params.max_bins)):
        np.testing.assert_array_equal(bins.cuts[j].astype(np.float32), theirs)
    mine = train(x, y, params, bins=bins)
    dm = xgb.DMatrix(x, label=y)
    theirs = xgb.train(
        {
            "tree_method": "hist",
            "max_bin": params.max_bins,
            "eta": params.learning_rate,
            "max_depth": params.max_depth,
            "reg_lambda": params.reg_lambda,
            "min_child_weight": params.min_child_weight,
            "objective": "binary:logistic",
            "base_score": 0.5,
            "nthread": 1,
        },
        dm,
        num_boost_round=params.n_trees,
    )
    flat = [t for r in mine.trees for t in r]
    for tree, their in zip(flat, xgbc.xgboost_trees(theirs), strict=True):
        assert their["left_children"] == list(tree.left)
        for i, (feature, cond) in enumerate(zip(their["split_indices"], their["split_conditions"])):
            if their["left_children"][i] < 0:
                np.testing.assert_allclose(tree.value[i], cond, rtol=1e-5, atol=1e-7)
                continue
            assert int(tree.feature[i]) == feature, f"node {i}"
            # XGBoost splits at "x < cut" on its float32 cut; shoal at its cut
            cut = bins.threshold(feature, int(tree.left_bins[i]))
            assert np.float32(cut) == np.float32(cond), f"node {i}"
    np.testing.assert_allclose(
        mine.predict(x), theirs.predict(xgb.DMatrix(x)), rtol=1e-5, atol=1e-6
    )


def test_more_rows_than_the_exact_summary_holds_still_cut_at_evenly_spaced_ranks() -> None:
    """Past 8 * max_bins rows XGBoost's summary is approximate; shoal's stays exact under the
    same pruning rule, so each bin holds close to 1/max_bins of the rows (the two prunings,
    to 2,048 entries and then to 257, leave one bin ~12% short where their grids meet)."""
    rng = np.random.default_rng(3)
    values = np.sort(rng.normal(size=100_000))
    cuts = quantile_cuts(values, np.ones(len(values), dtype=np.int64), max_bins=256)
    assert len(cuts) == 255
    assert np.all(np.diff(cuts) > 0)
    edges = np.concatenate([[0], np.searchsorted(values, cuts), [len(values)]])
    per_bin = np.diff(edges)
    assert per_bin.min() >= 100_000 / 256 * 0.85
    assert per_bin.max() <= 100_000 / 256 * 1.05
