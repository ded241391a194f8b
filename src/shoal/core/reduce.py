"""The library's one mean, one sum, one L2 norm and one L2 clip, and the plain aggregates.

Every aggregate that adds, averages, measures or clips node values (``values.mean``, the
``Mean``/``Sum``/``Clip`` stages, the robust rules, the secure sum's node-side clip) calls
these kernels, so ``out["x"].mean(weights=w)`` and ``out["x"].aggregate(Mean(), weights=w)``
are the same computation. They work on stacked rows of shape (n, d), keep float32 as float32,
and stay finite wherever the true result is (a mean of values near the float maximum).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shoal.errors import AggregationError

if TYPE_CHECKING:
    from shoal.core.values import NodeValues

__all__ = [
    "clip_rows",
    "column_blocks",
    "convex_combination",
    "finish",
    "l2_norm",
    "mean_rows",
    "plain_mean",
    "plain_sum",
    "row_norms",
    "sum_rows",
]

FloatArray = npt.NDArray[np.floating[Any]]

# Column blocks of about this many elements bound the scratch memory of the blocked loops
# (16 MiB of float64) whatever n and d are, while staying large enough for BLAS and the
# sort kernels to run at full speed.
_BLOCK_ELEMENTS = 1 << 21


def column_blocks(n: int, d: int) -> Iterator[slice]:
    width = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def l2_norm(v: npt.NDArray[Any]) -> float:
    """L2 norm of a vector, summed in float64; inf only if the norm itself exceeds the
    float64 range.

    Sums squares with einsum rather than BLAS: on busy cores (a simulation's worker threads,
    other processes) a threaded BLAS dot waits for a second core and took ~4 ms instead of
    ~0.05 ms for 10^5 values.
    """
    v = np.ravel(v)
    with np.errstate(over="ignore"):
        sq = float(np.einsum("i,i->", v, v, dtype=np.float64))
    if math.isfinite(sq):
        return math.sqrt(sq)
    # Squares of entries above ~1e154 overflow although the norm may not: rescale.
    top = float(np.abs(v).max())
    if not math.isfinite(top):
        return math.inf
    u = np.divide(v, top, dtype=np.float64)
    return top * math.sqrt(float(np.einsum("i,i->", u, u)))  # Python floats overflow to inf


def row_norms(x: FloatArray) -> npt.NDArray[np.float64]:
    """L2 norm of each row, accumulated in float64."""
    n, d = x.shape
    sq = np.zeros(n)
    with np.errstate(over="ignore"):
        for cols in column_blocks(n, d):
            blk = x[:, cols]
            if blk.dtype != np.float64:
                blk = blk.astype(np.float64)
            sq += np.einsum("ij,ij->i", blk, blk)
    norms = np.sqrt(sq)
    for i in np.flatnonzero(~np.isfinite(norms)):
        norms[i] = l2_norm(x[i].astype(np.float64))
    return norms


def clip_rows(x: FloatArray, max_norm: float) -> tuple[FloatArray, npt.NDArray[np.float64]]:
    """Scale each row by ``min(1, max_norm / ||row||)``; also return the norms before.

    Zero rows stay zero; no entry grows in magnitude; a row whose norm overflows float64 is
    rescaled first, so it too ends at ``max_norm``.
    """
    norms = row_norms(x)
    scale = np.ones_like(norms)
    over = norms > max_norm
    scale[over] = max_norm / norms[over]
    clipped = x * scale.astype(x.dtype)[:, None]
    for i in np.flatnonzero(np.isinf(norms)):
        row = x[i].astype(np.float64)
        row /= np.abs(row).max()
        clipped[i] = row * (max_norm / l2_norm(row))
    return clipped, norms


def _combine(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``coef @ x`` without BLAS: OpenBLAS runs a (nodes x d) matrix-vector product on
    all its threads, which took 1-4 ms where one thread takes 0.1 ms (waking the threads
    costs more than the product), and far longer when another process holds the cores."""
    out: np.ndarray = np.einsum("i,ij->j", coef, x)
    return out


