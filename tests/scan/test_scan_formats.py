"""Format sniffing and the container formats: torch, joblib, NumPy, archives, Keras, ONNX."""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import lzma
import pickle
import struct
import tarfile
import warnings
import zipfile
import zlib

import numpy as np
import pytest

from shoal.scan import ScanLimits, Severity, scan_bytes, scan_file


def kinds(report) -> set[str]:
    return {f.kind for f in report.findings}


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _pb_varint(field << 3) + _pb_varint(value)
    return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value


def onnx_model(*, external: str | None = None, domain: str = "") -> bytes:
    node = (
        _pb(1, b"x") + _pb(2, b"y") + _pb(4, b"Relu") + (_pb(7, domain.encode()) if domain else b"")
    )
    tensor = _pb(1, 4) + _pb(2, 1) + _pb(8, b"w")
    if external is None:
        tensor += _pb(9, struct.pack("<4f", 1, 2, 3, 4))
    else:
        tensor += _pb(13, _pb(1, b"location") + _pb(2, external.encode())) + _pb(14, 1)
    graph = _pb(1, node) + _pb(2, b"g") + _pb(5, tensor)
    return _pb(1, 8) + _pb(2, b"test") + _pb(7, graph) + _pb(8, _pb(2, 17))


class TestTorch:
    torch = pytest.importorskip("torch")

    def _save(self, obj, **kw) -> bytes:
        buf = io.BytesIO()
        self.torch.save(obj, buf, **kw)
        return buf.getvalue()

    def test_state_dicts_are_clean(self):
        net = self.torch.nn.Sequential(
            self.torch.nn.Conv2d(1, 2, 3), self.torch.nn.BatchNorm2d(2), self.torch.nn.Linear(4, 2)
        )
        for legacy in (False, True):
            data = self._save(net.state_dict(), _use_new_zipfile_serialization=not legacy)
            report = scan_bytes(data, name="m.pt")
            assert report.format == ("torch-legacy" if legacy else "torch")
            assert report.severity == Severity.NONE, report.findings

    def test_parameters_and_nested_checkpoint(self):
        lin = self.torch.nn.Linear(3, 2)
        ckpt = {"p": self.torch.nn.Parameter(self.torch.ones(2)), "sd": lin.state_dict(), "step": 3}
        assert scan_bytes(self._save(ckpt)).severity == Severity.NONE

    def test_malicious_object_in_torch_zip(self, evil):
        for legacy in (False, True):
            data = self._save({"x": evil}, _use_new_zipfile_serialization=not legacy)
            report = scan_bytes(data)
            assert report.severity == Severity.CRITICAL
            assert report.format.startswith("torch")

    def test_whole_module_is_not_allowlisted(self):
        report = scan_bytes(self._save(self.torch.nn.Linear(2, 2)))
        assert report.severity >= Severity.MEDIUM

    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_torchscript_is_flagged(self):
        buf = io.BytesIO()
        self.torch.jit.save(self.torch.jit.script(self.torch.nn.Linear(2, 2)), buf)
        report = scan_bytes(buf.getvalue())
        assert report.format == "torchscript"
        assert "torchscript" in kinds(report)


def test_torch_zip_with_encrypted_flag_is_still_scanned(make_zip, evil_pickle):
    data = bytearray(make_zip({"archive/data.pkl": evil_pickle, "archive/version": b"3\n"}))
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos >= 0:
            data[pos + off] |= 1
            pos = data.find(sig, pos + 4)
    report = scan_bytes(bytes(data))
    assert report.severity == Severity.CRITICAL


def test_torch_zip_with_any_name_is_sniffed(make_zip, evil_pickle):
    report = scan_bytes(make_zip({"weird/data.pkl": evil_pickle}), name="model.bin")
    assert report.format == "torch"
    assert report.severity == Severity.CRITICAL


