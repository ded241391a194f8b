"""Bounded resources: every limit of ScanLimits is enforced and reported as a finding (scan) or
a clear UnsafeModelError (load), never a crash, a hang or gigabytes of memory."""

from __future__ import annotations

import bz2
import io
import pickle
import struct
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import ConfigError, UnsafeModelError
from shoal.scan import ScanLimits, Severity, load, loads, scan_bytes, scan_file


def peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(result or exception, peak Python heap bytes while running fn)."""
    tracemalloc.start()
    try:
        try:
            out: Any = fn()
        except Exception as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def limit_details(report: Any) -> list[str]:
    return [f.detail for f in report.findings if f.kind in ("limit", "allocation")]


# --- the memo: a 9-byte pickle that makes pickle.load allocate gigabytes -----------------------

NINE_BYTES = b"\x80\x04Nr\xff\xff\xff\x7f."  # PROTO 4, NONE, LONG_BINPUT 2**31 - 1, STOP


def test_nine_byte_memo_bomb(tmp_path):
    assert len(NINE_BYTES) == 9
    report = scan_bytes(NINE_BYTES)
    assert report.severity == Severity.MEDIUM
    assert any("memo index 2147483647" in d for d in limit_details(report))
    path = tmp_path / "bomb.pkl"
    path.write_bytes(NINE_BYTES)
    out, peak = peak_bytes(lambda: load(path))
    assert isinstance(out, UnsafeModelError) and "memo index" in str(out)
    assert peak < 16 << 20
    with pytest.raises(UnsafeModelError, match=r"memo index 2147483647"):
        loads(NINE_BYTES)  # the interpreter alone refuses it too


def test_memo_entry_count_limit():
    data = b"\x80\x04" + b"N\x94" * 2000 + b"."
    with pytest.raises(UnsafeModelError, match="memo"):
        loads(data, limits=ScanLimits(max_memo=100))


# --- containers: tuples of tuples, and arrays built many times from one buffer ----------------


def _tuple_bomb(levels: int, width: int) -> bytes:
    """Each level is a tuple of `width` references to the previous one: items grow as
    width**levels while the file grows linearly."""
    out = b"\x80\x04N\x94"
    for level in range(levels):
        out += b"(" + (b"h" + bytes([level])) * width + b"t\x94"
    return out + b"."


def test_tuple_bomb_scan_and_load_stay_small():
    data = _tuple_bomb(levels=40, width=250)
    out, peak = peak_bytes(lambda: scan_bytes(data))
    assert out.severity < Severity.MEDIUM  # bounded without a limit: big tuples are counted
    assert peak < 32 << 20
    limits = ScanLimits(max_container_items=5000)
    assert limit_details(scan_bytes(data, limits=limits))
    with pytest.raises(UnsafeModelError, match="more than 5000 container items"):
        loads(data, limits=limits)


def test_one_buffer_many_arrays_is_refused():
    """200 arrays from one memoized 1 MiB buffer: 200 MiB built from 1 MiB read."""
    data = b"\x80\x04(" + b"\x8e" + struct.pack("<Q", 1 << 20) + b"\x00" * (1 << 20) + b"\x940"
    dtype = (
        b"\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02u1\x89\x88\x87R"
        b"(K\x03\x8c\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    rebuild = b"\x8c\x13numpy._core.numeric\x8c\x0b_frombuffer\x93"
    rebuild += b"(h\x00" + dtype + b"J\x00\x00\x10\x00\x85\x8c\x01CtR"
    out, peak = peak_bytes(lambda: loads(data + rebuild * 200 + b"l."))
    assert isinstance(out, UnsafeModelError), out
    assert "would build" in str(out) and "bytes of arrays from" in str(out)
    assert peak < 200 << 20
    assert len(loads(data + rebuild * 3 + b"l.")) == 3  # a few copies are fine


# --- decompression: size, ratio, and the bz2 bomb ---------------------------------------------


def _bz2_bomb(mb: int) -> bytes:
    comp = bz2.BZ2Compressor(9)
    out = [comp.compress(b"\x80\x04\x8e" + struct.pack("<Q", mb << 20))]
    zeros = b"\x00" * (1 << 20)
    for _ in range(mb):
        out.append(comp.compress(zeros))
    out.append(comp.compress(b"."))
    out.append(comp.flush())
    return b"".join(out)


def _frame_bomb(mb: int) -> bytes:
    """``mb`` MiB of empty FRAME opcodes (the fastest for the scanner to read): bytes read as
    opcodes, not as raw data. One bz2 stream per MiB, concatenated (bz2.BZ2File reads them all,
    and so does the scanner), so the test need not compress 256 MiB."""
    frames = b"\x95" + bytes(8)
    block = bz2.compress(frames * ((1 << 20) // len(frames)))
    return bz2.compress(b"\x80\x04") + block * mb + bz2.compress(b"N.")


def test_an_opcode_bomb_is_refused_by_ratio(tmp_path):
    data = _frame_bomb(256)
    assert len(data) < 30_000  # 256 MiB of opcodes in a few kilobytes
    out = scan_bytes(data)  # (not under tracemalloc: tracing the opcode loop's ints takes minutes)
    details = limit_details(out)
    assert out.severity == Severity.MEDIUM
    assert any("expands more than 1000 times" in d for d in details), details
    path = tmp_path / "bomb.pkl.bz2"
    path.write_bytes(data)
    with pytest.raises(UnsafeModelError, match="expands more than 1000 times"):
        load(path)


def test_raw_data_is_judged_by_ratio_only_past_ratio_after_bytes(tmp_path):
    """Raw data (a long BINBYTES here, array data in a model) compresses as well as the file
    wants: an all-zero weight is 1,000:1 in deflate and 1,000,000:1 in bz2. Its ratio counts
    once the stream has made ScanLimits.ratio_after_bytes (256 MiB) in all; the scan reads it
    without keeping it."""
    data = _bz2_bomb(250)
    assert len(data) < 5_000
    assert ScanLimits().ratio_after_bytes == 256 << 20
    out, peak = peak_bytes(lambda: scan_bytes(data))
    assert out.severity < Severity.MEDIUM, out.findings
    assert peak < 64 << 20
    limits = ScanLimits(ratio_after_bytes=64 << 20)
    details = limit_details(scan_bytes(data, limits=limits))
    assert any("expands more than 1000 times" in d for d in details), details
    path = tmp_path / "zeros.pkl.bz2"
    path.write_bytes(data)
    with pytest.raises(UnsafeModelError, match="expands more than 1000 times"):
        load(path, limits=limits)
    assert any(
        "expands more than 1000 times" in d for d in limit_details(scan_bytes(_bz2_bomb(257)))
    )
    with pytest.raises(UnsafeModelError, match="expands past 128 MiB"):
        load(path, limits=ScanLimits(max_total_bytes=128 << 20))


def test_decompressed_size_limit():
    data = _bz2_bomb(20)
    report = scan_bytes(data, limits=ScanLimits(max_total_bytes=8 << 20, max_ratio=10**9))
    assert any("expands past 8 MiB" in d for d in limit_details(report)), report.findings


# --- archives: members and nesting ------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_many_members():
    data = _zip({f"m{i}.pkl": pickle.dumps(i) for i in range(300)})
    report = scan_bytes(data, limits=ScanLimits(max_members=100))
    assert any("300 members" in d for d in limit_details(report)), report.findings
    assert report.severity == Severity.MEDIUM


def test_nesting_depth():
    data = pickle.dumps([1])
    for level in range(10):
        data = _zip({f"level{level}.zip": data})
    report = scan_bytes(data)
    assert any("nested deeper than 6" in d for d in limit_details(report)), report.findings
    assert report.severity == Severity.MEDIUM


def test_many_tiny_nested_zips_are_bounded_in_time():
    """A small zip whose members are zips of many members: the member limit and the time
    budget bound the work (the issue's 1.6 KB zip took 112 s)."""
    inner = _zip({f"x{i}": b"N." for i in range(200)})
    data = _zip({f"i{i}.zip": inner for i in range(200)})
    report = scan_bytes(data, limits=ScanLimits(max_members=1000, max_seconds=0.5))
    assert report.severity >= Severity.LOW


def test_time_budget():
    data = pickle.dumps(list(range(2_000_000)), protocol=4)
    report = scan_bytes(data, limits=ScanLimits(max_seconds=0.001))
    assert any("time budget" in d for d in limit_details(report)), report.findings
    with pytest.raises(UnsafeModelError, match="time budget"):
        loads(data, limits=ScanLimits(max_seconds=0.001))


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="max_memo"):
        ScanLimits(max_memo=0)


