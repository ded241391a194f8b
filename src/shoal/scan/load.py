"""Safe loading: scan first, then load with loaders that cannot import beyond the allowlist.

Even after a clean scan the loaders enforce the allowlist themselves (a restricted unpickler,
torch's weights-only unpickler, pickle-free array readers), so a file swapped between scan and
load still cannot run code.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import struct
import zipfile
from typing import IO, Any

from shoal.errors import ConfigError, UnsafeModelError
from shoal.scan.allowlist import is_allowed
from shoal.scan.report import FileReport, ScanLimits, Severity
from shoal.scan.scanner import scan_file
from shoal.scan.streams import Decompressed

__all__ = ["RestrictedUnpickler", "load", "restricted_loads"]

_CODECS = {"zlib", "gzip", "bz2", "xz", "lzma", "zfile"}


def _refuse_import(module: str, name: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"refusing to import {module}.{name}: it is not on shoal's allowlist of safe data "
        "constructors; only load this file if you trust its author"
    )


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allowlisted globals."""

    def find_class(self, module: str, name: str) -> Any:
        if not is_allowed(module, name) or (module, name) == (
            "joblib.numpy_pickle",
            "NumpyArrayWrapper",
        ):
            raise _refuse_import(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeModelError("refusing a persistent id: only torch files may use them")


def restricted_loads(data: bytes) -> Any:
    """Unpickle bytes with the allowlist enforced (no scan; for already-vetted payloads)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


class _JoblibArray:
    """Stands in for joblib's NumpyArrayWrapper: BUILD fills its attributes, then we read."""

    shape: tuple[int, ...]
    order: str
    dtype: Any

    def read(self, fh: IO[bytes]) -> Any:
        import numpy as np

        if not isinstance(self.dtype, np.dtype) or not isinstance(self.shape, tuple):
            raise UnsafeModelError("joblib array header is malformed")
        if self.dtype.hasobject:
            return _JoblibUnpickler(fh).load()
        if getattr(self, "numpy_array_alignment_bytes", None) is not None:
            pad = fh.read(1)
            if pad:
                fh.read(pad[0])
        count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        arr = _read_into(fh, count, self.dtype)
        if self.order == "F":
            return arr.reshape(self.shape[::-1]).transpose()
        return arr.reshape(self.shape)


class _JoblibUnpickler(pickle._Unpickler):  # pure-Python: its BUILD can be intercepted
    dispatch = pickle._Unpickler.dispatch.copy()

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__(fh)
        self._fh = fh

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
            return _JoblibArray
        if not is_allowed(module, name):
            raise _refuse_import(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeModelError("refusing a persistent id in a joblib file")

    def load_build(self) -> None:
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        top = self.stack[-1]  # type: ignore[attr-defined]
        if isinstance(top, _JoblibArray):
            self.stack[-1] = top.read(self._fh)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]


def _read_into(fh: IO[bytes], count: int, dtype: Any) -> Any:
    import numpy as np

    arr = np.empty(count, dtype=dtype)
    if count and dtype.itemsize:
        view = memoryview(arr.view(np.uint8).reshape(-1).data)
        got = 0
        while got < len(view):
            chunk = fh.read(min(len(view) - got, 1 << 24))
            if not chunk:
                raise UnsafeModelError("array data is truncated")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
    return arr


def _read_npy(fh: IO[bytes]) -> Any:
    import numpy as np
    from numpy.lib import format as npformat

    magic = fh.read(8)
    if magic[:6] != b"\x93NUMPY":
        raise UnsafeModelError("not a .npy array")
    if magic[6] == 1:
        (hlen,) = struct.unpack("<H", fh.read(2))
    else:
        (hlen,) = struct.unpack("<I", fh.read(4))
    text = fh.read(hlen).decode("utf-8" if magic[6] == 3 else "latin-1")
    header = ast.literal_eval(text)
    dtype = npformat.descr_to_dtype(header["descr"])
    shape = tuple(header["shape"])
    if dtype.hasobject:
        return RestrictedUnpickler(fh).load()
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    arr = _read_into(fh, count, dtype)
    if header["fortran_order"]:
        return arr.reshape(shape[::-1]).transpose()
    return arr.reshape(shape)


def _open_stream(path: str, codec: str | None) -> IO[bytes]:
    f = open(path, "rb")  # noqa: SIM115 (wrapped and closed by the caller)
    if codec is None:
        return f
    if codec == "zfile":
        f.read(21)
    inner = Decompressed(
        base=f, codec="zlib" if codec == "zfile" else codec, limit=1 << 62, owns_base=True
    )
    return io.BufferedReader(inner)


def _refusal(report: FileReport) -> UnsafeModelError:
    worst = max(report.findings, key=lambda f: f.severity)
    more = len([f for f in report.findings if f.severity >= Severity.MEDIUM]) - 1
    extra = f" (and {more} more)" if more > 0 else ""
    return UnsafeModelError(
        f"{report.path}: refusing to load: {worst.severity.label} {worst.kind}: {worst.detail}"
        f"{extra}; run `shoal scan {report.path}` for the full report"
    )


def load(
    path: str | os.PathLike[str],
    *,
    limits: ScanLimits | None = None,
    map_location: str = "cpu",
) -> Any:
    """Scan ``path`` and load it only if nothing reaches ``MEDIUM``.

    Pickles and joblib files come back as their objects, torch files as torch objects
    (``weights_only=True``), ``.npy`` as an array, ``.npz`` and safetensors as dicts of arrays.
    Raises ``UnsafeModelError`` naming the worst finding otherwise.
    """
    report = scan_file(path, limits=limits)
    if report.severity >= Severity.MEDIUM:
        raise _refusal(report)
    base, _, codec_part = report.format.partition("+")
    codec = codec_part if codec_part in _CODECS else None
    if codec_part and codec is None:
        raise ConfigError(f"{path}: {report.format} files cannot be loaded by shoal.scan.load")
    spath = os.fspath(path)
    if base in ("pickle", "joblib"):
        with _open_stream(spath, codec) as fh:
            if base == "joblib":
                return _JoblibUnpickler(fh).load()
            return RestrictedUnpickler(fh).load()
    if base in ("torch", "torch-legacy") and codec is None:
        return _load_torch(spath, map_location)
    if base == "numpy":
        with _open_stream(spath, codec) as fh:
            return _read_npy(fh)
    if base == "npz" and codec is None:
        out = {}
        with zipfile.ZipFile(spath) as zf:
            for name in zf.namelist():
                with zf.open(name) as member:
                    out[name[: -len(".npy")]] = _read_npy(member)
        return out
    if base == "safetensors" and codec is None:
        from safetensors.numpy import load_file

        return load_file(spath)
    raise ConfigError(
        f"{path}: shoal.scan.load does not load {report.format} files; the scan found nothing "
        "unsafe, so load it with its own library"
    )


def _load_torch(path: str, map_location: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"{path} is a torch checkpoint; install the torch extra (pip install 'shoal[torch]')"
        ) from None
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        raise UnsafeModelError(f"{path}: torch's weights-only loader refused it: {exc}") from None
