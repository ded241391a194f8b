"""shoal.scan.load: benign files load exactly as their own loaders load them (a differential
test), and nothing the file names is ever called."""

from __future__ import annotations

import collections
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import ShoalError, UnsafeModelError
from shoal.scan import load, loads, restricted_loads

# Appended, not inserted first: benchmarks/grpc.py would shadow the grpc package for every
# test that imports it later in the same session (tests/cli/test_audit_cli.py failed after this).
sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scan_corpus


def same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality that also compares types, dtypes, memory order and tensor flags."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.flags.f_contiguous == b.flags.f_contiguous, where
        if a.dtype.hasobject:
            for i, (x, y) in enumerate(zip(a.ravel(), b.ravel(), strict=True)):
                same(x, y, f"{where}[{i}]")
        else:
            assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
        return
    if type(a).__module__.startswith("torch"):
        import torch

        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
            assert a.requires_grad == b.requires_grad, where
            assert torch.equal(a, b), where
            return
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
        return
    if isinstance(a, float) and a != a:
        assert b != b, where
        return
    assert a == b, where


def reference(path: Path) -> Any:
    """The file's own loader (on files this test wrote itself)."""
    data = path.read_bytes()
    if path.suffix == ".joblib":
        import joblib

        return joblib.load(path)
    if path.suffix == ".pt":
        import torch

        return torch.load(path, weights_only=True)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=True)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    return pickle.loads(data)


