"""Zip and tar archives: every member is scanned, one at a time, with size and depth limits.

Zip members are read from their local headers directly (as PyTorch's reader does), so flag
bits such as "encrypted" or a wrong CRC cannot hide a member from the scan.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from shoal.scan.pickle_scan import Sink
from shoal.scan.report import ScanLimits, Severity
from shoal.scan.streams import Budget, Decompressed, Slice, Source

__all__ = ["MemberHint", "member_source", "scan_tar", "scan_zip", "torch_pickle_member"]


@dataclass(frozen=True)
class MemberHint:
    """What the archive says about a member, so the member scanner can interpret it."""

    torch: bool = False  # pickles here use torch persistent ids
    keras_weights: bool = False  # HDF5 weights inside a .keras archive
    torch_tar: str = ""  # "storages" or "tensors" of a legacy torch tar: pickles between raw bytes


# scan_member(source, name, hint) -> format of the member ("" if unrecognised)
ScanMember = Callable[[Source, str, MemberHint], str]

_TORCH_DATA = re.compile(r"(?:[^/]+/)?data\.pkl")
_TORCH_STORAGE = re.compile(r"(?:[^/]+/)?data/[^/]+")
_TORCH_META = re.compile(
    r"(?:[^/]+/)?(?:version|byteorder|\.format_version|\.storage_alignment|"
    r"\.data/serialization_id|data/serialization_id|\.data/version)"
)


def torch_pickle_member(name: str) -> bool:
    """Whether torch.load may read this member as its ``data.pkl``: torch's reader (miniz)
    looks names up ignoring ASCII case, under whatever folder the first member is in, and that
    folder may itself be called ``data`` (``data/data.pkl``, which also looks like a storage)."""
    return _TORCH_DATA.fullmatch(_ascii_lower(name)) is not None


def _ascii_lower(name: str) -> str:
    # miniz folds A-Z only; str.lower() would also fold other letters ('K' KELVIN SIGN -> 'k'),
    # so it is used only on ASCII names, where it folds exactly A-Z
    return name.lower() if name.isascii() else name.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _bad_name(name: str) -> bool:
    parts = _SEPARATORS.split(name)
    return name.startswith(("/", "\\")) or bool(_DRIVE.match(name)) or ".." in parts


_SEPARATORS = re.compile(r"[\\/]+")
_DRIVE = re.compile(r"^[A-Za-z]:")


def scan_zip(
    f: IO[bytes],
    sink: Sink,
    *,
    limits: ScanLimits,
    scan_member: ScanMember,
    budget: Budget | None = None,
) -> str:
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        struct.error,
        NotImplementedError,  # a member needing a newer zip version than zipfile reads
    ) as exc:
        sink.add(Severity.MEDIUM, "malformed", f"zip archive cannot be read: {exc}", 0)
        return "zip"
    shifted = _absolute_reading(f)
    if shifted is not None:
        # zipfile (np.load) shifts every offset by the bytes before the archive; torch's reader
        # (miniz) takes them as written: two loaders, two different sets of members.
        sink.add(
            Severity.MEDIUM,
            "prepended-data",
            f"{shifted[1]} bytes precede the zip archive its offsets describe: zipfile (np.load) "
            "and torch.load read different members; both readings are scanned",
            0,
        )
        try:
            view: IO[bytes] = shifted[0]  # type: ignore[assignment]
            scan_zip(view, sink, limits=limits, scan_member=scan_member, budget=budget)
        finally:
            shifted[0].close()
    other = _zip64_locator_reading(f)
    if other is not None:
        # zipfile reads the zip64 end record just before its locator; torch's reader (miniz)
        # reads it where the locator's offset says: two end records, two central directories.
        sink.add(
            Severity.MEDIUM,
            "zip64-locator",
            "the zip64 locator points to an end record other than the one before it: zipfile "
            "(np.load) and torch.load read different central directories; both are scanned",
            0,
        )
        try:
            reading: IO[bytes] = other  # type: ignore[assignment]
            scan_zip(reading, sink, limits=limits, scan_member=scan_member, budget=budget)
        finally:
            other.close()
    names = [i.filename for i in infos]
    torch = any(torch_pickle_member(n) for n in names)
    torchscript = torch and any("/code/" in n or n.startswith("code/") for n in names)
    keras = "config.json" in names and ("metadata.json" in names or "model.weights.h5" in names)
    npz = bool(names) and all(n.endswith(".npy") for n in names)
    fmt = "torch" if torch else "keras" if keras else "npz" if npz else "zip"
    if torchscript:
        fmt = "torchscript"
        sink.add(
            Severity.MEDIUM,
            "torchscript",
            "TorchScript archive: torch.jit.load runs its compiled code",
            0,
        )
    if len(set(names)) != len(names):
        sink.add(
            Severity.LOW,
            "duplicate-member",
            "duplicate member names (loaders disagree on which copy wins; all were scanned)",
            0,
        )
    if len(infos) > limits.max_members:
        sink.add(
            Severity.MEDIUM,
            "limit",
            f"archive has {len(infos)} members; only the first {limits.max_members} scanned",
            0,
        )
        infos = infos[: limits.max_members]
    outer = sink.where
    for info in infos:
        name = info.filename
        if _bad_name(name):
            sink.add(
                Severity.MEDIUM, "path-traversal", f"member name {name!r} escapes the folder", 0
            )
        raw_member = name.endswith("/") or (  # ZipInfo.is_dir() fails on an empty name
            torch
            and not torch_pickle_member(name)
            and (_TORCH_STORAGE.fullmatch(name) is not None or _TORCH_META.fullmatch(name))
        )
        if raw_member and not _npy_inside(f, zf, info, limits, budget):
            # Raw tensor bytes and metadata (torch never unpickles them) or an empty folder.
            # Not skipped when they start with NumPy's magic: np.load reads any member of an
            # archive that does as an array, pickle included, whatever its name says.
            continue
        sink.where = f"{outer}/{name}" if outer else name
        try:
            try:
                src = member_source(f, zf, info, limits, budget)
            except (
                _MemberError,
                zipfile.BadZipFile,
                OSError,
                ValueError,
                NotImplementedError,
            ) as exc:
                sink.add(Severity.MEDIUM, "malformed", f"member cannot be read: {exc}", None)
                continue
            if src is None:
                sink.add(
                    Severity.MEDIUM,
                    "unsupported",
                    f"member compressed with method {info.compress_type} cannot be checked",
                    info.header_offset,
                )
                continue
            hint = MemberHint(
                torch=torch and _ascii_lower(name).endswith(".pkl"),
                keras_weights=keras and name == "model.weights.h5",
            )
            scan_member(src, name, hint)
        finally:
            sink.where = outer
    return fmt


def _absolute_reading(f: IO[bytes]) -> tuple[_Tail, int] | None:
    """When zipfile shifts the archive's offsets (data before it: ``concat`` in zipfile), the
    archive as readers that take offsets as written see it (torch's miniz), with the number of
    bytes shifted; None when both read the same. The view is the file up to the end of the
    central directory the offsets name, then an end record pointing at it, so zipfile itself
    reads it with no shift."""
    try:
        endrec = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except (OSError, ValueError, struct.error):
        return None
    if endrec is None:
        return None
    size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd  # type: ignore[attr-defined]
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        if concat != 0:
            # not rebuilt for zip64; the finding still says the readings differ
            return _Tail(base=f, length=0, tail=b""), concat
    if concat == 0:
        return None
    entries = endrec[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, size_cd, offset_cd, 0)
    return _Tail(base=f, length=max(0, offset_cd + size_cd), tail=end), concat


def _zip64_locator_reading(f: IO[bytes]) -> _Tail | None:
    """The archive as miniz (torch.load) reads it when its zip64 locator names an end record
    other than the one zipfile reads (the 56 bytes just before the locator), else None. The
    view ends with a plain end record for that central directory, so zipfile reads it as is;
    a directory beyond 4 GiB cannot be described so and reads as an empty archive (the finding
    still says the readings differ)."""
    try:
        endrec = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except (OSError, ValueError, struct.error):
        return None
    if endrec is None or endrec[zipfile._ECD_SIGNATURE] != zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        return None
    where = endrec[zipfile._ECD_LOCATION]  # type: ignore[attr-defined]
    locator_at = where - zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    f.seek(locator_at)
    locator = f.read(zipfile.sizeEndCentDir64Locator)  # type: ignore[attr-defined]
    if len(locator) != 20 or locator[:4] != b"PK\x06\x07":
        return None
    record_at = struct.unpack_from("<Q", locator, 8)[0]
    if record_at == locator_at - zipfile.sizeEndCentDir64:  # type: ignore[attr-defined]
        return None
    f.seek(record_at)
    record = f.read(56)
    if len(record) != 56 or record[:4] != b"PK\x06\x06":
        return _Tail(base=f, length=0, tail=b"")  # miniz fails here; still two readings
    entries, size_cd, offset_cd = struct.unpack_from("<3Q", record, 32)
    if offset_cd + size_cd >= 1 << 32 or entries >= 0xFFFF:
        return _Tail(base=f, length=0, tail=b"")
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, size_cd, offset_cd, 0)
    return _Tail(base=f, length=offset_cd + size_cd, tail=end)


class _Tail(io.RawIOBase):
    """The first ``length`` bytes of a seekable file followed by ``tail``: a read-only view."""

    def __init__(self, *, base: IO[bytes], length: int, tail: bytes) -> None:
        super().__init__()
        self._base, self._length, self._tail, self._pos = base, length, tail, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        size = self._length + len(self._tail)
        pos = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: size}[whence] + offset
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def read(self, n: int | None = -1, /) -> bytes:
        size = self._length + len(self._tail)
        n = size - self._pos if n is None or n < 0 else min(n, size - self._pos)
        if n <= 0:
            return b""
        out = b""
        if self._pos < self._length:
            self._base.seek(self._pos)
            out = self._base.read(min(n, self._length - self._pos))
            if not out:
                return b""
        if len(out) < n and self._pos + len(out) >= self._length:
            at = self._pos + len(out) - self._length
            out += self._tail[at : at + n - len(out)]
        self._pos += len(out)
        return out

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def member_source(
    f: IO[bytes],
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    limits: ScanLimits,
    budget: Budget | None,
) -> Source | None:
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise _MemberError(f"member {info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    raw = Slice(base=f, start=start, length=info.compress_size)
    method = info.compress_type
    if method == zipfile.ZIP_STORED:
        return raw
    if method == zipfile.ZIP_DEFLATED:
        return Decompressed(base=raw, codec="deflate", limit=limits.max_member_bytes, budget=budget)
    if method == zipfile.ZIP_BZIP2:
        return Decompressed(base=raw, codec="bz2", limit=limits.max_member_bytes, budget=budget)
    if method == zipfile.ZIP_LZMA and not info.flag_bits & 0x1:
        # zipfile's own reader decompresses each compressed read whole (a 44 KB member of
        # zeros was 600 MiB in memory at once): read its framing (version, properties size,
        # properties) and decompress the raw LZMA1 data in bounded steps, as every stream
        head = raw.read(4)
        props = raw.read(struct.unpack("<H", head[2:4])[0]) if len(head) == 4 else b""
        try:
            lzma1 = lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)  # type: ignore[attr-defined]
        except (lzma.LZMAError, ValueError) as exc:
            raise _MemberError(f"member {info.filename!r} has a bad LZMA header: {exc}") from None
        return Decompressed(
            base=raw,
            codec="zip-lzma",
            limit=limits.max_member_bytes,
            budget=budget,
            filters=[lzma1],
        )
    return None


def _npy_inside(
    f: IO[bytes],
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    limits: ScanLimits,
    budget: Budget | None,
) -> bool:
    """Whether np.load would read this member as an array: its data starts with b"\\x93NUMPY".
    A member that cannot be read is reported as such by the normal path, so it counts too."""
    if info.file_size == 0 and info.compress_size == 0:
        return False
    try:
        src = member_source(f, zf, info, limits, budget)
        if src is None:
            return False  # a method zipfile cannot read without a password: np.load cannot
        head = src.read(6)
    except (
        _MemberError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        zlib.error,
        NotImplementedError,
    ):
        return True  # lzma.LZMAError is an OSError; the normal path reports the member
    return head == b"\x93NUMPY"


class _MemberError(OSError):
    pass


def scan_tar(src: IO[bytes], sink: Sink, *, limits: ScanLimits, scan_member: ScanMember) -> str:
    import tarfile  # here, not at the top: few model files are tars and `shoal scan` starts faster

    fmt = "tar"
    outer = sink.where
    try:
        with tarfile.open(fileobj=src, mode="r:") as tf:
            count = 0
            for member in tf:
                count += 1
                if count > limits.max_members:
                    sink.add(Severity.MEDIUM, "limit", "too many tar members", None)
                    break
                name = member.name
                if _bad_name(name):
                    sink.add(
                        Severity.MEDIUM, "path-traversal", f"member name {name!r} escapes", None
                    )
                torch_name = name in ("pickle", "storages", "tensors", "sys_info")
                if member.issym() or member.islnk():
                    sink.add(
                        Severity.LOW,
                        "link-member",
                        f"{name!r} links to {member.linkname!r} (matters if extracted)",
                        None,
                    )
                    if not torch_name:
                        continue
                    # torch.load extracts these by name and unpickles them: through a link it
                    # reads the target, which is scanned as the member it stands for
                    try:
                        fobj = tf.extractfile(member)
                    except (KeyError, tarfile.TarError):
                        fobj = None
                    if fobj is None:
                        sink.add(
                            Severity.MEDIUM,
                            "link-member",
                            f"{name!r} links to {member.linkname!r}, outside the archive: "
                            "torch.load unpickles whatever that path holds, which was not scanned",
                            None,
                        )
                        continue
                elif not member.isfile():
                    continue
                else:
                    fobj = tf.extractfile(member)
                if torch_name:
                    fmt = "torch-legacy-tar"
                if fobj is None:
                    continue
                sink.where = f"{outer}/{name}" if outer else name
                try:
                    # torch.load tries every tar as a legacy checkpoint and extracts these
                    # three members by name (the last of a name wins; all are scanned).
                    hint = MemberHint(
                        torch=name == "pickle",
                        torch_tar=name if name in ("storages", "tensors") else "",
                    )
                    scan_member(fobj, name, hint)
                finally:
                    sink.where = outer
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        sink.add(Severity.MEDIUM, "malformed", f"tar archive cannot be read fully: {exc}", None)
    return fmt
