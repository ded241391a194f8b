"""The Dataset type every node trains on: features, labels, and what the labels mean.

A Dataset checks itself once when built (matching lengths, finite features, integer labels in
range), so code further up never re-checks; subsets of a checked Dataset skip the work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.errors import DataError

__all__ = ["MAX_CLASSES", "Dataset"]

# Class ids index per-class arrays (counts, one-hot targets, a model's output layer), so a
# stray label such as 2**28 would allocate gigabytes: more classes than this is refused.
MAX_CLASSES = 10_000


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class Dataset:
    """Samples held by one party (or a whole built-in data set before partitioning).

    ``x`` has one row per sample: 2-D ``(samples, features)`` for tabular data, N-D for
    images or token windows. Float features must be finite; integer features (token ids)
    are kept as they are. ``classes`` is the number of classes for classification, whose
    labels ``y`` are int64 ids in ``0..classes-1``; ``classes=None`` means regression, with
    float targets.
    """

    x: np.ndarray
    y: np.ndarray
    classes: int | None
    feature_names: tuple[str, ...] | None = None
    name: str = "dataset"
    # categorical column name -> its categories; a row holds the category's index as a number
    categories: Mapping[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"Dataset name must be a non-empty string, got {self.name!r}")
        classes = _check_classes(self.classes, self.name)
        x = _check_features(self.x, self.name)
        y = _check_labels(self.y, classes, self.name)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"dataset {self.name!r}: x has {x.shape[0]} rows but y has {y.shape[0]} "
                "labels; they must match one label per row"
            )
        names = _check_feature_names(self.feature_names, x, self.name)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "categories", _check_categories(self.categories, names, self.name))

    @classmethod
    def _trusted(
        cls,
        *,
        x: np.ndarray,
        y: np.ndarray,
        classes: int | None,
        feature_names: tuple[str, ...] | None,
        name: str,
        categories: Mapping[str, tuple[str, ...]] | None = None,
    ) -> Dataset:
        # Subsets of a checked Dataset are valid by construction; re-checking every node's
        # data would cost a full pass over x each time a lazy partition materializes a node.
        obj = object.__new__(cls)
        object.__setattr__(obj, "x", x)
        object.__setattr__(obj, "y", y)
        object.__setattr__(obj, "classes", classes)
        object.__setattr__(obj, "feature_names", feature_names)
        object.__setattr__(obj, "name", name)
        object.__setattr__(obj, "categories", categories)
        return obj

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        kind = f"classes={self.classes}" if self.classes is not None else "regression"
        shape = ", ".join(str(d) for d in self.x.shape)
        return (
            f"Dataset(name={self.name!r}, samples={len(self)}, x={self.x.dtype}[{shape}], {kind})"
        )

    @property
    def is_classification(self) -> bool:
        return self.classes is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features (``(64,)`` for digits)."""
        return tuple(int(d) for d in self.x.shape[1:])

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Samples per class, length ``classes`` (classification only)."""
        if self.classes is None:
            raise DataError(
                f"dataset {self.name!r} is a regression data set (classes=None); "
                "it has no class counts"
            )
        return np.bincount(self.y, minlength=self.classes).astype(np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, *, name: str | None = None) -> Dataset:
        """The samples at ``indices`` (integer positions or a boolean mask), as a new Dataset."""
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise DataError(
                    f"boolean mask has shape {idx.shape} but dataset {self.name!r} has "
                    f"{len(self)} samples; a mask needs one entry per sample"
                )
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.intp)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise DataError(
                f"subset indices must be a 1-D array of integer positions (or a boolean mask), "
                f"got dtype {idx.dtype} and shape {idx.shape}"
            )
        n = len(self)
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise DataError(
                f"subset index out of range for dataset {self.name!r} with {n} samples: "
                f"indices must lie in [-{n}, {n - 1}]"
            )
        return Dataset._trusted(
            x=self.x[idx],
            y=self.y[idx],
            classes=self.classes,
            feature_names=self.feature_names,
            name=self.name if name is None else name,
            categories=self.categories,
        )


def _check_classes(classes: Any, name: str) -> int | None:
    if classes is None:
        return None
    if isinstance(classes, (bool, np.bool_)) or not isinstance(classes, (int, np.integer)):
        raise DataError(
            f"dataset {name!r}: classes must be an integer number of classes (or None for "
            f"regression), got {classes!r}"
        )
    if classes < 1:
        raise DataError(f"dataset {name!r}: classes must be at least 1, got {classes}")
    if classes > MAX_CLASSES:
        raise DataError(
            f"dataset {name!r}: {classes} classes is more than the {MAX_CLASSES} supported; "
            "class labels must be dense ids 0..K-1 (map sparse or hashed labels first)"
        )
    return int(classes)


def _check_categories(
    categories: Any, names: tuple[str, ...] | None, name: str
) -> Mapping[str, tuple[str, ...]] | None:
    if categories is None:
        return None
    if names is None or not isinstance(categories, Mapping):
        raise DataError(
            f"dataset {name!r}: categories map named feature columns to their categories "
            "(the data set needs feature_names)"
        )
    out: dict[str, tuple[str, ...]] = {}
    for column, labels in categories.items():
        if column not in names:
            raise DataError(f"dataset {name!r}: categorical column {column!r} is not a feature")
        labels = tuple(labels)
        if not all(isinstance(c, str) for c in labels) or len(set(labels)) != len(labels):
            raise DataError(
                f"dataset {name!r}: column {column!r}'s categories must be distinct strings"
            )
        out[column] = labels
    return out


def _check_features(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"dataset {name!r}: features cannot be read as one array ({exc}); every sample "
            "must have the same shape"
        ) from exc
    kind = arr.dtype.kind
    if kind == "b" or arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif kind == "f" and arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    elif kind not in "fiu":
        raise DataError(
            f"dataset {name!r}: features must be numbers, got dtype {arr.dtype}; encode "
            "categorical columns as numbers (for example one-hot) before building a Dataset"
        )
    if arr.ndim < 2:
        raise DataError(
            f"dataset {name!r}: x must have one row per sample (2-D: samples x features, or "
            f"N-D for images), got shape {arr.shape}; for a single feature use x.reshape(-1, 1)"
        )
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise DataError(
                f"dataset {name!r}: x{list(where)} is {arr[where]}; features must be finite: "
                "impute or drop missing values (and clip infinities) before building a Dataset"
            )
    return arr


def _check_labels(y: Any, classes: int | None, name: str) -> np.ndarray:
    try:
        arr = np.asarray(y)
    except (ValueError, TypeError) as exc:
        raise DataError(f"dataset {name!r}: labels cannot be read as one array ({exc})") from exc
    if classes is None:
        return _check_targets(arr, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(
            f"dataset {name!r}: classification labels must be 1-D (one class id per sample), "
            f"got shape {arr.shape}; for one-hot labels use y.argmax(axis=1)"
        )
    kind = arr.dtype.kind
    if kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"dataset {name!r}: label y[{i}] = {arr[i]} is not an integer class id; "
                "classification labels must be integers 0..classes-1 "
                "(for a regression target pass classes=None)"
            )
    elif kind not in "iub":
        raise DataError(
            f"dataset {name!r}: labels must be integer class ids, got dtype {arr.dtype}; map "
            "class names to 0..K-1 first (for example np.unique(y, return_inverse=True))"
        )
    out = arr.astype(np.int64, copy=False)
    if out.size:
        lo, hi = int(out.min()), int(out.max())
        if lo < 0 or hi >= classes:
            i = int(np.flatnonzero((out < 0) | (out >= classes))[0])
            raise DataError(
                f"dataset {name!r}: label y[{i}] = {out[i]} is outside 0..{classes - 1}; "
                f"class ids start at 0 (pass classes={max(hi + 1, classes)} if there are "
                "more classes)"
            )
    return out


def _check_targets(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind not in "fiub":
        raise DataError(
            f"dataset {name!r}: regression targets must be numbers, got dtype {arr.dtype}"
        )
    if arr.ndim not in (1, 2):
        raise DataError(
            f"dataset {name!r}: regression targets must be 1-D (one per sample) or 2-D "
            f"(samples x outputs), got shape {arr.shape}"
        )
    out = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise DataError(
            f"dataset {name!r}: target y{list(where)} is {out[where]}; targets must be "
            "finite: drop the samples whose target is missing"
        )
    return out


def _check_feature_names(names: Any, x: np.ndarray, name: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise DataError(
            f"dataset {name!r}: feature_names must be a sequence of strings, not one string"
        )
    out = tuple(names)
    if not all(isinstance(n, str) for n in out):
        raise DataError(f"dataset {name!r}: feature_names must all be strings")
    if x.ndim != 2 or len(out) != x.shape[1]:
        raise DataError(
            f"dataset {name!r}: {len(out)} feature_names for features of shape "
            f"{x.shape[1:]}; give one name per column of a 2-D x, or feature_names=None"
        )
    return out
