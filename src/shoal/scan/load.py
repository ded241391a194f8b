"""Safe loading: scan first, then build the file's contents without calling anything it names.

What loads (each through ``shoal.scan.unpickle.Unpickler`` or a raw-bytes reader):

* pickles (protocols 0-5, plain or gzip/bz2/xz/lzma/zlib-compressed) of plain containers and
  scalars, ``collections.OrderedDict``, NumPy arrays, dtypes and scalars;
* joblib files (compressed too) of the same, with joblib's raw array blocks;
* torch checkpoints, zip and legacy formats, of tensors, parameters and containers (state
  dicts), as CPU tensors; needs the ``torch`` extra;
* ``.npy`` (object arrays too, when their pickle holds only the above), ``.npz``, safetensors.

What is refused, by name: every other global (estimators, modules, functions, classes of any
library: scikit-learn models included), persistent ids outside torch files, extension codes,
out-of-band buffers, TorchScript, structured dtypes inside pickles, and anything beyond a limit
of ``ScanLimits``. ``restricted_loads`` is that same interpreter for bytes in memory; there is no
unpickler subclass any more (``pickle.Unpickler.find_class`` hands the file's arguments to real
constructors, which is how the old allowlist was broken).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from shoal.errors import ConfigError, ShoalError, UnsafeModelError
from shoal.scan.archives import member_source
from shoal.scan.brief import brief
from shoal.scan.builders import build_array, empty_bytes
from shoal.scan.formats import npy_header
from shoal.scan.report import FileReport, ScanLimits, Severity
from shoal.scan.scanner import scan_file
from shoal.scan.streams import Budget as StreamBudget
from shoal.scan.streams import ByteReader, Decompressed, LimitExceeded, time_budget
from shoal.scan.unpickle import Budget, Pending, Reconstructor, Unpickler, refuse

__all__ = ["load", "loads", "restricted_loads"]

_CODECS = {"zlib", "gzip", "bz2", "xz", "lzma", "zfile"}


def restricted_loads(data: bytes, *, limits: ScanLimits | None = None) -> Any:
    """Unpickle bytes with shoal's interpreter (no scan): plain values and NumPy arrays only.

    Kept for callers of the old API; it no longer wraps ``pickle.Unpickler``.
    """
    return loads(data, limits=limits)


def loads(data: bytes, *, limits: ScanLimits | None = None) -> Any:
    """Build the first pickle in ``data`` (plain values, NumPy arrays, joblib arrays)."""
    limits = limits or ScanLimits()
    with _only_shoal_errors("<bytes>", limits):
        return _unpickler(ByteReader(io.BytesIO(bytes(data))), limits, joblib=True).load()


# --- joblib ------------------------------------------------------------------------------------

_JOBLIB_ATTRS = frozenset(
    {"subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes"}
)
_JOBLIB_ARGS = ("subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes")


def _joblib_new(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    return Pending("joblib array")  # NEWOBJ: cls.__new__ sets no attributes


def _joblib_call(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    if len(args) > len(_JOBLIB_ARGS):
        raise refuse("joblib NumpyArrayWrapper with too many arguments")
    attrs = dict(zip(_JOBLIB_ARGS, args, strict=False))
    attrs.setdefault("allow_mmap", False)
    attrs.setdefault("numpy_array_alignment_bytes", 16)
    return Pending("joblib array", attrs)


def joblib_state(attrs: dict[str, Any], state: Any) -> dict[str, Any]:
    """The wrapper's attributes after BUILD, as joblib's ``load_build`` leaves them."""
    out = dict(attrs)
    parts = [state]
    if type(state) is tuple and len(state) == 2:
        parts = list(state)
    for part in parts:
        if part is None:
            continue
        if type(part) is not dict:
            raise refuse("a joblib array header that is not a dict")
        for key in part:
            if type(key) is not str or key not in _JOBLIB_ATTRS:
                raise refuse(f"joblib array header key {brief(key)}")
        out.update(part)  # later keys win, as in the dict pickle builds
    return out


def joblib_layout(attrs: dict[str, Any]) -> tuple[Any, tuple[int, ...], bool, bool]:
    """(dtype, shape, fortran, padded) exactly as joblib's ``read_array`` will read them."""
    import numpy as np

    subclass = attrs.get("subclass")
    if not (isinstance(subclass, Reconstructor) and subclass.tag == "numpy.ndarray"):
        raise refuse("a joblib array of a class other than numpy.ndarray")
    dtype = attrs.get("dtype")
    if not isinstance(dtype, np.dtype):
        raise refuse("a joblib array header without a dtype shoal built")
    shape = attrs.get("shape")
    if type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape):
        raise refuse(f"joblib array shape {brief(shape)}")
    order = attrs.get("order")
    if order not in ("C", "F"):
        raise refuse(f"joblib array order {brief(order)}")
    return dtype, shape, order == "F", attrs.get("numpy_array_alignment_bytes") is not None


