"""Feature binning: cut points per feature, and codes (bin indices) for rows.

A feature with cuts ``t_1 < ... < t_m`` has ``m + 1`` bins; a value's code is the number of
cuts at or below it, so ``code < k`` exactly when ``x < t_k``. Missing values (NaN) get the
code ``MISSING``. Cuts come from the data centrally (:func:`fit_bins`) or from a summed
histogram over a fine grid in federated training (:func:`bins_from_grid`). A categorical
feature with ``k`` categories has one bin per category: its values are the integer codes
``0..k-1`` and its code is the value itself (cuts at ``0.5, 1.5, ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.errors import DataError

__all__ = [
    "MISSING",
    "Bins",
    "bins_from_grid",
    "categorical_mask",
    "category_cuts",
    "fit_bins",
    "grid_counts",
    "quantile_cuts",
]

MISSING = 256  # one past the largest bin: codes are uint16


def category_cuts(k: int) -> np.ndarray:
    """The cuts of a categorical feature with ``k`` categories: one bin per code."""
    return np.arange(k - 1, dtype=np.float64) + 0.5


@dataclass(frozen=True, eq=False)
class Bins:
    """Cut points for each feature (ascending float64 arrays); ``categorical`` marks the
    features whose values are category codes (empty: none)."""

    cuts: tuple[np.ndarray, ...]
    categorical: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        flags = tuple(bool(c) for c in self.categorical)
        if flags and len(flags) != len(self.cuts):
            raise DataError(
                f"categorical flags for {len(flags)} features, cuts for {len(self.cuts)}"
            )
        object.__setattr__(self, "categorical", flags if any(flags) else ())

    @property
    def n_features(self) -> int:
        return len(self.cuts)

    @property
    def is_categorical(self) -> np.ndarray:
        """A boolean mask of the categorical features."""
        if not self.categorical:
            return np.zeros(self.n_features, dtype=bool)
        return np.asarray(self.categorical, dtype=bool)

    @property
    def n_bins(self) -> np.ndarray:
        """Bins per feature (cuts + 1)."""
        return np.array([len(c) + 1 for c in self.cuts], dtype=np.int64)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Codes of shape ``x.shape`` (uint16), ``MISSING`` where ``x`` is NaN."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DataError(
                f"expected rows with {self.n_features} features, got an array of shape {x.shape}"
            )
        codes = np.empty(x.shape, dtype=np.uint16)
        categorical = self.is_categorical
        for j, cuts in enumerate(self.cuts):
            column = x[:, j]
            if categorical[j]:
                _check_codes(column, j, len(cuts) + 1)
            codes[:, j] = np.searchsorted(cuts, column, side="right")
            codes[np.isnan(column), j] = MISSING
        return codes

    def threshold(self, feature: int, left_bins: int) -> float:
        """The raw value ``t`` with ``code < left_bins`` iff ``x < t`` (+-inf at the ends)."""
        cuts = self.cuts[feature]
        if left_bins <= 0:
            return -np.inf
        if left_bins > len(cuts):
            return np.inf
        return float(cuts[left_bins - 1])

    def same_as(self, other: Bins) -> bool:
        return (
            self.n_features == other.n_features
            and self.categorical == other.categorical
            and all(np.array_equal(a, b) for a, b in zip(self.cuts, other.cuts))
        )


def _check_codes(column: np.ndarray, j: int, k: int | None) -> None:
    """Category codes must be integers in [0, k) (NaN: missing)."""
    values = column[~np.isnan(column)]
    bad = (values != np.round(values)) | (values < 0)
    if k is not None:
        bad |= values >= k
    if bad.any():
        # the count, never a value: a node's refusal travels to the coordinator, which must
        # not read a feature's values off errors by flagging numeric columns categorical
        top = f", {k})" if k is not None else ", ...)"
        raise DataError(
            f"feature {j} is categorical but holds {int(bad.sum())} value(s) that are not "
            f"category codes: integers in [0{top}; a category not seen in training has no code"
        )


def _check_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"features must be a non-empty 2-D array, got shape {x.shape}")
    if np.isinf(x).any():
        raise DataError("features hold infinity; use NaN for missing values")
    return x


def _constant(j: int) -> DataError:
    return DataError(
        f"feature {j} is constant everywhere (or entirely missing): it can never split; "
        "drop that column before training"
    )


def categorical_mask(categorical: Sequence[int], n_features: int) -> tuple[bool, ...]:
    """Feature indices -> one flag per feature (checked: in range, no repeats)."""
    mask = [False] * n_features
    for j in categorical:
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
            raise DataError(f"categorical features are column indices, got {j!r}")
        if not 0 <= j < n_features:
            raise DataError(f"categorical feature {j} is out of range: {n_features} features")
        if mask[j]:
            raise DataError(f"categorical feature {j} is named twice")
        mask[j] = True
    return tuple(mask)


def fit_bins(x: np.ndarray, *, max_bins: int = 256, categorical: Sequence[int] = ()) -> Bins:
    """Cuts at the data's quantiles, placed as XGBoost's ``hist`` places them (see
    :func:`quantile_cuts`). A ``categorical`` feature (by index) gets one bin per code up to
    its largest."""
    x = _check_rows(x)
    flags = categorical_mask(categorical, x.shape[1])
    cuts: list[np.ndarray] = []
    for j in range(x.shape[1]):
        column = x[:, j]
        values, counts = np.unique(column[~np.isnan(column)], return_counts=True)
        if len(values) < 2:
            raise _constant(j)
        if flags[j]:
            _check_codes(column, j, None)
            cuts.append(category_cuts(_categories(j, values[-1], max_bins)))
            continue
        cuts.append(quantile_cuts(values, counts, max_bins=max_bins))
    return Bins(cuts=tuple(cuts), categorical=flags)


def quantile_cuts(values: np.ndarray, counts: np.ndarray, *, max_bins: int) -> np.ndarray:
    """Cuts for one numeric feature from its distinct ``values`` (ascending) and their counts.

    XGBoost's rule on an exact weighted quantile summary: prune the summary to
    ``min(rows, 8 * max_bins)`` entries, then to ``min(that, max_bins) + 1``, and cut at
    entries ``1 .. min(entries, max_bins) - 1``. On up to ``8 * max_bins`` rows XGBoost's own
    summary is exact, so these are its cuts value for value (a test checks them against
    ``xgboost`` itself); on more rows its sketch is approximate and these are the exact
    summary's cuts under the same rule. Cuts are data values, so the rows fall into the same
    bins as XGBoost's float32 comparisons put them, as long as float32 keeps values apart.
    """
    rows = int(counts.sum())
    # XGBoost keeps ranks in float32; computing the same way keeps its ties
    weight = counts.astype(np.float32)
    rmax = np.cumsum(weight, dtype=np.float32)
    rmin = (rmax - weight).astype(np.float32)
    keep = np.arange(len(values))
    intermediate = min(rows, 8 * max_bins)
    keep = keep[_prune(rmin[keep], rmax[keep], weight[keep], intermediate)]
    final = min(intermediate, max_bins)
    keep = keep[_prune(rmin[keep], rmax[keep], weight[keep], final + 1)]
    return values[keep[1 : min(len(keep), final)]].copy()


def _prune(rmin: np.ndarray, rmax: np.ndarray, wmin: np.ndarray, size: int) -> np.ndarray:
    """Which summary entries XGBoost's ``WQSummary::SetPrune`` keeps out of ``size`` slots:
    the first and last, and between them the entry nearest each of ``size - 2`` evenly
    spaced ranks (indices, ascending, no repeats)."""
    n = len(rmin)
    if n <= size:
        return np.arange(n)
    slots = size - 1
    begin, span = rmax[0], np.float32(rmin[-1] - rmax[0])
    k = np.arange(1, slots, dtype=np.float32)
    doubled = np.float32(2) * ((k * span) / np.float32(slots) + begin)
    mid = rmax + rmin  # twice each entry's middle rank, ascending
    i = np.minimum(1 + np.searchsorted(mid[2:], doubled, side="right"), n - 1)
    reached = np.flatnonzero(i == n - 1)
    if len(reached):  # XGBoost stops at the first target past the second-last entry
        i, doubled = i[: reached[0]], doubled[: reached[0]]
    nearer_next = doubled >= (rmin[i] + wmin[i]) + (rmax[i + 1] - wmin[i + 1])
    chosen = np.concatenate([[0], i + nearer_next, [n - 1]])
    return chosen[np.concatenate([[True], np.diff(chosen) != 0])]


def _categories(j: int, top: float, max_bins: int) -> int:
    k = int(top) + 1
    if k > max_bins:
        raise DataError(
            f"categorical feature {j} has codes up to {int(top)}: more than max_bins = "
            f"{max_bins} categories (one bin each); merge rare categories or raise max_bins"
        )
    return k


def grid_counts(x: np.ndarray, low: np.ndarray, high: np.ndarray, cells: int) -> np.ndarray:
    """Counts of each feature's non-missing values over ``cells`` equal cells of [low, high].

    Shape (features, cells), int64. What a node contributes to the federated sketch.
    """
    x = _check_rows(x)
    out = np.zeros((x.shape[1], cells), dtype=np.int64)
    for j in range(x.shape[1]):
        column = x[:, j]
        column = column[~np.isnan(column)]
        out[j] = np.bincount(_cell(column, low[j], high[j], cells), minlength=cells)
    return out


def _cell(values: np.ndarray, low: float, high: float, cells: int) -> np.ndarray:
    width = (high - low) / cells if high > low else 1.0
    index = np.floor((values - low) / width).astype(np.int64)
    return np.clip(index, 0, cells - 1)


def bins_from_grid(
    counts: np.ndarray, low: Sequence[float], high: Sequence[float], *, max_bins: int
) -> Bins:
    """Cuts from summed grid counts: cell edges at evenly spaced ranks of the pooled data."""
    counts = np.asarray(counts)
    cuts: list[np.ndarray] = []
    for j in range(counts.shape[0]):
        row = np.asarray(counts[j], dtype=np.float64)
        cells = len(row)
        occupied = np.flatnonzero(row > 0)
        if len(occupied) < 2 or not high[j] > low[j]:
            raise _constant(j)
        edges = low[j] + (high[j] - low[j]) * np.arange(cells + 1) / cells
        ranks = np.cumsum(row)
        if len(occupied) <= max_bins:
            # a cut just below each occupied cell but the first: one bin per occupied cell
            picked = edges[occupied[1:]]
        else:
            targets = ranks[-1] * np.arange(1, max_bins) / max_bins
            cell = np.unique(np.searchsorted(ranks, targets, side="right"))
            cell = cell[(cell > occupied[0]) & (cell < cells)]
            picked = edges[cell]
        cuts.append(np.unique(picked))
    return Bins(cuts=tuple(cuts))
