"""Built-in data sets from scikit-learn's bundled copies (no network), split into train and test.

Digits are scaled to [0, 1]; the tabular sets are standardized with train-split statistics
only, so nothing about the test split leaks into training.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.data.dataset import Dataset
from shoal.errors import DataError

__all__ = [
    "DATASETS",
    "load_breast_cancer",
    "load_dataset",
    "load_digits",
    "load_iris",
    "load_wine",
]

DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "iris")


@functools.cache
def _raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    # Imported here: scikit-learn takes about a second to import and most uses of
    # shoal.data never touch the built-in sets.
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    # Cached arrays are shared by every call, so nobody may write to them.
    x.setflags(write=False)
    y.setflags(write=False)
    names = getattr(bunch, "feature_names", None)
    return x, y, (tuple(str(n) for n in names) if names is not None else None)


def _split(
    name: str, *, test_fraction: float, seed: int, scale: bool, by_sixteen: bool
) -> tuple[Dataset, Dataset]:
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction!r} "
            "(0.2 keeps a fifth of the samples for testing)"
        )
    x, y, names = _raw(name)
    classes = int(y.max()) + 1
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(y)), test_size=float(test_fraction), random_state=seed, stratify=y
        )
    except ValueError as exc:
        raise DataError(
            f"{name}: cannot split {len(y)} samples of {classes} classes with "
            f"test_fraction={test_fraction} while keeping every class on both sides ({exc}); "
            "choose a test_fraction nearer 0.2"
        ) from exc
    x_train, x_test = x[train_idx], x[test_idx]
    if scale and by_sixteen:
        # Digits pixels are counts 0..16; a fixed scale keeps every node on the same grid.
        x_train, x_test = x_train / 16.0, x_test / 16.0
    elif scale:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    train = Dataset(
        x=x_train.astype(np.float32),
        y=y[train_idx].copy(),
        classes=classes,
        feature_names=names,
        name=f"{name}/train",
    )
    test = Dataset(
        x=x_test.astype(np.float32),
        y=y[test_idx].copy(),
        classes=classes,
        feature_names=names,
        name=f"{name}/test",
    )
    return train, test


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, scale: bool = True
) -> tuple[Dataset, Dataset]:
    """8x8 handwritten digits (1797 samples, 64 features, 10 classes) as (train, test).

    The split is stratified; ``scale`` divides pixel counts by 16 into [0, 1]. Features are
    float32, flattened to 64 columns.
    """
    return _split("digits", test_fraction=test_fraction, seed=seed, scale=scale, by_sixteen=True)


def load_breast_cancer(
    *, test_fraction: float = 0.2, seed: int = 0, scale: bool = True
) -> tuple[Dataset, Dataset]:
    """Wisconsin breast cancer (569 samples, 30 features, 2 classes) as (train, test).

    ``scale`` standardizes each feature with the train split's mean and standard deviation.
    """
    return _split(
        "breast_cancer", test_fraction=test_fraction, seed=seed, scale=scale, by_sixteen=False
    )


def load_wine(
    *, test_fraction: float = 0.2, seed: int = 0, scale: bool = True
) -> tuple[Dataset, Dataset]:
    """Wine cultivars (178 samples, 13 features, 3 classes) as (train, test), standardized."""
    return _split("wine", test_fraction=test_fraction, seed=seed, scale=scale, by_sixteen=False)


def load_iris(
    *, test_fraction: float = 0.2, seed: int = 0, scale: bool = True
) -> tuple[Dataset, Dataset]:
    """Iris (150 samples, 4 features, 3 classes) as (train, test), standardized."""
    return _split("iris", test_fraction=test_fraction, seed=seed, scale=scale, by_sixteen=False)


_LOADERS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "wine": load_wine,
    "iris": load_iris,
}


def load_dataset(name: str, **kwargs: Any) -> tuple[Dataset, Dataset]:
    """Load a built-in data set by name (see ``DATASETS``); keywords go to its loader."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    loader = _LOADERS.get(key)
    if loader is None:
        raise DataError(
            f"unknown data set {name!r}: the built-in ones are {', '.join(DATASETS)}; "
            "for your own data use load_csv or load_npz"
        )
    try:
        inspect.signature(loader).bind(**kwargs)
    except TypeError as exc:
        raise DataError(
            f"load_dataset({name!r}): {exc}; the loaders accept test_fraction, seed and scale"
        ) from exc
    return loader(**kwargs)
