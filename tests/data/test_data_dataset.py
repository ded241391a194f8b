"""Dataset validation, subsets and representation."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import Dataset
from shoal.errors import DataError


def make(n: int = 6, classes: int | None = 3) -> Dataset:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n) % 3 if classes is not None else np.linspace(0, 1, n)
    return Dataset(x=x, y=y, classes=classes, feature_names=("a", "b"), name="toy")


def test_valid_dataset_coerces_labels_to_int64() -> None:
    ds = Dataset(x=np.zeros((4, 3)), y=np.array([0, 1, 2, 1], dtype=np.int32), classes=3)
    assert ds.y.dtype == np.int64
    assert ds.x.dtype == np.float64
    assert len(ds) == 4
    assert ds.is_classification
    assert ds.sample_shape == (3,)
    assert ds.class_counts().tolist() == [1, 2, 1]


def test_integral_float_labels_accepted_and_nd_images_allowed() -> None:
    ds = Dataset(x=np.zeros((3, 8, 8), dtype=np.float32), y=np.array([0.0, 1.0, 1.0]), classes=2)
    assert ds.y.tolist() == [0, 1, 1]
    assert ds.sample_shape == (8, 8)


def test_regression_targets_are_float() -> None:
    ds = make(classes=None)
    assert ds.classes is None
    assert ds.y.dtype.kind == "f"
    with pytest.raises(DataError, match="regression"):
        ds.class_counts()


def test_mismatched_lengths_rejected() -> None:
    with pytest.raises(DataError, match="5 rows but y has 4 labels"):
        Dataset(x=np.zeros((5, 2)), y=np.zeros(4, dtype=int), classes=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_rejected(bad: float) -> None:
    x = np.zeros((3, 2))
    x[2, 1] = bad
    with pytest.raises(DataError, match=r"x\[2, 1\].*impute or drop"):
        Dataset(x=x, y=np.array([0, 1, 0]), classes=2)


def test_non_integer_labels_rejected_with_fix() -> None:
    with pytest.raises(DataError, match=r"y\[1\] = 0.5.*classes=None"):
        Dataset(x=np.zeros((2, 2)), y=np.array([0.0, 0.5]), classes=2)


def test_string_labels_rejected_with_fix() -> None:
    with pytest.raises(DataError, match="return_inverse"):
        Dataset(x=np.zeros((2, 2)), y=np.array(["cat", "dog"]), classes=2)


def test_label_out_of_range_rejected() -> None:
    with pytest.raises(DataError, match=r"outside 0..1.*classes=4"):
        Dataset(x=np.zeros((2, 2)), y=np.array([0, 3]), classes=2)
    with pytest.raises(DataError, match="outside"):
        Dataset(x=np.zeros((2, 2)), y=np.array([0, -1]), classes=2)


def test_one_dimensional_features_rejected_with_reshape_hint() -> None:
    with pytest.raises(DataError, match=r"reshape\(-1, 1\)"):
        Dataset(x=np.zeros(3), y=np.array([0, 1, 0]), classes=2)


def test_non_numeric_features_and_bad_classes_rejected() -> None:
    with pytest.raises(DataError, match="one-hot"):
        Dataset(x=np.array([["a"], ["b"]]), y=np.array([0, 1]), classes=2)
    with pytest.raises(DataError, match="classes must be"):
        Dataset(x=np.zeros((2, 1)), y=np.array([0, 1]), classes=True)
    with pytest.raises(DataError, match="at least 1"):
        Dataset(x=np.zeros((2, 1)), y=np.array([0, 1]), classes=0)


def test_feature_names_must_match_columns() -> None:
    with pytest.raises(DataError, match="one name per column"):
        Dataset(x=np.zeros((2, 3)), y=np.array([0, 1]), classes=2, feature_names=("a", "b"))


def test_subset_by_positions_and_mask() -> None:
    ds = make()
    sub = ds.subset([4, 1])
    assert sub.x.tolist() == [[8.0, 9.0], [2.0, 3.0]]
    assert sub.y.tolist() == [1, 1]
    assert sub.classes == 3 and sub.feature_names == ("a", "b") and sub.name == "toy"
    masked = ds.subset(ds.y == 0, name="zeros")
    assert masked.name == "zeros"
    assert masked.y.tolist() == [0, 0]
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    assert len(ds.subset([])) == 0


def test_subset_rejects_bad_indices() -> None:
    ds = make()
    with pytest.raises(DataError, match="out of range"):
        ds.subset([6])
    with pytest.raises(DataError, match="integer positions"):
        ds.subset(np.array([0.5]))
    with pytest.raises(DataError, match="one entry per sample"):
        ds.subset(np.array([True, False]))


def test_frozen_and_repr_is_short() -> None:
    ds = make()
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    text = repr(ds)
    assert text == "Dataset(name='toy', samples=6, x=float32[6, 2], classes=3)"
