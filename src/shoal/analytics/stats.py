"""Sufficient statistics: what each party sums, how sensitive each block is, what it answers.

A query's aggregates become blocks of per-group statistics (row counts, non-NULL counts,
centred sums and sums of squares of clamped values, histogram bins). Parties compute them on
their bounded rows; the blocks' sum over parties answers every aggregate exactly as SQL on
the pooled rows would (quantiles within one bin). Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.analytics.config import AnalyticsConfig
from shoal.analytics.dialect import Aggregate, Plan
from shoal.errors import QueryError

__all__ = [
    "Block",
    "Stats",
    "answer",
    "blocks_for",
    "check_size",
    "laplace_scales",
    "local_stats",
    "released",
]

# Under DP the count of NULLs each column ignores, and the count of values clamped to its
# bounds, are released too, each with this weight in the split of epsilon (the main blocks
# weigh 1 each): disclosed, but not at the answer's cost.
DISCLOSED_WEIGHT = 0.05
# Under DP a quantile's rank is placed by the column's noisy count (the histogram's own sum
# carries every bin's noise): a small weight suffices, as a count's noise is far below that
# of the cumulative bins it is compared with.
QUANTILE_N_WEIGHT = 0.25
# Most numbers one party's statistics may hold (groups x bins summed over blocks): 32 MiB of
# float64. The declarations come with every request, so a coordinator could otherwise ask a
# node for a vector larger than its memory (a product of large category lists, many bins).
MAX_STATS_CELLS = 1 << 22


@dataclass(frozen=True)
class Block:
    """One statistic per group: ``width`` numbers (bins), ``sensitivity`` = a row's L1 effect."""

    kind: str  # rows | n | s1 | s2 | sum | hist | nulls | clamped
    column: int | None  # index into Plan.columns
    width: int
    sensitivity: float
    weight: float
    # One number over all groups instead of one per group (the disclosed counts: only their
    # total is released, and under DP one cell carries one cell's noise, not the groups').
    total: bool = False

    def cells(self, n_groups: int) -> int:
        """Numbers this block sends for ``n_groups`` groups."""
        return (1 if self.total else n_groups) * self.width

    @property
    def name(self) -> str:
        col = "" if self.column is None else f":c{self.column}"
        bins = f":{self.width}" if self.kind == "hist" else ""
        return f"{self.kind}{col}{bins}"


Stats = dict[str, np.ndarray]  # block name -> (..., groups, width)


def _bounds(plan: Plan, config: AnalyticsConfig, column: int) -> tuple[float, float]:
    name = plan.bounds_of(plan.columns[column])
    if name not in config.bounds:
        raise QueryError(f"column {name!r} has no declared bounds")
    return config.bounds[name]


