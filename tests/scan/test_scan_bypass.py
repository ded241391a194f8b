"""Issue 15's attacks, rebuilt by our own generators (tests/scan/payloads.py).

Each bypass file is first shown to run code under its real loader (in a child process, where
it only creates a marker file); then ``shoal scan`` must rate it at least medium and
``shoal.scan.load`` must refuse it, with nothing run. The attack chain uses allowlisted names
only; the loader refuses it even when the scan is skipped.
"""

from __future__ import annotations

import bz2
import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import FileReport, ScanLimits, Severity, load, loads, scan_bytes, scan_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import payloads as P

load_module = importlib.import_module("shoal.scan.load")  # the module, not the function

BYPASSES: dict[str, tuple[Callable[[str], bytes], str]] = {
    "int_hex": (P.hex_int_first, "pickle"),
    "int_octal": (P.octal_int_first, "pickle"),
    "long_underscore": (P.underscore_long_first, "pickle"),
    "joblib_duplicate_key": (P.joblib_duplicate_key, "joblib"),
    "joblib_dtype_size": (P.joblib_lying_dtype_size, "joblib"),
    "bz2_streams": (P.multi_stream_bz2, "joblib"),
    "xz_streams": (P.multi_stream_xz, "joblib"),
    "lzma_streams": (P.multi_stream_lzma, "joblib"),
    "tar_polyglot": (P.tar_polyglot, "pickle"),
    "safetensors_polyglot": (P.safetensors_polyglot, "pickle"),
    "hdf5_userblock_polyglot": (P.hdf5_userblock_polyglot, "pickle"),
    "zip_appended_polyglot": (P.zip_appended_polyglot, "pickle"),
    "npy_python2_header": (P.npy_python2_header, "numpy"),
    "npy_large_header": (P.npy_large_header, "numpy"),
    "npy_bool_shape": (P.npy_bool_shape, "numpy"),
    "npz_folder_member": (P.npz_folder_member, "npz"),
    "npz_torch_storage_member": (P.npz_torch_storage_member, "npz"),
    "torch_tar_storages": (P.torch_tar_storages, "torch"),
    "torch_v7_tar": (P.torch_v7_tar, "torch"),
    "zip_prepended_for_torch": (P.zip_prepended_for_torch, "torch"),
    "torch_zip_in_data_folder": (P.torch_zip_in_data_folder, "torch"),
    "torch_zip_pickle_name_case": (P.torch_zip_pickle_name_case, "torch"),
    "zip64_locator_elsewhere": (P.zip64_locator_elsewhere, "torch"),
    "joblib_array_read_by_pickle": (P.joblib_array_read_by_pickle, "pickle"),
    "joblib_array_read_by_pickle_np": (P.joblib_array_read_by_pickle, "numpy"),
    "joblib_array_read_by_pickle_gzip": (P.joblib_array_read_by_pickle_gzip, "pickle-gzip"),
    "joblib_object_array_with_wrapper": (P.joblib_object_array_with_wrapper, "joblib"),
    "npy_object_pickle_with_wrapper": (P.npy_object_pickle_with_wrapper, "numpy"),
    "torch_tar_storages_hardlink": (P.torch_tar_storages_hardlink, "torch"),
    "joblib_second_build": (P.joblib_second_build, "joblib"),
    "joblib_wrapper_by_reconstructor": (P.joblib_wrapper_by_reconstructor, "joblib"),
}

_REAL_LOADERS = {
    "pickle": "import pickle; pickle.load(open(path, 'rb'))",
    "pickle-gzip": "import gzip, pickle; pickle.load(gzip.open(path))",
    "joblib": "import joblib; joblib.load(path)",
    "numpy": "import numpy; numpy.load(path, allow_pickle=True)",
    "npz": "import numpy; z = numpy.load(path, allow_pickle=True); [z[k] for k in z.files]",
    "torch": "import torch; torch.load(path, weights_only=False)",
}
# One child runs every real loader; what it runs is only ever `touch marker`.
_CHILD = f"""
import sys
for loader, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        exec({_REAL_LOADERS!r}[loader], {{"path": path}})
    except Exception:
        pass
"""


