"""Format sniffing and the public scanning API: ``scan_file``, ``scan_bytes``, ``scan_paths``.

The format is decided from content, never from the file name, and every recognised container
(zip, tar, compressed stream) is opened and its contents scanned the same way, to a depth limit.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import pickletools
import re
import stat
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from shoal.errors import ConfigError
from shoal.scan.archives import MemberHint, scan_tar, scan_zip
from shoal.scan.formats import (
    HDF5_MAGIC,
    looks_like_safetensors,
    scan_hdf5,
    scan_json,
    scan_npy,
    scan_onnx,
    scan_safetensors,
)
from shoal.scan.pickle_scan import (
    Sink,
    probe_pickle_imports,
    scan_pickle_stream,
    scan_torch_tar_member,
)
from shoal.scan.report import FileReport, Finding, ScanLimits, Severity
from shoal.scan.streams import (
    Budget,
    ByteReader,
    Decompressed,
    LimitExceeded,
    Source,
    check_time,
    spool,
    time_budget,
)

__all__ = ["MissingPath", "iter_files", "scan_bytes", "scan_file", "scan_paths"]


class MissingPath(ConfigError, FileNotFoundError):
    """A path given to the scanner does not exist."""


_STREAM_ERRORS = (
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
)


def _seekable(src: object) -> bool:
    try:
        return bool(src.seekable())  # type: ignore[attr-defined]
    except Exception:
        return False


def _size(f: IO[bytes]) -> int | None:
    try:
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return end
    except (OSError, ValueError):
        return None


def _compression(head: bytes) -> str | None:
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    bz2_blocks = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in bz2_blocks:
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"\x04\x22\x4d\x18":
        return "lz4"
    if head[:1] == b"\x5d" and len(head) >= 13:
        try:
            lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(head, 1)
            return "lzma"
        except lzma.LZMAError:
            return None
    if len(head) >= 2 and head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0:
        try:
            zlib.decompressobj().decompress(head, 1)
            return "zlib"
        except zlib.error:
            return None
    if head[:2] == b"ZF" and re.fullmatch(rb"0x[0-9a-fA-F]+L?\s*", head[2:21]):
        return "zfile"  # joblib < 0.10 zlib container: 'ZF' + hex length padded to 19 bytes
    return None


_OPCODE_BYTES = [False] * 256
for _op in pickletools.opcodes:
    _OPCODE_BYTES[ord(_op.code.encode("latin-1"))] = True


def _hdf5_offset(head: bytes, f: IO[bytes] | None, size: int | None) -> int | None:
    """Where an HDF5 superblock starts: at 0 or after a user block of 512, 1024, 2048, ...
    bytes (the places libhdf5 looks). ``size``: the stream's, as ``_size`` measured it."""
    if head[:8] == HDF5_MAGIC:
        return 0
    if head[512:520] == HDF5_MAGIC:
        return 512
    if f is None or size is None:
        return None
    here = f.tell()
    try:
        offset = 1024
        while offset + 8 <= size:
            f.seek(offset)
            if f.read(8) == HDF5_MAGIC:
                return offset
            offset *= 2
    finally:
        f.seek(here)
    return None


# Every byte tarfile.nti's text reading of a number field can take (int(s.strip(), 8): octal
# digits, '_', a sign, a 0o prefix, and whatever str.strip removes): a field with any other
# byte before its first NUL is not a number, so the header is not a tar's.
_SPACES = bytes(c for c in range(128) if chr(c).isspace())
_OCTAL_TEXT = _SPACES + b"01234567_+-oO"
_ASCII = bytes(range(128))


def _tar_header(head: bytes) -> bool:
    """Whether tarfile (hence torch.load, which tries every non-zip file as a legacy tar)
    opens the stream: the ustar magic, or a first 512-byte header whose checksum holds, as in
    pre-POSIX (v7) tars, which have no magic at all."""
    if head[257:262] == b"ustar":
        return True
    if len(head) < 512:
        return False
    field = head[148:156]
    if field[0] not in (0o200, 0o377):
        text = field.split(b"\0", 1)[0]  # tarfile.nts
        if text.strip(_OCTAL_TEXT):
            return False  # a byte int(..., 8) never takes: tarfile.nti refuses the field
        digits = text.strip(_SPACES)
        if not digits.strip(b"01234567"):
            # plain octal digits or none: nti's int(digits or "0", 8), against calc_chksums
            # (the header's bytes summed unsigned and signed, the field counted as spaces)
            body = head[:148] + head[156:512]
            unsigned = 256 + sum(body)
            signed = unsigned - 256 * len(body.translate(None, _ASCII))
            return int(digits or b"0", 8) in (unsigned, signed)
    import tarfile  # here, not at the top: few model files are tars

    try:
        return tarfile.nti(head[148:156]) in tarfile.calc_chksums(head[:512])  # type: ignore[attr-defined]
    except (tarfile.HeaderError, ValueError):
        return False


