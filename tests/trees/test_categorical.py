"""Categorical features: one category against the rest, as XGBoost's one-hot splits."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.cli.job import load_job
from shoal.cli.main import main
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.data import load_csv
from shoal.errors import ConfigError, DataError
from shoal.runtime import LocalEngine, NodeApp
from shoal.trees import MISSING, GBDTParams, fit_bins, train
from shoal.trees.bins import category_cuts
from shoal.trees.export import load_model, save_model, save_xgboost
from shoal.trees.horizontal import SETUP_TASK, horizontal_tasks, train_horizontal
from shoal.trees.split import RT_EPS, WIDTH, best_splits, node_gain, set_members


def categorical_task(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two numeric columns and two categorical ones (7 and 5 categories, one with missing
    values) whose categories carry signal no threshold on the codes can separate."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(size=(n, 2)),
            rng.integers(0, 7, size=n).astype(float),
            rng.integers(0, 5, size=n).astype(float),
        ]
    )
    x[rng.random(n) < 0.1, 2] = np.nan
    effect = np.array([1.5, -1.0, 0.3, 2.0, -2.0, 0.0, 0.7])
    z = x[:, 0] + np.where(np.isnan(x[:, 2]), 0.5, effect[np.nan_to_num(x[:, 2]).astype(int)])
    z += 0.8 * (x[:, 3] == 3)
    y = (z + rng.normal(size=n) > 0.5).astype(float)
    return x, y


def test_categorical_splits_match_xgboost_tree_by_tree(xgbc: SimpleNamespace) -> None:
    x, y = categorical_task()
    params = GBDTParams(n_trees=12, max_depth=4, min_child_weight=2.0, gamma=0.1)
    bins = fit_bins(x, max_bins=256, categorical=[2, 3])
    mine = train(x, y, params, bins=bins)
    xgbc.assert_same_model(mine, xgbc.xgboost_on_codes(x, y, params, bins))
    splits = [t.categorical[t.left >= 0] for r in mine.trees for t in r]
    # both kinds of split occur, and categorical ones send missing values either way
    assert any(s.any() for s in splits) and any((~s).any() for s in splits)
    cat_default = np.concatenate(
        [t.default_left[(t.left >= 0) & t.categorical] for r in mine.trees for t in r]
    )
    assert cat_default.any() and (~cat_default).any()


def test_softmax_with_a_categorical_column_matches_xgboost(xgbc: SimpleNamespace) -> None:
    x, y = categorical_task(seed=1)
    y = np.where(np.nan_to_num(x[:, 2]) > 3, 2, y).astype(float)
    params = GBDTParams(objective="multi:softprob", num_class=3, n_trees=5, max_depth=3)
    bins = fit_bins(x, max_bins=256, categorical=[2, 3])
    mine = train(x, y, params, bins=bins)
    xgbc.assert_same_model(mine, xgbc.xgboost_on_codes(x, y, params, bins))


def test_categorical_routes_rows_by_category_not_by_code_order() -> None:
    x, y = categorical_task()
    model = train(x, y, GBDTParams(n_trees=1, max_depth=1), categorical=[2, 3])
    tree = model.trees[0][0]
    assert tree.categorical[0] and tree.feature[0] == 2
    c = int(tree.left_bins[0])
    rows = np.array([[0.0, 0.0, c, 0.0], [0.0, 0.0, (c + 1) % 7, 0.0]])
    leaves = tree.leaf_index(model.bins.transform(rows))
    assert list(leaves) == [tree.right[0], tree.left[0]]


def test_categorical_model_files_round_trip_and_load_in_xgboost(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    from shoal.trees.export import load_model, save_model, save_xgboost

    x, y = categorical_task()
    model = train(x, y, GBDTParams(n_trees=8, max_depth=4), categorical=[2, 3])
    save_model(model, tmp_path / "m.json")
    again = load_model(tmp_path / "m.json")
    assert again.bins.categorical == model.bins.categorical
    np.testing.assert_array_equal(again.predict(x), model.predict(x))
    save_xgboost(model, tmp_path / "x.json")
    booster = xgb.Booster(model_file=str(tmp_path / "x.json"))
    types = ["q", "q", "c", "c"]
    dm = xgb.DMatrix(x.astype(np.float32), missing=np.nan, feature_types=types,
                     enable_categorical=True)  # fmt: skip
    np.testing.assert_allclose(booster.predict(dm), model.predict(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "words"),
    [(1.5, "holds 1 value"), (-1.0, "holds 1 value"), (300.0, "more than max_bins")],
)
def test_bad_category_codes_are_clear_errors(value: float, words: str) -> None:
    x, y = categorical_task(n=200)
    x[7, 3] = value
    with pytest.raises(DataError, match=words):
        train(x, y, GBDTParams(n_trees=1), categorical=[3])


def test_a_category_unseen_in_training_is_refused_at_prediction() -> None:
    x, y = categorical_task(n=300)
    model = train(x, y, GBDTParams(n_trees=2), categorical=[2, 3])
    rows = x[:2].copy()
    rows[1, 3] = 9.0
    with pytest.raises(DataError, match=r"feature 3 is categorical but holds 1 value.*\[0, 5\)"):
        model.predict(rows)


def test_bad_categorical_indices_are_clear_errors() -> None:
    x, y = categorical_task(n=100)
    with pytest.raises(DataError, match="out of range"):
        train(x, y, GBDTParams(n_trees=1), categorical=[4])
    with pytest.raises(DataError, match="named twice"):
        train(x, y, GBDTParams(n_trees=1), categorical=[2, 2])


def _one_hot_by_hand(
    g: np.ndarray, h: np.ndarray, k: int, tg: float, th: float, params: GBDTParams
) -> tuple[float, tuple[int, bool, float, float] | None]:
    """XGBoost's EnumerateOneHot as a loop: category c right with missing left, then with
    missing right; the first strictly better candidate wins."""
    lam, mcw = params.reg_lambda, params.min_child_weight
    root = np.float32(node_gain(tg, th, lam))
    miss_g, miss_h = tg - g[:MISSING].sum(), th - h[:MISSING].sum()
    best: tuple[float, tuple[int, bool, float, float] | None] = (0.0, None)
    for c in range(k):
        for missing_left in (True, False):
            rg, rh = g[c] + (0 if missing_left else miss_g), h[c] + (0 if missing_left else miss_h)
            lg, lh = tg - rg, th - rh
            if lh < mcw or rh < mcw:
                continue
            both = np.float32(node_gain(lg, lh, lam) + node_gain(rg, rh, lam))
            gain = float(np.float32(both - root))
            if gain > best[0]:
                best = (gain, (c, missing_left, lg, lh))
    return best


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 9),
    seed=st.integers(0, 2**31),
    missing=st.booleans(),
    mcw=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_one_hot_search_is_xgboosts_scan(k: int, seed: int, missing: bool, mcw: float) -> None:
    rng = np.random.default_rng(seed)
    g, h = np.zeros(WIDTH), np.zeros(WIDTH)
    g[:k] = np.round(rng.normal(size=k) * 8) / 4  # ties happen on a coarse grid
    h[:k] = rng.integers(0, 12, size=k) / 2
    if missing:
        g[MISSING], h[MISSING] = rng.normal(), rng.integers(1, 6)
    tg, th = float(g.sum()), float(h.sum())
    params = GBDTParams(min_child_weight=mcw)
    splits = best_splits(
        g[None, None], h[None, None], np.array([tg]), np.array([th]),
        n_bins=np.array([k]), features=np.array([True]), params=params,
        categorical=np.array([True]),
    )  # fmt: skip
    gain, found = _one_hot_by_hand(g, h, k, tg, th, params)
    if found is None:
        assert splits.gain[0] <= RT_EPS
        return
    c, missing_left, lg, lh = found
    assert splits.gain[0] == pytest.approx(gain, abs=0)
    assert bool(splits.categorical[0])
    assert (int(splits.left_bins[0]), bool(splits.default_left[0])) == (c, missing_left)
    assert (splits.left_g[0], splits.left_h[0]) == (lg, lh)


# -- horizontal ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A node's rows as a CSV with categorical columns gives them."""

    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...] = ("a", "b", "color", "size")
    categories: Mapping[str, tuple[str, ...]] | None = None