@pytest.fixture(scope="module")
def bypasses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{name: (file, marker)}, after proving each file runs code under its real loader."""
    root = tmp_path_factory.mktemp("bypass")
    out: dict[str, tuple[Path, Path]] = {}
    argv: list[str] = []
    for name, (make, loader) in BYPASSES.items():
        marker = root / f"ran_{name}"
        path = root / name
        path.write_bytes(make(str(marker)))
        out[name] = (path, marker)
        argv += [loader, str(path)]
    subprocess.run([sys.executable, "-c", _CHILD, *argv], check=True, timeout=120, cwd=root)
    ran = {name for name, (_p, marker) in out.items() if marker.exists()}
    assert ran == set(BYPASSES), f"not real bypasses: {set(BYPASSES) - ran}"
    for _path, marker in out.values():
        marker.unlink()
    return out


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_bypass_is_rated_at_least_medium_and_refused(bypasses, name):
    path, marker = bypasses[name]
    report = scan_file(path)
    assert report.severity >= Severity.MEDIUM, report.findings
    with pytest.raises(UnsafeModelError):
        load(path)
    assert not marker.exists()


def test_the_code_behind_each_bypass_is_named(bypasses):
    """Not just 'medium, cannot tell': the scanner reads the payload and names os.system."""
    for name, (path, _marker) in bypasses.items():
        report = scan_file(path)
        assert report.severity == Severity.CRITICAL, (name, report.findings)
        assert any("os.system" in f.detail for f in report.findings), (name, report.findings)


# --- the attack chain ---------------------------------------------------------------------------

CHAIN_FILES: dict[str, Callable[[], bytes]] = {
    "pickle_p2": lambda: P.chain_pickle(proto=2),
    "pickle_p4": lambda: P.chain_pickle(proto=4),
    "gzip": lambda: P.as_gzip(P.chain_pickle(proto=4)),
    "npy": lambda: P.as_npy(P.chain_pickle(proto=2)),
    "npz_member": lambda: P.as_npz_member(P.chain_pickle(proto=4)),
}


@pytest.mark.parametrize("proto", [2, 4])
def test_chain_scanner_names_each_move(proto):
    kinds = {f.kind: f.severity for f in scan_bytes(P.chain_pickle(proto=proto)).findings}
    assert kinds.get("computed-state") == Severity.HIGH  # BUILD state made by a call
    assert kinds.get("call-mutation") == Severity.HIGH  # SETITEM on a call's result
    assert kinds.get("chosen-function") == Severity.HIGH  # helper calling the file's choice


@pytest.mark.parametrize("name", sorted(CHAIN_FILES))
def test_chain_is_refused_in_every_container(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(CHAIN_FILES[name]())
    assert scan_file(path).severity >= Severity.HIGH
    with pytest.raises(UnsafeModelError):
        load(path)


@pytest.mark.parametrize("name", sorted(CHAIN_FILES))
def test_chain_is_refused_by_the_loader_alone(tmp_path, monkeypatch, name):
    """Even if the scan were fooled, the interpreter builds nothing of the chain."""
    path = tmp_path / name
    path.write_bytes(CHAIN_FILES[name]())
    fmt = scan_file(path).format.replace("pickle+", "")

    def clean(p, *, limits=None):
        return FileReport(path=str(p), format=fmt, severity=Severity.NONE)

    monkeypatch.setattr(load_module, "scan_file", clean)
    with pytest.raises(UnsafeModelError, match="refused"):
        load(path)


@pytest.mark.parametrize("proto", [2, 4])
def test_chain_first_refusal_is_the_first_name_shoal_does_not_build(proto):
    with pytest.raises(UnsafeModelError, match=r"builtins\.dict"):
        loads(P.chain_pickle(proto=proto))


def test_bypasses_are_refused_by_the_loader_alone(bypasses, monkeypatch):
    """The same with every bypass file: a fooled scan would still not run or build them."""
    for name, (path, marker) in bypasses.items():
        fmt = scan_file(path).format.split("+")[-1] if "polyglot" in name else None
        fmt = fmt or scan_file(path).format.replace("pickle+", "")

        def clean(p, *, limits=None, fmt=fmt):
            return FileReport(path=str(p), format=fmt, severity=Severity.NONE)

        monkeypatch.setattr(load_module, "scan_file", clean)
        try:
            load(path)
        except UnsafeModelError:
            pass
        else:
            # only a polyglot's other reading may load (a zip of plain arrays): the pickle
            # at its byte 0 is never run by shoal; and a torch zip's data.pkl, whose storage
            # member (an object .npy for np.load) shoal never reads as an array, or that
            # zipfile finds after prepended bytes (torch's reader finds the other one)
            other_reading = (
                "npz_torch_storage_member",
                "zip_prepended_for_torch",
                "zip64_locator_elsewhere",
            )
            # joblib's reading of a file pickle.load reads otherwise: an array of bytes
            other_reading += (
                "joblib_array_read_by_pickle",
                "joblib_array_read_by_pickle_np",
                "joblib_array_read_by_pickle_gzip",
            )
            assert name == "zip_appended_polyglot" or name in other_reading, name
        assert not marker.exists(), name


# --- polyglots that need more than a few bytes of setup ---------------------------------------


def test_pickle_and_bz2_polyglot(tmp_path: Path) -> None:
    """A bz2 stream that is also, from byte 0, a pickle running code (its ``BZh9`` opens an
    825 MB BINBYTES: the file is sparse, so the gap costs no disk). A bz2 reader gets the
    benign bytes; the scanner analyses the pickle reading too and reports the worst, without
    reading the gap into memory; the loader refuses it."""
    path = tmp_path / "weights.pkl.bz2"
    marker = tmp_path / "ran"
    P.bz2_pickle_polyglot(str(path), str(marker))
    assert path.stat().st_size > 825_000_000
    with bz2.open(path) as f:
        assert f.read() == P.BZ2_BENIGN  # the other reading: what a bz2 reader gets
    report = scan_file(path)
    assert report.severity == Severity.CRITICAL, report.findings
    assert any("os.system" in f.detail for f in report.findings), report.findings
    with pytest.raises(UnsafeModelError):
        load(path)
    assert not marker.exists()


@pytest.mark.skipif(
    not os.environ.get("SHOAL_BIG_TESTS"), reason="pickle.load reads 825 MB: SHOAL_BIG_TESTS=1"
)
def test_the_bz2_polyglot_runs_code_under_pickle_load(tmp_path: Path) -> None:
    """The proof that the file above is a real bypass: pickle.load runs its payload (it
    reads the gap into memory first, so this one is left to release checks)."""
    path = tmp_path / "weights.pkl.bz2"
    marker = tmp_path / "ran"
    P.bz2_pickle_polyglot(str(path), str(marker))
    subprocess.run([sys.executable, "-c", _CHILD, "pickle", str(path)], timeout=300, cwd=tmp_path)
    assert marker.exists()


def test_hdf5_userblock_polyglot_written_by_h5py(tmp_path: Path) -> None:
    """A real HDF5 file, written by h5py with a 512-byte user block, whose user block holds a
    pickle: h5py reads its dataset, pickle.load runs the pickle, the scanner reports the
    worst of both readings and the loader refuses."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "model.h5"
    marker = tmp_path / "ran"
    path.write_bytes(P.hdf5_h5py_userblock_polyglot(str(marker)))
    with h5py.File(path, "r") as f:  # the HDF5 reading
        assert f["weights"][()].tolist() == [[0, 1, 2], [3, 4, 5]]
    subprocess.run([sys.executable, "-c", _CHILD, "pickle", str(path)], timeout=120, cwd=tmp_path)
    assert marker.exists()  # the pickle reading: code ran
    marker.unlink()
    report = scan_file(path)
    assert "hdf5" in report.format, report.format
    assert report.severity == Severity.CRITICAL, report.findings
    assert any("os.system" in f.detail for f in report.findings), report.findings
    with pytest.raises(UnsafeModelError):
        load(path)
    assert not marker.exists()


