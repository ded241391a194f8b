"""The math of aggregation rules: plain functions on stacked updates, no I/O.

Every function takes ``updates`` of shape ``(n, d)`` (one flattened update per node)
and returns plain arrays; the composable stages in ``shoal.aggregate`` wrap these.
Results keep the input's float dtype (float32 stays float32); inputs are never modified.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.core.reduce import clip_rows, l2_norm, mean_rows, sum_rows
from shoal.core.reduce import column_blocks as _column_blocks
from shoal.core.reduce import convex_combination as _convex_combination
from shoal.errors import AggregationError

__all__ = [
    "all_finite",
    "as_float",
    "clip_l2",
    "coordinate_median",
    "geometric_median",
    "krum",
    "krum_scores",
    "l2_norm",
    "multi_krum",
    "pairwise_sq_distances",
    "total",
    "trimmed_mean",
    "weighted_mean",
]

FloatArray = npt.NDArray[np.floating[Any]]
Float64Array = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]

# --------------------------------------------------------------------------- validation


def _check_updates(updates: npt.ArrayLike) -> FloatArray:
    x = np.asarray(updates)
    if x.dtype.kind in "iu":
        x = x.astype(np.float64)
    elif x.dtype.kind == "f":
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32 if x.dtype.itemsize < 4 else np.float64)
    else:
        raise AggregationError(
            f"updates must hold real numbers (float32 or float64), got dtype {x.dtype}; "
            "convert the node updates to a float array before aggregating"
        )
    if x.ndim != 2:
        hint = " (for a single update use updates.reshape(1, -1))" if x.ndim == 1 else ""
        raise AggregationError(
            f"updates must be a 2-D array of shape (n_nodes, n_params), got shape {x.shape}; "
            f"stack the flattened node updates with np.stack{hint}"
        )
    if x.shape[0] < 1:
        raise AggregationError(
            "updates has no rows: there is nothing to aggregate; "
            "check that at least one node replied"
        )
    if not all_finite(x):
        bad = [int(i) for i in np.flatnonzero(~np.isfinite(x).all(axis=1))]
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise AggregationError(
            f"updates rows [{shown}] contain NaN or infinity; drop or repair those "
            "nodes' updates before aggregating"
        )
    return x


def _check_weights(weights: npt.ArrayLike | None, n: int) -> Float64Array | None:
    if weights is None:
        return None
    w = np.asarray(weights)
    if w.dtype.kind not in "iuf":
        raise AggregationError(
            f"weights must be real numbers, got dtype {w.dtype}; pass one number per node"
        )
    w = w.astype(np.float64)
    if w.ndim != 1 or w.shape[0] != n:
        raise AggregationError(
            f"weights must have shape ({n},), one per update row, got shape {w.shape}; "
            "pass exactly one weight per node"
        )
    if not np.isfinite(w).all():
        raise AggregationError("weights contain NaN or infinity; pass finite weights")
    if (w < 0).any():
        raise AggregationError(
            f"weights must be non-negative, got {int((w < 0).sum())} negative; "
            "use 0 to leave a node out"
        )
    top = w.max()
    if top <= 0:
        raise AggregationError(
            "weights sum to zero, so the weighted aggregate is undefined; "
            "give at least one node a positive weight"
        )
    # Scaling by the largest weight first keeps the sum finite for huge weights.
    w = w / top
    return w / w.sum()


def _check_count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise AggregationError(f"{name} must be an integer, got a bool")
    try:
        k = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise AggregationError(f"{name} must be an integer, got {type(value).__name__}") from None
    if k < minimum:
        raise AggregationError(f"{name} must be at least {minimum}, got {k}")
    return k


def _check_positive(value: object, name: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AggregationError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (math.isfinite(v) and v > 0):
        raise AggregationError(f"{name} must be a positive finite number, got {value!r}")
    return v


# --------------------------------------------------------------------------- helpers


def as_float(value: npt.ArrayLike) -> FloatArray:
    """``value`` as a float array: float32 and float64 as they are (no copy), anything else
    converted to float64."""
    arr = np.asarray(value)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)


def all_finite(v: npt.NDArray[Any]) -> bool:
    """Whether no entry is NaN or infinite (min and max propagate NaN and expose inf without
    allocating a mask the size of ``v``)."""
    if v.size == 0 or v.dtype.kind in "biu":
        return True
    return bool(np.isfinite(v.min()) and np.isfinite(v.max()))


def _distances_to(x: FloatArray, y: Float64Array) -> Float64Array:
    """Exact Euclidean distance from each row to ``y`` (coinciding rows give 0.0)."""
    n, d = x.shape
    sq = np.zeros(n)
    with np.errstate(over="ignore"):
        for cols in _column_blocks(n, d):
            diff = x[:, cols] - y[cols]  # float64, since y is
            sq += np.einsum("ij,ij->i", diff, diff)
        dist = np.sqrt(sq)
        for i in np.flatnonzero(~np.isfinite(dist)):
            dist[i] = l2_norm(x[i] - y)
    return dist


def _median_rows(x: FloatArray) -> FloatArray:
    """Coordinate-wise median of every column, computed a block of columns at a time."""
    n, d = x.shape
    out = np.empty(d, dtype=x.dtype)
    mid = n // 2
    for cols in _column_blocks(n, d):
        # One kth (rather than np.median's two for even n) plus a max over the lower
        # half measured faster than both np.median and a full sort.
        part = np.partition(x[:, cols], mid, axis=0)
        if n % 2:
            out[cols] = part[mid]
        else:
            lower, upper = part[:mid].max(axis=0), part[mid]
            # Halving the gap stays between the two values; only a gap wider than the
            # float range overflows, and then halving each value first is exact enough.
            with np.errstate(over="ignore"):
                middle = lower + (upper - lower) / 2
            wide = ~np.isfinite(middle)
            middle[wide] = lower[wide] / 2 + upper[wide] / 2
            out[cols] = middle
    return out


# --------------------------------------------------------------------------- means


def weighted_mean(updates: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> FloatArray:
    """Mean of the rows, weighted by ``weights`` (non-negative, positive sum) if given.

    A (weighted) mean of finite values is always finite, even when their sum is not.
    """
    x = _check_updates(updates)
    return mean_rows(x, _check_weights(weights, x.shape[0]))


def total(updates: npt.ArrayLike) -> FloatArray:
    """Coordinate-wise sum of the rows."""
    return sum_rows(_check_updates(updates))


def clip_l2(updates: npt.ArrayLike, max_norm: float) -> tuple[FloatArray, Float64Array]:
    """Scale each row by ``min(1, max_norm / ||row||)``.

    Returns ``(clipped, norms)`` where ``norms`` are the float64 L2 norms *before*
    clipping (useful for adaptive clipping; inf for a row whose norm exceeds the float64
    range). Zero rows stay zero; no entry grows in magnitude; clipped norms equal
    ``max_norm`` up to floating-point rounding.
    """
    return clip_rows(_check_updates(updates), _check_positive(max_norm, "max_norm"))


# --------------------------------------------------------------------------- coordinate-wise


def coordinate_median(updates: npt.ArrayLike) -> FloatArray:
    """Coordinate-wise median (the mean of the two middle values when n is even)."""
    return _median_rows(_check_updates(updates))


def trimmed_mean(updates: npt.ArrayLike, beta: float) -> FloatArray:
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` largest and smallest values."""
    x = _check_updates(updates)
    n, d = x.shape
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise AggregationError(f"beta must be a number, got {type(beta).__name__}") from None
    if not (0.0 <= b < 0.5):
        raise AggregationError(
            f"beta must be in [0, 0.5), got {beta!r}: it is the fraction trimmed from "
            "each end, so 0.5 or more would leave nothing"
        )
    # beta * n carries float noise (0.29 * 100 is 28.999999999999996): unrounded, a
    # beta meant to trim f of n values (beta = f / n) would trim f - 1.
    k = math.floor(round(b * n, 9))
    if n - 2 * k < 1:
        raise AggregationError(
            f"trimming {k} values from each end of {n} leaves nothing; "
            "lower beta or aggregate more updates"
        )
    out = np.empty(d, dtype=x.dtype)
    for cols in _column_blocks(n, d):
        if k == 0:
            kept = x[:, cols]
            low, high = kept.min(axis=0), kept.max(axis=0)
        else:
            # NumPy's vectorized sort beat a two-kth np.partition on every shape measured.
            kept = np.sort(x[:, cols], axis=0)[k : n - k]
            low, high = kept[0], kept[-1]
        # Rounding can push the mean of equal values one ulp outside them; clip it back.
        mean = mean_rows(kept, dtype=np.float64)
        np.clip(mean, low, high, out=out[cols], casting="unsafe")
    return out