COLORS = tuple(f"c{i}" for i in range(7))
SIZES = ("XS", "S", "M", "L", "XL")


def _nodes(x: np.ndarray, y: np.ndarray, count: int) -> list[Node]:
    parts = np.array_split(np.random.default_rng(3).permutation(len(x)), count)
    return [Node(x[p], y[p], categories={"color": COLORS, "size": SIZES}) for p in parts]


def _fed(nodes: list[Node], secure: bool = True) -> Federation:
    app = NodeApp()
    app.install(horizontal_tasks(secure=secure))
    app.install(SecureSum().node_tasks())
    return Federation(LocalEngine(app, data=nodes))


@pytest.mark.parametrize("secure", [True, False])
def test_horizontal_categorical_trees_equal_centralized_and_xgboost(
    secure: bool, xgbc: SimpleNamespace
) -> None:
    x, y = categorical_task(n=1500)
    params = GBDTParams(n_trees=5, max_depth=4)
    fed = _fed(_nodes(x, y, 4), secure=secure)
    federated = train_horizontal(fed, params, secure=secure, categorical=[2, 3])
    assert federated.bins.categorical == (False, False, True, True)
    assert list(federated.bins.n_bins[2:]) == [7, 5]
    pooled = train(x, y, federated.params, bins=federated.bins)
    for ra, rb in zip(federated.trees, pooled.trees, strict=True):
        for ta, tb in zip(ra, rb, strict=True):
            for name, value in ta.to_dict().items():
                np.testing.assert_array_equal(value, getattr(tb, name), err_msg=name)
    assert any(t.categorical.any() for (t,) in federated.trees)
    # and XGBoost with the same cuts (its gradients unrounded) grows the same trees
    xgbc.assert_same_model(federated, xgbc.xgboost_on_codes(x, y, params, federated.bins))


