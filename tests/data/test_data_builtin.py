"""Built-in scikit-learn data sets: splits, scaling with train statistics, dispatch by name."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from shoal.data import (
    DATASETS,
    Dataset,
    load_breast_cancer,
    load_dataset,
    load_digits,
    load_iris,
    load_wine,
)
from shoal.errors import DataError


def test_digits_split_scaled_and_stratified() -> None:
    train, test = load_digits(test_fraction=0.2, seed=0)
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    assert train.x.shape[1] == 64 and train.x.dtype == np.float32
    assert train.classes == test.classes == 10
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    assert train.x.max() == 1.0
    # Stratified: class proportions of both sides agree closely.
    p_train = train.class_counts() / len(train)
    p_test = test.class_counts() / len(test)
    assert np.abs(p_train - p_test).max() < 0.01
    raw, _ = load_digits(seed=0, scale=False)
    assert raw.x.max() == 16.0


def test_splits_are_deterministic_and_seed_dependent() -> None:
    a, _ = load_iris(seed=1)
    b, _ = load_iris(seed=1)
    c, _ = load_iris(seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


@pytest.mark.parametrize(
    ("loader", "n", "features", "classes"),
    [(load_breast_cancer, 569, 30, 2), (load_wine, 178, 13, 3), (load_iris, 150, 4, 3)],
)
def test_tabular_standardized_with_train_statistics(
    loader: Callable[..., tuple[Dataset, Dataset]], n: int, features: int, classes: int
) -> None:
    train, test = loader(test_fraction=0.25, seed=3)
    assert len(train) + len(test) == n
    assert train.x.shape[1] == features and train.classes == classes
    assert train.feature_names is not None and len(train.feature_names) == features
    np.testing.assert_allclose(train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(axis=0), 1.0, atol=1e-4)
    # Test data are transformed with the train statistics, so they are not exactly standard.
    raw_train, raw_test = loader(test_fraction=0.25, seed=3, scale=False)
    mean, std = raw_train.x.mean(axis=0), raw_train.x.std(axis=0)
    np.testing.assert_allclose(test.x, (raw_test.x - mean) / std, rtol=1e-4, atol=1e-4)


def test_load_dataset_dispatch_and_unknown_name() -> None:
    assert DATASETS == ("digits", "breast_cancer", "wine", "iris")
    train, _ = load_dataset("Breast-Cancer", seed=0)
    assert train.name == "breast_cancer/train"
    with pytest.raises(DataError, match="digits, breast_cancer, wine, iris"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="test_fraction, seed and scale"):
        load_dataset("iris", bogus=1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="between 0 and 1"):
        load_wine(test_fraction=fraction)


def test_test_fraction_too_small_to_stratify() -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_iris(test_fraction=0.01)
