"""Whatever the bytes, ``scan`` and ``load`` raise only ShoalError subclasses.

Mutated benign files of every format shoal loads, and random bytes behind each format's magic.
CI replays a fixed, derandomized set (tests/conftest.py); for a release check run many more:

    SHOAL_FUZZ_EXAMPLES=20000 python -m pytest -q tests/scan/test_scan_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import ShoalError
from shoal.scan import ScanLimits, load, scan_file

EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "150"))
# Small limits keep each example fast; the limits' own behaviour is tested elsewhere.
LIMITS = ScanLimits(max_seconds=20.0, max_total_bytes=64 << 20, max_container_items=1_000_000)


def _samples() -> list[bytes]:
    import joblib

    obj = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "o": np.array([1, "x", None], dtype=object),
        "meta": {"epoch": 3, "name": "m", "t": (1.5, None)},
    }
    out = [pickle.dumps(obj, protocol=p) for p in (0, 2, 4, 5)]
    for comp in (0, ("zlib", 3), ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)):
        buf = io.BytesIO()
        joblib.dump(obj, buf, compress=comp)
        out.append(buf.getvalue())
    for arr in (obj["w"], obj["o"]):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    np.savez_compressed(buf, w=obj["w"])
    out.append(buf.getvalue())
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("inner.npz", out[-1])
    out.append(zbuf.getvalue())
    try:
        import torch
    except ImportError:
        return out
    sd = torch.nn.Linear(3, 2).state_dict()
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
        out.append(buf.getvalue())
    from safetensors.torch import save

    out.append(save(sd))
    return out


SAMPLES = _samples()
PREFIXES = [
    b"",
    b"\x80\x02",
    b"\x80\x04\x95",
    b"PK\x03\x04",
    b"\x93NUMPY\x01\x00",
    b"\x89HDF\r\n\x1a\n",
    b"\x1f\x8b\x08",
    b"BZh91AY&SY",
    b"\xfd7zXZ\x00",
    b"x\x9c",
    b"]\x00\x00\x80\x00",
    b"{",
    b"I0x",
]


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="shoal-fuzz-") as d:
        yield Path(d)


def _only_shoal_errors(path: Path) -> None:
    report = scan_file(path, limits=LIMITS)
    assert all(f.kind != "scanner-error" for f in report.findings), report.findings
    with contextlib.suppress(ShoalError):  # a clear refusal is what the contract allows
        load(path, limits=LIMITS)


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@_SETTINGS
@given(index=st.integers(0, len(SAMPLES) - 1), data=st.data())
def test_mutated_files_raise_only_shoal_errors(workdir, index, data):
    raw = bytearray(SAMPLES[index])
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if how == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif how == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        if not raw:
            break
    cut = data.draw(st.integers(0, len(raw)))
    path = workdir / "mutated"
    path.write_bytes(bytes(raw[:cut] if data.draw(st.booleans()) else raw))
    _only_shoal_errors(path)


@_SETTINGS
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=600))
def test_random_bytes_raise_only_shoal_errors(workdir, prefix, body):
    path = workdir / "random"
    path.write_bytes(prefix + body)
    _only_shoal_errors(path)
