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

__all__ = [
    "RT_EPS",
    "SET_WORDS",
    "WIDTH",
    "Splits",
    "best_splits",
    "in_set",
    "leaf_weight",
    "node_gain",
    "one_category",
    "set_members",
]

WIDTH = MISSING + 1  # histogram slots per feature: 256 bins and the missing slot
RT_EPS = 1e-6  # XGBoost's kRtEps: a split must gain more than this


SET_WORDS = MISSING // 64  # a set of categories: one bit per code, 4 x 64 bits


def one_category(codes: np.ndarray) -> np.ndarray:
    """Sets of shape (len(codes), SET_WORDS) holding one category each (none where < 0)."""
    codes = np.asarray(codes, dtype=np.int64)
    out = np.zeros((len(codes), SET_WORDS), dtype=np.uint64)
    rows = np.flatnonzero((codes >= 0) & (codes < MISSING))
    bits = np.left_shift(np.uint64(1), (codes[rows] % 64).astype(np.uint64))
    out[rows, codes[rows] // 64] = bits
    return out


def in_set(sets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Whether each ``codes[i]`` is in ``sets[i]`` (False for MISSING)."""
    codes = np.asarray(codes, dtype=np.int64)
    word = np.minimum(codes // 64, SET_WORDS - 1)
    bits = sets[np.arange(len(codes)), word] >> (codes % 64).astype(np.uint64)
    out: np.ndarray = ((bits & np.uint64(1)) == 1) & (codes < MISSING)
    return out


def set_members(words: np.ndarray) -> list[int]:
    """The categories of one set, ascending."""
    return [64 * w + b for w in range(SET_WORDS) for b in range(64) if (int(words[w]) >> b) & 1]


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
    categorical: np.ndarray  # the split sends the categories in category_set right
    category_set: np.ndarray  # (nodes, SET_WORDS) bits; left_bins is its lowest category


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
    part = cat & (np.asarray(n_bins) >= params.max_cat_to_onehot)
    one_hot = _one_hot(bins_g, bins_h, tg, th, root, real, features, cat & ~part, params)
    if one_hot is not None:
        feat_gain = np.where((cat & ~part)[None, :], one_hot[0], feat_gain)
    sets = _partition(bins_g, bins_h, tg, th, root, n_bins, features, part, params)
    for j, found in sets.items():
        feat_gain[:, j] = found[0]
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
    category_set = one_category(np.where(is_cat, left_bins, -1))
    for j, (_, p_left, p_rg, p_rh, p_set) in sets.items():
        here = feature == j
        back = np.where(here, p_left, back)
        right_g = np.where(here, p_rg, right_g)
        right_h = np.where(here, p_rh, right_h)
        left_g = np.where(here, tg[:, 0, 0] - p_rg, left_g)
        left_h = np.where(here, th[:, 0, 0] - p_rh, left_h)
        category_set[here] = p_set[here]
        lowest = [set_members(w)[0] if w.any() else 0 for w in p_set]
        left_bins = np.where(here, np.asarray(lowest, dtype=np.int64), left_bins)
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
        category_set=category_set,
    )


def _partition(
    bins_g: np.ndarray,
    bins_h: np.ndarray,
    tg: np.ndarray,
    th: np.ndarray,
    root: np.ndarray,
    n_bins: np.ndarray,
    features: np.ndarray,
    part: np.ndarray,
    params: GBDTParams,
) -> dict[int, tuple[np.ndarray, ...]]:
    """A set of categories against the rest, as XGBoost's ``EnumeratePart`` finds it, for
    each feature in ``part``: the categories stably sorted by their weight (float32, 0
    below ``min_child_weight``), then a forward scan (a growing prefix of that order right,
    missing values left) and a backward scan (a growing suffix left with the missing
    values, the rest right), each at most ``max_cat_threshold`` categories deep; the first
    maximum wins. Per feature: gain, default_left, right g, right h and the set, per node."""
    mcw, lam = params.min_child_weight, params.reg_lambda
    out: dict[int, tuple[np.ndarray, ...]] = {}
    total_g, total_h = tg[:, 0, 0], th[:, 0, 0]
    node_root = root[:, 0, 0]
    for j in np.flatnonzero(part & np.asarray(features, dtype=bool)).tolist():
        k = int(n_bins[j])
        steps = min(params.max_cat_threshold, k) - 1
        g, h = bins_g[:, j, :k], bins_h[:, j, :k]
        order = np.argsort(leaf_weight(g, h, params), axis=1, kind="stable")
        sg, sh = np.take_along_axis(g, order, 1), np.take_along_axis(h, order, 1)
        # forward: order[:i+1] right; backward: order[k-1-i:] left, so order[:k-1-i] right
        f_rg, f_rh = np.cumsum(sg, 1)[:, :steps], np.cumsum(sh, 1)[:, :steps]
        b_lg, b_lh = np.cumsum(sg[:, ::-1], 1)[:, :steps], np.cumsum(sh[:, ::-1], 1)[:, :steps]
        rg = np.concatenate([f_rg, total_g[:, None] - b_lg], axis=1)
        rh = np.concatenate([f_rh, total_h[:, None] - b_lh], axis=1)
        lg, lh = total_g[:, None] - rg, total_h[:, None] - rh
        ok = (lh >= mcw) & (rh >= mcw)
        gain = np.where(ok, _scan_gain(lg, lh, rg, rh, node_root[:, None], lam), -np.inf)
        at = np.argmax(gain, axis=1) if gain.shape[1] else np.zeros(len(g), np.int64)
        rows = np.arange(len(g))
        best = gain[rows, at] if gain.shape[1] else np.full(len(g), -np.inf)
        forward = at < steps
        size = np.where(forward, at + 1, k - 1 - (at - steps))  # categories right
        sets = np.zeros((len(g), SET_WORDS), dtype=np.uint64)
        for i in range(len(g)):
            members = order[i, : size[i]]
            np.bitwise_or.at(
                sets[i],
                members // 64,
                np.left_shift(np.uint64(1), (members % 64).astype(np.uint64)),
            )
        pick_g = rg[rows, at] if gain.shape[1] else np.zeros(len(g))
        pick_h = rh[rows, at] if gain.shape[1] else np.zeros(len(g))
        out[j] = (best, forward, pick_g, pick_h, sets)
    return out


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