# --------------------------------------------------------------------------- distance-based


def pairwise_sq_distances(updates: npt.ArrayLike) -> Float64Array:
    """Squared Euclidean distances between all rows, as an ``(n, n)`` float64 matrix.

    Uses ``|a|^2 + |b|^2 - 2 a.b`` from one Gram matrix, built over column blocks from
    float64 copies centred on the coordinate-wise median: centring avoids the
    cancellation that ruins distances between nearby updates far from zero, and the
    median (unlike the mean) cannot be dragged away by a few huge updates. A row whose
    squared distance from that centre exceeds the float64 range is reported at distance
    inf from every other row.
    """
    x = _check_updates(updates)
    n, d = x.shape
    gram = np.zeros((n, n))
    with np.errstate(over="ignore", invalid="ignore"):
        for cols in _column_blocks(n, d):
            blk = x[:, cols].astype(np.float64)
            blk -= np.partition(blk, n // 2, axis=0)[n // 2]
            gram += blk @ blk.T
        sq = np.diag(gram).copy()
        # Both sums are commutative in floating point, so the result is exactly symmetric.
        dist = np.add.outer(sq, sq)
        dist -= gram + gram.T
    # A row whose squared norm overflowed gets inf or inf - inf = nan against every
    # other row: either way, too far to measure in float64.
    dist[np.isnan(dist)] = np.inf
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _krum_check(n: int, f: object) -> int:
    byz = _check_count(f, "f", minimum=0)
    if n < 2 * byz + 3:
        raise AggregationError(
            f"Krum with f={byz} needs at least n = 2f+3 = {2 * byz + 3} updates, got {n}; "
            "sample more nodes or assume fewer Byzantine ones"
        )
    return byz


def krum_scores(updates: npt.ArrayLike, f: int) -> Float64Array:
    """Krum score of each row: sum of squared distances to its ``n - f - 2`` nearest others.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent" (NeurIPS 2017). Requires ``n >= 2f + 3``. Scores may be inf for rows too
    far from the rest to measure in float64.
    """
    x = _check_updates(updates)
    n = x.shape[0]
    byz = _krum_check(n, f)
    neighbours = n - byz - 2
    dist = pairwise_sq_distances(x)
    np.fill_diagonal(dist, np.inf)
    nearest = np.partition(dist, neighbours - 1, axis=1)[:, :neighbours]
    # Summing in sorted order makes a row's score independent of the row order.
    with np.errstate(over="ignore"):
        return np.asarray(np.sort(nearest, axis=1).sum(axis=1), dtype=np.float64)


def krum(updates: npt.ArrayLike, f: int) -> int:
    """Index of the row with the lowest Krum score (the lowest index on ties)."""
    return int(np.argmin(krum_scores(updates, f)))


def multi_krum(updates: npt.ArrayLike, f: int, m: int) -> tuple[FloatArray, IndexArray]:
    """Mean of the ``m`` rows with the lowest Krum scores, and their indices (best first)."""
    x = _check_updates(updates)
    n = x.shape[0]
    byz = _krum_check(n, f)
    count = _check_count(m, "m", minimum=1)
    if count > n - byz:
        raise AggregationError(
            f"multi_krum can select at most n - f = {n - byz} updates, got m={count}; lower m"
        )
    scores = krum_scores(x, byz)
    selected = np.argsort(scores, kind="stable")[:count].astype(np.intp)
    coef = np.zeros(n)
    coef[selected] = 1.0 / count
    # A matrix-vector product reads the rows in place instead of copying m of them.
    return _convex_combination(coef, x, x.dtype), selected


def geometric_median(
    updates: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    eps: float = 1e-6,
    max_iter: int = 100,
) -> FloatArray:
    """Weighted geometric median (argmin of sum w_i |y - x_i|) by Weiszfeld's algorithm.

    This is the robust aggregate of RFA (Pillutla et al., 2022). Starts from the
    coordinate-wise median, which a minority of huge updates cannot drag away. The
    Vardi-Zhang (2000) modification keeps the iteration exact when it lands on an
    update, so coinciding or duplicated updates are fine, and a median that is one of
    the updates is returned exactly. Stops when a step is below ``eps`` times the
    weighted median distance to the updates (the scale of the majority, which outliers
    cannot inflate) or after ``max_iter`` iterations of two passes over ``updates`` each.
    """
    x = _check_updates(updates)
    n = x.shape[0]
    w = _check_weights(weights, n)
    if w is None:
        w = np.full(n, 1.0 / n)
    tol = _check_positive(eps, "eps")
    iters = _check_count(max_iter, "max_iter", minimum=1)
    active = w > 0

    y = _median_rows(x if active.all() else x[active]).astype(np.float64)
    dist = np.zeros(n)
    for _ in range(iters):
        dist, new_y = _weiszfeld_step(x, w, active, y)
        if new_y is None:
            break  # y is optimal
        step = l2_norm(new_y - y)
        y = new_y
        if step <= tol * _spread(dist, w, active):
            break

    # Iterates only approach a median that sits on an update, and sublinearly when the
    # optimality condition there is nearly tight (e.g. an update holding half the weight):
    # 100 iterations can leave the estimate a third of the way short. So test the updates
    # nearest the estimate directly; an optimal one is the exact answer.
    candidates = np.flatnonzero(active)
    nearest_first = candidates[np.argsort(dist[candidates], kind="stable")]
    tested: list[FloatArray] = []
    for index in nearest_first[:_CANDIDATES]:
        point = x[index].astype(np.float64)
        if any(np.array_equal(point, seen) for seen in tested):
            continue  # a duplicate of an update already tested
        tested.append(point)
        if _weiszfeld_step(x, w, active, point)[1] is None:
            y = point
            break
    return y.astype(x.dtype)


# How many of the updates nearest the final estimate geometric_median tests for optimality
# (each test is one pass over the updates).
_CANDIDATES = 4


def _farthest(dist: Float64Array, active: npt.NDArray[np.bool_]) -> float:
    """Largest finite distance to a weighted update (0.0 if there is none)."""
    finite = dist[active & np.isfinite(dist)]
    return float(finite.max()) if finite.size else 0.0


def _spread(dist: Float64Array, w: Float64Array, active: npt.NDArray[np.bool_]) -> float:
    """Weighted median distance to the updates, or the largest if that median is 0."""
    values, weights = dist[active], w[active]
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    pos = min(int(np.searchsorted(cumulative, 0.5 * cumulative[-1])), len(values) - 1)
    return float(values[order][pos]) or _farthest(dist, active)


def _weiszfeld_step(
    x: FloatArray, w: Float64Array, active: npt.NDArray[np.bool_], y: Float64Array
) -> tuple[Float64Array, Float64Array | None]:
    """Distances from ``y`` and the next Vardi-Zhang iterate (None when ``y`` is optimal)."""
    dist = _distances_to(x, y)
    far = _farthest(dist, active)
    if far == 0.0:
        return dist, None  # every weighted update coincides with y (or none is measurable)
    at_y = active & (dist == 0.0)
    away = active & ~at_y
    # Weiszfeld weights w_i/d_i, scaled by the nearest distance so that they lie in
    # [0, w_i]: no overflow however close y gets to an update, and updates at an
    # unmeasurable (inf) distance get 0.
    nearest = float(dist[away].min())
    inv = np.zeros(len(w))
    inv[away] = w[away] * (nearest / dist[away])
    inv_sum = float(inv.sum())
    target = _convex_combination(inv / inv_sum, x, np.float64).astype(np.float64, copy=False)
    eta = float(w[at_y].sum())
    if eta == 0.0:
        return dist, target  # the classic Weiszfeld step
    # y sits on updates of total weight eta; the rest pull with force
    # |sum over away of w_i (x_i - y) / d_i| = (inv_sum / nearest) * |target - y|.
    # If eta >= pull, 0 is a subgradient and y is optimal; otherwise step part way.
    pull = inv_sum * l2_norm(target - y)
    if pull <= eta * nearest:
        return dist, None
    gamma = eta * nearest / pull
    return dist, (1.0 - gamma) * target + gamma * y
