"""Model files: XGBoost's JSON model format, and shoal's own NumPy-only JSON predictor.

Nothing here pickles: a model is numbers in JSON, checked on load (tree links must point
forward, features and bins must exist), so a hostile file cannot run code or loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import DataError
from shoal.trees.bins import Bins
from shoal.trees.booster import Booster
from shoal.trees.objective import base_margin
from shoal.trees.params import GBDTParams
from shoal.trees.split import set_members
from shoal.trees.tree import Tree

__all__ = ["FORMAT", "load_model", "save_model", "save_xgboost", "to_xgboost_json"]

FORMAT = "shoal.trees/1"
_BIG = float(np.finfo(np.float32).max)  # "x < BIG" holds for every finite float32


def _xgb_tree(tree: Tree, bins: Bins, index: int) -> dict[str, Any]:
    n = tree.n_nodes
    parents = np.full(n, 2147483647, dtype=np.int64)
    inner = np.flatnonzero(tree.left >= 0)
    parents[tree.left[inner]] = inner
    parents[tree.right[inner]] = inner
    conditions = []
    cat_nodes: list[int] = []
    cat_sets: list[list[int]] = []
    for v in range(n):
        if tree.left[v] < 0:
            conditions.append(float(tree.value[v]))
            continue
        if tree.categorical[v]:
            # XGBoost's categorical split: the node's category set goes right
            cat_nodes.append(v)
            cat_sets.append(set_members(tree.category_set[v]))
            conditions.append(float(tree.left_bins[v]))
            continue
        t = bins.threshold(int(tree.feature[v]), int(tree.left_bins[v]))
        conditions.append(float(np.clip(t, -_BIG, _BIG)))
    return {
        "base_weights": [float(v) for v in tree.value],
        "categories": [c for members in cat_sets for c in members],
        "categories_nodes": cat_nodes,
        "categories_segments": [int(x) for x in np.cumsum([0, *map(len, cat_sets)])[:-1]],
        "categories_sizes": [len(members) for members in cat_sets],
        "default_left": [int(d) for d in tree.default_left],
        "id": index,
        "left_children": [int(c) for c in tree.left],
        "loss_changes": [0.0] * n,
        "parents": [int(p) for p in parents],
        "right_children": [int(c) for c in tree.right],
        "split_conditions": conditions,
        "split_indices": [int(f) if c >= 0 else 0 for f, c in zip(tree.feature, tree.left)],
        "split_type": [int(c and left >= 0) for c, left in zip(tree.categorical, tree.left)],
        "sum_hessian": [float(h) for h in tree.sum_h],
        "tree_param": {
            "num_deleted": "0",
            "num_feature": str(bins.n_features),
            "num_nodes": str(n),
            "size_leaf_vector": "1",
        },
    }


def to_xgboost_json(booster: Booster) -> dict[str, Any]:
    """The model in XGBoost's JSON format (``xgboost.Booster(model_file=...)`` loads it).

    Categorical columns become category-set splits; XGBoost then predicts from a DMatrix
    built with ``enable_categorical=True`` whose categorical columns hold the codes."""
    params = booster.params
    flat = [t for round_trees in booster.trees for t in round_trees]
    k = params.outputs
    if params.objective == "binary:logistic":
        base = [0.5 if params.base_score is None else params.base_score]
    else:
        base = [base_margin(params)] * k
    return {
        "learner": {
            "attributes": {},
            "feature_names": [],
            "feature_types": (
                ["c" if c else "float" for c in booster.bins.is_categorical]
                if booster.bins.categorical
                else []
            ),
            "gradient_booster": {
                "model": {
                    "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(len(flat))},
                    "iteration_indptr": [i * k for i in range(len(booster.trees) + 1)],
                    "tree_info": [i % k for i in range(len(flat))],
                    "trees": [_xgb_tree(t, booster.bins, i) for i, t in enumerate(flat)],
                },
                "name": "gbtree",
            },
            "learner_model_param": {
                "base_score": "[" + ",".join(repr(float(b)) for b in base) + "]",
                "boost_from_average": "0",
                "num_class": str(params.num_class if k > 1 else 0),
                "num_feature": str(booster.bins.n_features),
                "num_target": "1",
            },
            "objective": _objective(params),
        },
        "version": [2, 1, 0],
    }


def _objective(params: GBDTParams) -> dict[str, Any]:
    if params.objective == "binary:logistic":
        return {"name": "binary:logistic", "reg_loss_param": {"scale_pos_weight": "1"}}
    if params.objective == "reg:squarederror":
        return {"name": "reg:squarederror", "reg_loss_param": {"scale_pos_weight": "1"}}
    return {
        "name": "multi:softprob",
        "softmax_multiclass_param": {"num_class": str(params.num_class)},
    }


def save_xgboost(booster: Booster, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_xgboost_json(booster)), encoding="utf-8")


def model_dict(booster: Booster) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "params": booster.params.to_dict(),
        "cuts": [[float(c) for c in cuts] for cuts in booster.bins.cuts],
        "categorical": [bool(c) for c in booster.bins.is_categorical],
        "trees": [
            [{k: np.asarray(v).tolist() for k, v in t.to_dict().items()} for t in round_trees]
            for round_trees in booster.trees
        ],
    }


def save_model(booster: Booster, path: str | Path) -> None:
    """shoal's predictor file: JSON numbers only (cuts, trees, parameters)."""
    Path(path).write_text(json.dumps(model_dict(booster)), encoding="utf-8")


def load_model(path: str | Path) -> Booster:
    """Load :func:`save_model`'s file, checking every part of it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read tree model {str(path)!r}: {exc}") from None
    return model_from_dict(raw)


def model_from_dict(raw: Any) -> Booster:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"not a shoal tree model (expected format {FORMAT!r})")
    try:
        params = GBDTParams(**raw["params"])
        cuts = tuple(np.asarray(c, dtype=np.float64) for c in raw["cuts"])
        if any(c.ndim != 1 or (np.diff(c) <= 0).any() or not np.isfinite(c).all() for c in cuts):
            raise DataError("cuts must be increasing finite numbers")
        flags = raw.get("categorical", [])
        if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags):
            raise DataError("categorical must be a list of true/false, one per feature")
        bins = Bins(cuts=cuts, categorical=tuple(flags))
        trees = tuple(
            tuple(Tree.from_dict(t, n_features=bins.n_features) for t in round_trees)
            for round_trees in raw["trees"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed tree model: {exc}") from None
    if any(len(r) != params.outputs for r in trees):
        raise DataError("malformed tree model: each round needs one tree per output")
    return Booster(params=params, bins=bins, trees=trees)