def convex_combination(coef: npt.NDArray[np.float64], x: FloatArray, dtype: Any) -> FloatArray:
    """``coef @ x`` in ``dtype`` for non-negative ``coef`` summing to 1.

    Every partial sum is bounded by the largest entry, so only rounding right at the float
    limit can overflow; the true value then lies within rounding of the column's extreme,
    which is what clipping returns. Float32 input combined in float64 is converted a block
    at a time rather than all at once.
    """
    with np.errstate(over="ignore"):
        if x.dtype == dtype:
            out = np.asarray(_combine(coef.astype(dtype), x), dtype=dtype)
        else:
            n, d = x.shape
            out = np.empty(d, dtype=dtype)
            for cols in column_blocks(n, d):
                out[cols] = _combine(coef.astype(dtype), x[:, cols].astype(dtype))
    wide = ~np.isfinite(out)
    if wide.any():
        part = x[:, wide]
        out[wide] = np.clip(out[wide], part.min(axis=0), part.max(axis=0))
    return out


def mean_rows(
    x: FloatArray, weights: npt.NDArray[Any] | None = None, *, dtype: Any = None
) -> FloatArray:
    """Column means (weighted by non-negative ``weights`` of positive sum) in ``dtype``
    (default: the rows'). A mean of finite values is always finite, even when their sum is
    not: a sum that overflows is redone on pre-divided values."""
    dtype = x.dtype if dtype is None else dtype
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        top = float(w.max()) if w.size else 0.0
        if not top > 0:
            raise AggregationError("the weights sum to zero, so the weighted mean is undefined")
        w = w / top  # scaling by the largest weight first keeps the sum finite
        return convex_combination(w / w.sum(), x, dtype)
    m = x.shape[0]
    if m == 0:
        return np.zeros(x.shape[1:], dtype=dtype)
    with np.errstate(over="ignore"):
        mean = np.asarray(x.sum(axis=0, dtype=dtype) / m, dtype=dtype)
    wide = ~np.isfinite(mean)
    if wide.any():
        part = x[:, wide].astype(dtype)
        # Only a mean within rounding of the float limit can still overflow; the true mean
        # lies between the column's extremes, so clipping there is exact enough.
        with np.errstate(over="ignore"):
            redone = (part / m).sum(axis=0)
        mean[wide] = np.clip(redone, part.min(axis=0), part.max(axis=0))
    return mean


def sum_rows(x: FloatArray, weights: npt.NDArray[Any] | None = None) -> FloatArray:
    """Coordinate-wise (weighted) sum of the rows; an overflowing sum is an error."""
    with np.errstate(over="ignore"):
        if weights is None:
            result = np.asarray(x.sum(axis=0), dtype=x.dtype)
        else:
            result = np.asarray(_combine(np.asarray(weights, dtype=x.dtype), x), dtype=x.dtype)
    if not np.isfinite(result).all():
        bad = np.flatnonzero(~np.isfinite(result))
        raise AggregationError(
            f"the sum of the updates overflows {x.dtype} in {len(bad)} coordinates "
            f"(first: {int(bad[0])}); clip the updates first (Clip) or use a mean"
        )
    return result


def finish(values: NodeValues, vector: np.ndarray, layout: Any) -> Any:
    """Shape an aggregated vector like the values: one array, or a dict for several fields."""
    from shoal.core.values import unflatten

    named = unflatten(vector, layout)
    return next(iter(named.values())) if len(named) == 1 else named


def plain_sum(values: NodeValues) -> Any:
    gathered = values.gather()
    return finish(values, sum_rows(gathered.rows), gathered.layout)


def plain_mean(values: NodeValues, *, weights: NodeValues | None = None) -> Any:
    gathered = values.gather(weights=weights)
    return finish(values, mean_rows(gathered.rows, gathered.weights), gathered.layout)
