"""Parameters of gradient-boosted trees, with XGBoost's names and LightGBM's aliases.

One frozen dataclass checked on construction; :func:`gbdt_params` also accepts the names
XGBoost and LightGBM use where they mean exactly the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shoal.errors import ConfigError

__all__ = [
    "ALIASES",
    "MAX_BINS",
    "MAX_DEPTH",
    "OBJECTIVES",
    "GBDTParams",
    "declared_categories",
    "gbdt_params",
]

MAX_BINS = 256  # bin codes fit one byte; more bins buy little for boosting
MAX_DEPTH = 12  # 4096 leaves per tree; deeper trees make level histograms explode
OBJECTIVES = ("binary:logistic", "reg:squarederror", "multi:softprob")

# Other libraries' names for the same parameter (one to one only).
ALIASES: dict[str, str] = {
    "num_boost_round": "n_trees",
    "n_estimators": "n_trees",
    "num_iterations": "n_trees",
    "num_trees": "n_trees",
    "eta": "learning_rate",
    "shrinkage_rate": "learning_rate",
    "lambda": "reg_lambda",
    "lambda_l2": "reg_lambda",
    "min_split_loss": "gamma",
    "min_split_gain": "gamma",
    "min_gain_to_split": "gamma",
    "min_sum_hessian_in_leaf": "min_child_weight",
    "min_hessian": "min_child_weight",
    "max_bin": "max_bins",
    "bagging_fraction": "subsample",
    "colsample_bytree": "colsample",
    "feature_fraction": "colsample",
    "num_class": "num_class",
    "seed": "seed",
    "random_state": "seed",
}
_OBJECTIVE_ALIASES = {
    "logistic": "binary:logistic",
    "binary": "binary:logistic",
    "squared_error": "reg:squarederror",
    "regression": "reg:squarederror",
    "l2": "reg:squarederror",
    "softmax": "multi:softprob",
    "multiclass": "multi:softprob",
    "multi:softmax": "multi:softprob",
}


@dataclass(frozen=True, kw_only=True)
class GBDTParams:
    """XGBoost's second-order boosting: depth-wise trees on histograms of binned features.

    ``fixed_point_bits`` rounds every gradient and hessian to a multiple of
    ``2**-fixed_point_bits`` before it enters a histogram: sums of such numbers are exact in
    float64, so they do not depend on how rows are split across parties or in what order
    they are added (federated training uses it; see docs/trees.md).

    A categorical feature with fewer than ``max_cat_to_onehot`` categories splits one
    category against the rest; one with more splits a set of categories against the rest,
    found as XGBoost finds it (categories sorted by weight, at most ``max_cat_threshold``
    deep). The default, above any category count, always splits one category (XGBoost's
    own default is 4).
    """

    objective: str = "binary:logistic"
    num_class: int = 1
    n_trees: int = 50
    max_depth: int = 6
    learning_rate: float = 0.3
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    max_bins: int = 256
    subsample: float = 1.0
    colsample: float = 1.0
    base_score: float | None = None
    seed: int = 0
    fixed_point_bits: int | None = None
    max_cat_to_onehot: int = MAX_BINS + 1
    max_cat_threshold: int = 64

    def __post_init__(self) -> None:
        objective = _OBJECTIVE_ALIASES.get(self.objective, self.objective)
        object.__setattr__(self, "objective", objective)
        if objective not in OBJECTIVES:
            raise ConfigError(
                f"objective {self.objective!r} is not supported; use one of {OBJECTIVES}"
            )
        _int("n_trees", self.n_trees, 1, 100_000)
        _int("max_depth", self.max_depth, 1, MAX_DEPTH, why="deeper trees are not supported")
        _int("max_bins", self.max_bins, 2, MAX_BINS, why="bin codes fit one byte")
        _int("seed", self.seed, 0, 2**63 - 1)
        if objective == "multi:softprob":
            _int("num_class", self.num_class, 2, 10_000)
        elif self.num_class != 1:
            raise ConfigError(f"num_class is for multi-class objectives; {objective} has one")
        _float("learning_rate", self.learning_rate, low=0.0, open_low=True)
        _float("reg_lambda", self.reg_lambda, low=0.0)
        _float("gamma", self.gamma, low=0.0)
        _float("min_child_weight", self.min_child_weight, low=0.0)
        _float("subsample", self.subsample, low=0.0, high=1.0, open_low=True)
        _float("colsample", self.colsample, low=0.0, high=1.0, open_low=True)
        if self.base_score is not None:
            _float("base_score", self.base_score)
            if objective == "binary:logistic" and not 0.0 < self.base_score < 1.0:
                raise ConfigError(
                    f"base_score is a probability for binary:logistic, got {self.base_score}"
                )
        if self.fixed_point_bits is not None:
            _int("fixed_point_bits", self.fixed_point_bits, 8, 40)
        _int("max_cat_to_onehot", self.max_cat_to_onehot, 1, MAX_BINS + 1)
        _int("max_cat_threshold", self.max_cat_threshold, 1, MAX_BINS)

    @property
    def partition_splits(self) -> bool:
        """Whether some categorical feature (at most ``max_bins`` categories) may split a
        set of categories rather than one."""
        return self.max_cat_to_onehot <= self.max_bins

    @property
    def outputs(self) -> int:
        """Trees per boosting round (one per class for multi-class)."""
        return self.num_class if self.objective == "multi:softprob" else 1

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def gbdt_params(values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> GBDTParams:
    """GBDTParams from a mapping that may use XGBoost's or LightGBM's names."""
    merged = {**(values or {}), **kwargs}
    known = {f.name for f in fields(GBDTParams)}
    out: dict[str, Any] = {}
    for key, value in merged.items():
        name = key if key in known else ALIASES.get(key)
        if name is None:
            raise ConfigError(
                f"unknown tree parameter {key!r}; known: {sorted(known)} "
                f"(aliases: {sorted(ALIASES)})"
            )
        if name in out:
            raise ConfigError(f"parameter {name!r} is given twice (as {key!r} and an alias)")
        out[name] = value
    return GBDTParams(**out)


def _int(name: str, value: Any, low: int, high: int, *, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        tail = f" ({why})" if why else ""
        raise ConfigError(f"{name} must be in [{low}, {high}]{tail}, got {value}")


def _float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bound = "(" if open_low else "["
        raise ConfigError(f"{name} must be in {bound}{low}, {high}], got {value}")


def declared_categories(model: Mapping[str, Any]) -> dict[str, list[str] | None]:
    """``[model] categorical`` (CSV column names) -> each one's declared categories
    (``[model] categories``) or None (each file's own sorted labels), checked."""
    names = model.get("categorical", [])
    declared = model.get("categories", {})
    if "categorical" not in model and "categories" not in model:
        return {}
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"[model] categorical is a list of CSV column names, got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"[model] categorical names a column twice: {names!r}")
    if not isinstance(declared, Mapping):
        raise ConfigError("[model] categories is a table: column = [category, ...]")
    out: dict[str, list[str] | None] = {n: None for n in names}
    for column, labels in declared.items():
        if column not in out:
            raise ConfigError(
                f"[model] categories lists column {column!r}, which [model] categorical does "
                "not name"
            )
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(c, str) and c for c in labels)
            or len(set(labels)) != len(labels)
        ):
            raise ConfigError(
                f"[model] categories.{column} must be a list of distinct non-empty strings"
            )
        out[column] = list(labels)
    return out