def test_a_coordinator_flagging_a_numeric_column_categorical_reads_no_values() -> None:
    """The node refuses the cuts and says how many values are not codes, never which."""
    x, y = categorical_task(n=400)
    fed = _fed(_nodes(x, y, 4))
    flags = np.array([True, False, True, True])  # column 0 is numeric
    cuts = [category_cuts(3), np.array([0.0]), category_cuts(7), category_cuts(5)]
    replies, failures = fed.request(
        ["n0"],
        SETUP_TASK,
        common={
            "params": GBDTParams(n_trees=1).to_dict(),
            "cuts": np.concatenate(cuts),
            "sizes": np.array([len(c) for c in cuts]),
            "categorical": flags,
        },
    )
    assert not replies
    detail = failures["n0"].detail
    assert "feature 0 is categorical but holds" in detail
    # the first bad value would have been quoted before: no value of the column appears
    values = _nodes(x, y, 4)[0].x[:, 0]
    assert not any(str(float(v)) in detail or f"{v:.6g}" in detail for v in values)


def test_nodes_with_different_category_codes_are_refused_naming_column_and_node() -> None:
    x, y = categorical_task(n=800)
    nodes = _nodes(x, y, 4)
    # n2 built its code table from its own labels: same categories, another order
    nodes[2] = Node(nodes[2].x, nodes[2].y, categories={"color": COLORS[::-1], "size": SIZES})
    with pytest.raises(DataError, match=r"column 'color' is encoded differently.*\['n2'\]"):
        train_horizontal(_fed(nodes), GBDTParams(n_trees=1), categorical=[2, 3],
                         feature_names=nodes[0].feature_names)  # fmt: skip
    # a node holding the column as plain numbers is refused as well, named
    nodes[2] = Node(nodes[2].x, nodes[2].y, categories={"size": SIZES})
    with pytest.raises(DataError, match=r"column 2 is encoded differently.*\['n2'\]"):
        train_horizontal(_fed(nodes), GBDTParams(n_trees=1), categorical=[2, 3])


def test_non_code_values_in_a_horizontal_categorical_column_are_refused() -> None:
    x, y = categorical_task(n=800)
    x = x.copy()
    x[5, 3] = 2.5
    with pytest.raises(DataError, match=r"feature 3 is categorical but holds 1 value"):
        train_horizontal(_fed(_nodes(x, y, 4)), GBDTParams(n_trees=1), categorical=[3])


# -- job files and CSVs -------------------------------------------------------------------


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, colors: Sequence[str]) -> None:
    lines = ["a,b,color,size,label"]
    for row, label in zip(x, y):
        color = colors[int(np.nan_to_num(row[2]))]
        lines.append(f"{row[0]},{row[1]},{color},{SIZES[int(row[3])]},{int(label)}")
    path.write_text("\n".join(lines) + "\n")


JOB = """
[job]
name = "categories"

[data]
path = "data.csv"
partition = { scheme = "iid", nodes = 4 }

[model]
name = "gbdt"
n_trees = 5
max_depth = 3
categorical = ["color", "size"]
categories = { size = ["XS", "S", "M", "L", "XL"] }
"""