def test_a_benign_legacy_torch_tar_is_followed_record_by_record(tmp_path: Path) -> None:
    """The tar's storages member read as torch reads it: the raw bytes are skipped by their
    size header, and the views pickle after them is analysed, not taken for trailing data."""
    storages = b"\x80\x02K\x01." + b"\x80\x02(X\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    storages += P.glob2("torch", "FloatStorage") + b"t." + P.struct.pack("<q", 1) + b"\0" * 4
    path = tmp_path / "benign.tar"
    path.write_bytes(P.legacy_torch_tar(storages + b"\x80\x02]."))
    report = scan_file(path)
    assert report.severity < Severity.MEDIUM, report.findings
    assert report.format == "torch-legacy-tar", report.format
    # a size header that does not fit the member: the rest cannot be located
    path.write_bytes(P.legacy_torch_tar(storages[:-12] + P.struct.pack("<q", 99) + b"\x80\x02]."))
    assert any(f.kind == "unverifiable" for f in scan_file(path).findings)


def test_raw_joblib_array_data_is_not_taken_for_code():
    """The plain reading of a joblib file walks its raw array bytes as opcodes (pickle.load
    would): random bytes must not make a benign file suspect. 1,000 unaligned 4 KiB arrays of
    random bytes (old joblib files have no alignment byte to stop the walk at once)."""
    import numpy as np

    flagged = []
    for seed in range(1000):
        data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        report = scan_bytes(b"\x80\x04" + P.joblib_wrapper(4096, P._dtype("u1")) + data + b".")
        if report.severity >= Severity.MEDIUM:
            flagged.append((seed, report.findings))
    assert not flagged, flagged[:3]


