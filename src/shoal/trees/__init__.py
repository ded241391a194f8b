"""Gradient-boosted trees: XGBoost's histogram algorithm in NumPy, trained centrally,
horizontally (rows split across nodes, histograms through a secure sum) or vertically
(SecureBoost: columns split across parties, gradients under Paillier). See docs/trees.md.
"""

from __future__ import annotations

from shoal.trees.bins import MISSING, Bins, bins_from_grid, fit_bins
from shoal.trees.booster import Booster, train
from shoal.trees.params import GBDTParams, gbdt_params
from shoal.trees.tree import Tree

__all__ = [
    "MISSING",
    "Bins",
    "Booster",
    "GBDTParams",
    "Tree",
    "bins_from_grid",
    "fit_bins",
    "gbdt_params",
    "train",
]