def blocks_for(plan: Plan, config: AnalyticsConfig, *, dp: bool) -> tuple[Block, ...]:
    """The statistics a query needs, in a fixed order both parties and coordinator derive."""
    kinds: dict[int, set[str]] = {}
    hist_bins: dict[int, set[int]] = {}
    quantiled: set[int] = set()
    col_index = {c: i for i, c in enumerate(plan.columns)}
    want_rows = not dp
    for agg in plan.aggregates:
        if agg.kind == "count_rows":
            want_rows = True
            continue
        assert agg.column is not None
        i = col_index[agg.column]
        need = kinds.setdefault(i, set())
        if agg.kind == "count":
            need.add("n")
        elif agg.kind == "sum":
            need.add("sum")
        elif agg.kind == "avg":
            need |= {"n", "s1"}
        elif agg.kind.startswith(("var", "stddev")):
            need |= {"n", "s1", "s2"}
        elif agg.kind == "quantile":
            hist_bins.setdefault(i, set()).add(config.bins)
            quantiled.add(i)
        elif agg.kind == "histogram":
            assert agg.bins is not None
            hist_bins.setdefault(i, set()).add(agg.bins)
    blocks: list[Block] = []
    if want_rows:
        blocks.append(Block("rows", None, 1, 1.0, 1.0))
    for i in range(len(plan.columns)):
        need = kinds.get(i, set())
        bins = hist_bins.get(i, set())
        if not need and not bins:
            continue
        lo, hi = _bounds(plan, config, i) if ({"sum", "s1", "s2"} & need) or bins else (0.0, 1.0)
        r = (hi - lo) / 2.0
        if "sum" in need:
            # A plain sum is cheapest uncentred (one block); with n around, centring halves it.
            if dp and "s1" not in need and "n" not in need:
                blocks.append(Block("sum", i, 1, max(abs(lo), abs(hi)), 1.0))
            else:
                need |= {"n", "s1"}
        if "n" in need or not dp:
            blocks.append(Block("n", i, 1, 1.0, 1.0))
        elif i in quantiled:
            blocks.append(Block("n", i, 1, 1.0, QUANTILE_N_WEIGHT))
        if "s1" in need or (not dp and "sum" in need):
            blocks.append(Block("s1", i, 1, r, 1.0))
        if "s2" in need:
            blocks.append(Block("s2", i, 1, r * r, 1.0))
        for b in sorted(bins):
            blocks.append(Block("hist", i, b, 1.0, 1.0))
        # Disclosed counts: NULLs ignored and, for a column whose values are used, values
        # clamped to its bounds (a row is one of either in one group: sensitivity 1). Under
        # DP they are noised and charged with the rest of the query; exact answers are free.
        weight = DISCLOSED_WEIGHT if dp else 0.0
        blocks.append(Block("nulls", i, 1, 1.0, weight, total=True))
        if ({"sum", "s1", "s2"} & need) or bins:
            blocks.append(Block("clamped", i, 1, 1.0, weight, total=True))
    return tuple(blocks)


def check_size(blocks: Sequence[Block], n_groups: int) -> None:
    """Refuse a query whose statistics would exceed MAX_STATS_CELLS, before any is made."""
    cells = sum(b.cells(n_groups) for b in blocks)
    if cells > MAX_STATS_CELLS:
        raise QueryError(
            f"this query's statistics would hold {cells:,} numbers per party ({n_groups:,} "
            f"groups; histograms and quantiles add their bins to each), over {MAX_STATS_CELLS:,}; "
            "group by fewer or smaller declared categories, or lower bins"
        )


def scales(blocks: Sequence[Block], plan: Plan, config: AnalyticsConfig) -> dict[str, float]:
    """Public per-block bounds on one party's statistic: the secure sum carries value/scale."""
    out = {}
    for b in blocks:
        if b.kind in ("s1", "s2", "sum"):
            out[b.name] = config.max_rows * b.sensitivity
        else:
            out[b.name] = float(config.max_rows)
    return out


def laplace_scales(
    blocks: Sequence[Block], config: AnalyticsConfig, epsilon: float
) -> dict[str, float]:
    """Laplace scale per block so that the whole release is epsilon-DP for one privacy unit.

    A unit adds at most ``max_contributions`` rows and a row moves block k by at most its
    sensitivity (in L1, across groups and bins), so scale_k = m * sens_k / eps_k with the
    eps_k summing to epsilon.
    """
    total = sum(b.weight for b in blocks)
    m = config.max_contributions
    return {b.name: m * b.sensitivity * total / (b.weight * epsilon) for b in blocks}


SKELLAM_GAMMA = 2.0**12  # integer units per unit of L2 sensitivity (the rounding's resolution)


