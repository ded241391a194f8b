"""The histogram GBDT core grows XGBoost's trees (same cuts, same parameters)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine, make_regression

from shoal.errors import ConfigError, DataError
from shoal.trees import Booster, GBDTParams, Tree, fit_bins, gbdt_params, train


def _cancer(missing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    if missing:
        x = x.copy()
        x[np.random.default_rng(0).random(x.shape) < missing] = np.nan
    return x, y


def _same_as_xgboost(
    xgbc: SimpleNamespace, x: np.ndarray, y: np.ndarray, params: GBDTParams
) -> Booster:
    bins = fit_bins(x, max_bins=params.max_bins)
    mine = train(x, y, params, bins=bins)
    xgbc.assert_same_model(mine, xgbc.xgboost_on_codes(x, y, params, bins))
    return mine


def test_logistic_matches_xgboost_tree_by_tree(xgbc: SimpleNamespace) -> None:
    x, y = _cancer()
    model = _same_as_xgboost(xgbc, x, y, GBDTParams(n_trees=20, max_depth=4))
    assert sum(t.n_nodes for r in model.trees for t in r) > 20 * 7  # real trees, not stumps


def test_missing_values_learn_default_directions_like_xgboost(xgbc: SimpleNamespace) -> None:
    x, y = _cancer(missing=0.1)
    params = GBDTParams(
        n_trees=15, max_depth=5, reg_lambda=2.0, gamma=0.5, min_child_weight=2.0,
        learning_rate=0.1,
    )  # fmt: skip
    model = _same_as_xgboost(xgbc, x, y, params)
    inner = [t.default_left[t.left >= 0] for r in model.trees for t in r]
    assert any(d.any() for d in inner) and any((~d).any() for d in inner)


def test_few_bins_match_xgboost(xgbc: SimpleNamespace) -> None:
    x, y = _cancer()
    model = _same_as_xgboost(xgbc, x, y, GBDTParams(n_trees=10, max_depth=4, max_bins=16))
    assert int(model.bins.n_bins.max()) <= 16


def test_softmax_matches_xgboost(xgbc: SimpleNamespace) -> None:
    x, y = load_wine(return_X_y=True)
    params = GBDTParams(objective="multi:softprob", num_class=3, n_trees=10, max_depth=3)
    model = _same_as_xgboost(xgbc, x, y, params)
    assert all(len(r) == 3 for r in model.trees)


def test_squared_error_matches_xgboost(xgbc: SimpleNamespace) -> None:
    x, y = make_regression(500, 10, noise=5, random_state=0)
    _same_as_xgboost(xgbc, x, y, GBDTParams(objective="reg:squarederror", n_trees=10, max_depth=4))


def test_predictions_match_xgboost_on_codes(xgbc: SimpleNamespace) -> None:
    x, y = _cancer(missing=0.05)
    params = GBDTParams(n_trees=10, max_depth=4)
    bins = fit_bins(x, max_bins=256)
    mine = train(x, y, params, bins=bins)
    theirs = xgbc.xgboost_on_codes(x, y, params, bins)
    import xgboost as xgb

    codes = bins.transform(x).astype(np.float32)
    codes[codes == 256] = np.nan
    expected = theirs.predict(xgb.DMatrix(codes, missing=np.nan))
    np.testing.assert_allclose(mine.predict(x), expected, rtol=1e-5, atol=1e-6)


def test_subsample_and_colsample_use_only_the_drawn_columns() -> None:
    x, y = _cancer()
    model = train(x, y, GBDTParams(n_trees=8, max_depth=3, colsample=0.2, subsample=0.5))
    for (tree,) in model.trees:
        assert len(set(tree.feature[tree.left >= 0].tolist())) <= int(0.2 * 30)
    again = train(x, y, GBDTParams(n_trees=8, max_depth=3, colsample=0.2, subsample=0.5))
    np.testing.assert_array_equal(model.predict(x), again.predict(x))


def test_fixed_point_trees_are_the_same_trees() -> None:
    x, y = _cancer()
    exact = train(x, y, GBDTParams(n_trees=10, max_depth=4))
    fixed = train(x, y, GBDTParams(n_trees=10, max_depth=4, fixed_point_bits=24))
    for (a,), (b,) in zip(exact.trees, fixed.trees):
        np.testing.assert_array_equal(a.feature, b.feature)
        np.testing.assert_array_equal(a.left_bins, b.left_bins)
        np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-6)


def test_lightgbm_and_xgboost_names() -> None:
    p = gbdt_params(
        {"num_iterations": 7, "eta": 0.2, "lambda_l2": 3.0, "min_split_gain": 0.1,
         "max_bin": 64, "feature_fraction": 0.5, "bagging_fraction": 0.8,
         "objective": "binary"}
    )  # fmt: skip
    assert (p.n_trees, p.learning_rate, p.reg_lambda, p.gamma) == (7, 0.2, 3.0, 0.1)
    assert (p.max_bins, p.colsample, p.subsample, p.objective) == (64, 0.5, 0.8, "binary:logistic")
    with pytest.raises(ConfigError, match="given twice"):
        gbdt_params({"eta": 0.1, "learning_rate": 0.2})
    with pytest.raises(ConfigError, match="unknown tree parameter 'num_leaves'"):
        gbdt_params({"num_leaves": 31})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bins": 257}, "max_bins must be in"),
        ({"max_depth": 13}, "max_depth must be in"),
        ({"objective": "poisson"}, "not supported"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"num_class": 3}, "num_class is for multi-class"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GBDTParams(**kwargs)  # type: ignore[arg-type]


def test_bad_data_is_refused() -> None:
    x, y = _cancer()
    constant = x.copy()
    constant[:, 3] = 1.0
    with pytest.raises(DataError, match="feature 3 is constant"):
        train(constant, y)
    labels = y.astype(float)
    labels[5] = np.nan
    with pytest.raises(DataError, match="NaN"):
        train(x, labels)
    with pytest.raises(DataError, match="multi-class labels"):
        train(x, y + 5, GBDTParams(objective="multi:softprob", num_class=3))
    with pytest.raises(DataError, match="rows of features"):
        train(x, y[:-1])


def test_hostile_tree_arrays_are_refused() -> None:
    x, y = _cancer()
    (tree,) = train(x, y, GBDTParams(n_trees=1, max_depth=2)).trees[0]
    data = tree.to_dict()
    assert Tree.from_dict(data, n_features=30).n_nodes == tree.n_nodes
    loop = dict(data, left=np.where(data["left"] >= 0, 0, -1))  # a child pointing back
    with pytest.raises(DataError, match="point forward"):
        Tree.from_dict(loop)
    far = dict(data, feature=np.where(data["left"] >= 0, 99, 0))
    with pytest.raises(DataError, match="feature out of range"):
        Tree.from_dict(far, n_features=30)