def _has_zip_directory(f: IO[bytes], head: bytes, size: int | None) -> bool:
    """``zipfile.is_zipfile(f)``, which looks for the end-of-central-directory signature in
    the last 64 KiB + 22 bytes of the stream. ``head`` is the stream's first bytes: when they
    are the whole stream and hold no such signature, no zip reader finds a directory there,
    and the end is not read again."""
    if _END_OF_DIRECTORY not in head and size == len(head):
        return False
    try:
        return zipfile.is_zipfile(f)
    except (OSError, ValueError):
        return False


_END_OF_DIRECTORY = b"PK\x05\x06"


class _Scanner:
    def __init__(self, *, sink: Sink, limits: ScanLimits) -> None:
        self.sink = sink
        self.limits = limits
        self.budget = Budget(
            limits.max_total_bytes, ratio=limits.max_ratio, ratio_after=limits.ratio_after_bytes
        )
        self._spools: list[IO[bytes]] = []

    def close(self) -> None:
        for f in self._spools:
            f.close()
        self._spools.clear()

    def member(self, src: Source, name: str, hint: MemberHint, depth: int) -> str:
        """Scan a nested stream; stream errors become findings instead of aborting the parent."""
        try:
            return self.scan(src, name=name, depth=depth, hint=hint)
        except LimitExceeded as exc:
            self.sink.add(Severity.MEDIUM, "limit", f"{exc}; the rest was not verified", None)
        except _STREAM_ERRORS as exc:
            self.sink.add(Severity.MEDIUM, "malformed", f"stream cannot be read: {exc}", None)
        return "unreadable"

    def scan(self, src: Source, *, name: str, depth: int, hint: MemberHint) -> str:
        """Every plausible reading of the stream: pickle.load reads any file from byte 0 and
        stops at STOP, while containers (tar, safetensors, HDF5 with a user block, zip from its
        end, ...) read other bytes of the same file. Each reading is analysed; the report holds
        the findings of all of them, so the worst counts."""
        limits, sink = self.limits, self.sink
        if depth > limits.max_depth:
            sink.add(
                Severity.MEDIUM,
                "limit",
                f"refused: archives nested deeper than {limits.max_depth} (ScanLimits.max_depth)",
                None,
            )
            return "nested"
        check_time()
        seekable: IO[bytes] | None = src if _seekable(src) else None  # type: ignore[assignment]
        r = ByteReader(src)
        head = r.peek(1024)
        if not head:
            if depth == 0:
                sink.add(Severity.LOW, "empty", "empty file", 0)
            return "empty"
        if hint.torch_tar:
            # torch's legacy_load extracts this member and unpickles it record by record,
            # whatever else its bytes might also be.
            return scan_torch_tar_member(r, sink, limits=limits, member=hint.torch_tar).format
        # measured once: every sniff below that needs the stream's size asks for it
        size = _size(seekable) if seekable is not None else None
        ruled_out = False  # whether _other_format found none of the containers it knows
        if _OPCODE_BYTES[head[0]]:
            ruled_out = self._other_format(head, seekable, size) is None
        if _OPCODE_BYTES[head[0]] and not ruled_out:
            # A container that may also be a pickle at byte 0: read it both ways.
            with self._whole(seekable, r) as f:
                imports = probe_pickle_imports(ByteReader(f), sink, limits=limits, torch=False)
                f.seek(0)
                whole = size if f is seekable else _size(f)
                fmt = self._container(
                    f, ByteReader(f), head, name=name, depth=depth, hint=hint, size=whole
                )
                if imports:
                    sink.add(
                        Severity.MEDIUM,
                        "polyglot",
                        f"the file is both a pickle that imports code (read from byte 0) and {fmt}",
                        0,
                    )
                    fmt = f"pickle+{fmt}"
                return fmt
        return self._container(
            seekable, r, head, name=name, depth=depth, hint=hint, size=size, ruled_out=ruled_out
        )

    def _other_format(
        self, head: bytes, seekable: IO[bytes] | None, size: int | None
    ) -> str | None:
        """The non-pickle format the first bytes announce, if any (cheap: no parsing)."""
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return "zip"
        if head[:8] == HDF5_MAGIC or _hdf5_offset(head, seekable, size) is not None:
            return "hdf5"
        if _compression(head) is not None:
            return "compressed"
        if _tar_header(head):
            return "tar"
        if looks_like_safetensors(head, size):
            return "safetensors"
        return None

    def _container(
        self,
        seekable: IO[bytes] | None,
        r: ByteReader,
        head: bytes,
        *,
        name: str,
        depth: int,
        hint: MemberHint,
        size: int | None,
        ruled_out: bool = False,
    ) -> str:
        """``size``: the stream's (``_size``; None when not seekable). ``ruled_out``:
        ``_other_format`` already found none of zip, HDF5, compressed, tar and safetensors in
        these bytes, so they are not sniffed again."""
        limits, sink = self.limits, self.sink

        def sub(s: Source, n: str, h: MemberHint) -> str:
            return self.member(s, n, h, depth + 1)

        if head[:6] == b"\x93NUMPY":
            return scan_npy(r, sink, limits=limits)
        if not ruled_out:
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                with self._whole(seekable, r) as f:
                    return scan_zip(f, sink, limits=limits, scan_member=sub, budget=self.budget)
            if head[:8] == HDF5_MAGIC or _hdf5_offset(head, seekable, size) is not None:
                with self._whole(seekable, r) as f:
                    return scan_hdf5(f, sink, limits=limits, weights_only=hint.keras_weights)
            codec = _compression(head)
            if codec is not None:
                return self._compressed(r, codec, name=name, depth=depth, hint=hint)
            if _tar_header(head):
                with self._whole(seekable, r) as f:
                    return scan_tar(f, sink, limits=limits, scan_member=sub)
            if looks_like_safetensors(head, size):
                return scan_safetensors(r, sink, limits=limits, size=size)
        if head[0] == 0x08:
            fmt = scan_onnx(r, sink, strict=name.lower().endswith(".onnx"))
            return fmt or self._unknown()
        if head.lstrip()[:1] in (b"{", b"["):
            fmt = scan_json(r, sink, limits=limits)
            return fmt or self._unknown()
        outcome = scan_pickle_stream(
            r, sink, limits=limits, torch=hint.torch, probe=True, joblib_arrays=not hint.torch
        )
        fmt = outcome.format
        if seekable is not None and _has_zip_directory(seekable, head, size):
            # A zip directory at the end of a non-zip file: loaders that look at the end
            # (zipfile, numpy) see an archive, loaders that look at the start see the rest.
            sink.add(
                Severity.MEDIUM,
                "polyglot",
                "a zip archive is appended to this file (two loaders read two different files)",
                None,
            )
            seekable.seek(0)
            zfmt = scan_zip(seekable, sink, limits=limits, scan_member=sub, budget=self.budget)
            fmt = f"{fmt}+{zfmt}" if fmt else zfmt
        return fmt or self._unknown()

    def _unknown(self) -> str:
        self.sink.add(
            Severity.MEDIUM,
            "unknown-format",
            "not a recognised model format: the scanner cannot tell what a loader would do",
            0,
        )
        return "unknown"

    @contextlib.contextmanager
    def _whole(self, seekable: IO[bytes] | None, r: ByteReader) -> Iterator[IO[bytes]]:
        """The entire stream as a seekable file at offset 0 (a temp copy if forward-only)."""
        if seekable is not None:
            seekable.seek(0)
            yield seekable
            return
        f = spool(r.raw(), limit=self.limits.max_spool_bytes)
        self._spools.append(f)
        try:
            yield f
        finally:
            f.close()
            self._spools.remove(f)

    def _compressed(
        self, r: ByteReader, codec: str, *, name: str, depth: int, hint: MemberHint
    ) -> str:
        raw = r.raw()
        if codec == "lz4":
            try:
                import lz4.frame
            except ImportError:
                self.sink.add(
                    Severity.MEDIUM,
                    "unsupported",
                    "lz4-compressed (joblib can load it) but the lz4 package is not installed",
                    0,
                )
                return "lz4"
            stream: Source = lz4.frame.LZ4FrameFile(raw, mode="rb")
        else:
            if codec == "zfile":
                raw.read(21)
            stream = Decompressed(
                base=raw,
                codec="zlib" if codec == "zfile" else codec,
                limit=self.limits.max_member_bytes,
                budget=self.budget,
            )
        inner = self.member(stream, name, hint, depth + 1)
        return f"{inner}+{codec}" if inner not in ("unknown", "unreadable", "empty") else codec