def skellam_steps(
    blocks: Sequence[Block], config: AnalyticsConfig
) -> tuple[dict[str, float], float]:
    """Integer scaling for Skellam noise: ``(k, d2)``, where a party sends
    ``round(stat_b * k[b])`` and ``d2`` bounds one privacy unit's L2 effect on those integers.

    Block b gets a share weight_b / total of the squared L2 sensitivity: one unit moves it by
    at most m * sens_b in L1 (so in L2), scaled to GAMMA * sqrt(share). Rounding adds at most
    1 on each coordinate a unit touches (a row touches one per block, so m per block), i.e.
    sqrt(m) per block in L2; by the triangle inequality d2 <= GAMMA + sqrt(blocks * m)."""
    total = sum(b.weight for b in blocks)
    m = config.max_contributions
    k = {b.name: SKELLAM_GAMMA * math.sqrt(b.weight / total) / (m * b.sensitivity) for b in blocks}
    return k, SKELLAM_GAMMA + math.sqrt(len(blocks) * m)


def local_stats(
    plan: Plan,
    config: AnalyticsConfig,
    blocks: Sequence[Block],
    *,
    groups: np.ndarray,
    n_groups: int,
    values: Sequence[np.ndarray],
) -> Stats:
    """One party's blocks. ``groups[i]`` is row i's group (``n_groups`` = outside the domain,
    kept in the exact answer's disclosure); ``values[j]`` is column j as float64, NaN = NULL."""
    width = n_groups + 1
    out: Stats = {}
    for b in blocks:
        if b.kind == "rows":
            out[b.name] = np.bincount(groups, minlength=width).astype(np.float64)[:, None]
            continue
        assert b.column is not None
        x = values[b.column]
        present = ~np.isnan(x)
        if b.kind == "n":
            stat = np.bincount(groups, weights=present, minlength=width)
        elif b.kind == "nulls":
            stat = np.bincount(groups, weights=~present, minlength=width)
        else:
            lo, hi = _bounds(plan, config, b.column)
            g = groups[present]
            v = x[present]
            clipped = np.clip(v, lo, hi)
            c = (lo + hi) / 2.0
            if b.kind == "clamped":
                stat = np.bincount(g, weights=(v < lo) | (v > hi), minlength=width)
            elif b.kind == "sum":
                stat = np.bincount(g, weights=clipped, minlength=width)
            elif b.kind == "s1":
                stat = np.bincount(g, weights=clipped - c, minlength=width)
            elif b.kind == "s2":
                stat = np.bincount(g, weights=(clipped - c) ** 2, minlength=width)
            else:  # hist
                idx = _bin_index(clipped, lo, hi, b.width)
                flat = np.bincount(g * b.width + idx, minlength=width * b.width)
                out[b.name] = flat.reshape(width, b.width).astype(np.float64)
                continue
        out[b.name] = np.asarray(stat, dtype=np.float64)[:, None]
    return out


def released(stats: Mapping[str, np.ndarray], blocks: Sequence[Block], groups: int) -> Stats:
    """What a party sends of ``local_stats``: the first ``groups`` groups of each block (under
    DP the public domain; exact answers keep the outside group too), and a ``total`` block
    summed over them."""
    out: Stats = {}
    for b in blocks:
        kept = np.asarray(stats[b.name])[:groups]
        out[b.name] = kept.sum(axis=0, keepdims=True) if b.total else kept
    return out


