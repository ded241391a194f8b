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


# --- keys whose hashing is slow per value: big ints inside tuple keys ---------------------------


def _big_int_keys(int_bytes: int, width: int, keys: int) -> bytes:
    """A set of ``keys`` tuples ``(T, i)``, where T holds one ``int_bytes``-byte integer
    ``width`` times (through the memo): each key is a few bytes of pickle, and Python hashes
    the integer ``width`` times per hash of the key (tuple hashes are not cached, int hashes
    are linear in their size). All keys go into one ADDITEMS, one opcode: the interpreter's
    time checks run between opcodes."""
    out = bytearray(P4 + _long4(int_bytes) + b"\x94")  # memo 0: the integer
    out += b"(" + b"h\x00" * width + b"t\x94"  # memo 1: T
    out += b"\x8f("  # EMPTY_SET, MARK
    for i in range(keys):
        out += b"h\x01J" + struct.pack("<i", i) + b"\x86"  # BINGET 1, BININT i, TUPLE2
    out += b"\x90."  # ADDITEMS, STOP
    return bytes(out)


def test_keys_whose_hashing_is_slow_are_bounded_in_time(tmp_path):
    # hash() of a 1 MiB int takes ~1.8 ms: each key here costs ~0.2 s to hash, twice (the
    # collision count, then the set), so 300 keys (a 1 MiB pickle) were ~2 minutes in one opcode
    data = _big_int_keys(1 << 20, 100, 300)
    out = _load_in_subprocess(tmp_path, data, max_seconds=2, timeout=60)
    assert out.startswith("REFUSED") and "max_container_items" in out, out


def test_one_big_int_in_many_sets_is_bounded_in_time(tmp_path):
    # 60 copies of one 1 MiB int per set (under the per-set collision bound of 64), in many
    # sets: each set costs ~0.2 s of hashing in 64 opcodes, 64 sets between two time checks
    # (~14 s with a 2 s budget)
    one = b"\x8f(" + b"h\x00" * 60 + b"\x90a"  # EMPTY_SET, MARK, 60 x BINGET 0, ADDITEMS, APPEND
    data = P4 + _long4(1 << 20) + b"\x94]" + one * 2000 + b"."  # the sets kept in a list
    out = _load_in_subprocess(tmp_path, data, max_seconds=2, timeout=60)
    # refused by the count of hashing work, before the time check between opcodes came
    assert out.startswith("REFUSED") and "max_container_items" in out, out


def test_a_tuple_key_holding_a_modest_int_still_loads():
    value = {(10**300, 1): "a", (10**300, 2): "b", frozenset({(2**4000, "x")}): [1]}
    import pickle

    assert loads(pickle.dumps(value, protocol=4)) == value


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


def test_an_lzma_member_cannot_lie_its_way_past_the_ratio(tmp_path):
    # the ratio is judged against the compressed bytes the file holds, not the directory's
    # compressed size (here 4 GB, in a 4 KB file)
    path = tmp_path / "zeros.npz"
    _lzma_npz(path, np.zeros(24 << 20, dtype=np.uint8))
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b"PK\x01\x02")
    raw[at + 20 : at + 24] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    limits = ScanLimits(max_ratio=100, ratio_after_bytes=1 << 20)
    report = scan_file(path, limits=limits)
    assert any("max_ratio" in f.detail for f in report.findings), report.findings


def test_an_lzma_member_is_read_in_bounded_steps(tmp_path):
    # zipfile's reader decompresses each compressed read whole: a 10 KB member of 64 MiB of
    # zeros was 64 MiB in memory at once (a 44 KB one of 300 MiB grew the scan's RSS 607 MiB)
    import tracemalloc

    path = tmp_path / "zeros.npz"
    _lzma_npz(path, np.zeros(64 << 20, dtype=np.uint8))
    tracemalloc.start()
    try:
        report = scan_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.severity < Severity.MEDIUM, report.findings
    assert peak < 16 << 20, peak