def _report(path: str, fmt: str, sink: Sink) -> FileReport:
    items = sink.items()
    if sink.overflow:
        items.append(
            (
                Severity.MEDIUM,
                "limit",
                f"{sink.overflow} more findings were not listed (finding limit reached)",
                None,
            )
        )
    findings = tuple(Finding(sev, kind, detail, offset) for sev, kind, detail, offset in items)
    worst = max((f.severity for f in findings), default=Severity.NONE)
    return FileReport(path=path, format=fmt, severity=worst, findings=findings)


def _scan_source(src: IO[bytes], *, path: str, limits: ScanLimits) -> FileReport:
    sink = Sink(limit=limits.max_findings)
    scanner = _Scanner(sink=sink, limits=limits)
    try:
        with time_budget(limits.max_seconds):
            fmt = scanner.scan(src, name=path, depth=0, hint=MemberHint())
    except LimitExceeded as exc:
        sink.add(Severity.MEDIUM, "limit", f"{exc}; the rest was not verified", None)
        fmt = "unknown"
    except _STREAM_ERRORS as exc:
        sink.add(Severity.MEDIUM, "malformed", f"file cannot be read: {exc}", None)
        fmt = "unknown"
    except (RecursionError, MemoryError) as exc:
        sink.add(Severity.MEDIUM, "limit", f"scanner ran out of resources: {exc!r}", None)
        fmt = "unknown"
    except Exception as exc:  # a scanner bug must not pass a file as clean
        sink.add(Severity.MEDIUM, "scanner-error", f"scanner failed: {exc!r}", None)
        fmt = "unknown"
    finally:
        scanner.close()
    return _report(path, fmt, sink)