def _joblib_build(vm: Unpickler, p: Pending, state: Any) -> Any:
    attrs = joblib_state(p.attrs, state)
    dtype, shape, fortran, padded = joblib_layout(attrs)
    if dtype.hasobject:
        value = vm.nested().load()
        import numpy as np

        if not isinstance(value, np.ndarray):
            raise refuse("a joblib object array whose pickle is not an array")
        return value
    if padded:
        pad = vm.r.byte()
        if pad > 0:
            vm.blob(pad)
    count = 1
    for d in shape:
        count *= d
    n = count * dtype.itemsize
    data, got = vm.r.read_buffer(n, empty_bytes)
    if got != n:
        raise refuse(f"a truncated joblib array ({n} bytes declared, {got} present)")
    vm.budget.add_read(n)
    arr = build_array(data, dtype, shape, fortran=fortran)
    vm.budget.add_built(arr.nbytes)
    if arr.dtype.byteorder == ">":  # joblib.load swaps to native order, so does shoal
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


_JOBLIB = {
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): Reconstructor(
        "joblib.numpy_pickle.NumpyArrayWrapper", call=_joblib_call, new=_joblib_new
    )
}


def _unpickler(
    reader: ByteReader, limits: ScanLimits, *, joblib: bool, budget: Budget | None = None
) -> Unpickler:
    return Unpickler(
        reader,
        limits=limits,
        budget=budget,
        extra=_JOBLIB if joblib else None,
        builders={"joblib array": _joblib_build} if joblib else None,
    )


# --- streams -----------------------------------------------------------------------------------


def _open_stream(path: str, codec: str | None, limits: ScanLimits) -> IO[bytes]:
    f = open(path, "rb")  # noqa: SIM115 (wrapped and closed by the caller)
    if codec is None:
        return f
    if codec == "zfile":
        f.read(21)
    stream: IO[bytes] = Decompressed(  # type: ignore[assignment]
        base=f,
        codec="zlib" if codec == "zfile" else codec,
        limit=limits.max_member_bytes,
        owns_base=True,
        budget=StreamBudget(
            limits.max_total_bytes, ratio=limits.max_ratio, ratio_after=limits.ratio_after_bytes
        ),
    )
    return stream


def _refusal(report: FileReport) -> UnsafeModelError:
    worst = max(report.findings, key=lambda f: f.severity)
    more = len([f for f in report.findings if f.severity >= Severity.MEDIUM]) - 1
    extra = f" (and {more} more)" if more > 0 else ""
    return UnsafeModelError(
        f"{report.path}: refusing to load: {worst.severity.label} {worst.kind}: {worst.detail}"
        f"{extra}; run `shoal scan {report.path}` for the full report"
    )


@contextmanager
def _only_shoal_errors(path: str, limits: ScanLimits) -> Iterator[None]:
    """Whatever the bytes do, the caller sees a ShoalError that names the file."""
    try:
        with time_budget(limits.max_seconds):
            yield
    except ShoalError as exc:
        text = str(exc)
        if isinstance(exc, UnsafeModelError) and not text.startswith(path):
            raise UnsafeModelError(f"{path}: {text}") from None
        raise
    except LimitExceeded as exc:
        raise UnsafeModelError(f"{path}: {exc}") from None
    except MemoryError:
        raise UnsafeModelError(f"{path}: refused: ran out of memory while loading") from None
    except RecursionError:
        raise UnsafeModelError(f"{path}: refused: values nested too deeply") from None
    except Exception as exc:  # a corrupt file: loaders raise every builtin type
        raise UnsafeModelError(f"{path}: cannot be loaded: {type(exc).__name__}: {exc}") from None