def _fitted():
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_iris(return_X_y=True)
    return RandomForestClassifier(n_estimators=2, random_state=0).fit(x, y)


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_joblib_benign_every_compression(tmp_path, compress):
    import joblib

    path = tmp_path / "m.joblib"
    joblib.dump(
        {"model": _fitted(), "names": np.array(["a", None], dtype=object)}, path, compress=compress
    )
    report = scan_file(path)
    assert report.format.startswith("joblib")
    assert report.severity == Severity.NONE, report.findings


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_joblib_malicious_every_compression(tmp_path, compress, evil):
    import joblib

    path = tmp_path / "m.joblib"
    joblib.dump({"a": np.arange(5), "evil": evil}, path, compress=compress)
    assert scan_file(path).severity == Severity.CRITICAL


def test_joblib_payload_inside_object_array(tmp_path, evil):
    import joblib

    arr = np.empty(2, dtype=object)
    arr[0] = evil
    path = tmp_path / "m.joblib"
    joblib.dump({"pre": np.ones(3), "arr": arr}, path)
    assert scan_file(path).severity == Severity.CRITICAL


def test_joblib_truncated_array_data_is_malformed(tmp_path):
    import joblib

    path = tmp_path / "m.joblib"
    joblib.dump(np.ones(1000), path)
    data = path.read_bytes()
    report = scan_bytes(data[:-100])
    assert "malformed" in kinds(report)


@pytest.mark.parametrize("codec", [zlib.compress, gzip.compress, bz2.compress, lzma.compress])
def test_compressed_raw_pickles(codec, evil_pickle):
    assert scan_bytes(codec(evil_pickle)).severity == Severity.CRITICAL
    assert scan_bytes(codec(pickle.dumps([1, 2]))).severity == Severity.NONE


def test_corrupt_compressed_stream_is_reported(evil_pickle):
    data = bytearray(zlib.compress(evil_pickle * 50))
    data[20:40] = b"\x00" * 20
    report = scan_bytes(bytes(data))
    assert report.severity >= Severity.MEDIUM


def test_decompression_limit():
    data = zlib.compress(pickle.dumps(b"\x00" * 5_000_000))
    report = scan_bytes(data, limits=ScanLimits(max_member_bytes=1_000_000))
    assert "limit" in kinds(report)


class TestNumpy:
    def test_npy_and_npz(self):
        for save in (np.save,):
            buf = io.BytesIO()
            save(buf, np.arange(12.0).reshape(3, 4))
            report = scan_bytes(buf.getvalue())
            assert (report.format, report.severity) == ("numpy", Severity.NONE)
        for savez in (np.savez, np.savez_compressed):
            buf = io.BytesIO()
            savez(buf, a=np.ones(3), b=np.zeros((2, 2), dtype=np.int8))
            report = scan_bytes(buf.getvalue())
            assert (report.format, report.severity) == ("npz", Severity.NONE)

    def test_structured_and_fortran(self):
        buf = io.BytesIO()
        np.save(buf, np.asfortranarray(np.zeros((3, 2), dtype=[("a", "<f4"), ("b", "<i8")])))
        assert scan_bytes(buf.getvalue()).severity == Severity.NONE

    def test_object_arrays(self, evil):
        buf = io.BytesIO()
        np.save(buf, np.array([1, "x", None], dtype=object), allow_pickle=True)
        report = scan_bytes(buf.getvalue())
        assert report.severity == Severity.LOW  # a pickle, but only data
        arr = np.empty(1, dtype=object)
        arr[0] = evil
        for save in (np.save, np.savez):
            buf = io.BytesIO()
            save(buf, arr, allow_pickle=True) if save is np.save else save(buf, x=arr)
            assert scan_bytes(buf.getvalue()).severity == Severity.CRITICAL

    def test_truncated_and_bad_header(self):
        buf = io.BytesIO()
        np.save(buf, np.ones(100))
        data = buf.getvalue()
        assert "truncated" in kinds(scan_bytes(data[:-10]))
        bad = data.replace(b"'descr'", b"'descX'")
        assert "malformed" in kinds(scan_bytes(bad))
        # a malformed file is something the scanner cannot vouch for: never below medium
        assert scan_bytes(data[:9]).severity == Severity.MEDIUM