_DEFAULT_LIMITS = ScanLimits()  # frozen: one for every call that gives none
_PATH = type(Path())  # PosixPath or WindowsPath


def scan_file(path: str | os.PathLike[str], *, limits: ScanLimits | None = None) -> FileReport:
    """Scan one file. Never executes or imports anything named by the file."""
    limits = limits or _DEFAULT_LIMITS
    # a Path as iter_files makes them is kept: Path() of it parses its parts again
    p = path if type(path) is _PATH else Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise MissingPath(f"{str(p)!r} does not exist; give an existing file or folder") from None
    except OSError as exc:  # a name too long, a folder that may not be searched: load refuses
        finding = Finding(Severity.MEDIUM, "unreadable", f"cannot open: {exc.strerror}", None)
        return FileReport(
            path=str(p), format="unknown", severity=Severity.MEDIUM, findings=(finding,)
        )
    if not stat.S_ISREG(st.st_mode):
        finding = Finding(Severity.LOW, "not-a-file", "not a regular file; skipped", None)
        return FileReport(path=str(p), format="special", severity=Severity.LOW, findings=(finding,))
    try:
        with open(p, "rb") as f:
            return _scan_source(f, path=str(p), limits=limits)
    except OSError as exc:
        finding = Finding(Severity.MEDIUM, "unreadable", f"cannot open: {exc.strerror}", None)
        return FileReport(
            path=str(p), format="unknown", severity=Severity.MEDIUM, findings=(finding,)
        )


def scan_bytes(
    data: bytes, *, name: str = "<bytes>", limits: ScanLimits | None = None
) -> FileReport:
    """Scan an in-memory file (same analysis as ``scan_file``)."""
    return _scan_source(io.BytesIO(bytes(data)), path=name, limits=limits or _DEFAULT_LIMITS)


def _exists(p: Path) -> bool:
    """Whether ``p`` may exist: pathlib raises, rather than answers, for a name too long or a
    folder that may not be searched; such a path is kept, for scan_file to report."""
    try:
        return p.exists()
    except OSError:
        return True


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files under the given paths (folders walked, sorted; symlinks inside folders skipped)."""
    for raw in paths:
        p = Path(raw)
        if not _exists(p):
            raise MissingPath(f"{str(p)!r} does not exist; give an existing file or folder")
        if not _is_dir(p):
            yield p  # scan_file reports what it cannot open
            continue
        for root, dirs, files in os.walk(p, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                child = Path(root) / name
                if not child.is_symlink():
                    yield child


def scan_paths(
    paths: Iterable[str | os.PathLike[str]], *, limits: ScanLimits | None = None
) -> list[FileReport]:
    """Scan files and folders; raises ``MissingPath`` before scanning if any path is missing."""
    plist = list(paths)
    for raw in plist:
        if not _exists(Path(raw)):
            raise MissingPath(f"{str(raw)!r} does not exist; give an existing file or folder")
    return [scan_file(p, limits=limits) for p in iter_files(plist)]