def test_shoal_run_with_categorical_columns_equals_centralized(tmp_path: Path) -> None:
    x, y = categorical_task(n=1500)
    _write_csv(tmp_path / "data.csv", x, y, COLORS)
    (tmp_path / "job.toml").write_text(JOB)
    code = main(["run", str(tmp_path / "job.toml"), "--json", str(tmp_path / "s.json"), "--quiet"])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and summary["identical_predictions"] and summary["categorical_splits"] > 0
    assert summary["federated_auc"] == summary["centralized_auc"] > 0.8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "gbdt"', 'name = "secureboost"\nguest_features = 2\nhosts = 1'), "one-hot"),
        (("size = [", "shape = ["), "lists column 'shape', which"),
        (('"color", "size"]', '"colour", "size"]'), "'colour' is not a feature column"),
        (('"XL"]', '"L"]'), "must be a list of distinct"),
        ((', "XL"]', "]"), "holds 'XL', which is not one of its declared categories"),
    ],
)
def test_bad_categorical_jobs_fail_at_parse_time(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    x, y = categorical_task(n=300)
    _write_csv(tmp_path / "data.csv", x, y, COLORS)
    (tmp_path / "job.toml").write_text(JOB.replace(*change))
    with pytest.raises(ConfigError, match=message):
        load_job(tmp_path / "job.toml")


def test_node_csvs_coding_their_own_labels_are_refused_unless_declared(tmp_path: Path) -> None:
    """What `shoal node --data own.csv` does: each node codes a categorical column from its
    own sorted labels. A node that never saw one color codes the rest differently."""
    x, y = categorical_task(n=1200)
    parts = np.array_split(np.arange(len(x)), 4)
    for i, p in enumerate(parts):
        xi = x[p].copy()
        if i == 1:
            xi[:, 2] = np.where(np.nan_to_num(xi[:, 2]) == 0, 1, xi[:, 2])  # no "c0" at n1
        _write_csv(tmp_path / f"n{i}.csv", xi, y[p], COLORS)
    own = {"color": None, "size": list(SIZES)}
    nodes = [load_csv(tmp_path / f"n{i}.csv", categorical=own) for i in range(4)]
    assert nodes[1].categories is not None and nodes[1].categories["color"] == COLORS[1:]
    with pytest.raises(DataError, match=r"column 'color' is encoded differently.*\['n1'\]"):
        train_horizontal(_fed(nodes), GBDTParams(n_trees=1), categorical=[2, 3],
                         feature_names=nodes[0].feature_names)  # fmt: skip
    declared = {"color": list(COLORS), "size": list(SIZES)}
    nodes = [load_csv(tmp_path / f"n{i}.csv", categorical=declared) for i in range(4)]
    model = train_horizontal(_fed(nodes), GBDTParams(n_trees=2), categorical=[2, 3])
    assert model.bins.categorical == (False, False, True, True)


@dataclass(frozen=True)
class CodedNode:
    """A node whose categorical columns arrive as integer codes with no table (a .npz, or
    numbers built in Python), declared with their number of categories, or not at all."""

    x: np.ndarray
    y: np.ndarray
    category_counts: Mapping[int, int] | None = None


def test_integer_coded_columns_declared_without_a_table_must_agree() -> None:
    """Nodes that declare a different number of categories for a column of integer codes,
    or that hold codes outside the declared range, are refused by column and node; the
    error quotes no node's values. Agreeing nodes get one bin per declared category, even
    one that no node holds."""
    x, y = categorical_task(n=800)
    parts = np.array_split(np.random.default_rng(3).permutation(len(x)), 4)
    counts = {2: 8, 3: 5}  # column 2 has an eighth category that no row holds

    def nodes(odd: int | None = None, odd_counts: Mapping[int, int] | None = None) -> list:
        return [CodedNode(x[p], y[p], odd_counts if i == odd else counts)
                for i, p in enumerate(parts)]  # fmt: skip

    model = train_horizontal(_fed(nodes()), GBDTParams(n_trees=2), categorical=[2, 3])
    assert list(model.bins.n_bins[2:]) == [8, 5]
    pooled = train(x, y, model.params, bins=model.bins)
    for ra, rb in zip(model.trees, pooled.trees, strict=True):
        np.testing.assert_array_equal(ra[0].left, rb[0].left)
        np.testing.assert_array_equal(ra[0].value, rb[0].value)
    # n1 declares 6 categories for column 3: refused, named
    with pytest.raises(DataError, match=r"column 3 is encoded differently.*\['n1'\]"):
        train_horizontal(_fed(nodes(1, {2: 8, 3: 6})), GBDTParams(n_trees=1), categorical=[2, 3])
    # n2 declares nothing where the others declare: refused, named
    with pytest.raises(DataError, match=r"column 2 is encoded differently.*\['n2'\]"):
        train_horizontal(_fed(nodes(2, {3: 5})), GBDTParams(n_trees=1), categorical=[2, 3])
    # every node declares 4 categories for column 2, but n0..n3 hold codes up to 6
    with pytest.raises(DataError, match=r"column 2 is declared with 4 categories") as caught:
        bad = [CodedNode(n.x, n.y, {2: 4, 3: 5}) for n in nodes()]
        train_horizontal(_fed(bad), GBDTParams(n_trees=1), categorical=[2, 3])
    assert "['n0', 'n1', 'n2', 'n3']" in str(caught.value)
    # one node's codes shifted by one (1..7 where the others use 0..6): it alone is named,
    # and none of its values (nor its range) appears in the error
    shifted = nodes()
    moved = shifted[3].x.copy()
    moved[:, 2] += 1
    shifted[3] = CodedNode(moved, shifted[3].y, {2: 7, 3: 5})
    for i in range(3):
        shifted[i] = CodedNode(shifted[i].x, shifted[i].y, {2: 7, 3: 5})
    with pytest.raises(DataError, match=r"declared with 7 categories.*\['n3'\]") as caught:
        train_horizontal(_fed(shifted), GBDTParams(n_trees=1), categorical=[2, 3])
    detail = str(caught.value)
    assert "7.0" not in detail and "8" not in detail
    with pytest.raises(DataError, match="must be an integer >= 2"):
        train_horizontal(_fed(nodes(0, {2: 1})), GBDTParams(n_trees=1), categorical=[2])


@pytest.mark.parametrize(
    ("seed", "threshold", "mcw", "objective"),
    [(0, 64, 2.0, "binary:logistic"), (1, 3, 0.0, "binary:logistic"),
     (2, 64, 1.0, "multi:softprob"), (3, 2, 5.0, "binary:logistic")],
)  # fmt: skip
def test_partition_splits_match_xgboost_tree_by_tree(
    xgbc: SimpleNamespace, seed: int, threshold: int, mcw: float, objective: str
) -> None:
    """Sets of categories against the rest (XGBoost's default max_cat_to_onehot = 4:
    both categorical columns, 7 and 5 categories, split by partition), with missing
    values, a small max_cat_threshold and min_child_weight: every node as XGBoost's."""
    x, y = categorical_task(n=1500, seed=seed)
    extra: dict[str, Any] = {}
    if objective == "multi:softprob":
        y = np.where(np.nan_to_num(x[:, 3]) >= 3, 2.0, y)
        extra = {"objective": objective, "num_class": 3}
    params = GBDTParams(n_trees=6, max_depth=4, min_child_weight=mcw, max_cat_to_onehot=4,
                        max_cat_threshold=threshold, **extra)  # fmt: skip
    bins = fit_bins(x, max_bins=256, categorical=[2, 3])
    mine = train(x, y, params, bins=bins)
    xgbc.assert_same_model(mine, xgbc.xgboost_on_codes(x, y, params, bins))
    sizes = [
        len(set_members(t.category_set[v]))
        for r in mine.trees for t in r for v in np.flatnonzero(t.categorical & (t.left >= 0))
    ]  # fmt: skip
    assert max(sizes) >= 2  # set splits, not only one category


def test_partition_models_export_to_xgboost_and_predict_the_same(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    x, y = categorical_task(n=1000, seed=4)
    params = GBDTParams(n_trees=4, max_depth=3, max_cat_to_onehot=4)
    mine = train(x, y, params, categorical=[2, 3])
    save_xgboost(mine, tmp_path / "m.json")
    save_model(mine, tmp_path / "m.shoal.json")
    theirs = xgb.Booster(model_file=str(tmp_path / "m.json"))
    dm = xgb.DMatrix(x, feature_types=["q", "q", "c", "c"], enable_categorical=True)
    np.testing.assert_allclose(theirs.predict(dm), mine.predict(x), rtol=1e-5, atol=1e-6)
    again = load_model(tmp_path / "m.shoal.json")
    np.testing.assert_array_equal(again.predict(x), mine.predict(x))
    # a horizontal federation grows the same set splits as centralized training
    fed = _fed(_nodes(x, y, 4))
    federated = train_horizontal(fed, params, categorical=[2, 3])
    pooled = train(x, y, federated.params, bins=federated.bins)
    for ra, rb in zip(federated.trees, pooled.trees, strict=True):
        for name, value in ra[0].to_dict().items():
            np.testing.assert_array_equal(value, getattr(rb[0], name), err_msg=name)
    assert any(
        len(set_members(t.category_set[v])) >= 2
        for (t,) in federated.trees for v in np.flatnonzero(t.categorical & (t.left >= 0))
    )  # fmt: skip