def load(
    path: str | os.PathLike[str],
    *,
    limits: ScanLimits | None = None,
    map_location: str = "cpu",
) -> Any:
    """Scan ``path``, then build its contents if nothing reaches ``MEDIUM``.

    Pickles and joblib files come back as plain values and NumPy arrays, torch files as CPU
    tensors in their containers, ``.npy`` as an array, ``.npz`` and safetensors as dicts of
    arrays. Raises ``UnsafeModelError`` naming the worst finding, or what the loader refused;
    only ``ShoalError`` subclasses ever escape, whatever the bytes.
    """
    limits = limits or ScanLimits()
    if map_location != "cpu":
        raise ConfigError(f"map_location={map_location!r}: shoal.scan.load builds CPU tensors only")
    report = scan_file(path, limits=limits)
    if report.severity >= Severity.MEDIUM:
        raise _refusal(report)
    spath = os.fspath(path)
    with _only_shoal_errors(spath, limits):
        return _load(spath, report.format, limits)


def _load(path: str, fmt: str, limits: ScanLimits) -> Any:
    base, _, codec_part = fmt.partition("+")
    codec = codec_part if codec_part in _CODECS else None
    if codec_part and codec is None:
        raise UnsafeModelError(f"{path}: shoal.scan.load does not load {fmt} files")
    if base in ("pickle", "joblib"):
        with _open_stream(path, codec, limits) as fh:
            return _unpickler(ByteReader(fh), limits, joblib=base == "joblib").load()
    if base == "torch" and codec is None:
        from shoal.scan.torch_load import load_torch_zip

        return load_torch_zip(path, limits)
    if base == "torch-legacy" and codec is None:
        from shoal.scan.torch_load import load_torch_legacy

        return load_torch_legacy(path, limits)
    if base == "numpy":
        with _open_stream(path, codec, limits) as fh:
            return _read_npy(fh, limits)
    if base == "npz" and codec is None:
        return _read_npz(path, limits)
    if base == "safetensors" and codec is None:
        from safetensors.numpy import load_file

        return load_file(path)
    raise UnsafeModelError(
        f"{path}: shoal.scan.load does not load {fmt} files (it loads pickles, joblib, torch, "
        ".npy, .npz and safetensors files)"
    )


# --- NumPy -------------------------------------------------------------------------------------


def _read_npy(fh: IO[bytes], limits: ScanLimits, budget: Budget | None = None) -> Any:
    r = ByteReader(fh)
    header = npy_header(r, limits)
    dtype, shape, fortran = header
    budget = budget or Budget(limits)
    if dtype.hasobject:
        value = _unpickler(r, limits, joblib=False, budget=budget).load()
        import numpy as np

        if not isinstance(value, np.ndarray):
            raise refuse("an object .npy whose pickle is not an array")
        return value
    count = 1
    for d in shape:
        count *= d
    n = count * dtype.itemsize
    data, got = r.read_buffer(n, empty_bytes)
    if got != n:
        raise refuse(f".npy data is truncated ({n} bytes declared, {got} present)")
    budget.add_read(n)
    arr = build_array(data, dtype, shape, fortran=fortran)
    return arr


def _read_npz(path: str, limits: ScanLimits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    budget = Budget(limits)
    stream_budget = StreamBudget(
        limits.max_total_bytes, ratio=limits.max_ratio, ratio_after=limits.ratio_after_bytes
    )
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise refuse(f"more than {limits.max_members} members (ScanLimits.max_members)")
        for info in infos:
            if info.filename.endswith("/"):  # ZipInfo.is_dir() fails on an empty name
                continue
            src = member_source(f, zf, info, limits, stream_budget)
            if src is None:
                raise refuse(f"member {info.filename!r}: compression method not supported")
            key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else None
            if key is None:
                raise refuse(f"member {info.filename!r} is not a .npy array")
            out[key] = _read_npy(src, limits, budget)  # type: ignore[arg-type]
    return out
