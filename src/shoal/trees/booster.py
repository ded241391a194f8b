"""Centralized training and the model: boosting rounds of trees over binned features.

:func:`train` is the reference every federated mode is checked against: with the same cuts
and parameters, horizontal and vertical training grow these trees exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.errors import DataError
from shoal.trees.bins import Bins, categorical_mask, fit_bins
from shoal.trees.objective import base_margin, check_labels, gradients, predict_from_margin
from shoal.trees.params import GBDTParams
from shoal.trees.tree import Tree, advance, grow_tree, local_histograms

__all__ = [
    "Booster",
    "feature_sampler",
    "fixed_point",
    "row_sampler",
    "sample_features",
    "train",
    "tree_gradients",
]


@dataclass(frozen=True, eq=False)
class Booster:
    """A trained model: its parameters, cuts and trees (``trees[round][output]``)."""

    params: GBDTParams
    bins: Bins
    trees: tuple[tuple[Tree, ...], ...]

    def margin_codes(self, codes: np.ndarray) -> np.ndarray:
        margin = np.full((len(codes), self.params.outputs), base_margin(self.params), np.float32)
        for round_trees in self.trees:
            for k, tree in enumerate(round_trees):
                margin[:, k] += tree.predict(codes)
        return margin

    def predict_margin(self, x: np.ndarray) -> np.ndarray:
        return self.margin_codes(self.bins.transform(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(y=1) for logistic, class probabilities for multi-class, values for regression."""
        return predict_from_margin(self.predict_margin(x), self.params)


def fixed_point(values: np.ndarray, bits: int | None) -> np.ndarray:
    """``values`` rounded to multiples of ``2**-bits`` (float64), or as float64 if None."""
    out = np.asarray(values, dtype=np.float64)
    if bits is None:
        return out
    scale = float(2**bits)
    rounded: np.ndarray = np.round(out * scale) / scale
    return rounded


def feature_sampler(params: GBDTParams, n_features: int) -> np.random.Generator:
    """The column-sampling randomness (the server's, in federated training)."""
    return np.random.default_rng([params.seed, 1, n_features])


def sample_features(rng: np.random.Generator, params: GBDTParams, n_features: int) -> np.ndarray:
    mask = np.ones(n_features, dtype=bool)
    if params.colsample < 1.0:
        keep = max(1, int(params.colsample * n_features))
        mask[:] = False
        mask[rng.choice(n_features, size=keep, replace=False)] = True
    return mask


def row_sampler(params: GBDTParams, party: str = "") -> np.random.Generator:
    """Row-sampling randomness of the party holding the rows."""
    return np.random.default_rng([params.seed, 2, *party.encode()])


def tree_gradients(
    grad: np.ndarray, hess: np.ndarray, params: GBDTParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One tree's (g, h): in fixed point if asked, zero for rows not in its subsample."""
    g = fixed_point(grad, params.fixed_point_bits)
    h = fixed_point(hess, params.fixed_point_bits)
    if params.subsample < 1.0:
        keep = rng.random(len(g)) < params.subsample
        g, h = np.where(keep, g, 0.0), np.where(keep, h, 0.0)
    return g, h


class _Rows:
    """All rows in one array: the centralized histogram source."""

    def __init__(self, codes: np.ndarray, g: np.ndarray, h: np.ndarray) -> None:
        self.codes, self.g, self.h = codes, g, h
        self.pos = np.zeros(len(codes), dtype=np.int64)

    def histograms(self, tree: Tree, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        advance(tree, self.codes, self.pos)
        return local_histograms(self.codes, self.g, self.h, self.pos, nodes)


def train(
    x: np.ndarray,
    y: np.ndarray,
    params: GBDTParams | None = None,
    *,
    bins: Bins | None = None,
    categorical: Sequence[int] = (),
) -> Booster:
    """Boost ``params.n_trees`` rounds on rows ``x`` (NaN = missing) and labels ``y``.

    ``categorical`` names the columns (by index) that hold category codes ``0..k-1``; they
    split one category against the rest. Given ``bins``, their flags say which."""
    params = params or GBDTParams()
    labels = check_labels(y, params)
    if bins is None:
        bins = fit_bins(x, max_bins=params.max_bins, categorical=categorical)
    elif int(bins.n_bins.max()) > params.max_bins:
        raise DataError(f"the given cuts have more than max_bins={params.max_bins} bins")
    elif categorical and bins.categorical != categorical_mask(categorical, bins.n_features):
        raise DataError("categorical= disagrees with the given cuts' categorical features")
    codes = bins.transform(x)
    if len(codes) != len(labels):
        raise DataError(f"{len(codes)} rows of features but {len(labels)} labels")
    n, d = codes.shape
    margin = np.full((n, params.outputs), base_margin(params), dtype=np.float32)
    columns = feature_sampler(params, d)
    rows = row_sampler(params)
    trees: list[tuple[Tree, ...]] = []
    for _ in range(params.n_trees):
        grad, hess = gradients(margin, labels, params)
        round_trees = []
        for k in range(params.outputs):
            g, h = tree_gradients(grad[:, k], hess[:, k], params, rows)
            features = sample_features(columns, params, d)
            tree = grow_tree(
                _Rows(codes, g, h),
                params=params,
                n_bins=bins.n_bins,
                features=features,
                root_g=float(g.sum()),
                root_h=float(h.sum()),
                categorical=bins.is_categorical,
            )
            round_trees.append(tree)
        for k, tree in enumerate(round_trees):
            margin[:, k] += tree.predict(codes)
        trees.append(tuple(round_trees))
    return Booster(params=params, bins=bins, trees=tuple(trees))