def _objects() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "plain": {
            "ints": [0, 1, -1, 255, 65535, 2**31, -(2**63), 2**100],
            "floats": [0.0, -1.5, float("inf"), float("nan")],
            "text": ["", "é", "x" * 300],
            "bytes": [b"", b"\x00\xff" * 200],
            "nested": ({"a": (1, 2)}, [None, True, False]),
            "sets": [{1, 2}, frozenset({"a"})],
            "complex": 1 + 2j,
            "bytearray": bytearray(b"abc"),
            "od": collections.OrderedDict([("z", 1), ("a", 2)]),
        },
        "arrays": {
            "f64": rng.normal(size=(5, 3)),
            "f32_fortran": np.asfortranarray(rng.normal(size=(4, 6)).astype(np.float32)),
            "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
            "bool": np.array([True, False]),
            "u8": np.arange(256, dtype=np.uint8),
            "c64": np.array([1 + 1j], dtype=np.complex64),
            "str": np.array(["ab", "c"]),
            "bytes": np.array([b"x", b"yz"]),
            "datetime": np.array(["2020-01-01", "2021-06-01"], dtype="M8[D]"),
            "empty": np.zeros((0, 3)),
            "scalar0d": np.array(3.5),
            "structured": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i8")]),
            "np_scalar": np.float32(2.5),
            "np_int": np.int64(-7),
            "object": np.array([1, "x", None, 2.5], dtype=object),
        },
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The benchmark's benign corpus plus this test's own files, in every format shoal loads."""
    import joblib

    root = tmp_path_factory.mktemp("benign")
    (root / "bench").mkdir()
    files = scan_corpus.benign(root / "bench")
    own = root / "own"
    own.mkdir()
    for name, obj in _objects().items():
        for proto in range(6):
            p = own / f"{name}_p{proto}.pkl"
            p.write_bytes(pickle.dumps(obj, protocol=proto))
            files.append(p)
        for comp in (0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3), ("zlib", 3)):
            tag = comp if isinstance(comp, int) else comp[0]
            p = own / f"{name}_c{tag}.joblib"
            joblib.dump(obj, p, compress=comp)
            files.append(p)
    for name, arr in _objects()["arrays"].items():
        if isinstance(arr, np.ndarray):
            p = own / f"{name}.npy"
            np.save(p, arr, allow_pickle=True)
            files.append(p)
    np.savez(own / "arrays.npz", **{k: v for k, v in _objects()["arrays"].items() if k != "object"})
    files.append(own / "arrays.npz")
    return files


_SKLEARN_FILES = {"logreg", "forest", "mlp", "scaler", "pipeline"}


def test_benign_corpus_loads_as_its_own_loaders_load_it(corpus):
    loaded = refused = 0
    for path in corpus:
        if path.suffix in (".onnx", ".keras", ".h5"):
            continue  # formats shoal.scan.load does not load (they have no pickle)
        try:
            got = load(path)
        except UnsafeModelError as exc:
            # the only refusals: the scikit-learn models (estimators are classes, which shoal
            # does not build), each refused by the name of the first class it meets
            assert path.stem.split("_")[0] in _SKLEARN_FILES, (path, exc)
            assert "refused: the file names " in str(exc), exc
            refused += 1
            continue
        same(got, reference(path), path.name)
        loaded += 1
    sklearn = sum(p.stem.split("_")[0] in _SKLEARN_FILES for p in corpus)
    assert refused == sklearn and loaded >= 45, (loaded, refused)


def test_torch_tensors_are_cpu_views_and_parameters(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(12.0)
    obj = {
        "view": base[2:10:2],
        "t": base.reshape(3, 4).t(),
        "p": torch.nn.Parameter(torch.ones(2)),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "long": torch.arange(3),
        "nested": [{"x": torch.zeros(0)}],
    }
    for legacy in (False, True):
        path = tmp_path / f"m{legacy}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        got = load(path)
        same(got, torch.load(path, weights_only=True), path.name)
        assert isinstance(got["p"], torch.nn.Parameter)
        assert got["view"].untyped_storage().data_ptr() == got["t"].untyped_storage().data_ptr()


def test_a_loaded_state_dict_restores_a_module(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    fresh.load_state_dict(load(tmp_path / "m.pt"))
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_other_classes_are_refused_by_name(tmp_path):
    from sklearn.linear_model import LogisticRegression

    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression()))
    with pytest.raises(UnsafeModelError, match=r"sklearn\.linear_model.*LogisticRegression"):
        load(path)
    with pytest.raises(UnsafeModelError, match="does not build"):
        loads(pickle.dumps(LogisticRegression()))


def test_restricted_loads_is_the_same_interpreter():
    assert restricted_loads(pickle.dumps({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]
    with pytest.raises(UnsafeModelError, match="persistent id"):
        restricted_loads(b"\x80\x02X\x01\x00\x00\x00xQ.")
    with pytest.raises(UnsafeModelError, match=r"collections\.defaultdict"):
        restricted_loads(pickle.dumps(collections.defaultdict(int)))


@pytest.mark.parametrize(
    ("pickle_bytes", "message"),
    [
        # BUILD on a container the file did not get from shoal: a dict is not an object
        (b"\x80\x02}(X\x01\x00\x00\x00aK\x01u}b.", "BUILD on a dict"),
        # APPEND to a tuple, SETITEM on an array, ADDITEMS on a list
        (b"\x80\x02)K\x01a.", "APPEND to a tuple"),
        (pickle.dumps(np.arange(3), protocol=2)[:-1] + b"K\x00K\x01s.", "SETITEM on a ndarray"),
        (b"\x80\x04](\x90.", "ADDITEMS on a list"),
        # attributes starting with "_" on the one object that takes attributes
        (b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00_evilK\x01sb.", "_evil"),
        # extension registry, out-of-band buffers
        (b"\x80\x02\x82\x01.", "extension code"),
        (b"\x80\x05\x97.", "out-of-band"),
        # an array state whose data is not raw bytes, or does not fit the shape
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            b"(K\x01K\x04\x85cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
            b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            b"\x89C\x08\x00\x00\x00\x00\x00\x00\x00\x00tb.",
            "needs 32 bytes",
        ),
    ],
)
def test_structural_refusals(pickle_bytes, message):
    with pytest.raises(UnsafeModelError, match=message):
        loads(pickle_bytes)


def test_numpy_scalar_of_object_dtype_is_refused():
    obj = b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
    obj += b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tbK\x01\x86R."
    with pytest.raises(UnsafeModelError, match="scalar"):
        loads(obj)


def test_unloadable_format_is_refused_without_pointing_elsewhere(tmp_path):
    (tmp_path / "m.onnx").write_bytes(scan_corpus.onnx_model())
    with pytest.raises(UnsafeModelError) as info:
        load(tmp_path / "m.onnx")
    assert "does not load onnx" in str(info.value)
    assert "own library" not in str(info.value)


def test_missing_file_is_a_shoal_error(tmp_path):
    with pytest.raises(ShoalError):
        load(tmp_path / "nope.pkl")