def test_an_lzma_npz_member_is_still_scanned(tmp_path):
    # an object .npy member (np.load(allow_pickle=True) unpickles it) naming os.system
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    payload = head.getvalue() + b"cos\nsystem\n(S'true'\ntR."
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:
        zf.writestr("x.npy", payload)
    report = scan_file(path)
    assert report.severity == Severity.CRITICAL, report.findings


def test_an_lzma_npz_member_still_loads(tmp_path):
    path = tmp_path / "small.npz"
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    _lzma_npz(path, arr)
    assert scan_file(path).severity < Severity.MEDIUM
    out = load(path)
    assert out["x"].dtype == arr.dtype and np.array_equal(out["x"], arr)


# --- shoal's own objects and depth inside attributes -------------------------------------------

GLOBAL_NDARRAY = b"\x8c\x05numpy\x8c\x07ndarray\x93"
ORDERED = b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R"  # OrderedDict()


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


@pytest.mark.parametrize(
    "data",
    [
        P4 + GLOBAL_NDARRAY + b".",  # the global itself as the value
        P4 + b"]" + GLOBAL_NDARRAY + b"a.",  # inside a list
        P4 + b"}" + GLOBAL_NDARRAY + b"K\x01s.",  # as a dict key
    ],
)
def test_a_global_is_not_a_value(data):
    # pickle.load would return the class numpy.ndarray; shoal returned its own reconstructor
    # object (with the shoal functions it stands for): only plain values, arrays and tensors
    # come back from a load
    with pytest.raises(UnsafeModelError, match=r"numpy\.ndarray as a value"):
        loads(data)


def _ordered_with_metadata(inner: bytes) -> bytes:
    # OrderedDict() with BUILD {"_metadata": {"k": {"x": <inner>}}}
    meta = b"}" + _str("k") + b"}" + _str("x") + inner + b"ss"
    return P4 + ORDERED + b"}" + _str("_metadata") + meta + b"sb."


def test_depth_is_measured_inside_ordered_dict_metadata():
    # _metadata is the one attribute a load keeps; the depth bound did not look inside it
    deep = b"N" + b"\x85" * 100_000  # a tuple 100,000 deep
    with pytest.raises(UnsafeModelError, match="max_value_depth"):
        loads(_ordered_with_metadata(deep))


def test_a_global_is_not_a_value_inside_ordered_dict_metadata():
    with pytest.raises(UnsafeModelError, match=r"numpy\.ndarray as a value"):
        loads(_ordered_with_metadata(GLOBAL_NDARRAY))


def test_torch_metadata_still_loads():
    import collections
    import pickle

    value = collections.OrderedDict(w=1.5)
    value._metadata = {"": {"version": 1}, "fc": {"version": 2}}  # type: ignore[attr-defined]
    out = loads(pickle.dumps(value, protocol=2))
    assert out == value and out._metadata == value._metadata


def _torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")


def _float_storage_pid(key: str, numel: int) -> bytes:
    # ('storage', torch.FloatStorage, key, 'cpu', numel), protocol 2
    return (
        b"(X\x07\x00\x00\x00storage"
        + b"ctorch\nFloatStorage\n"
        + b"X"
        + struct.pack("<I", len(key))
        + key.encode()
        + b"X\x03\x00\x00\x00cpu"
        + b"K"
        + bytes([numel])
        + b"tQ"
    )


def test_a_torch_storage_is_not_a_value(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "storage.pt"
    _torch_zip(path, b"\x80\x02" + _float_storage_pid("0", 1) + b".", {"0": b"\x00" * 4})
    with pytest.raises(UnsafeModelError, match="as a value"):
        load(path)


# --- limits themselves --------------------------------------------------------------------------


def test_a_nan_limit_is_refused(capsys):
    # NaN passed the "must be positive" check (NaN <= 0 is false) and then bounded nothing:
    # time.monotonic() > deadline is never true when the deadline is NaN
    from shoal.cli.main import main
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match="max_seconds must be positive"):
        ScanLimits(max_seconds=float("nan"))
    assert main(["scan", "--max-seconds", "nan", __file__]) == 2
    assert "max_seconds must be positive" in capsys.readouterr().err


