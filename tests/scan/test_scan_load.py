"""Safe loading: benign files round-trip, anything unsafe is refused before it runs."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from shoal.errors import ConfigError, UnsafeModelError
from shoal.scan import RestrictedUnpickler, load, restricted_loads


def _model():
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y), x


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickled_sklearn_round_trips(tmp_path, protocol):
    model, x = _model()
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(model, protocol=protocol))
    loaded = load(path)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_joblib_round_trips(tmp_path, compress):
    import joblib

    model, x = _model()
    path = tmp_path / "m.joblib"
    extra = np.array(["a", None, 3], dtype=object)
    joblib.dump(
        {"model": model, "extra": extra, "f": np.asfortranarray(np.ones((3, 2)))},
        path,
        compress=compress,
    )
    loaded = load(path)
    np.testing.assert_array_equal(loaded["model"].predict(x), model.predict(x))
    assert list(loaded["extra"]) == ["a", None, 3]
    assert loaded["f"].flags.f_contiguous


def test_numpy_formats_round_trip(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.save(tmp_path / "a.npy", np.asfortranarray(a))
    np.testing.assert_array_equal(load(tmp_path / "a.npy"), a)
    np.savez_compressed(tmp_path / "b.npz", a=a, s=np.array(["x", "yz"]))
    out = load(tmp_path / "b.npz")
    np.testing.assert_array_equal(out["a"], a)
    assert list(out["s"]) == ["x", "yz"]
    np.save(tmp_path / "o.npy", np.array([1, "two", None], dtype=object), allow_pickle=True)
    assert list(load(tmp_path / "o.npy")) == [1, "two", None]


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((2, 3), dtype=np.float32)}, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(load(tmp_path / "w.safetensors")["w"], np.ones((2, 3)))


def test_torch_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(3, 2)
    for legacy in (False, True):
        path = tmp_path / f"m{legacy}.pt"
        torch.save(lin.state_dict(), path, _use_new_zipfile_serialization=not legacy)
        loaded = load(path)
        assert torch.equal(loaded["weight"], lin.weight.detach())


def test_malicious_files_are_refused(tmp_path, evil, evil_pickle, make_zip):
    import joblib

    cases = {
        "a.pkl": evil_pickle,
        "b.pt": make_zip({"archive/data.pkl": evil_pickle}),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    joblib.dump({"x": evil}, tmp_path / "c.joblib", compress=3)
    arr = np.empty(1, dtype=object)
    arr[0] = evil
    np.save(tmp_path / "d.npy", arr, allow_pickle=True)
    for name in ("a.pkl", "b.pt", "c.joblib", "d.npy"):
        with pytest.raises(
            UnsafeModelError, match=r"refusing to load: critical unsafe-import.*system"
        ):
            load(tmp_path / name)


def test_unknown_classes_are_refused(tmp_path):
    path = tmp_path / "m.pkl"
    path.write_bytes(b"\x80\x04\x8c\x06mypkg.\x8c\x03Net\x93)R.".replace(b"mypkg.", b"mypkg\x8c"))
    with pytest.raises(UnsafeModelError):
        load(path)


def test_restricted_unpickler_enforces_allowlist_itself(evil_pickle):
    with pytest.raises(UnsafeModelError, match="not on shoal's allowlist"):
        restricted_loads(evil_pickle)
    with pytest.raises(UnsafeModelError, match="persistent id"):
        RestrictedUnpickler(io.BytesIO(b"\x80\x02X\x01\x00\x00\x00xQ.")).load()
    assert restricted_loads(pickle.dumps({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]


def test_unloadable_format_is_a_config_error(tmp_path):
    (tmp_path / "t.txt").write_text("plain text\n")
    with pytest.raises(ConfigError, match="does not load"):
        load(tmp_path / "t.txt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.pkl")
