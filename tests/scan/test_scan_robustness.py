"""The scanner never raises on hostile input: it reports instead, within its limits."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import UnsafeModelError
from shoal.scan import FileReport, ScanLimits, Severity, loads, scan_bytes

PREFIXES = [
    b"",
    b"\x80\x04\x95",
    b"\x80\x02",
    b"PK\x03\x04",
    b"\x93NUMPY\x01\x00",
    b"\x89HDF\r\n\x1a\n",
    b"\x1f\x8b\x08",
    b"BZh91AY&SY",
    b"\xfd7zXZ\x00",
    b"x\x9c",
    b"\x08\x07\x12",
    b"{",
    b"c",
]


def _check(report: FileReport) -> None:
    assert isinstance(report, FileReport)
    assert report.severity == max((f.severity for f in report.findings), default=Severity.NONE)
    assert all(f.kind != "scanner-error" for f in report.findings), report.findings


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(prefix, body):
    _check(scan_bytes(prefix + body))


def _samples() -> list[bytes]:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(4), b=np.array([1, "x"], dtype=object))
    npz = buf.getvalue()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
        zf.writestr("inner.zip", npz)
    return [pickle.dumps({"a": np.arange(3), "b": [1, "x"]}, protocol=p) for p in (0, 2, 4, 5)] + [
        npz,
        zbuf.getvalue(),
    ]


SAMPLES = _samples()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(SAMPLES) - 1),
    data=st.data(),
)
def test_mutated_real_files_never_raise(index, data):
    raw = bytearray(SAMPLES[index])
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4)
    )
    for pos, value in flips:
        raw[pos] = value
    _check(scan_bytes(bytes(raw[:cut])))


def test_every_truncation_of_a_pickle_is_reported_not_raised():
    data = pickle.dumps({"x": np.ones(3), "y": "text"}, protocol=4)
    for cut in range(1, len(data)):
        report = scan_bytes(data[:cut])
        _check(report)
        assert report.severity >= Severity.LOW


def test_deeply_nested_marks_hit_the_limit():
    data = b"\x80\x04" + b"(" * 5000 + b"."
    report = scan_bytes(data, limits=ScanLimits(max_pickle_stack=1000))
    assert "limit" in {f.kind for f in report.findings}


def test_deeply_nested_json_does_not_crash():
    report = scan_bytes(b'{"class_name": "A", "config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    _check(report)


def test_overlong_global_line_is_bounded():
    data = b"\x80\x02c" + b"a" * 200_000 + b"\nb\n."
    report = scan_bytes(data)
    _check(report)
    assert report.severity >= Severity.HIGH


def test_finding_flood_is_capped():
    body = b"".join(f"cmod{i}\nName\n0".encode() for i in range(2000))
    report = scan_bytes(b"\x80\x02" + body + b"N.", limits=ScanLimits(max_findings=50))
    assert len(report.findings) == 51
    assert report.findings[-1].kind == "limit"


def test_many_concatenated_pickles_are_capped():
    data = pickle.dumps(1) * 50
    report = scan_bytes(data, limits=ScanLimits(max_pickles_per_stream=10))
    assert "limit" in {f.kind for f in report.findings}


def test_total_decompression_budget_across_members():
    import zlib

    member = zlib.compress(pickle.dumps(b"\x00" * 400_000))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(5):
            zf.writestr(f"m{i}.gz", member)
    report = scan_bytes(buf.getvalue(), limits=ScanLimits(max_total_bytes=1_000_000))
    assert "limit" in {f.kind for f in report.findings}


def test_opcode_budget():
    data = b"\x80\x04" + b"N0" * 5000 + b"N."
    report = scan_bytes(data, limits=ScanLimits(max_pickle_ops=1000))
    assert "limit" in {f.kind for f in report.findings}


def _zip_needing_version(version: int) -> bytes:
    """A stored one-member zip whose central directory says extracting needs ``version``
    (zipfile raises NotImplementedError past 6.3)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("w.npy", b"\x80\x02N.")
    raw = bytearray(buf.getvalue())
    at = raw.find(b"PK\x01\x02")
    raw[at + 6] = version  # "version needed to extract", low byte
    return bytes(raw)


def test_a_zip_needing_a_newer_zip_version_is_reported_not_a_scanner_error():
    """Found by a mutation fuzz run over the benign corpus (3,000 files): zipfile raises
    NotImplementedError, which escaped the archive reader as a scanner error."""
    report = scan_bytes(_zip_needing_version(255))
    _check(report)
    assert report.severity == Severity.MEDIUM
    assert any("zip file version" in f.detail for f in report.findings), report.findings


def test_a_dtype_code_numpy_does_not_have_is_reported_not_a_scanner_error():
    """'f14' fits the plain type-code pattern, but np.dtype raises TypeError for it; under a
    BUILD the scanner let it escape (found by the same fuzz run)."""
    state = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    data = b"\x80\x02cnumpy\ndtype\nX\x03\x00\x00\x00f14\x89\x88\x87R" + state + b"b."
    _check(scan_bytes(data))  # pickle.load fails on it too (TypeError): nothing runs
    with pytest.raises(UnsafeModelError, match="f14"):
        loads(data)


def test_a_zip_member_with_an_empty_name_is_scanned_not_a_scanner_error():
    """ZipInfo.is_dir() indexes the last character of the name: an empty name raised
    IndexError out of the archive reader (found by a mutation fuzz run, 4,000 files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(""), b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.")
    report = scan_bytes(buf.getvalue())
    _check(report)
    assert report.severity == Severity.CRITICAL, report.findings
