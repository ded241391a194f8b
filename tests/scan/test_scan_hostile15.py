"""Hostile tester's files for issue 15 (hostile15): each test builds a file that broke a bound
of ``ScanLimits`` or the loader's promises, and shows it is now refused. Loads that could hang
or take gigabytes run in a subprocess with a timeout, so a regression fails instead of hanging
the suite."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import ScanLimits, Severity, load, loads, scan_file

P4 = b"\x80\x04"


def _long4(n: int) -> bytes:
    """LONG4 of an ``n``-byte positive integer (0x7f bytes): hashing it costs time in n."""
    return b"\x8b" + struct.pack("<i", n) + b"\x7f" * n


_RUN = """
import sys, time
from shoal.errors import ShoalError
from shoal.scan import loads
from shoal.scan.report import ScanLimits
start = time.monotonic()
try:
    loads(open(sys.argv[1], "rb").read(), limits=ScanLimits(max_seconds=float(sys.argv[2])))
    print("LOADED", round(time.monotonic() - start, 1))
except ShoalError as exc:
    print("REFUSED", round(time.monotonic() - start, 1), str(exc)[:300])
"""


def _load_in_subprocess(tmp_path: Path, data: bytes, max_seconds: float, timeout: float) -> str:
    path = tmp_path / "bomb.pkl"
    path.write_bytes(data)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUN, str(path), str(max_seconds)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the load ran past {timeout} s with a {max_seconds} s time budget")
    assert done.returncode == 0, f"the loader crashed ({done.returncode}): {done.stderr[-500:]}"
    return done.stdout


# --- text that costs more memory than its bytes ------------------------------------------------


def test_text_that_widens_in_memory_is_charged():
    # 8 MiB of ASCII and one astral character: 8 MiB of UTF-8, a 32 MiB str (4 bytes a
    # character); 4 such strings in a list are 128 MiB of objects from 32 MiB of file
    text = ("a" * (8 << 20) + "\U0001f600").encode()
    one = b"\x8d" + struct.pack("<Q", len(text)) + text  # BINUNICODE8
    data = P4 + b"(" + one * 4 + b"l."
    limits = ScanLimits(max_object_bytes=64 << 20)
    with pytest.raises(UnsafeModelError, match="max_object_bytes"):
        loads(data, limits=limits)


def test_protocol_0_text_that_widens_in_memory_is_charged():
    # UNICODE's raw-unicode-escape line: 1 MiB of ASCII and one escaped astral character
    line = b"V" + b"a" * ((1 << 20) - 16) + b"\\U0001f600\n"
    data = b"(" + line * 16 + b"l."
    with pytest.raises(UnsafeModelError, match="max_object_bytes"):
        loads(data, limits=ScanLimits(max_object_bytes=32 << 20))


def test_plain_text_is_not_charged_twice():
    import pickle

    value = ["a" * (1 << 20), "\u00e9" * (1 << 19), b"x" * (1 << 20)]
    assert loads(pickle.dumps(value, protocol=4), limits=ScanLimits(max_object_bytes=1 << 20)) == (
        value
    )


# --- zip members compressed with LZMA (method 14) -----------------------------------------------


def _lzma_npz(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:
        zf.writestr("x.npy", buf.getvalue())


def test_an_lzma_npz_member_is_bounded_like_other_streams(tmp_path):
    # np.load reads LZMA members (zipfile does); zipfile's own reader has none of shoal's
    # bounds, so a 24 MiB member passed a max_total_bytes of 8 MiB (and a 4 GiB default)
    path = tmp_path / "zeros.npz"
    _lzma_npz(path, np.zeros(24 << 20, dtype=np.uint8))
    assert path.stat().st_size < 64 << 10
    assert np.load(path)["x"].nbytes == 24 << 20  # numpy reads it
    limits = ScanLimits(max_total_bytes=8 << 20)
    report = scan_file(path, limits=limits)
    assert report.severity >= Severity.MEDIUM, report.findings
    assert any("max_total_bytes" in f.detail for f in report.findings), report.findings
    with pytest.raises(UnsafeModelError, match="max_total_bytes"):
        load(path, limits=limits)
    # all-zero weights are judged as other streams judge them: not flagged below ratio_after
    assert scan_file(path).severity < Severity.MEDIUM


def test_an_lzma_npz_member_still_loads(tmp_path):
    path = tmp_path / "small.npz"
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    _lzma_npz(path, arr)
    assert scan_file(path).severity < Severity.MEDIUM
    out = load(path)
    assert out["x"].dtype == arr.dtype and np.array_equal(out["x"], arr)