def test_a_plain_reading_past_what_is_kept_is_unverified():
    """In a stream that cannot be read twice, the scanner keeps the bytes after the first
    joblib array header for pickle.load's reading (ScanLimits.max_plain_reading_bytes); a
    reading that runs past them is a medium limit finding naming that field, not a pass. The
    boundary: the payload ends at byte len(evil) + 1 of what is kept (its STOP after it)."""
    import gzip

    filler = b"N0" * 64  # 128 bytes of opcodes that import nothing, before the payload
    evil = filler + P.system_call("/nonexistent/marker", proto=4) + b"0"
    data = b"\x80\x04" + P.joblib_wrapper(len(evil), P._dtype("u1")) + evil + b"."
    assert scan_bytes(gzip.compress(data)).severity == Severity.CRITICAL
    assert ScanLimits().max_plain_reading_bytes == 64 << 20
    report = scan_bytes(gzip.compress(data), limits=ScanLimits(max_plain_reading_bytes=64))
    assert report.severity == Severity.MEDIUM, report.findings
    (finding,) = [f for f in report.findings if f.kind == "limit"]
    assert "ScanLimits.max_plain_reading_bytes" in finding.detail, finding.detail
    assert "64 bytes" in finding.detail, finding.detail
    # a seekable stream is read again, whatever the bound
    assert scan_bytes(data, limits=ScanLimits(max_plain_reading_bytes=64)).severity == (
        Severity.CRITICAL
    )
    # the boundary: the import is seen once its STACK_GLOBAL byte is kept, not one byte before
    seen = len(filler) + len(P.sglob("os", "system"))
    for kept, worst in ((seen, Severity.CRITICAL), (seen - 1, Severity.MEDIUM)):
        limits = ScanLimits(max_plain_reading_bytes=kept)
        assert scan_bytes(gzip.compress(data), limits=limits).severity == worst, kept


def test_a_torch_tar_member_linked_outside_the_archive_is_medium(tmp_path):
    """torch.load extracts 'storages' and opens it: a symbolic link to a path outside the
    archive makes it unpickle a file the scanner never saw."""
    outside = tmp_path / "elsewhere.pkl"
    marker = tmp_path / "ran"
    outside.write_bytes(P.evil_pickle(str(marker)))
    path = tmp_path / "model.tar"
    path.write_bytes(P.torch_tar_storages_symlink_outside(str(outside)))
    subprocess.run([sys.executable, "-c", _CHILD, "torch", str(path)], timeout=120, cwd=tmp_path)
    assert marker.exists()  # torch.load ran the pickle behind the link
    marker.unlink()
    report = scan_file(path)
    assert report.severity == Severity.MEDIUM, report.findings
    assert any(f.kind == "link-member" and "outside" in f.detail for f in report.findings)
