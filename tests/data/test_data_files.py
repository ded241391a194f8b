"""load_csv and load_npz: happy paths and every error case with a precise, fixable message."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from shoal.data import load_csv, load_npz
from shoal.errors import DataError


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_happy_path(tmp_path: Path) -> None:
    path = write(tmp_path, "age,weight,label\n1,2.5,0\n3,4,2\n\n5,6e1,1\n")
    ds = load_csv(path)
    assert ds.name == "data"
    assert ds.feature_names == ("age", "weight")
    assert ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, np.array([[1, 2.5], [3, 4], [5, 60]]))
    assert ds.y.tolist() == [0, 2, 1]
    assert ds.classes == 3


def test_csv_label_by_index_header_false_and_options(tmp_path: Path) -> None:
    path = write(tmp_path, "1;0.5;7\n0;1.5;8\n")
    ds = load_csv(path, label=0, header=False, delimiter=";", classes=5, dtype=np.float64)
    assert ds.feature_names is None
    assert ds.x.dtype == np.float64
    np.testing.assert_allclose(ds.x, [[0.5, 7], [1.5, 8]])
    assert ds.y.tolist() == [1, 0] and ds.classes == 5
    last = load_csv(path, label=-1, header=False, delimiter=";", regression=True)
    assert last.classes is None and last.y.tolist() == [7.0, 8.0]


def test_csv_bom_quotes_and_regression(tmp_path: Path) -> None:
    path = write(tmp_path, '\ufeffa,"b",label\n"1", 2 ,0.25\n')
    ds = load_csv(path, regression=True)
    assert ds.feature_names == ("a", "b")
    np.testing.assert_allclose(ds.x, [[1, 2]])
    assert ds.y.tolist() == [0.25]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a,b,label\n1,2,0\n3,,1\n", r"row 2 \(line 3.*missing value in column 'b'"),
        ("a,b,label\n1,NA,0\n", r"row 1 .*missing value in column 'b' \(found 'NA'\)"),
        ("a,b,label\n1,2,0\n3,abc,1\n", r"row 2 .*column 'b' holds 'abc'.*one-hot"),
        ("a,b,label\n1,inf,0\n", r"column 'b' holds 'inf'.*finite"),
        ("a,b,label\n1,2,cat\n", r"row 1 .*label 'cat' is not a number.*integers"),
        ("a,b,label\n1,2,0\n1,2,0.5\n", r"row 2 .*label '0.5' is not an integer.*regression=True"),
        ("a,b,label\n1,2,-1\n", r"label '-1' is negative"),
        ("a,b,label\n1,2,\n", r"row 1 .*no label.*drop the unlabeled row"),
        ("a,b,label\n1,2,0\n1,2\n", r"row 2 .*2 fields but the file has 3 columns"),
        ("a,b,target\n1,2,0\n", r"no label column 'label'; its columns are 'a', 'b', 'target'"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("a,b,label\n", "no data rows"),
        ("label\n1\n", "at least one feature column"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=pattern):
        load_csv(path)


def test_csv_argument_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "a,label\n1,0\n")
    with pytest.raises(DataError, match="header=False"):
        load_csv(path, label="label", header=False)
    with pytest.raises(DataError, match=r"out of range.*2 columns"):
        load_csv(path, label=5)
    with pytest.raises(DataError, match="not found"):
        load_csv(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="classes=1"):
        load_csv(write(tmp_path, "a,label\n1,3\n", "c.csv"), classes=1)
    with pytest.raises(DataError, match="float type"):
        load_csv(path, dtype=np.int64)


def test_csv_many_rows_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5)).round(4)
    y = rng.integers(0, 4, size=2000)
    path = tmp_path / "big.csv"
    np.savetxt(
        path,
        np.column_stack([y, x]),
        delimiter=",",
        fmt="%.4f",
        header="label,f0,f1,f2,f3,f4",
        comments="",
    )
    ds = load_csv(path, dtype=np.float64)
    np.testing.assert_allclose(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "node.npz"
    np.savez(path, features=np.ones((4, 3), np.float32), labels=np.array([0, 2, 1, 2]))
    ds = load_npz(path, x="features", y="labels")
    assert ds.x.shape == (4, 3) and ds.classes == 3 and ds.name == "node"
    reg = load_npz(path, x="features", y="labels", regression=True)
    assert reg.classes is None


def test_npz_object_array_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([[1], ["a"]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="object arrays are refused because they hold pickles"):
        load_npz(path)


def test_npz_refuses_pickles_and_other_files(tmp_path: Path) -> None:
    pkl = tmp_path / "model.npz"
    pkl.write_bytes(pickle.dumps({"x": [1, 2]}))
    with pytest.raises(DataError, match="pickle"):
        load_npz(pkl)
    npy = tmp_path / "one.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(DataError, match="single array"):
        load_npz(npy)
    csv = write(tmp_path, "a,label\n1,0\n")
    with pytest.raises(DataError, match="load_csv"):
        load_npz(csv)


def test_npz_missing_key_and_bad_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((2, 2)), y=np.array([0.0, 0.5]), names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"no array 'feats'.*'x', 'y', 'names'"):
        load_npz(path, x="feats")
    with pytest.raises(DataError, match="regression=True"):
        load_npz(path)
    with pytest.raises(DataError, match="map class names"):
        load_npz(path, y="names")