def test_a_path_too_long_is_a_finding_not_an_oserror(tmp_path, capsys):
    # pathlib raises for a name too long for the file system (ENAMETOOLONG): scan_file raised
    # OSError, shoal scan printed a traceback, and load broke its only-ShoalError promise
    from shoal.cli.main import main

    path = tmp_path / ("y" * 300)
    report = scan_file(path)
    assert report.severity == Severity.MEDIUM and report.findings[0].kind == "unreadable"
    with pytest.raises(UnsafeModelError, match="File name too long"):
        load(path)
    assert main(["scan", str(path)]) == 1
    assert "File name too long" in capsys.readouterr().out


# --- structured dtypes nested in one another ----------------------------------------------------

GLOBAL_DTYPE = b"\x8c\x05numpy\x8c\x05dtype\x93"


def _nested_dtype(levels: int) -> bytes:
    """A float64 dtype inside ``levels`` structured dtypes of one field each, as NumPy pickles
    dtypes: numpy.dtype('V8', False, True) and BUILD (3, '|', None, ('f',), {'f': (inner, 0)},
    8, 1, 16); about 53 bytes a level."""
    value = (
        GLOBAL_DTYPE
        + _str("f8")
        + b"\x89\x88\x87R(K\x03"
        + _str("<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    for _ in range(levels):
        state = b"(K\x03" + _str("|") + b"N" + _str("f") + b"\x85}" + _str("f") + value
        state += b"K\x00\x86sK\x08K\x01K\x10t"
        value = GLOBAL_DTYPE + _str("V8") + b"\x89\x88\x87R" + state + b"b"
    return P4 + value + b"."


def test_a_dtype_nested_too_deep_is_refused():
    # 400 levels (21 KB) loaded, and repr() or str() of the dtype raised RecursionError
    with pytest.raises(UnsafeModelError, match="nested more than 100 deep"):
        loads(_nested_dtype(400))


def test_a_nested_dtype_within_the_bound_loads_and_prints():
    dtype = loads(_nested_dtype(50))
    assert dtype.itemsize == 8 and repr(dtype).count("('f'") == 50


# --- shoal scan's report: names from the file are text, not markup or terminal codes ------------

PAYLOAD = b"cposix\nsystem\n(S'true'\ntR."


@pytest.mark.parametrize(
    ("member", "shown"),
    [
        ("[/bold]evil.pkl", "[/bold]evil.pkl"),  # rich raised MarkupError: a traceback, no report
        ("evil[white on white].pkl", "evil[white on white].pkl"),  # the tag was taken as style
        ("a\x1b[1A\x1b[2K.pkl", "a\\u001b[1A\\u001b[2K.pkl"),  # ESC reached the terminal
        ("b\u202eLKP.pkl", "b\\u202eLKP.pkl"),  # a bidi override reorders what follows
    ],
)
def test_scan_report_shows_file_controlled_names_as_text(tmp_path, capsys, member, shown):
    from shoal.cli.main import main

    path = tmp_path / "names.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, PAYLOAD)
    assert main(["scan", str(path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert shown in out.replace("\n", "").replace(" ", "") or shown in out, out
    assert "critical" in out and "posix.system" in out.replace("\n", "")


def test_shoal_errors_print_file_controlled_names_inert(tmp_path, capsys):
    # a pretrained-weights refusal quotes the scanner's finding, which names the member
    from shoal.cli.main import main

    (tmp_path / "d.csv").write_text(
        "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20))
    )
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as zf:
        zf.writestr("a\x1b[1A\x1b[2K.npy", PAYLOAD)
    job = tmp_path / "job.toml"
    job.write_text(
        '[data]\npath = "d.csv"\npartition = { scheme = "iid", nodes = 2 }\n'
        '[model]\nname = "mlp"\nhidden = 4\n[algorithm]\nrounds = 1\nnodes_per_round = 2\n'
        '[transfer]\npretrained = "w.npz"\n'
    )
    assert main(["run", str(job), "--store", str(tmp_path / "s.db"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load pretrained weights" in err, err
    assert "\x1b" not in err and "a\\u001b[1A\\u001b[2K.npy" in err