def test_every_limit_is_documented_with_its_default():
    """docs/scan.md's limits table has a row for every ScanLimits field (no hidden bound)."""
    import dataclasses
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "scan.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", doc, flags=re.M))
    for field in dataclasses.fields(ScanLimits):
        assert field.name in rows, f"ScanLimits.{field.name} is not in docs/scan.md's table"


def test_load_honours_limits(tmp_path):
    path = tmp_path / "l.pkl"
    path.write_bytes(pickle.dumps(list(range(1000))))
    with pytest.raises(UnsafeModelError, match="container items"):
        load(path, limits=ScanLimits(max_container_items=10))
    assert scan_file(path).severity == Severity.NONE


_SCAN_IN_CHILD = """
import sys
from shoal.scan import scan_file
report = scan_file(sys.argv[1])
print(report.severity.label)
"""


def _scan_in_subprocess(tmp_path, data: bytes) -> str:
    import subprocess

    path = tmp_path / "walk.pkl"
    path.write_bytes(data)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SCAN_IN_CHILD, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the scan did not finish in 60 s")
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout.strip()


def test_describing_a_shared_tuple_is_bounded(tmp_path):
    """A finding quoting the arguments of copyreg._reconstructor described a tuple that holds
    one tuple twice, 40 levels over (a few hundred bytes), by walking all 2**40 paths: the
    scan never ended, and no time check runs there."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import payloads as P

    data = b"\x80\x04" + P.sglob("copyreg", "_reconstructor") + P.shared_tuple(40) + b"\x85R."
    assert _scan_in_subprocess(tmp_path, data) == "high"


def test_a_dtype_whose_fields_share_one_dtype_is_built_once_per_dtype(monkeypatch):
    """Structured dtypes whose fields all name the level below through the memo: 4 fields,
    13 levels (1.8 KB) took 29 s to scan (load 30), since the dtype-state check built and
    re-checked every path of the tree. Each dtype object is now built once per depth and
    checked once: at 4 fields and 8 levels, 45 builds and 525 checks, where the
    tree has 4**8 = 65,536 leaves."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import payloads as P

    import shoal.scan.builders as builders
    from shoal.scan import scan_bytes

    calls = {"build": 0, "check": 0}
    build, check = builders.build_dtype, builders._canonical

    def counted_build(*args: Any, **kwargs: Any) -> Any:
        calls["build"] += 1
        return build(*args, **kwargs)

    def counted_check(*args: Any, **kwargs: Any) -> Any:
        calls["check"] += 1
        return check(*args, **kwargs)

    monkeypatch.setattr(builders, "build_dtype", counted_build)
    monkeypatch.setattr(builders, "_canonical", counted_check)
    assert scan_bytes(P.dtype_tree(4, 8)).severity < Severity.MEDIUM
    assert calls["build"] < 200 and calls["check"] < 1_000, calls  # were 116,505 and 970,905


