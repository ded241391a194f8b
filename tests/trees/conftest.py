"""Fixture ``xgbc``: train XGBoost on shoal's bin codes and compare its trees with shoal's."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from shoal.trees import MISSING, Bins, Booster, GBDTParams, Tree
from shoal.trees.split import set_members


def xgboost_on_codes(x: np.ndarray, y: np.ndarray, params: GBDTParams, bins: Bins) -> Any:
    """XGBoost hist trained on the bin codes: its cuts are then exactly shoal's bins (a feature
    with at most max_bin distinct values gets one bin per value, cut at the next value)."""
    import xgboost as xgb

    codes = bins.transform(x).astype(np.float32)
    codes[codes == MISSING] = np.nan
    categorical = bins.is_categorical
    objective = params.objective
    base = params.base_score
    if base is None:
        base = 0.5 if objective == "binary:logistic" else 0.0
    xp: dict[str, Any] = {
        "tree_method": "hist",
        "max_bin": 256,
        "eta": params.learning_rate,
        "max_depth": params.max_depth,
        "reg_lambda": params.reg_lambda,
        "reg_alpha": 0.0,
        "gamma": params.gamma,
        "min_child_weight": params.min_child_weight,
        "objective": objective,
        "base_score": base,
        "nthread": 1,
    }
    if objective.startswith("multi"):
        xp["num_class"] = params.num_class
    if categorical.any():
        # one category against the rest below max_cat_to_onehot categories (shoal's
        # default: every count), a set of categories from there on
        xp["max_cat_to_onehot"] = params.max_cat_to_onehot
        xp["max_cat_threshold"] = params.max_cat_threshold
        types = ["c" if c else "q" for c in categorical]
        dm = xgb.DMatrix(
            codes, label=y, missing=np.nan, feature_types=types, enable_categorical=True
        )
        return xgb.train(xp, dm, num_boost_round=params.n_trees)
    dm = xgb.DMatrix(codes, label=y, missing=np.nan)
    return xgb.train(xp, dm, num_boost_round=params.n_trees)


def xgboost_trees(booster: Any) -> list[dict[str, Any]]:
    model = json.loads(booster.save_raw("json").decode())
    trees: list[dict[str, Any]] = model["learner"]["gradient_booster"]["model"]["trees"]
    return trees


def assert_same_tree(mine: Tree, theirs: dict[str, Any], n_bins: np.ndarray) -> None:
    """Node by node: children, split feature, bin and default direction, leaf values."""
    left, right = theirs["left_children"], theirs["right_children"]
    cond, feat, dl = theirs["split_conditions"], theirs["split_indices"], theirs["default_left"]
    kinds = theirs.get("split_type") or [0] * len(left)
    # a categorical node's categories: categories[segment : segment + size]
    sets = {
        node: theirs["categories"][start : start + size]
        for node, start, size in zip(
            theirs["categories_nodes"], theirs["categories_segments"], theirs["categories_sizes"]
        )
    }
    assert len(left) == mine.n_nodes
    for i in range(len(left)):
        assert (left[i], right[i]) == (mine.left[i], mine.right[i]), f"node {i}"
        if left[i] < 0:
            np.testing.assert_allclose(mine.value[i], cond[i], rtol=1e-5, atol=1e-7)
        elif kinds[i] == 1:
            # XGBoost sends the node's categories right; shoal's one category is left_bins
            members = set_members(mine.category_set[i])
            assert int(mine.left_bins[i]) == members[0], f"node {i}"
            got = (int(mine.feature[i]), members, bool(mine.default_left[i]))
            assert bool(mine.categorical[i]), f"node {i}: XGBoost's split is categorical"
            assert got == (feat[i], sorted(sets[i]), bool(dl[i])), f"node {i}"
        else:
            assert not mine.categorical[i], f"node {i}: XGBoost's split is numerical"
            # XGBoost splits at "x < cut"; on codes the cut is the number of left bins
            # (the last cut lies beyond the largest code: all non-missing rows go left)
            f = feat[i]
            t = min(int(np.ceil(cond[i])), int(n_bins[f]))
            got = (int(mine.feature[i]), int(mine.left_bins[i]), bool(mine.default_left[i]))
            assert got == (f, t, bool(dl[i])), f"node {i}"


def assert_same_model(mine: Booster, theirs: Any) -> None:
    flat = [t for r in mine.trees for t in r]
    other = xgboost_trees(theirs)
    assert len(flat) == len(other)
    for tree, their in zip(flat, other):
        assert_same_tree(tree, their, mine.bins.n_bins)


@pytest.fixture
def xgbc() -> SimpleNamespace:
    pytest.importorskip("xgboost")
    return SimpleNamespace(
        xgboost_on_codes=xgboost_on_codes,
        assert_same_model=assert_same_model,
        assert_same_tree=assert_same_tree,
        xgboost_trees=xgboost_trees,
    )