class TestArchives:
    def test_nested_zips(self, make_zip, evil_pickle):
        inner = make_zip({"x/payload.bin": evil_pickle}, method=zipfile.ZIP_DEFLATED)
        outer = make_zip({"level1.zip": make_zip({"level2.zip": inner})})
        report = scan_bytes(outer)
        assert report.severity == Severity.CRITICAL
        assert any("level1.zip/level2.zip/x/payload.bin" in f.detail for f in report.findings)

    def test_depth_limit(self, make_zip, evil_pickle):
        data = evil_pickle
        for i in range(5):
            data = make_zip({f"l{i}.zip": data})
        report = scan_bytes(data, limits=ScanLimits(max_depth=2))
        assert "limit" in kinds(report)
        assert report.severity >= Severity.MEDIUM

    def test_tar_members_are_scanned(self, evil_pickle):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in (("ok.pkl", pickle.dumps([1])), ("../evil.pkl", evil_pickle)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        report = scan_bytes(buf.getvalue())
        assert report.severity == Severity.CRITICAL
        assert "path-traversal" in kinds(report)

    def test_polyglot_pickle_with_appended_zip(self, make_zip, evil_pickle):
        report = scan_bytes(evil_pickle + make_zip({"a.npy": b"x"}))
        assert report.severity == Severity.CRITICAL
        assert "polyglot" in kinds(report)

    def test_bad_zip_is_reported(self, make_zip):
        data = make_zip({"a.pkl": pickle.dumps(1)})
        report = scan_bytes(data[: len(data) // 2])
        assert report.severity >= Severity.MEDIUM

    def test_path_traversal_member_name(self, make_zip):
        assert "path-traversal" in kinds(scan_bytes(make_zip({"../../x.txt": b"hi"})))


class TestSafetensors:
    def _file(self) -> bytes:
        from safetensors.numpy import save

        return save({"w": np.ones((3, 4), dtype=np.float32), "b": np.zeros(2, dtype=np.int64)})

    def test_valid(self):
        report = scan_bytes(self._file())
        assert (report.format, report.severity) == ("safetensors", Severity.NONE)

    def test_overlapping_offsets_and_truncation(self):
        header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}  # fmt: skip
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + bytes(12)
        report = scan_bytes(data)
        assert report.format == "safetensors"
        assert "malformed" in kinds(report)
        assert report.severity == Severity.MEDIUM
        assert "malformed" in kinds(scan_bytes(self._file()[:-3]))


class TestOnnx:
    def test_valid_model(self):
        report = scan_bytes(onnx_model(), name="m.onnx")
        assert (report.format, report.severity) == ("onnx", Severity.NONE)

    def test_external_data(self):
        assert scan_bytes(onnx_model(external="w.bin")).severity == Severity.LOW
        report = scan_bytes(onnx_model(external="../../etc/passwd"))
        assert report.severity == Severity.HIGH
        assert "path-traversal" in kinds(report)

    def test_custom_domain(self):
        assert "custom-operator" in kinds(scan_bytes(onnx_model(domain="com.evil")))

    def test_truncated(self):
        data = onnx_model()
        report = scan_bytes(data[:-5], name="m.onnx")
        assert report.format == "onnx"
        assert "malformed" in kinds(report)


def _dense(name: str) -> dict:
    return {"module": "keras.layers", "class_name": "Dense", "config": {"name": name, "units": 2},
            "registered_name": None}  # fmt: skip


def _keras(layers: list, make_zip) -> bytes:
    config = {"name": "s", "layers": [_dense("a"), *layers]}
    cfg = {"module": "keras", "class_name": "Sequential", "config": config}
    return make_zip({"metadata.json": b"{}", "config.json": json.dumps(cfg).encode(),
                     "model.weights.h5": b"\x89HDF\r\n\x1a\n" + bytes(32)})  # fmt: skip


_CODE = {"code": base64.b64encode(b"\xe3abc").decode()}
_FN = {"class_name": "__lambda__", "config": _CODE}
LAMBDA_K3 = {
    "module": "keras.layers",
    "class_name": "Lambda",
    "config": {"name": "l", "function": _FN},
}
LAMBDA_K2 = {"class_name": "Lambda", "config": {"name": "l", "function": ["4wAAAA==", None, None],
                                                 "function_type": "lambda"}}  # fmt: skip


class TestKeras:
    def test_keras_v3(self, make_zip, monkeypatch):
        monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # byte-search path
        assert scan_bytes(_keras([], make_zip)).severity == Severity.NONE
        report = scan_bytes(_keras([LAMBDA_K3], make_zip))
        assert report.format == "keras"
        assert report.severity == Severity.CRITICAL
        assert "lambda-layer" in kinds(report)

    def test_function_and_module_references(self, make_zip, monkeypatch):
        monkeypatch.setitem(__import__("sys").modules, "h5py", None)
        fn = {"module": "builtins", "class_name": "function", "config": "exec"}
        assert (
            scan_bytes(_keras([{**_dense("b"), "config": {"activation": fn}}], make_zip)).severity
            == Severity.CRITICAL
        )
        custom = {"module": "mypkg.layers", "class_name": "Mine", "config": {}}
        assert scan_bytes(_keras([custom], make_zip)).severity >= Severity.HIGH
        registered = {"class_name": "Mine", "config": {}, "registered_name": "Custom>Mine"}
        assert scan_bytes(_keras([registered], make_zip)).severity == Severity.MEDIUM

    def test_h5_without_h5py(self, monkeypatch):
        monkeypatch.setitem(__import__("sys").modules, "h5py", None)
        good = {
            "class_name": "Sequential",
            "config": {"layers": [{"class_name": "Dense", "config": {}}]},
        }
        bad = {"class_name": "Sequential", "config": {"layers": [LAMBDA_K2]}}
        head = b"\x89HDF\r\n\x1a\n" + bytes(300) + b"model_config" + bytes(50)
        report = scan_bytes(head + json.dumps(good).encode() + bytes(100))
        assert report.format == "keras-h5"
        assert report.severity == Severity.LOW  # found by byte search, structure unverified
        assert scan_bytes(head + json.dumps(bad).encode()).severity == Severity.CRITICAL
        assert scan_bytes(head + bytes(100)).severity == Severity.MEDIUM  # config not readable

    def test_h5_with_h5py(self, tmp_path):
        h5py = pytest.importorskip("h5py")
        for layers, expected in (
            ([{"class_name": "Dense", "config": {}}], Severity.NONE),
            ([LAMBDA_K2], Severity.CRITICAL),
        ):
            path = tmp_path / "m.h5"
            with h5py.File(path, "w") as f:
                f.attrs["model_config"] = json.dumps(
                    {"class_name": "Sequential", "config": {"layers": layers}}
                )
                f.create_dataset("w", data=np.ones(3))
            report = scan_file(path)
            assert report.format == "keras-h5"
            assert report.severity == expected

    def test_standalone_json_config(self):
        cfg = {"class_name": "Sequential", "config": {"layers": [LAMBDA_K2]}}
        report = scan_bytes(json.dumps(cfg).encode())
        assert (report.format, report.severity) == ("keras-config", Severity.CRITICAL)
        assert scan_bytes(b'{"a": 1}').format == "json"


def test_content_not_extension_decides(tmp_path, evil_pickle):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(evil_pickle)
    report = scan_file(path)
    assert report.format == "pickle"
    assert report.severity == Severity.CRITICAL


def test_unknown_and_empty_files():
    assert scan_bytes(b"").format == "empty"
    report = scan_bytes(b"hello, world\n")
    assert (report.format, report.severity) == ("unknown", Severity.MEDIUM)


def test_sklearn_warnings_do_not_leak():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_bytes(pickle.dumps(_fitted()))