def test_the_plain_reading_copies_shared_values_once(tmp_path):
    """Reading a joblib file the way pickle.load does starts from a copy of the analyser's
    state at the first array header; copy.deepcopy does not memoise tuples, and copied a
    tuple holding one tuple twice, 20 levels over, for 13 s (40 levels: never)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import payloads as P

    wrapper = P.sglob("joblib.numpy_pickle", "NumpyArrayWrapper") + b")\x81"
    data = b"\x80\x04" + P.shared_tuple(40) + wrapper + P.shared_tuple(40) + b"b."
    assert _scan_in_subprocess(tmp_path, data) == "medium"  # the header is not a joblib one


# --- all-zero weights: benign files that compress past max_ratio --------------------------------


def _zero_files(tmp_path: Path) -> dict[str, Path]:
    """A 32 MiB all-zero float32 weight as real libraries save it, compressed."""
    import gzip

    import joblib
    import numpy as np

    w = np.zeros(8 << 20, dtype=np.float32)
    out = {}
    for comp in (("zlib", 6), ("gzip", 6), ("bz2", 3), ("xz", 3), ("lzma", 3)):
        out[f"joblib_{comp[0]}"] = tmp_path / f"zeros_{comp[0]}.joblib"
        joblib.dump({"w": w}, out[f"joblib_{comp[0]}"], compress=comp)
    out["npz_deflated"] = tmp_path / "zeros.npz"
    np.savez_compressed(out["npz_deflated"], w=w)
    out["pickle_gzip"] = tmp_path / "zeros.pkl.gz"
    out["pickle_gzip"].write_bytes(gzip.compress(pickle.dumps({"w": w}, protocol=4)))
    return out


def test_all_zero_weights_are_not_flagged(tmp_path):
    import numpy as np

    for name, path in _zero_files(tmp_path).items():
        report = scan_file(path)
        assert report.severity < Severity.MEDIUM, (name, report.findings)
        value = load(path)
        w = value["w"]
        assert w.shape == (8 << 20,) and w.dtype == np.float32 and not w.any(), name


def test_raw_data_read_again_as_opcodes_counts_for_the_ratio():
    """pickle.load's reading of a compressed joblib file reads the array data as opcodes, from
    the copy the scanner keeps (max_plain_reading_bytes): those bytes count as read, not as raw
    data, once they are read so. 24 MiB of FRAME opcodes as a joblib array, in a 1.5 KB bz2
    file (one stream per MiB, which bz2.BZ2File reads on): refused by the ratio, not read for
    free (a slower opcode than FRAME costs ~1 us a byte)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import payloads as P

    frames = (b"\x95" + bytes(8)) * ((1 << 20) // 9)
    size = 24 * len(frames)
    pairs = P.su("subclass") + P.sglob("numpy", "ndarray") + P.su("shape")
    pairs += b"J" + struct.pack("<i", size) + b"\x85" + P.su("order") + P.su("C")
    pairs += P.su("dtype") + P._dtype("u1")
    wrapper = P.sglob("joblib.numpy_pickle", "NumpyArrayWrapper") + b")\x81}(" + pairs + b"ub"
    data = bz2.compress(b"\x80\x04" + wrapper) + bz2.compress(frames) * 24 + bz2.compress(b"N.")
    assert len(data) < 5_000
    report = scan_bytes(data)
    assert report.severity == Severity.MEDIUM, report.findings
    assert any("expands more than 1000 times" in d for d in limit_details(report)), report.findings
