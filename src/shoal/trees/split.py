"""XGBoost's split search on gradient histograms, as a pure function.

For each tree node and feature: a forward scan (missing values go right), then, when the
node has missing values for that feature, a backward scan (missing values go left). The
gain of a split is ``G_L^2/(H_L+lambda) + G_R^2/(H_R+lambda) - G^2/(H+lambda)``, rounded to
float32 the way XGBoost rounds it, so ties break the same way: the first maximum of a scan,
forward before backward, the lowest feature index across features.

A categorical feature splits one category against the rest (XGBoost's one-hot splits,
``max_cat_to_onehot`` above the number of categories): for each category in code order, the
category goes right with missing values left, then with missing values right; the first
maximum wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.trees.bins import MISSING
from shoal.trees.params import GBDTParams

__all__ = ["RT_EPS", "WIDTH", "Splits", "best_splits", "leaf_weight", "node_gain"]

WIDTH = MISSING + 1  # histogram slots per feature: 256 bins and the missing slot
RT_EPS = 1e-6  # XGBoost's kRtEps: a split must gain more than this


@dataclass(frozen=True)
class Splits:
    """The best split of each node (arrays of length nodes); ``gain`` <= 0 means none."""

    gain: np.ndarray
    feature: np.ndarray
    left_bins: np.ndarray  # left iff code < left_bins (missing: default_left)
    default_left: np.ndarray
    left_g: np.ndarray
    left_h: np.ndarray
    right_g: np.ndarray
    right_h: np.ndarray
    categorical: np.ndarray  # the split sends one category (left_bins) right


def node_gain(g: np.ndarray, h: np.ndarray, reg_lambda: float) -> np.ndarray:
    """``G^2 / (H + lambda)``, and 0 where ``H <= 0`` (XGBoost's CalcGainGivenWeight)."""
    g = np.asarray(g, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(h > 0, g * g / (h + reg_lambda), 0.0)
    return out


def leaf_weight(g: np.ndarray, h: np.ndarray, params: GBDTParams) -> np.ndarray:
    """``-G / (H + lambda)``, 0 below ``min_child_weight`` (XGBoost's CalcWeight)."""
    g = np.asarray(g, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where((h < params.min_child_weight) | (h <= 0), 0.0, -g / (h + params.reg_lambda))
    return w.astype(np.float32)


def _scan_gain(
    lg: np.ndarray, lh: np.ndarray, rg: np.ndarray, rh: np.ndarray, root: np.ndarray, lam: float
) -> np.ndarray:
    both = (node_gain(lg, lh, lam) + node_gain(rg, rh, lam)).astype(np.float32)
    out: np.ndarray = (both - root).astype(np.float32)
    return out


def best_splits(
    hist_g: np.ndarray,
    hist_h: np.ndarray,
    total_g: np.ndarray,
    total_h: np.ndarray,
    *,
    n_bins: np.ndarray,
    features: np.ndarray,
    params: GBDTParams,
    categorical: np.ndarray | None = None,
) -> Splits:
    """Best split per node from histograms of shape (nodes, features, WIDTH).

    ``total_g``/``total_h`` are each node's sums (XGBoost's node statistics), ``n_bins`` the
    bins per feature, ``features`` a boolean mask of the features this tree may use and
    ``categorical`` one of the features whose bins are categories.
    """
    nodes, d = hist_g.shape[0], hist_g.shape[1]
    cat = np.zeros(d, dtype=bool) if categorical is None else np.asarray(categorical, dtype=bool)
    mcw, lam = params.min_child_weight, params.reg_lambda
    tg = np.asarray(total_g, dtype=np.float64)[:, None, None]
    th = np.asarray(total_h, dtype=np.float64)[:, None, None]
    root = node_gain(tg, th, lam).astype(np.float32)
    real = np.arange(MISSING)[None, :] < np.asarray(n_bins)[:, None]  # (d, 256)
    usable = real[None] & (np.asarray(features, dtype=bool) & ~cat)[None, :, None]
    bins_g, bins_h = hist_g[:, :, :MISSING], hist_h[:, :, :MISSING]

    # forward: bins 0..i left, missing right
    lg, lh = np.cumsum(bins_g, axis=2), np.cumsum(bins_h, axis=2)
    rg, rh = tg - lg, th - lh
    ok = usable & (lh >= mcw) & (rh >= mcw)
    gain = np.where(ok, _scan_gain(lg, lh, rg, rh, root, lam), -np.inf)
    f_at = np.argmax(gain, axis=2)  # first maximum
    f_gain = np.take_along_axis(gain, f_at[..., None], axis=2)[..., 0]

    # backward: bins i.. right, bins below i and missing left; only where missing exists
    has_missing = (hist_g[:, :, MISSING] != 0) | (hist_h[:, :, MISSING] != 0)
    brg = np.cumsum(bins_g[:, :, ::-1], axis=2)[:, :, ::-1]
    brh = np.cumsum(bins_h[:, :, ::-1], axis=2)[:, :, ::-1]
    blg, blh = tg - brg, th - brh
    ok = usable & has_missing[..., None] & (blh >= mcw) & (brh >= mcw)
    bgain = np.where(ok, _scan_gain(blg, blh, brg, brh, root, lam), -np.inf)
    # scanned from the top bin down: the first maximum in that order is the highest index
    b_at = MISSING - 1 - np.argmax(bgain[:, :, ::-1], axis=2)
    b_gain = np.take_along_axis(bgain, b_at[..., None], axis=2)[..., 0]

    use_backward = b_gain > np.maximum(f_gain, 0.0)
    feat_gain = np.where(use_backward, b_gain, f_gain)
    one_hot = _one_hot(bins_g, bins_h, tg, th, root, real, features, cat, params)
    if one_hot is not None:
        feat_gain = np.where(cat[None, :], one_hot[0], feat_gain)
    feat_gain = np.where(feat_gain > 0, feat_gain, -np.inf)
    feature = np.argmax(feat_gain, axis=1)  # ties: the lowest feature index
    rows = np.arange(nodes)
    back = use_backward[rows, feature]
    at = np.where(back, b_at[rows, feature], f_at[rows, feature])
    best = feat_gain[rows, feature]
    left_g = np.where(back, blg[rows, feature, at], lg[rows, feature, at])
    left_h = np.where(back, blh[rows, feature, at], lh[rows, feature, at])
    right_g = np.where(back, brg[rows, feature, at], rg[rows, feature, at])
    right_h = np.where(back, brh[rows, feature, at], rh[rows, feature, at])
    left_bins = np.where(back, at, at + 1)
    is_cat = cat[feature]
    if one_hot is not None:
        _, c_at, c_missing_left, c_right = one_hot
        c = c_at[rows, feature]
        c_rg, c_rh = (r[rows, feature, c] for r in c_right[:2])
        c_back = c_missing_left[rows, feature]
        c_rg = np.where(c_back, c_rg, c_rg + c_right[2][rows, feature])
        c_rh = np.where(c_back, c_rh, c_rh + c_right[3][rows, feature])
        back = np.where(is_cat, c_back, back)
        left_bins = np.where(is_cat, c, left_bins)
        left_g = np.where(is_cat, tg[:, 0, 0] - c_rg, left_g)
        left_h = np.where(is_cat, th[:, 0, 0] - c_rh, left_h)
        right_g = np.where(is_cat, c_rg, right_g)
        right_h = np.where(is_cat, c_rh, right_h)
    return Splits(
        gain=np.where(np.isfinite(best), best, 0.0).astype(np.float64),
        feature=feature.astype(np.int64),
        left_bins=left_bins.astype(np.int64),
        default_left=back,
        left_g=left_g,
        left_h=left_h,
        right_g=right_g,
        right_h=right_h,
        categorical=is_cat,
    )


def _one_hot(
    bins_g: np.ndarray,
    bins_h: np.ndarray,
    tg: np.ndarray,
    th: np.ndarray,
    root: np.ndarray,
    real: np.ndarray,
    features: np.ndarray,
    cat: np.ndarray,
    params: GBDTParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]] | None:
    """One category against the rest, for the categorical features: the best gain per
    (node, feature) (-inf elsewhere), its category, whether missing values go left, and
    the right side's sums (category g, h per bin; missing g, h per feature)."""
    if not cat.any():
        return None
    mcw, lam = params.min_child_weight, params.reg_lambda
    # missing = the node's sums minus the feature's bins, as XGBoost derives it
    miss_g = tg[..., 0] - bins_g.sum(axis=2)
    miss_h = th[..., 0] - bins_h.sum(axis=2)
    usable = real[None] & (np.asarray(features, dtype=bool) & cat)[None, :, None]
    gains = []
    for rg, rh in ((bins_g, bins_h), (bins_g + miss_g[..., None], bins_h + miss_h[..., None])):
        lg, lh = tg - rg, th - rh
        ok = usable & (lh >= mcw) & (rh >= mcw)
        gains.append(np.where(ok, _scan_gain(lg, lh, rg, rh, root, lam), -np.inf))
    # candidates in XGBoost's order: category 0 missing left, category 0 missing right, ...
    both = np.stack(gains, axis=3).reshape(*bins_g.shape[:2], -1)
    at = np.argmax(both, axis=2)
    gain = np.take_along_axis(both, at[..., None], axis=2)[..., 0]
    gain = np.where(cat[None, :], gain, -np.inf)
    return gain, at // 2, at % 2 == 0, (bins_g, bins_h, miss_g, miss_h)