def _bin_index(v: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    idx = np.floor((v - lo) / (hi - lo) * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


def flatten(stats: Mapping[str, np.ndarray], blocks: Sequence[Block]) -> np.ndarray:
    return np.concatenate([np.asarray(stats[b.name], dtype=np.float64).ravel() for b in blocks])


def unflatten(vector: np.ndarray, blocks: Sequence[Block], n_groups: int) -> Stats:
    """Inverse of ``flatten``; a leading axis (noise draws) is kept."""
    lead = vector.shape[:-1]
    out: Stats = {}
    at = 0
    for b in blocks:
        size = b.cells(n_groups)
        out[b.name] = vector[..., at : at + size].reshape(*lead, size // b.width, b.width)
        at += size
    if at != vector.shape[-1]:
        raise QueryError(f"the summed statistics have {vector.shape[-1]} numbers, expected {at}")
    return out


def answer(
    agg: Aggregate, plan: Plan, config: AnalyticsConfig, stats: Stats, *, dp: bool
) -> np.ndarray:
    """One aggregate for every group from the summed blocks: shape (..., groups) or, for a
    histogram, (..., groups, bins). NaN stands for SQL NULL (no non-NULL value)."""
    if agg.kind == "count_rows":
        return stats["rows"][..., 0]
    assert agg.column is not None
    i = plan.columns.index(agg.column)
    with np.errstate(divide="ignore", invalid="ignore"):
        if agg.kind == "count":
            return stats[f"n:c{i}"][..., 0]
        if agg.kind == "histogram":
            return stats[f"hist:c{i}:{agg.bins}"]
        lo, hi = _bounds(plan, config, i)
        if agg.kind == "quantile":
            hist = stats[f"hist:c{i}:{config.bins}"]
            if not dp:
                return quantile_from_hist(hist, agg.q or 0.0, lo, hi)
            count = np.maximum(stats[f"n:c{i}"][..., 0], 1.0)
            return quantile_from_hist(hist, agg.q or 0.0, lo, hi, total=count)
        c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
        if agg.kind == "sum":
            if f"sum:c{i}" in stats:
                return stats[f"sum:c{i}"][..., 0]
            n = stats[f"n:c{i}"][..., 0]
            total = stats[f"s1:c{i}"][..., 0] + c * n
            return total if dp else np.where(n > 0, total, np.nan)
        n = stats[f"n:c{i}"][..., 0]
        s1 = stats[f"s1:c{i}"][..., 0]
        if dp:  # noisy counts can be tiny or negative: the answer is post-processed into range
            n = np.maximum(n, 1.0)
        mean_c = s1 / n
        if agg.kind == "avg":
            mean = mean_c + c
            return np.clip(mean, lo, hi) if dp else np.where(n > 0, mean, np.nan)
        s2 = stats[f"s2:c{i}"][..., 0]
        pop = agg.kind.endswith("pop")
        denom = n if pop else n - 1.0
        var = (s2 - s1 * mean_c) / denom
        var = np.clip(var, 0.0, r * r) if dp else np.where(denom > 0, np.maximum(var, 0.0), np.nan)
        return np.sqrt(var) if agg.kind.startswith("stddev") else var


def quantile_from_hist(
    hist: np.ndarray, q: float, lo: float, hi: float, *, total: np.ndarray | None = None
) -> np.ndarray:
    """PERCENTILE_CONT(q) from bin counts: the two order statistics it interpolates are
    placed at their bins' midpoints, so an exact histogram answers within half a bin.

    Noisy (DP) counts pass ``total``, the number of values counted apart: the rank is placed
    by it, and found where the cumulative noisy counts, negative bins included, first pass
    it. Clipping negative bins to 0 would add about half the noise scale per bin, which over
    many empty bins outweighs the rows and pulls every quantile to the middle of the bounds.
    """
    if total is None:
        h = np.maximum(hist, 0.0)
        total = h.sum(axis=-1)
    else:
        h = hist
    bins = h.shape[-1]
    width = (hi - lo) / bins
    pos = q * np.maximum(total - 1.0, 0.0)
    k = np.floor(pos)
    frac = pos - k
    cum = np.cumsum(h, axis=-1)

    def bin_of(rank: np.ndarray) -> np.ndarray:
        # The bin holding the (rank+1)-th smallest value: the first whose cumulative count
        # exceeds rank (the last bin if rounding leaves none).
        found = cum > rank[..., None]
        idx = np.where(found.any(axis=-1), found.argmax(axis=-1), bins - 1)
        return lo + (idx + 0.5) * width

    upper_rank = np.minimum(k + 1.0, np.maximum(total - 1.0, 0.0))
    below = bin_of(k)
    above = bin_of(upper_rank)
    out = below + frac * (above - below)
    return np.where(total > 0, out, np.nan)


def std_of_laplace(scale: float) -> float:
    return math.sqrt(2.0) * scale
