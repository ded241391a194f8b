"""The HDF5 fast path must read exactly what h5py reads, or step aside (return None)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.scan import Severity, scan_file
from shoal.scan.hdf5 import root_string_attributes

h5py = pytest.importorskip("h5py")

KEYS = ("model_config", "training_config")


def _reference(path: Path) -> dict[str, str]:
    out = {}
    with h5py.File(path, "r") as f:
        for key in KEYS:
            if key in f.attrs:
                raw = f.attrs[key]
                out[key] = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    return out


def _fast(path: Path) -> dict[str, str] | None:
    data = path.read_bytes()
    return root_string_attributes(io.BytesIO(data), len(data), KEYS)


def _write(path: Path, attrs: dict[str, Any], **kwargs: Any) -> None:
    with h5py.File(path, "w", **kwargs) as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        f.create_dataset("w", data=np.ones(3))


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=300
)
_value = st.one_of(
    _text,  # variable-length UTF-8
    _text.map(lambda s: np.bytes_(s.encode("utf-8"))),  # fixed-length
    st.integers(-5, 5),
    st.lists(_text, min_size=1, max_size=3),  # an array, not a scalar
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    attrs=st.dictionaries(
        st.sampled_from([*KEYS, "backend", "keras_version", "x" * 40]), _value, max_size=4
    ),
    libver=st.sampled_from(["earliest", "latest"]),
    track_order=st.booleans(),
    extra=st.integers(0, 12),
    big=st.booleans(),
)
def test_fast_path_agrees_with_h5py(tmp_path, attrs, libver, track_order, extra, big):
    path = tmp_path / "a.h5"
    attrs = dict(attrs)
    for i in range(extra):  # many attributes push newer files into dense storage
        attrs[f"filler_{i}"] = i
    if big:  # too big for the first header chunk: continuation blocks
        attrs["model_config"] = json.dumps({"class_name": "X", "pad": "y" * 5000})
    _write(path, attrs, libver=libver, track_order=track_order)
    fast = _fast(path)
    try:
        expected = _reference(path)
    except (TypeError, ValueError, UnicodeDecodeError):
        assert fast is None  # h5py cannot give text for it, so the fast path must not either
        return
    if fast is not None:
        assert fast == expected


def test_common_layouts_take_the_fast_path(tmp_path):
    cfg = json.dumps({"class_name": "Sequential", "config": {"layers": []}})
    for kwargs in ({}, {"libver": "latest"}, {"track_order": True}):
        path = tmp_path / "m.h5"
        _write(path, {"model_config": cfg, "training_config": cfg, "backend": "tf"}, **kwargs)
        assert _fast(path) == {"model_config": cfg, "training_config": cfg}
        _write(path, {"model_config": np.bytes_(cfg.encode())}, **kwargs)
        assert _fast(path) == {"model_config": cfg}
        _write(path, {"other": 1}, **kwargs)
        assert _fast(path) == {}


def test_unusual_layouts_step_aside(tmp_path):
    path = tmp_path / "m.h5"
    attrs = {f"a{i}": i for i in range(20)} | {"model_config": "{}"}
    _write(path, attrs, libver="latest")  # dense attribute storage
    assert _fast(path) is None
    _write(path, {"model_config": "{}"}, userblock_size=512)
    assert _fast(path) is None
    _write(path, {"model_config": np.array([b"{}"])})
    assert _fast(path) is None
    data = path.read_bytes()
    for cut in (8, 40, 200, len(data) // 2):
        assert root_string_attributes(io.BytesIO(data[:cut]), cut, KEYS) is None


def test_scan_uses_h5py_when_fast_path_steps_aside(tmp_path):
    lam = {"class_name": "Lambda", "config": {"function": ["4wAAAA==", None, None]}}
    cfg = json.dumps({"class_name": "Sequential", "config": {"layers": [lam]}})
    path = tmp_path / "m.h5"
    attrs = {f"a{i}": i for i in range(20)} | {"model_config": cfg}
    _write(path, attrs, libver="latest")
    report = scan_file(path)
    assert (report.format, report.severity) == ("keras-h5", Severity.CRITICAL)
    _write(path, {"model_config": cfg}, libver="latest")
    report = scan_file(path)
    assert (report.format, report.severity) == ("keras-h5", Severity.CRITICAL)


def _lambda_config(name: str) -> str:
    layer = {"class_name": "Lambda", "config": {"name": name, "function": ["4wEAAAAA", None, None]}}
    return json.dumps({"class_name": "Sequential", "config": {"name": "m", "layers": [layer]}})


def _duplicate_heap_index(path: Path) -> None:
    """model_config and a second attribute as variable-length strings (global heap objects 1
    and 2), then object 2 renumbered 1: libhdf5 files objects by index, so the later one wins."""
    benign = json.dumps({"class_name": "Sequential", "config": {"name": "m", "layers": []}})
    evil = _lambda_config("runs")
    width = max(len(benign), len(evil))
    _write(path, {"model_config": benign.ljust(width), "other": evil.ljust(width)})
    raw = bytearray(path.read_bytes())
    heap = raw.find(b"GCOL")
    first = heap + 16  # 8 bytes of header + an 8-byte collection size
    second = first + 16 + (int.from_bytes(raw[first + 8 : first + 16], "little") + 7) // 8 * 8
    assert raw[first : first + 2] == b"\x01\x00" and raw[second : second + 2] == b"\x02\x00"
    raw[second : second + 2] = b"\x01\x00"
    path.write_bytes(bytes(raw))


def test_a_global_heap_index_used_twice_is_read_as_h5py_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "model.h5"
    _duplicate_heap_index(path)
    assert "Lambda" in _reference(path)["model_config"]  # what h5py (and Keras) read
    assert _fast(path) is None  # the fast path steps aside instead of reading the first copy
    report = scan_file(path)
    assert report.severity == Severity.CRITICAL, report.findings
    assert any(f.kind == "lambda-layer" for f in report.findings), report.findings
    # without h5py, the byte search still finds the Lambda config
    monkeypatch.setattr("shoal.scan.formats._optional_h5py", lambda: None)
    assert scan_file(path).severity >= Severity.MEDIUM
