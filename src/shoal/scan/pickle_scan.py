"""Symbolic pickle analysis: walk the opcodes, simulate stack and memo, classify every import.

Nothing is imported or executed. Opcodes and their argument formats come from ``pickletools``
(its opcode table and line readers); arguments are read here rather than through
``pickletools.genops`` because genops materialises every length-prefixed argument, and a
single BINBYTES8 in a hostile file can claim terabytes. Large arguments are skipped instead.
"""

from __future__ import annotations

import io
import itertools
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.errors import UnsafeModelError
from shoal.scan.allowlist import classify_global, normalize_global
from shoal.scan.brief import brief
from shoal.scan.depth import nesting
from shoal.scan.opcodes import (
    F8,
    I4,
    OPCODES,
    PLAIN_INT,
    U2,
    U4,
    dispatch_table,
    text_literal,
)
from shoal.scan.report import ScanLimits, Severity
from shoal.scan.streams import ByteReader, check_time, size_text

__all__ = [
    "TORCH_LEGACY_MAGIC",
    "PickleOutcome",
    "Sink",
    "probe_pickle_imports",
    "scan_pickle_stream",
]

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Arguments up to this size are kept (names, small strings); larger ones are skipped.
_KEEP_BYTES = 1 << 16
_LINE_LIMIT = 1 << 16
_CONTAINER_KEEP = 512  # items remembered per list/dict (the rest are only counted)
_KEPT_BUDGET = 2_000_000  # items remembered across all containers of one stream
_MAX_NESTED = 16  # pickles nested inside joblib object arrays
_INLINE = True  # tests turn the inline opcode loop off to check it against the handlers

# The inline loop's branches, in the order its ``if`` chain tests them (the order model files
# use them): ``_SLOTS[code]`` is the index of the branch that reads ``code``, and
# len(_BRANCH_CODES) for an opcode the loop leaves to its handler. The loop tests that index
# in groups of six, so an opcode costs a lookup and at most ~11 compares wherever it sits in
# the order (a chain of 36 tests cost protocol 0's PUT and GET 33 and 34).
_BRANCH_CODES: tuple[tuple[int, ...], ...] = (
    (0x68,),  # BINGET
    (0x94,),  # MEMOIZE
    (0x4B,),  # BININT1
    (0x4A,),  # BININT
    (0x28,),  # MARK
    (0x74,),  # TUPLE
    (0x71, 0x72),  # BINPUT, LONG_BINPUT
    (0x8C, 0x43),  # SHORT_BINUNICODE, SHORT_BINBYTES
    (0x47,),  # BINFLOAT
    (0x4D,),  # BININT2
    (0x85,),  # TUPLE1
    (0x86,),  # TUPLE2
    (0x4E, 0x88, 0x89),  # NONE, NEWTRUE, NEWFALSE
    (0x87,),  # TUPLE3
    (0x52, 0x81),  # REDUCE, NEWOBJ
    (0x73,),  # SETITEM
    (0x62,),  # BUILD
    (0x58, 0x42),  # BINUNICODE, BINBYTES
    (0x75, 0x65),  # SETITEMS, APPENDS
    (0x61,),  # APPEND
    (0x29,),  # EMPTY_TUPLE
    (0x7D, 0x5D),  # EMPTY_DICT, EMPTY_LIST
    (0x6A,),  # LONG_BINGET
    (0x93,),  # STACK_GLOBAL
    (0x70, 0x67),  # PUT, GET
    (0x49, 0x56),  # INT, UNICODE
    (0x63,),  # GLOBAL
    (0x95,),  # FRAME
    (0x30,),  # POP
    (0x32,),  # DUP
    (0x31,),  # POP_MARK
    (0x8F,),  # EMPTY_SET
    (0x91, 0x6C, 0x64),  # FROZENSET, LIST, DICT
    (0x90,),  # ADDITEMS
    (0x80,),  # PROTO
    (0x55,),  # SHORT_BINSTRING
)
_SLOTS: list[int] = [len(_BRANCH_CODES)] * 256
for _k, _codes in enumerate(_BRANCH_CODES):
    for _c in _codes:
        _SLOTS[_c] = _k
del _k, _codes, _c

_OPCODES = OPCODES


class Sink:
    """Collects findings for one top-level file; ``where`` prefixes nested member paths."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._seen: dict[tuple[Severity, str, str], list[Any]] = {}
        self._order: list[tuple[Severity, str, str]] = []
        self.where = ""
        self.overflow = 0

    def add(self, severity: Severity, kind: str, detail: str, offset: int | None) -> None:
        if self.where:
            detail = f"{self.where}: {detail}"
        self._add_key((severity, kind, detail), offset)

    def scratch(self) -> Sink:
        """An empty sink with the same context, for analyses that may be thrown away."""
        other = Sink(limit=self._limit)
        other.where = self.where
        return other

    def merge(self, other: Sink) -> None:
        for key in other._order:
            offset, count = other._seen[key]
            self._add_key(key, offset, count)
        self.overflow += other.overflow

    def _add_key(self, key: tuple[Severity, str, str], offset: int | None, count: int = 1) -> None:
        hit = self._seen.get(key)
        if hit is not None:
            hit[1] += count
            return
        if len(self._order) >= self._limit:
            self.overflow += 1
            return
        self._seen[key] = [offset, count]
        self._order.append(key)

    def items(self) -> list[tuple[Severity, str, str, int | None]]:
        out = []
        for key in self._order:
            offset, count = self._seen[key]
            sev, kind, detail = key
            if count > 1:
                detail = f"{detail} (x{count})"
            out.append((sev, kind, detail, offset))
        return out

    @property
    def worst(self) -> Severity:
        return max((k[0] for k in self._order), default=Severity.NONE)


class _Malformed(Exception):
    """The real unpickler would raise here; analysis of this pickle stops."""


class _Abort(Exception):
    """A limit was hit or the stream cannot be followed further; already reported."""


# --- symbolic values -------------------------------------------------------------------------


class _Glob:
    """An imported global. ``plain``: a call of it has nothing for ``_check_args`` to check
    (not allowlisted, so never checked, or allowlisted with no check for its arguments).
    ``build``: what a BUILD on a call's result needs beyond the state's own check (0 nothing,
    1 the handler: numpy.dtype or joblib's wrapper, 2 whether its argument is the wrapper)."""

    __slots__ = ("build", "module", "name", "plain", "qual", "quiet", "severity")

    def __init__(self, module: str, name: str, severity: Severity) -> None:
        self.module = module
        self.name = name
        self.severity = severity
        self.qual = qual = f"{module}.{name}"  # read by every check of every call: made once
        self.plain = severity != Severity.NONE or not _call_checked(qual)
        self.quiet = 0 if self.plain else _QUIET_KINDS.get(qual, 0)  # see _quiet_call
        if qual == "numpy.dtype" or qual == _JOBLIB_WRAPPER:
            self.build = 1
        elif _makes_instance(module, name):
            self.build = 2
        else:
            self.build = 0


class _Obj:
    """Result of a call or construction; ``origin`` is None when the callable was computed.
    ``new`` marks NEWOBJ (``cls.__new__``: the arguments set no attributes)."""

    __slots__ = ("args", "filled", "new", "origin", "state")

    def __init__(self, origin: _Glob | None, args: Any = None, *, new: bool = False) -> None:
        self.origin = origin
        self.args = args
        self.new = new
        self.state: Any = None
        self.filled = 0  # items SETITEM / APPEND / ADDITEMS put into it


# Call results that SETITEM / APPEND / ADDITEMS may fill: the containers pickle itself uses.
_CONTAINER_CLASSES = frozenset(
    {
        "builtins.dict",
        "builtins.list",
        "builtins.set",
        "collections.OrderedDict",
        "collections.Counter",
        "collections.defaultdict",
        "collections.deque",
        "sklearn.utils._bunch.Bunch",
        "sklearn.utils.Bunch",
    }
)
_BIT_GENERATORS = frozenset(
    {
        "numpy.random._mt19937.MT19937",
        "numpy.random._pcg64.PCG64",
        "numpy.random._pcg64.PCG64DXSM",
        "numpy.random._philox.Philox",
        "numpy.random._sfc64.SFC64",
    }
)


def _is_bit_generator(v: Any) -> bool:
    return (
        isinstance(v, _Obj)
        and v.origin is not None
        and (
            v.origin.qual == "numpy.random._pickle.__bit_generator_ctor"
            or v.origin.qual in _BIT_GENERATORS
        )
    )


# Calls whose result is a dict whose keys a BUILD would turn into attribute names.
_DICT_MAKERS = frozenset(
    {
        "builtins.dict",
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.Counter",
        "sklearn.utils._bunch.Bunch",
        "sklearn.utils.Bunch",
    }
)
# Allowlisted helpers that call one of their arguments, and what that argument may be.
_NDARRAY_CLASSES = frozenset({"numpy.ndarray", "numpy.matrix", "numpy.matrixlib.defmatrix.matrix"})
# Allowlisted helpers whose arguments decide what they call or which attributes they set: their
# argument tuple must be written out in the file.
_CHECKED_ARGUMENTS = frozenset(
    {
        "numpy.random._pickle.__bit_generator_ctor",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_parameter_with_state",
    }
)
_CALLS_ARGUMENT = {
    "numpy.random._pickle.__randomstate_ctor": "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor": "numpy.random._pickle.__bit_generator_ctor",
}
# The other allowlisted helpers that call something one of their arguments names (its
# ``__new__``, ``__init__`` or a method), keep callables for later, or build a tensor nobody
# checks: each entry says what the real helper does, and _check_args what its arguments may be.
_PLAIN_BASES = frozenset(
    "builtins." + n
    for n in [
        "object",
        "dict",
        "list",
        "set",
        "frozenset",
        "tuple",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "bool",
    ]
)
_TENSOR_CLASSES = frozenset(
    {"torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.parameter.Buffer"}
)
_MASKED_CLASSES = frozenset({"numpy.ma.MaskedArray", "numpy.ma.core.MaskedArray"})
# (helper, index of its backward_hooks argument): torch keeps the hooks on the tensor and calls
# each one during backward, so a hook is a callable the file chose, run later.
_HOOKS_AT = {
    "torch._utils._rebuild_tensor_v2": 5,
    "torch._utils._rebuild_parameter": 2,
    "torch._utils._rebuild_parameter_with_state": 2,
    "torch._utils._rebuild_qtensor": 6,
}
_CHOOSES_CALLEE = frozenset(
    {
        "copyreg._reconstructor",  # base.__new__(cls, state), then base.__init__(obj, state)
        "numpy.ma.core._mareconstruct",  # subtype.__new__(subtype, data, mask=..., dtype=...)
        "torch._utils._rebuild_wrapper_subclass",  # Tensor._make_wrapper_subclass(cls, ...)
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",  # data.to(dtype, device)
        *_HOOKS_AT,
    }
)


def _quiet_call(func: _Glob, args: Any) -> bool:
    """Whether ``_check_args`` would find nothing in a call of one of the three checked helpers
    model files call most (NumPy's ``_reconstruct``, ``_codecs.encode`` of protocol 2's bytes,
    torch's ``_rebuild_tensor_v2``), checked here with the same tests; False for any other
    global (its handler decides). tests/scan/test_scan_fast_paths.py holds it to that."""
    if type(args) is not tuple:
        return False
    kind = func.quiet
    if kind == 1:  # _codecs.encode: a codec that only turns text into bytes
        return len(args) > 1 and args[1] in _PLAIN_CODECS
    if kind == 2:  # multiarray._reconstruct: an allocation pickle.load can make
        if len(args) < 2 or not isinstance(args[1], tuple):
            return True
        total = 1
        for d in args[1]:
            if type(d) is int and d > 0:
                total *= d
        return total <= 1 << 31
    if kind == 3:  # a tensor rebuilder: no backward hooks
        at = _HOOKS_AT[func.qual]
        return len(args) <= at or _empty_mapping(args[at])
    return False


_PLAIN_CODECS = ("latin1", "latin-1", "ascii", "utf-8", "utf8")
# The checked helpers _quiet_call knows: qual -> its kind there.
_QUIET_KINDS = {
    "_codecs.encode": 1,
    "numpy.core.multiarray._reconstruct": 2,
    "numpy._core.multiarray._reconstruct": 2,
    "torch._utils._rebuild_tensor_v2": 3,
    "torch._utils._rebuild_parameter": 3,
    "torch._utils._rebuild_qtensor": 3,
}


def _call_checked(qual: str) -> bool:
    """Whether ``_check_args`` checks anything of a call of this allowlisted global: every
    name it tests must be here (tests/scan/test_scan_fast_paths.py holds it to that)."""
    return (
        qual in _CALLS_ARGUMENT
        or qual in _CHECKED_ARGUMENTS
        or qual in _ARGUMENT_CHECKS
        or qual in _NDARRAY_CLASSES
        or qual.endswith("multiarray._reconstruct")
        or _chooses_callee(qual)
    )


# The globals _check_args has a check of their own for, beyond the sets above.
_ARGUMENT_CHECKS = frozenset(
    {
        "numpy.random._pickle.__bit_generator_ctor",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_sparse_tensor",
        "builtins.bytearray",
        "builtins.bytes",
        "_codecs.encode",
    }
)


def _chooses_callee(qual: str) -> bool:
    """An allowlisted helper whose arguments decide what it calls (see _check_callee)."""
    hit = _CHOOSES_SEEN.get(qual)
    if hit is None:
        module, _, name = qual.rpartition(".")
        hit = (
            qual in _CHOOSES_CALLEE
            or (module.startswith("sklearn.") and name == "newObj")  # obj.__new__(obj)
            or name.startswith("__pyx_unpickle_")  # X.__new__(type), then X's C fields
        )
        if len(_CHOOSES_SEEN) < 4096:  # a file naming many globals cannot grow it further
            _CHOOSES_SEEN[qual] = hit
    return hit


_CHOOSES_SEEN: dict[str, bool] = {}  # every call's check asks this twice per global


def _classified(module: str, name: str) -> tuple[_Glob, str, str]:
    """(the global, finding kind or "" when allowlisted, reason) for an import of a valid
    module path; the same answer for every file, so the first few thousand are kept."""
    norm_module, norm_name = normalize_global(module, name)
    severity, reason = classify_global(norm_module, norm_name)
    kind = ""
    if severity > Severity.NONE:
        kind = {
            Severity.MEDIUM: "unknown-import",
            Severity.HIGH: "suspicious-import",
            Severity.CRITICAL: "unsafe-import",
        }.get(severity, "import")
    known = (_Glob(norm_module, norm_name, severity), kind, reason)
    if len(_IMPORTS) < 4096:  # a file naming many globals cannot grow it further
        _IMPORTS[(module, name)] = known
    return known


# (module, name) as the file writes them -> _classified's answer. _Glob values are never
# changed once made, so one serves every import of that name.
_IMPORTS: dict[tuple[str, str], tuple[_Glob, str, str]] = {}


def _empty_mapping(v: Any) -> bool:
    """None, {} or an OrderedDict()/dict() call that nothing was put into."""
    if v is None:
        return True
    if isinstance(v, _Dict):
        return v.n == 0
    return (
        isinstance(v, _Obj)
        and v.origin is not None
        and v.origin.qual in ("collections.OrderedDict", "builtins.dict")
        and v.args in ((), None)
        and v.filled == 0
        and v.state is None
    )


def _is_class(v: Any, quals: frozenset[str] | None = None) -> bool:
    """An allowlisted global (one of ``quals`` if given), not something a call computed."""
    return (
        isinstance(v, _Glob) and v.severity == Severity.NONE and (quals is None or v.qual in quals)
    )


class _List:
    __slots__ = ("items", "n")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.n = 0


class _Dict:
    __slots__ = ("n", "pairs")

    def __init__(self) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        self.n = 0

    def get(self, key: str) -> Any:
        """The value the real dict would hold: the last pair with this key wins."""
        found = _MISSING
        for k, v in self.pairs:
            if type(k) is str and k == key:
                found = v
        return found


class _Opaque:
    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class _Blob:
    """A string or bytes value too long to keep."""

    __slots__ = ("kind", "size")

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.size = size


_MISSING = _Opaque("missing")


def _object_items(v: _Obj) -> Any:
    """What a call's result holds, as pickle.load would build it: an object array holds the
    items of its state's data list, an OrderedDict the pairs of its argument; anything else
    its arguments and state."""
    state = v.state
    if type(state) is tuple and state and type(state[-1]) is _List:
        return state[-1].items
    args = v.args if type(v.args) is tuple else (v.args,)
    if v.origin is not None and v.origin.qual == "collections.OrderedDict" and args:
        pairs = args[0]
        if type(pairs) is _List:
            return itertools.chain.from_iterable(p for p in pairs.items if type(p) is tuple)
    return args if state is None else (*args, state)


# The symbolic values that hold others, for the depth of what pickle.load would return (the
# items a list or dict keeps: past _CONTAINER_KEEP the scan does not see, the loader does).
_SYMBOLIC_CONTAINERS: dict[type, Callable[[Any], Any]] = {
    tuple: iter,
    _List: lambda v: v.items,
    _Dict: lambda v: itertools.chain.from_iterable(v.pairs),
    _Obj: _object_items,
}


def _describe(v: Any, depth: int = 0) -> str:
    """Short text for a symbolic value: tuples at most three levels and four items deep (a
    tuple holding one tuple twice, forty times over, is a few hundred bytes of pickle)."""
    if isinstance(v, _Glob):
        return f"imported {v.qual}"
    if isinstance(v, _Obj):
        return f"result of calling {v.origin.qual}" if v.origin else "result of a computed call"
    if isinstance(v, _Opaque):
        return v.what
    if isinstance(v, _Blob):
        return f"{v.kind} of {v.size} bytes"
    if isinstance(v, (_List, _Dict)):
        return type(v).__name__.strip("_").lower()
    if isinstance(v, tuple):
        if depth >= 3:
            return "(...)"
        inner = ", ".join(_describe(x, depth + 1) for x in v[:4])
        return f"({inner}{', ...' if len(v) > 4 else ''})"
    if isinstance(v, (str, bytes)):
        v = v[:80]
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class PickleOutcome:
    """What one stream of (possibly concatenated) pickles turned out to be."""

    format: str  # "pickle", "joblib", "torch-legacy" or "" when it is not a pickle at all
    pickles: int


class _Analyzer:
    """One pickle, opcode by opcode, on a shared reader (joblib arrays may nest more)."""

    def __init__(
        self,
        reader: ByteReader,
        sink: Sink,
        *,
        limits: ScanLimits,
        torch: bool,
        depth: int = 0,
        joblib_arrays: bool = True,
        fork: _Fork | None = None,
    ) -> None:
        self.r = reader
        self.sink = sink
        self.limits = limits
        self.torch = torch
        self.depth = depth
        # joblib.load reads array data after a NumpyArrayWrapper's BUILD; pickle.load (and
        # np.load, torch.load, joblib's own object arrays) reads on from the same bytes
        self.joblib_arrays = joblib_arrays
        self.fork = fork
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.memo_dropped = False
        self.proto = 0
        self.ops = 0
        self.imports = 0
        self.extensions = 0  # EXT opcodes among the imports
        self.kept = 0
        self.items = 0  # tuple items made (lists and dicts keep at most _CONTAINER_KEEP)
        # Containers (tuples, lists, dicts, call results) this analyser made: no chain of
        # containers is longer, so STOP need not walk a value when this is within the depth
        # limit. A reading that starts from another's state (_plain_reading) counts from 'any'.
        self.built = 0
        self.started_with_proto = False
        self.joblib = False
        self.pos = 0

    # -- plumbing -----------------------------------------------------------------------------

    def report(self, sev: Severity, kind: str, detail: str) -> None:
        self.sink.add(sev, kind, detail, self.pos)

    def push(self, v: Any) -> None:
        self.stack.append(v)
        if len(self.stack) > self.limits.max_pickle_stack:
            self.report(
                Severity.MEDIUM, "limit", "pickle stack exceeds the scan limit; rest not verified"
            )
            raise _Abort

    def pop(self) -> Any:
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise _Malformed("MARK expected but missing")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _keep(self, n: int) -> bool:
        self.kept += n
        return self.kept <= _KEPT_BUDGET

    def u(self, n: int, fmt: str) -> int:
        data = self.r.take(n)
        if len(data) != n:
            raise _Malformed("truncated opcode argument")
        value: int = struct.unpack(fmt, data)[0]
        return value

    def line(self) -> tuple[bytes, bool]:
        data, total, newline = self.r.line(_LINE_LIMIT)
        if not newline:
            raise _Malformed("truncated line argument")
        return data, total <= _LINE_LIMIT

    def text_line(self, reader: Callable[[io.BytesIO], Any]) -> Any:
        data, complete = self.line()
        if not complete:
            return _Blob("line", len(data))
        try:
            return reader(io.BytesIO(data + b"\n"))
        except (ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise _Malformed(f"bad argument: {exc}") from None

    def blob(self, n: int, kind: str) -> Any:
        if n < 0:
            raise _Malformed("negative length")
        if n <= _KEEP_BYTES:
            data = self.r.take(n)
            if len(data) != n:
                raise _Malformed(f"truncated {kind}")
            if kind == "str":
                try:
                    return data.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    raise _Malformed("invalid UTF-8 in string") from None
            if kind == "bstr":  # protocol 0-2 str: decoded by the loader's encoding
                return data.decode("latin-1")
            return data
        if self.r.skip(n) != n:
            raise _Malformed(f"truncated {kind} ({n} bytes declared)")
        return _Blob(kind, n)

    # -- main loop ----------------------------------------------------------------------------

    def run(self) -> Any:
        """Analyse up to and including STOP; returns the symbolic result.

        The common opcodes of real model files are handled inline on the reader's buffer; any
        opcode that is rare, needs bytes beyond the buffer, would hit a limit or is malformed
        falls through to its ``op_*`` handler, which does the full checks and reporting.
        """
        r = self.r
        handlers = _HANDLERS
        memo = self.memo
        metastack = self.metastack
        max_ops = self.limits.max_pickle_ops
        max_stack = self.limits.max_pickle_stack
        max_memo = self.limits.max_memo
        max_items = self.limits.max_container_items
        unpack_i, unpack_u, unpack_h, unpack_d = (
            _I4.unpack_from,
            _U4.unpack_from,
            _U2.unpack_from,
            _F8.unpack_from,
        )
        List, Dict, Opaque, keep_max = _List, _Dict, _Opaque, _CONTAINER_KEEP
        missing = _MISSING
        plain_int = PLAIN_INT.fullmatch
        Glob, Obj, is_wrapper, state_findings = _Glob, _Obj, _is_joblib_wrapper, _state_findings
        quiet_call = _quiet_call
        imports_get = _IMPORTS.get
        slot = _SLOTS
        while True:
            buf, i = r.window()
            n = len(buf)
            # Every opcode is at least one byte, so this also keeps within the opcode limit.
            left = max_ops - self.ops
            stop = (n if left >= n - i else i + left) if _INLINE and left > 0 else i
            stack = self.stack
            ops = built = 0
            while i < stop:
                code = buf[i]
                br = slot[code]  # the opcode's branch, by its place in _BRANCH_CODES
                if br < 6:
                    if br == 0:  # BINGET
                        if i + 1 >= n or len(stack) >= max_stack:
                            break
                        v = memo.get(buf[i + 1], missing)
                        if v is missing:
                            break
                        stack.append(v)
                        i += 2
                    elif br == 1:  # MEMOIZE
                        if not stack or len(memo) >= max_stack:
                            break
                        memo[len(memo)] = stack[-1]
                        i += 1
                    elif br == 2:  # BININT1
                        if i + 1 >= n or len(stack) >= max_stack:
                            break
                        stack.append(buf[i + 1])
                        i += 2
                    elif br == 3:  # BININT
                        if i + 5 > n or len(stack) >= max_stack:
                            break
                        stack.append(unpack_i(buf, i + 1)[0])
                        i += 5
                    elif br == 4:  # MARK
                        if len(metastack) >= max_stack:
                            break
                        metastack.append(stack)
                        stack = []
                        i += 1
                    elif br == 5:  # TUPLE
                        if not metastack or len(metastack[-1]) >= max_stack:
                            break
                        if len(stack) > keep_max or self.items + len(stack) > max_items:
                            break
                        self.items += len(stack)
                        items = stack
                        stack = metastack.pop()
                        stack.append(tuple(items))
                        built += 1
                        i += 1
                    else:
                        break
                elif br < 12:
                    if br == 6:  # BINPUT, LONG_BINPUT
                        if code == 0x71:
                            if i + 1 >= n:
                                break
                            idx, width = buf[i + 1], 2
                        else:
                            if i + 5 > n:
                                break
                            idx, width = unpack_u(buf, i + 1)[0], 5
                        if (
                            not stack
                            or idx >= max_memo
                            or (len(memo) >= max_stack and idx not in memo)
                        ):
                            break
                        memo[idx] = stack[-1]
                        i += width
                    elif br == 7:  # SHORT_BINUNICODE, SHORT_BINBYTES
                        if i + 1 >= n or len(stack) >= max_stack:
                            break
                        end = i + 2 + buf[i + 1]
                        if end > n:
                            break
                        if code == 0x8C:
                            try:
                                stack.append(buf[i + 2 : end].decode("utf-8", "surrogatepass"))
                            except UnicodeDecodeError:
                                break
                        else:
                            stack.append(buf[i + 2 : end])
                        i = end
                    elif br == 8:  # BINFLOAT
                        if i + 9 > n or len(stack) >= max_stack:
                            break
                        stack.append(unpack_d(buf, i + 1)[0])
                        i += 9
                    elif br == 9:  # BININT2
                        if i + 3 > n or len(stack) >= max_stack:
                            break
                        stack.append(unpack_h(buf, i + 1)[0])
                        i += 3
                    elif br == 10:  # TUPLE1
                        if not stack:
                            break
                        stack[-1] = (stack[-1],)
                        built += 1
                        i += 1
                    elif br == 11:  # TUPLE2
                        if len(stack) < 2:
                            break
                        b = stack.pop()
                        stack[-1] = (stack[-1], b)
                        built += 1
                        i += 1
                    else:
                        break
                elif br < 18:
                    if br == 12:  # NONE, NEWTRUE, NEWFALSE
                        if len(stack) >= max_stack:
                            break
                        stack.append(_CONSTANTS[code])
                        i += 1
                    elif br == 13:  # TUPLE3
                        if len(stack) < 3:
                            break
                        c = stack.pop()
                        b = stack.pop()
                        stack[-1] = (stack[-1], b, c)
                        built += 1
                        i += 1
                    elif br == 14:  # REDUCE, NEWOBJ
                        # of an imported global whose arguments have nothing to check (_call)
                        if len(stack) < 2:
                            break
                        func = stack[-2]
                        if type(func) is not Glob:
                            break
                        if not func.plain and not (func.quiet and quiet_call(func, stack[-1])):
                            break
                        args = stack.pop()
                        stack[-1] = Obj(func, args, new=code == 0x81)
                        built += 1
                        i += 1
                    elif br == 15:  # SETITEM
                        if len(stack) < 3 or type(stack[-3]) is not Dict:
                            break
                        v = stack.pop()
                        k = stack.pop()
                        d = stack[-1]
                        d.n += 1
                        if len(d.pairs) < keep_max and self._keep(1):
                            d.pairs.append((k, v))
                        i += 1
                    elif br == 16:  # BUILD
                        # on a call's result, of a state with nothing to report (op_BUILD)
                        if len(stack) < 2:
                            break
                        inst = stack[-2]
                        if type(inst) is not Obj or inst.origin is None:
                            break
                        how = inst.origin.build
                        if how == 1 or (how == 2 and is_wrapper(inst)):
                            break
                        state = stack[-1]
                        if state_findings(state):
                            break
                        inst.state = stack.pop()
                        i += 1
                    elif br == 17:  # BINUNICODE, BINBYTES
                        if i + 5 > n or len(stack) >= max_stack:
                            break
                        size = unpack_u(buf, i + 1)[0]
                        end = i + 5 + size
                        if size > _KEEP_BYTES or end > n:
                            break
                        if code == 0x58:
                            try:
                                stack.append(buf[i + 5 : end].decode("utf-8", "surrogatepass"))
                            except UnicodeDecodeError:
                                break
                        else:
                            stack.append(buf[i + 5 : end])
                        i = end
                    else:
                        break
                elif br < 24:
                    if br == 18:  # SETITEMS, APPENDS
                        if not metastack or not metastack[-1]:
                            break
                        target = metastack[-1][-1]
                        if code == 0x75:
                            if type(target) is not Dict or len(stack) % 2:
                                break
                            self._set_items(target, stack)
                        else:
                            if type(target) is not List:
                                break
                            self._extend(target, stack)
                        stack = metastack.pop()
                        i += 1
                    elif br == 19:  # APPEND
                        if len(stack) < 2 or type(stack[-2]) is not List:
                            break
                        v = stack.pop()
                        lst = stack[-1]
                        lst.n += 1
                        if len(lst.items) < keep_max and self._keep(1):
                            lst.items.append(v)
                        i += 1
                    elif br == 20:  # EMPTY_TUPLE: a container of no items, one level deep
                        if len(stack) >= max_stack:
                            break
                        stack.append(())
                        built += 1
                        i += 1
                    elif br == 21:  # EMPTY_DICT, EMPTY_LIST
                        if len(stack) >= max_stack:
                            break
                        stack.append(Dict() if code == 0x7D else List())
                        built += 1
                        i += 1
                    elif br == 22:  # LONG_BINGET
                        if i + 5 > n or len(stack) >= max_stack:
                            break
                        v = memo.get(unpack_u(buf, i + 1)[0], missing)
                        if v is missing:
                            break
                        stack.append(v)
                        i += 5
                    elif br == 23:  # STACK_GLOBAL of a name already found allowlisted
                        if (
                            len(stack) < 2
                            or type(stack[-1]) is not str
                            or type(stack[-2]) is not str
                        ):
                            break
                        known = imports_get((stack[-2], stack[-1]))  # (module, name)
                        if known is None or known[1]:
                            break  # not yet classified, or a finding to report: the handler
                        stack.pop()
                        stack[-1] = known[0]
                        self.imports += 1
                        i += 1
                    else:
                        break
                elif br < 30:
                    if br == 24:  # PUT, GET (protocol 0: decimal line)
                        j = buf.find(b"\n", i + 1)  # an end bound costs more than it saves
                        if j < 0 or j > i + _LINE_LIMIT:
                            break
                        try:
                            idx = int(buf[i + 1 : j])
                        except ValueError:
                            break
                        if code == 0x70:
                            if idx < 0 or idx >= max_memo or not stack:
                                break
                            if len(memo) >= max_stack and idx not in memo:
                                break
                            memo[idx] = stack[-1]
                        else:
                            if len(stack) >= max_stack:
                                break
                            v = memo.get(idx, missing)
                            if v is missing:
                                break
                            stack.append(v)
                        i = j + 1
                    elif br == 25:  # INT, UNICODE (protocol 0: a text line)
                        if len(stack) >= max_stack:
                            break
                        j = buf.find(b"\n", i + 1)  # an end bound costs more than it saves
                        if j < 0 or j > i + _LINE_LIMIT:
                            break
                        data = buf[i + 1 : j]
                        if code == 0x56:
                            try:
                                v = data.decode("raw-unicode-escape")  # what text_literal does
                            except UnicodeDecodeError:
                                break
                        elif plain_int(data) is not None:
                            v = int(data)
                        elif data == b"00" or data == b"01":  # protocol 0's False and True
                            v = data == b"01"
                        else:
                            break  # the other forms pickle reads: text_literal, in the handler
                        stack.append(v)
                        i = j + 1
                    elif br == 26:  # GLOBAL of a name already found allowlisted
                        if len(stack) >= max_stack:
                            break
                        j = buf.find(b"\n", i + 1)
                        if j < 0 or j > i + _LINE_LIMIT:
                            break
                        k = buf.find(b"\n", j + 1)
                        if k < 0 or k > j + _LINE_LIMIT:
                            break
                        try:
                            pair = (buf[i + 1 : j].decode("utf-8"), buf[j + 1 : k].decode("utf-8"))
                        except UnicodeDecodeError:
                            break
                        known = imports_get(pair)
                        if known is None or known[1]:
                            break
                        stack.append(known[0])
                        self.imports += 1
                        i = k + 1
                    elif br == 27:  # FRAME: framing only, the opcodes inside are read as usual
                        if i + 9 > n:
                            break
                        i += 9
                    # Rare in real files, but cheap: inline so that a file repeating them costs
                    # what their work costs, not a trip through the handlers.
                    elif br == 28:  # POP (of an item; of a MARK: the handler)
                        if not stack:
                            break
                        stack.pop()
                        i += 1
                    elif br == 29:  # DUP
                        if not stack or len(stack) >= max_stack:
                            break
                        stack.append(stack[-1])
                        i += 1
                    else:
                        break
                elif br < 36:
                    if br == 30:  # POP_MARK
                        if not metastack:
                            break
                        stack = metastack.pop()
                        i += 1
                    elif br == 31:  # EMPTY_SET
                        if len(stack) >= max_stack:
                            break
                        stack.append(Opaque("set"))
                        i += 1
                    elif br == 32:  # FROZENSET, LIST, DICT
                        if not metastack or len(metastack[-1]) >= max_stack:
                            break
                        if code == 0x64 and len(stack) % 2:
                            break
                        items = stack
                        stack = metastack.pop()
                        if code == 0x91:
                            stack.append(Opaque("frozenset"))
                        elif code == 0x6C:
                            lst = List()
                            if items:
                                self._extend(lst, items)
                            stack.append(lst)
                            built += 1
                        else:
                            d = Dict()
                            if items:
                                self._set_items(d, items)
                            stack.append(d)
                            built += 1
                        i += 1
                    elif br == 33:  # ADDITEMS into a set
                        if (
                            not metastack
                            or not metastack[-1]
                            or type(metastack[-1][-1]) is not Opaque
                        ):
                            break
                        stack = metastack.pop()
                        i += 1
                    elif br == 34:  # PROTO, after the first opcode (the handler notes that one)
                        if i + 1 >= n or buf[i + 1] > 5 or self.ops + ops == 0:
                            break
                        self.proto = buf[i + 1]
                        i += 2
                    elif br == 35:  # SHORT_BINSTRING
                        if i + 1 >= n or len(stack) >= max_stack:
                            break
                        end = i + 2 + buf[i + 1]
                        if end > n:
                            break
                        stack.append(buf[i + 2 : end].decode("latin-1"))
                        i = end
                    else:
                        break
                else:
                    break
                ops += 1
            self.stack = stack
            self.ops += ops
            self.built += built
            # One opcode the slow way: read from the buffer when it is there.
            if i < n:
                code = buf[i]
                r.consumed_to(i + 1)
                self.pos = r.pos - 1
            else:
                r.consumed_to(i)
                self.pos = r.pos
                code = r.byte()
                if code < 0:
                    raise _Malformed("pickle ends without STOP")
            handler = handlers[code]
            if handler is None:
                raise _Malformed(f"invalid opcode 0x{code:02x}")
            self.ops += 1
            if self.ops > max_ops:
                self.report(Severity.MEDIUM, "limit", "pickle has too many opcodes to analyse")
                raise _Abort
            if handler(self):
                return self.stack.pop() if self.stack else None

    # -- constants ----------------------------------------------------------------------------

    def op_PROTO(self) -> None:
        if self.ops == 1:
            self.started_with_proto = True
        proto = self.u(1, "<B")
        if proto > 5:
            raise _Malformed(f"unsupported pickle protocol {proto}")
        self.proto = proto

    def op_FRAME(self) -> None:
        self.u(8, "<Q")

    def op_STOP(self) -> bool:
        if not self.stack:
            raise _Malformed("STOP with an empty stack")
        limit = self.limits.max_value_depth
        self.memo = {}  # only the value's own references count as sharing
        # A chain of containers is at most as long as the containers made: then no walk.
        if self.built > limit and nesting(self.stack[-1], limit, _SYMBOLIC_CONTAINERS) is None:
            self.report(
                Severity.MEDIUM,
                "limit",
                f"refused: values nested more than {limit} deep (ScanLimits.max_value_depth): "
                "repr, == and json.dumps of what pickle.load returns would recurse past "
                "Python's limit",
            )
        return True

    def _literal(self, op: bytes) -> Any:
        """A protocol-0 literal parsed by pickle's own C code (hex, octal and underscore forms
        included): a pickle of one such opcode can only make a str, int, bool, float or bytes."""
        data, complete = self.line()
        if not complete:
            return _Blob("line", len(data))
        try:
            return text_literal(op, data)
        except Exception as exc:
            raise _Malformed(f"bad {op.decode()} argument: {exc}") from None

    def op_INT(self) -> None:
        self.push(self._literal(b"I"))

    def op_LONG(self) -> None:
        self.push(self._literal(b"L"))

    def op_FLOAT(self) -> None:
        self.push(self._literal(b"F"))

    def op_BININT(self) -> None:
        self.push(self.u(4, "<i"))

    def op_BININT1(self) -> None:
        self.push(self.u(1, "<B"))

    def op_BININT2(self) -> None:
        self.push(self.u(2, "<H"))

    def op_LONG1(self) -> None:
        n = self.u(1, "<B")
        data = self.r.take(n)
        if len(data) != n:
            raise _Malformed("truncated LONG1")
        self.push(int.from_bytes(data, "little", signed=True))

    def op_LONG4(self) -> None:
        n = self.u(4, "<i")
        if n < 0:
            raise _Malformed("negative LONG4 length")
        if n > 64:
            self.blob(n, "long")
            self.push(_Opaque(f"{n}-byte integer"))
            return
        data = self.r.take(n)
        if len(data) != n:
            raise _Malformed("truncated LONG4")
        self.push(int.from_bytes(data, "little", signed=True))

    def op_BINFLOAT(self) -> None:
        data = self.r.take(8)
        if len(data) != 8:
            raise _Malformed("truncated BINFLOAT")
        self.push(struct.unpack(">d", data)[0])

    def op_NONE(self) -> None:
        self.push(None)

    def op_NEWTRUE(self) -> None:
        self.push(True)

    def op_NEWFALSE(self) -> None:
        self.push(False)

    def op_STRING(self) -> None:
        data, complete = self.line()
        if not complete:
            self.push(_Blob("str", len(data)))
            return
        try:
            # as pickle.load(encoding="latin1") would decode it: the widest reading
            self.push(pickle.loads(b"S" + data + b"\n.", encoding="latin1"))
        except Exception as exc:
            raise _Malformed(f"bad STRING argument: {exc}") from None

    def op_BINSTRING(self) -> None:
        self.push(self.blob(self.u(4, "<i"), "bstr"))

    def op_SHORT_BINSTRING(self) -> None:
        self.push(self.blob(self.u(1, "<B"), "bstr"))

    def op_BINBYTES(self) -> None:
        self.push(self.blob(self.u(4, "<I"), "bytes"))

    def op_SHORT_BINBYTES(self) -> None:
        self.push(self.blob(self.u(1, "<B"), "bytes"))

    def op_BINBYTES8(self) -> None:
        self.push(self.blob(self.u(8, "<Q"), "bytes"))

    def op_BYTEARRAY8(self) -> None:
        v = self.blob(self.u(8, "<Q"), "bytes")
        self.push(v if isinstance(v, _Blob) else _Opaque("bytearray"))

    def op_UNICODE(self) -> None:
        self.push(self._literal(b"V"))

    def op_SHORT_BINUNICODE(self) -> None:
        self.push(self.blob(self.u(1, "<B"), "str"))

    def op_BINUNICODE(self) -> None:
        self.push(self.blob(self.u(4, "<I"), "str"))

    def op_BINUNICODE8(self) -> None:
        self.push(self.blob(self.u(8, "<Q"), "str"))

    def op_NEXT_BUFFER(self) -> None:
        self.report(
            Severity.MEDIUM,
            "out-of-band-buffer",
            "NEXT_BUFFER needs buffers supplied by a custom loader; its contents are not here",
        )
        self.push(_Opaque("out-of-band buffer"))

    def op_READONLY_BUFFER(self) -> None:
        self.top()

    # -- containers and stack -----------------------------------------------------------------

    def op_MARK(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []
        if len(self.metastack) > self.limits.max_pickle_stack:
            self.report(Severity.MEDIUM, "limit", "MARK nesting exceeds the scan limit")
            raise _Abort

    def op_POP(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_POP_MARK(self) -> None:
        self.pop_mark()

    def op_DUP(self) -> None:
        self.push(self.top())

    def op_EMPTY_TUPLE(self) -> None:
        self.built += 1
        self.push(())

    def op_TUPLE(self) -> None:
        items = self.pop_mark()
        self.items += len(items)
        if self.items > self.limits.max_container_items:
            self.report(
                Severity.MEDIUM,
                "limit",
                f"refused: more than {self.limits.max_container_items} container items "
                "(ScanLimits.max_container_items); the rest was not verified",
            )
            raise _Abort
        if len(items) > _CONTAINER_KEEP:
            # kept as a count, not as items: tuples of tuples must not multiply memory
            self.push(_Opaque(f"tuple of {len(items)} items"))
            return
        self.built += 1
        self.push(tuple(items))

    def op_TUPLE1(self) -> None:
        self.built += 1
        self.push((self.pop(),))

    def op_TUPLE2(self) -> None:
        b = self.pop()
        a = self.pop()
        self.built += 1
        self.push((a, b))

    def op_TUPLE3(self) -> None:
        c = self.pop()
        b = self.pop()
        a = self.pop()
        self.built += 1
        self.push((a, b, c))

    def op_EMPTY_LIST(self) -> None:
        self.built += 1
        self.push(_List())

    def op_LIST(self) -> None:
        self.built += 1
        lst = _List()
        self._extend(lst, self.pop_mark())
        self.push(lst)

    def op_EMPTY_DICT(self) -> None:
        self.built += 1
        self.push(_Dict())

    def op_DICT(self) -> None:
        self.built += 1
        d = _Dict()
        self._set_items(d, self.pop_mark())
        self.push(d)

    def op_EMPTY_SET(self) -> None:
        self.push(_Opaque("set"))

    def op_FROZENSET(self) -> None:
        self.pop_mark()
        self.push(_Opaque("frozenset"))

    def op_APPEND(self) -> None:
        v = self.pop()
        self._extend(self._target("APPEND"), [v])

    def op_APPENDS(self) -> None:
        items = self.pop_mark()
        self._extend(self._target("APPENDS"), items)

    def op_SETITEM(self) -> None:
        v = self.pop()
        k = self.pop()
        self._set_items(self._target("SETITEM"), [k, v])

    def op_SETITEMS(self) -> None:
        items = self.pop_mark()
        self._set_items(self._target("SETITEMS"), items)

    def op_ADDITEMS(self) -> None:
        self.pop_mark()
        self._target("ADDITEMS")

    def _target(self, op: str) -> Any:
        target = self.top()
        if isinstance(target, _Glob):
            self.report(
                Severity.HIGH,
                "global-mutation",
                f"{op} modifies {target.qual} itself (changes state the interpreter shares)",
            )
        elif isinstance(target, _Obj) and (
            target.origin is None or target.origin.qual not in _CONTAINER_CLASSES
        ):
            self.report(
                Severity.HIGH,
                "call-mutation",
                f"{op} writes into the {_describe(target)}, not into a container",
            )
        elif not isinstance(target, (_List, _Dict, _Obj, _Opaque)):
            raise _Malformed(f"{op} on {_describe(target)}")
        return target

    def _extend(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, _Obj):
            target.filled += len(items)
        if isinstance(target, _List):
            target.n += len(items)
            room = _CONTAINER_KEEP - len(target.items)
            if room > 0 and self._keep(min(room, len(items))):
                target.items.extend(items[:room])

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise _Malformed("odd number of items for a dict")
        if isinstance(target, _Obj):
            target.filled += len(items) // 2
        if isinstance(target, _Dict):
            target.n += len(items) // 2
            room = _CONTAINER_KEEP - len(target.pairs)
            if room > 0 and self._keep(min(room, len(items) // 2)):
                pairs = list(zip(items[0::2], items[1::2]))[:room]
                target.pairs.extend(pairs)

    # -- memo ---------------------------------------------------------------------------------

    def _put(self, index: int) -> None:
        if index < 0:
            raise _Malformed("negative memo index")
        value = self.top()
        if index >= self.limits.max_memo:
            # pickle's C unpickler sizes its memo table by the largest index: a 9-byte pickle
            # storing at index 2**31 makes pickle.load allocate gigabytes
            self.report(
                Severity.MEDIUM,
                "allocation",
                f"refused: memo index {index}: pickle.load would allocate a table of that many "
                f"entries (ScanLimits.max_memo is {self.limits.max_memo})",
            )
        if len(self.memo) >= self.limits.max_pickle_stack and index not in self.memo:
            self.memo_dropped = True
            return
        self.memo[index] = value

    def _get(self, index: int) -> None:
        if index in self.memo:
            self.push(self.memo[index])
        elif self.memo_dropped:
            self.push(_Opaque("memo entry beyond the scan limit"))
        else:
            raise _Malformed(f"memo key {index} was never stored")

    def _index_line(self) -> int:
        data, complete = self.line()
        try:
            if not complete:
                raise ValueError("overlong")
            return int(data)
        except ValueError:
            raise _Malformed("bad memo index") from None

    def op_PUT(self) -> None:
        self._put(self._index_line())

    def op_BINPUT(self) -> None:
        self._put(self.u(1, "<B"))

    def op_LONG_BINPUT(self) -> None:
        self._put(self.u(4, "<I"))

    def op_MEMOIZE(self) -> None:
        self._put(len(self.memo))

    def op_GET(self) -> None:
        self._get(self._index_line())

    def op_BINGET(self) -> None:
        self._get(self.u(1, "<B"))

    def op_LONG_BINGET(self) -> None:
        self._get(self.u(4, "<I"))

    # -- imports ------------------------------------------------------------------------------

    def _name_pair(self) -> tuple[str, str] | None:
        mod_raw, mod_ok = self.line()
        name_raw, name_ok = self.line()
        if not (mod_ok and name_ok):
            return None
        try:
            return mod_raw.decode("utf-8"), name_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("global name is not UTF-8") from None

    def _import(self, module: str, name: str, how: str) -> _Glob:
        known = _IMPORTS.get((module, name))
        if known is None:
            if not all(part.isidentifier() for part in module.split(".")):
                # The real unpickler's import of such a name fails, so loading stops here.
                raise _Malformed(f"{how} names module {module[:60]!r}, which cannot be imported")
            known = _classified(module, name)
        self.imports += 1
        glob, kind, reason = known
        if kind:
            self.report(glob.severity, kind, f"{how} {reason}")
        return glob

    def _unresolvable(self, how: str, what: str) -> _Glob:
        self.imports += 1
        self.report(Severity.HIGH, "computed-import", f"{how} with {what}: cannot be resolved")
        return _Glob("<computed>", "<computed>", Severity.HIGH)

    def op_GLOBAL(self) -> None:
        pair = self._name_pair()
        if pair is None:
            self.push(self._unresolvable("GLOBAL", "an overlong name"))
        else:
            self.push(self._import(pair[0], pair[1], "GLOBAL"))

    def op_STACK_GLOBAL(self) -> None:
        name = self.pop()
        module = self.pop()
        if type(module) is str and type(name) is str:
            self.push(self._import(module, name, "STACK_GLOBAL"))
        else:
            what = f"module {_describe(module)} and name {_describe(name)}"
            self.push(self._unresolvable("STACK_GLOBAL", what))

    def _ext(self, code: int) -> None:
        self.imports += 1
        self.extensions += 1
        self.report(
            Severity.HIGH,
            "extension-import",
            f"EXT opcode imports extension code {code} from the copyreg registry (unresolvable)",
        )
        self.push(_Glob("<extension>", str(code), Severity.HIGH))

    def op_EXT1(self) -> None:
        self._ext(self.u(1, "<B"))

    def op_EXT2(self) -> None:
        self._ext(self.u(2, "<H"))

    def op_EXT4(self) -> None:
        self._ext(self.u(4, "<i"))

    # -- calls --------------------------------------------------------------------------------

    def _call(self, func: Any, args: Any, how: str, *, new: bool = False) -> _Obj:
        self.built += 1
        if not isinstance(func, _Glob):
            self.report(
                Severity.HIGH,
                "computed-call",
                f"{how} calls {_describe(func)}, not an imported global (indirect call)",
            )
            return _Obj(None, args)
        if not func.plain:
            self._check_args(func, args, how)
        return _Obj(func, args, new=new)

    def _check_args(self, func: _Glob, args: Any, how: str) -> None:
        qual = func.qual
        if not isinstance(args, tuple):
            if qual in _CALLS_ARGUMENT or qual in _CHECKED_ARGUMENTS or _chooses_callee(qual):
                # e.g. builtins.tuple([...]) as the argument tuple: what these helpers call or
                # set would go unchecked
                self.report(
                    Severity.HIGH,
                    "chosen-function",
                    f"{how} {qual} with arguments {_describe(args)}, not written out in the "
                    "file: what it calls cannot be checked",
                )
            return
        expected = _CALLS_ARGUMENT.get(qual)
        if expected is not None:
            # numpy.random._pickle: the first argument is a bit generator's name (then the
            # second is called with it) or a bit generator already made
            first_ok = not args or type(args[0]) is str or _is_bit_generator(args[0])
            for a in args[1:]:
                if not (isinstance(a, _Glob) and a.qual == expected):
                    self.report(
                        Severity.HIGH,
                        "chosen-function",
                        f"{how} {qual} calls its argument {_describe(a)}, which the file chose",
                    )
            if not first_ok:
                self.report(
                    Severity.HIGH,
                    "chosen-function",
                    f"{how} {qual} with first argument {_describe(args[0])}",
                )
        elif qual == "numpy.random._pickle.__bit_generator_ctor" and args:
            a = args[0]
            if not (type(a) is str or (isinstance(a, _Glob) and a.qual in _BIT_GENERATORS)):
                self.report(
                    Severity.HIGH,
                    "chosen-function",
                    f"{how} {qual} instantiates {_describe(a)}, which the file chose",
                )
        elif qual == "torch._tensor._rebuild_from_type_v2":
            self._check_rebuild_from_type(args, how)
        elif qual == "torch._utils._rebuild_parameter_with_state" and len(args) == 4:
            # the state is set with setattr, like a BUILD state's __dict__
            self._check_state(args[3])
        if _chooses_callee(qual):
            self._check_callee(qual, args, how)
        if qual == "torch._utils._rebuild_sparse_tensor":
            self.report(
                Severity.MEDIUM,
                "unchecked-tensor",
                f"{how} {qual} builds a sparse tensor without checking its indices: torch.load "
                "checks them once loading is done, pickle.load never does (not verified)",
            )
        if qual in _NDARRAY_CLASSES and len(args) > 2:
            # ndarray(shape, dtype, buffer, offset, strides): NumPy accepts a negative offset,
            # so pickle.load hands back a writable view of the heap before the buffer
            self.report(
                Severity.HIGH,
                "raw-memory",
                f"{how} {qual} over a buffer with an offset or strides the file chose "
                "(NumPy's own pickles never build arrays this way)",
            )
        if qual in ("builtins.bytearray", "builtins.bytes") and args:
            n = args[0]
            if type(n) is int and n > 1 << 30:
                self.report(Severity.MEDIUM, "allocation", f"{how} {qual}({n}) allocates {n} bytes")
        elif qual.endswith("multiarray._reconstruct") and len(args) >= 2:
            shape = args[1]
            if isinstance(shape, tuple):
                total = 1
                for d in shape:
                    if type(d) is int and d > 0:
                        total *= d
                if total > 1 << 31:
                    self.report(
                        Severity.MEDIUM, "allocation", f"{how} {qual} allocates {total} elements"
                    )
        elif qual == "_codecs.encode":
            enc = args[1] if len(args) > 1 else None
            if enc not in _PLAIN_CODECS:
                self.report(
                    Severity.MEDIUM,
                    "unknown-import",
                    f"{how} _codecs.encode with codec {_describe(enc)} (not verified)",
                )

    def _check_callee(self, qual: str, args: tuple[Any, ...], how: str) -> None:
        """The helpers of _chooses_callee: the argument that decides what they call must be
        what torch, NumPy, scikit-learn or Python itself write there; anything else is a
        callable (or a callee's class) the file chose."""
        name = qual.rpartition(".")[2]
        bad: Any = _MISSING
        if qual == "copyreg._reconstructor":
            # Python writes (cls, object, None) or (cls, a plain builtin base, its value)
            if len(args) != 3 or not _is_class(args[0]):
                bad = args[0] if args else _MISSING
            elif not _is_class(args[1], _PLAIN_BASES):
                bad = args[1]
        elif qual == "numpy.ma.core._mareconstruct":
            if len(args) != 4 or not _is_class(args[0], _MASKED_CLASSES):
                bad = args[0] if args else _MISSING
            elif not _is_class(args[1], _NDARRAY_CLASSES):
                bad = args[1]
        elif qual == "torch._utils._rebuild_wrapper_subclass":
            if not args or not _is_class(args[0], _TENSOR_CLASSES):
                bad = args[0] if args else _MISSING
        elif qual == "torch._utils._rebuild_device_tensor_from_cpu_tensor":
            data = args[0] if args else _MISSING
            if not (
                isinstance(data, _Obj)
                and data.origin is not None
                and data.origin.severity == Severity.NONE
                and data.origin.module == "torch._utils"
                and data.origin.name.startswith("_rebuild_")
                and data.state is None
            ):
                bad = data
        elif name == "newObj":
            if len(args) != 1 or not _is_class(args[0]):
                bad = args[0] if args else _MISSING
        elif name.startswith("__pyx_unpickle_"):
            # scikit-learn's and NumPy's Cython pickles: (the class itself, checksum, state)
            cls = name.removeprefix("__pyx_unpickle_")
            if not args or not (_is_class(args[0]) and args[0].name == cls):
                bad = args[0] if args else _MISSING
        if bad is not _MISSING:
            self.report(
                Severity.HIGH,
                "chosen-function",
                f"{how} {qual} calls into {_describe(bad)}, which the file chose (its own "
                "library only ever writes its own classes there)",
            )
        at = _HOOKS_AT.get(qual)
        if at is not None and len(args) > at and not _empty_mapping(args[at]):
            self.report(
                Severity.HIGH,
                "chosen-function",
                f"{how} {qual} with backward hooks {_describe(args[at])}: callables the file "
                "chose, which torch calls during backward",
            )

    def _check_rebuild_from_type(self, args: tuple[Any, ...], how: str) -> None:
        """``_rebuild_from_type_v2(func, new_type, args, state)`` calls ``func(*args)`` and
        setattr()s every key of ``state`` on the result: a call and a BUILD in one. torch
        writes it only around one of its own tensor rebuilders; anything else is a function
        the file chose, and its state is checked like a BUILD state."""
        ok = (
            len(args) == 4
            and isinstance(args[0], _Glob)
            and args[0].severity == Severity.NONE
            and args[0].module == "torch._utils"
            and args[0].name.startswith("_rebuild_")
            and isinstance(args[1], _Glob)
            and args[1].severity == Severity.NONE
            and args[1].module.startswith("torch")
            and isinstance(args[2], tuple)
        )
        if not ok:
            what = ", ".join(_describe(a) for a in args[:2]) if args else "no arguments"
            self.report(
                Severity.HIGH,
                "chosen-function",
                f"{how} torch._tensor._rebuild_from_type_v2 calls {what}, which the file chose "
                "(torch writes it only around its own tensor rebuilders)",
            )
            return
        self._check_args(args[0], args[2], how)
        self._check_state(args[3])

    def op_REDUCE(self) -> None:
        args = self.pop()
        func = self.pop()
        self.push(self._call(func, args, "REDUCE"))

    def op_NEWOBJ(self) -> None:
        args = self.pop()
        cls = self.pop()
        self.push(self._call(cls, args, "NEWOBJ", new=True))

    def op_NEWOBJ_EX(self) -> None:
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        if (
            isinstance(cls, _Glob)
            and cls.qual in _NDARRAY_CLASSES
            and not (isinstance(kwargs, _Dict) and kwargs.n == 0)
        ):
            self.report(
                Severity.HIGH,
                "raw-memory",
                f"NEWOBJ_EX {cls.qual} with keyword arguments {_describe(kwargs)} (buffer, "
                "offset and strides can be passed this way)",
            )
        self.push(self._call(cls, args, "NEWOBJ_EX", new=True))

    def op_OBJ(self) -> None:
        items = self.pop_mark()
        if not items:
            raise _Malformed("OBJ without a class")
        self.built += 1  # the argument tuple
        self.push(self._call(items[0], tuple(items[1:]), "OBJ"))

    def op_INST(self) -> None:
        pair = self._name_pair()
        cls = (
            self._unresolvable("INST", "an overlong name")
            if pair is None
            else self._import(pair[0], pair[1], "INST")
        )
        args = self.pop_mark()
        self.built += 1  # the argument tuple
        self.push(self._call(cls, tuple(args), "INST"))

    def op_BUILD(self) -> None:
        state = self.pop()
        inst = self.top()
        if isinstance(inst, _Glob):
            self.report(
                Severity.HIGH,
                "global-mutation",
                f"BUILD sets attributes on {inst.qual} itself (mutates a module-level object)",
            )
            return
        self._check_state(state)
        if isinstance(inst, _Obj):
            wrapper = _is_joblib_wrapper(inst)
            # joblib's BUILD updates the wrapper's __dict__: a second BUILD (the wrapper fetched
            # again from the memo) adds to the attributes of the first, and reads data again
            if wrapper and inst.state:
                self.built += 1  # the merged state
                inst.state = _merge_states(inst.state, state)
            else:
                inst.state = state
            if inst.origin is not None and inst.origin.qual == "numpy.dtype":
                self._check_dtype(inst)
            if wrapper and self.joblib_arrays:
                self._joblib_array(inst)

    def _check_dtype(self, dtype: _Obj) -> None:
        """NumPy's dtype ``__setstate__`` trusts the state's flags, field offsets and element
        size: a state that lies makes pickle.load read raw bytes as object pointers, or
        fields past the array's memory (states that are not literals are left to the rest)."""
        from shoal.scan.builders import DtypeLayoutError

        if _known_dtype(dtype) is not None:
            return  # a state NumPy itself writes for a plain type: no lie, no NumPy needed
        try:
            _real_dtype(dtype, 0)
        except DtypeLayoutError as exc:
            self.report(
                Severity.HIGH,
                "dtype-state",
                f"BUILD on numpy.dtype: {exc} (pickle.load would build arrays over memory "
                "they do not own)",
            )
        except UnsafeModelError:
            pass  # a state shoal's builder does not take: not a layout lie, judged elsewhere

    def _check_state(self, state: Any) -> None:
        """BUILD hands its state to ``__setstate__`` or ``__dict__.update``: it must be written
        out in the file (a dict, or a (dict, slots) pair) so that every attribute name is known,
        and no name may be a dunder such as ``__array_interface__`` or ``__class__``."""
        for severity, kind, detail in _state_findings(state):
            self.report(severity, kind, detail)

    # -- persistent ids -----------------------------------------------------------------------

    def op_PERSID(self) -> None:
        data, _complete = self.line()
        self.push(self._persistent(data.decode("latin-1")))

    def op_BINPERSID(self) -> None:
        self.push(self._persistent(self.pop()))

    def _persistent(self, pid: Any) -> Any:
        if not self.torch:
            self.report(
                Severity.MEDIUM,
                "persistent-id",
                "persistent id: plain pickle.load rejects it and a custom loader decides "
                "what it loads",
            )
            return _Opaque("persistent object")
        if isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5:
            storage_type = pid[1]
            ok = (
                isinstance(storage_type, _Glob)
                and storage_type.severity == Severity.NONE
                and storage_type.module.startswith("torch")
                and type(pid[2]) is str
                and type(pid[3]) is str
                and type(pid[4]) is int
            )
            if ok:
                self.built += 1
                return _Obj(storage_type)
        elif isinstance(pid, tuple) and pid and pid[0] == "module":
            self.report(
                Severity.LOW,
                "persistent-id",
                "legacy torch module-source record (its class is checked as an import)",
            )
            return _Opaque("module")
        self.report(
            Severity.MEDIUM,
            "persistent-id",
            f"unexpected torch persistent id {_describe(pid)}",
        )
        return _Opaque("persistent object")

    # -- joblib -------------------------------------------------------------------------------

    def _joblib_array(self, wrapper: _Obj) -> None:
        """Skip (or recurse into) the array bytes joblib writes right after the wrapper."""
        self.joblib = True
        if self.fork is not None:
            self.fork.capture(self)
        info = _joblib_layout(wrapper)
        if info is None:
            self.report(
                Severity.MEDIUM,
                "unverifiable",
                "joblib array header cannot be resolved, so the data after it is not verified",
            )
            raise _Abort
        count, itemsize, hasobject, aligned = info
        if hasobject:
            if self.depth >= _MAX_NESTED:
                self.report(Severity.MEDIUM, "limit", "joblib object arrays nested too deeply")
                raise _Abort
            # joblib reads it with plain pickle.load: wrappers inside read no array data
            nested = _Analyzer(
                self.r,
                self.sink,
                limits=self.limits,
                torch=self.torch,
                depth=self.depth + 1,
                joblib_arrays=False,
            )
            try:
                nested.run()
            except _Malformed as exc:
                self.pos = self.r.pos
                raise _Malformed(f"in joblib object array: {exc}") from None
        else:
            if aligned:
                pad = self.r.byte()
                if pad < 0 or self.r.skip(pad) != pad:
                    raise _Malformed("truncated joblib array padding")
            size = count * itemsize
            if self.r.skip(size) != size:
                raise _Malformed(f"truncated joblib array data ({size} bytes declared)")
        self.built += 1
        self.stack[-1] = _Obj(_Glob("numpy", "ndarray", Severity.NONE))


_HANDLERS: list[Callable[[_Analyzer], bool | None] | None] = dispatch_table(_Analyzer)
_I4, _U4, _U2, _F8 = I4, U4, U2, F8
_CONSTANTS: dict[int, Any] = {0x4E: None, 0x88: True, 0x89: False, 0x29: ()}


_JOBLIB_ARGS = ("subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes")
_JOBLIB_ATTRS = frozenset(_JOBLIB_ARGS)


_JOBLIB_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
# Allowlisted helpers that make an instance of the class they are given without its __init__
_INSTANCE_MAKERS = frozenset({"copyreg._reconstructor", "copy_reg._reconstructor"})


def _state_findings(state: Any) -> list[tuple[Severity, str, str]]:
    """What ``_Analyzer._check_state`` reports of a BUILD state (none: the state is fine)."""
    if type(state) is _Dict and state.n == len(state.pairs):
        for k, _v in state.pairs:  # the common state, checked without building any list
            if type(k) is not str or (k.startswith("__") and k.endswith("__")):
                break
        else:
            return []
    computed = False
    if isinstance(state, tuple):
        # (dict, slots) pairs, or a state for a class's own __setstate__ (NumPy's (version,
        # shape, dtype, fortran, data)): data made by allowlisted constructors is fine, a
        # mapping made by a call is not (its keys would become attribute names unchecked).
        # (The symbolic classes have no subclasses, so type() is isinstance() here.)
        for x in state:
            t = type(x)
            if (
                t is _Glob
                or t is _Opaque
                or (
                    t is _Obj
                    and (
                        x.origin is None
                        or x.origin.severity != Severity.NONE
                        or x.origin.qual in _DICT_MAKERS
                    )
                )
            ):
                computed = True
                break
    if isinstance(state, tuple) and not computed:
        dicts = [x for x in state if type(x) is _Dict]
    elif isinstance(state, _Dict):
        dicts = [state]
    elif state is None or isinstance(state, (_List, _Blob, str, bytes, int, float)):
        dicts = []
    else:
        return [
            (
                Severity.HIGH,
                "computed-state",
                f"BUILD state is {_describe(state)}, not written out in the file: its attribute "
                "names cannot be checked",
            )
        ]
    out: list[tuple[Severity, str, str]] = []
    for d in dicts:
        if d.n > len(d.pairs):
            out.append(
                (
                    Severity.MEDIUM,
                    "unverifiable",
                    f"BUILD state with {d.n} keys, more than the scanner keeps; not all checked",
                )
            )
        for k, _v in d.pairs:
            if type(k) is not str:
                out.append(
                    (
                        Severity.HIGH,
                        "computed-state",
                        f"BUILD state key {_describe(k)} is not a string written in the file",
                    )
                )
            elif k.startswith("__") and k.endswith("__"):
                out.append(
                    (
                        Severity.HIGH,
                        "dunder-state",
                        f"BUILD sets dunder attribute {k!r} (can swap an object's class or "
                        "expose raw memory)",
                    )
                )
    return out


def _makes_instance(module: str, name: str) -> bool:
    return f"{module}.{name}" in _INSTANCE_MAKERS or (
        module.startswith("sklearn") and name == "newObj"
    )


def _is_joblib_wrapper(inst: _Obj) -> bool:
    """Whether joblib's unpickler sees a NumpyArrayWrapper here (it reads array data after
    BUILD on any instance of it): the class called or given NEWOBJ, or the class handed to a
    helper that makes an instance of it (``copyreg._reconstructor(wrapper, object, None)``,
    scikit-learn's ``newObj(wrapper)``)."""
    origin = inst.origin
    if origin is None:
        return False
    if origin.qual == _JOBLIB_WRAPPER:
        return True
    maker = _makes_instance(origin.module, origin.name)
    first = inst.args[0] if isinstance(inst.args, tuple) and inst.args else None
    return maker and isinstance(first, _Glob) and first.qual == _JOBLIB_WRAPPER


def _merge_states(old: Any, new: Any) -> Any:
    """The attributes two BUILDs leave on an object without ``__setstate__``, as one dict
    (later pairs win); opaque when either state is not written out in the file."""
    merged = _Dict()
    for state in (old, new):
        parts = list(state) if isinstance(state, tuple) and len(state) == 2 else [state]
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, _Dict):
                return _Opaque("state")
            merged.pairs.extend(part.pairs)
            merged.n += part.n
    # Only the last value of each name matters. Keeping every pair made one wrapper rebuilt
    # from the memo N times cost N**2 (32,000 BUILDs, 600 KB: 2.4 s; a few KB of bz2 could
    # hold millions); a wrapper has six attributes, so a state of more names is opaque.
    last: dict[Any, Any] = {}
    for key, value in merged.pairs:
        if type(key) is not str:
            return _Opaque("state")
        last.pop(key, None)
        last[key] = value
    if len(last) > _MERGED_NAMES or merged.n != len(merged.pairs):
        return _Opaque("state")
    merged.pairs = list(last.items())
    merged.n = len(merged.pairs)
    return merged


_MERGED_NAMES = 64
_UNCOUNTED = 1 << 62  # more containers than any depth limit


def _joblib_attrs(wrapper: _Obj) -> dict[str, Any] | None:
    """The wrapper's attributes as joblib's unpickler leaves them after BUILD: ``__init__``'s
    arguments when it was called (not for NEWOBJ), then the state dict(s), later keys winning.
    None when any of it is not written out in the file."""
    attrs: dict[str, Any] = {}
    called = wrapper.origin is not None and wrapper.origin.qual == _JOBLIB_WRAPPER
    if called and not wrapper.new and isinstance(wrapper.args, tuple) and wrapper.args:
        if len(wrapper.args) > len(_JOBLIB_ARGS):
            return None
        attrs.update(zip(_JOBLIB_ARGS, wrapper.args, strict=False))
        attrs.setdefault("numpy_array_alignment_bytes", 16)
    state = wrapper.state
    parts = list(state) if isinstance(state, tuple) and len(state) == 2 else [state]
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, _Dict) or part.n > len(part.pairs):
            return None
        for k, v in part.pairs:
            if type(k) is not str or k not in _JOBLIB_ATTRS:
                return None
            attrs[k] = v
    return attrs


def _joblib_layout(wrapper: _Obj) -> tuple[int, int, bool, bool] | None:
    """(count, itemsize, hasobject, padded) as joblib's ``read_array`` will read the data, or
    None when that cannot be known exactly. The dtype is built by NumPy itself from the
    literal code and state (through shoal's checks), so its itemsize is the one joblib gets."""
    attrs = _joblib_attrs(wrapper)
    if attrs is None:
        return None
    shape = attrs.get("shape", _MISSING)
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    dtype = attrs.get("dtype", _MISSING)
    if not isinstance(dtype, _Obj) or dtype.origin is None or dtype.origin.qual != "numpy.dtype":
        return None
    if dtype.new or not isinstance(dtype.args, tuple) or not dtype.args:
        return None
    known = _known_dtype(dtype)
    if known is not None:
        itemsize, hasobject = known
    else:
        from shoal.errors import UnsafeModelError

        try:
            built = _real_dtype(dtype, 0)
        except UnsafeModelError:
            return None
        if built is None:
            return None
        itemsize, hasobject = built.itemsize, bool(built.hasobject)
    count = 1
    for d in shape:
        count *= d
    padded = attrs.get("numpy_array_alignment_bytes") is not None
    return count, itemsize, hasobject, padded


# The dtypes NumPy pickles most, with the exact BUILD state it writes for each: code ->
# (byte orders it writes, flags, itemsize, hasobject). Long double (f16, c32) is left out: its
# size is the platform's. tests/scan checks every entry against shoal's NumPy-built dtype.
_PLAIN_DTYPES: dict[str, tuple[tuple[str, ...], int, int, bool]] = {
    **{c: (("|",), 0, 1, False) for c in ("b1", "i1", "u1")},
    **{
        f"{k}{n}": (("<", ">"), 0, n, False)
        for k, sizes in (("i", (2, 4, 8)), ("u", (2, 4, 8)), ("f", (2, 4, 8)), ("c", (8, 16)))
        for n in sizes
    },
    "O8": (("|",), 63, 8, True),
}
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MAX_KNOWN_FIELDS = 64


def _known_dtype(dtype: Any) -> tuple[int, bool] | None:
    """(itemsize, hasobject), without NumPy, of a symbolic ``numpy.dtype(code, ...)`` whose
    layout is known to be what NumPy would build, else None (the caller builds it with NumPy
    as before: importing NumPy costs a scan about 0.1 CPU-s). Known: NumPy's plain dtypes with
    no state or exactly the state NumPy writes for them (types compared too: ``False`` is not
    the flag ``0`` here), and packed structured dtypes as NumPy writes them (scikit-learn's tree
    nodes): named fields of plain non-object dtypes at increasing, non-overlapping offsets
    inside the element. tests/scan checks both against shoal's NumPy-built dtype."""
    if type(dtype) is not _Obj:
        return None
    origin = dtype.origin
    if origin is None or origin.qual != "numpy.dtype" or dtype.new:
        return None
    args = dtype.args
    if type(args) is not tuple or not args or type(args[0]) is not str:
        return None
    state = dtype.state
    entry = _PLAIN_DTYPES.get(args[0])
    if entry is not None:
        orders, flags, itemsize, hasobject = entry
        if state is None or _numpy_state(state, orders, None, -1, -1, flags):
            return itemsize, hasobject
        return None
    if not args[0].startswith("V") or type(state) is not tuple or len(state) != 8:
        return None
    names, fields, elsize = state[3], state[4], state[5]
    if args[0] != f"V{elsize}" or not _numpy_state(state, ("|",), names, elsize, 1, 16):
        return None
    if type(names) is not tuple or not 0 < len(names) <= _MAX_KNOWN_FIELDS:
        return None
    if type(fields) is not _Dict or fields.n != len(names) or len(fields.pairs) != len(names):
        return None
    end = 0
    for name, (key, spec) in zip(names, fields.pairs, strict=True):
        if type(name) is not str or not _FIELD_NAME.fullmatch(name) or key != name:
            return None
        if type(key) is not str or type(spec) is not tuple or len(spec) != 2:
            return None
        inner, offset = spec
        # a plain field only, not one that is itself structured (so no recursion)
        if type(inner) is not _Obj or type(inner.args) is not tuple or not inner.args:
            return None
        if _PLAIN_DTYPES.get(inner.args[0]) is None:
            return None
        known = _known_dtype(inner)
        if known is None or known[1] or type(offset) is not int or offset < end:
            return None
        end = offset + known[0]
    if end > elsize or elsize > 1 << 24:
        return None
    return elsize, False


def _numpy_state(
    state: Any, orders: tuple[str, ...], names: Any, elsize: int, align: int, flags: int
) -> bool:
    """Whether a dtype's BUILD state is ``(3, order, None, names, fields, elsize, align,
    flags)`` with ``order`` one of ``orders``, every number an int (not a bool) equal to the
    one given, and fields present exactly when ``names`` is not None."""
    if type(state) is not tuple or len(state) != 8:
        return False
    version, order, sub, got_names, fields, got_elsize, got_align, got_flags = state
    return (
        type(version) is int
        and version == 3
        and type(order) is str
        and order in orders
        and sub is None
        and got_names is names
        and (fields is None) == (names is None)
        and type(got_elsize) is int
        and got_elsize == elsize
        and type(got_align) is int
        and got_align == align
        and type(got_flags) is int
        and got_flags == flags
    )


def _real_dtype(dtype: Any, depth: int, built: dict[tuple[int, int], Any] | None = None) -> Any:
    """The dtype NumPy would build from a symbolic ``numpy.dtype(...)`` call and its state, via
    shoal's checked builder (nested field dtypes too); None if any part is not literal.

    Each symbolic dtype is built once per depth and call (``built``): fields are dtypes from
    the memo, so a dtype of four fields of one dtype of four fields ... eight levels deep is
    1 KB of pickle and 4**8 builds when walked as a tree."""
    if depth > 16 or not isinstance(dtype, _Obj) or dtype.origin is None:
        return None
    if built is None:
        built = {}
    key = (id(dtype), depth)
    if key in built:
        return built[key]
    built[key] = None  # a dtype that contains itself is not literal
    result = _real_dtype_once(dtype, depth, built)
    built[key] = result
    return result


def _real_dtype_once(dtype: _Obj, depth: int, built: dict[tuple[int, int], Any]) -> Any:
    from shoal.scan.builders import build_dtype

    if dtype.origin is None:
        return None
    if dtype.origin.qual != "numpy.dtype" or dtype.new or not isinstance(dtype.args, tuple):
        return None
    if not dtype.args:
        return None
    state = dtype.state
    if isinstance(state, tuple) and len(state) >= 8:
        parts = list(state)
        sub, fields = parts[2], parts[4]
        if isinstance(sub, tuple) and len(sub) == 2:
            inner = _real_dtype(sub[0], depth + 1, built)
            if inner is None:
                return None
            parts[2] = (inner, sub[1])
        if isinstance(fields, _Dict):
            if fields.n > len(fields.pairs):
                return None
            real: dict[Any, Any] = {}
            for name, spec in fields.pairs:
                if not isinstance(spec, tuple) or not spec:
                    return None
                inner = _real_dtype(spec[0], depth + 1, built)
                if inner is None:
                    return None
                real[name] = (inner, *spec[1:])
            parts[4] = real
        state = tuple(parts)
    return build_dtype(dtype.args[0], state)


def _analyze_one(
    reader: ByteReader,
    sink: Sink,
    *,
    limits: ScanLimits,
    torch: bool,
    joblib_arrays: bool = True,
    fork: _Fork | None = None,
) -> tuple[_Analyzer, Any, str | None]:
    """Run one pickle; returns (analyzer, value, error-or-None)."""
    a = _Analyzer(reader, sink, limits=limits, torch=torch, joblib_arrays=joblib_arrays, fork=fork)
    try:
        value = a.run()
    except _Malformed as exc:
        return a, None, str(exc)
    except _Abort:
        return a, None, "aborted"
    return a, value, None


class _Fork:
    """Where joblib's reading of a stream and pickle.load's part: the first NumpyArrayWrapper
    whose array data joblib reads. pickle.load builds the wrapper like any object and reads on
    from the bytes joblib takes as data, so a file can be an array to joblib and code to
    pickle.load and np.load. The plain reading starts from a copy of the analyser's state
    there."""

    __slots__ = ("pos", "proto", "replay", "state")

    def __init__(self) -> None:
        self.replay: Callable[[], tuple[ByteReader, bool]] | None = None
        self.state: Any = None
        self.proto = 0
        self.pos = 0

    def capture(self, a: _Analyzer) -> None:
        if self.replay is not None or a.depth:
            return
        try:
            self.state = _snapshot((a.stack, a.metastack, a.memo), {})
        except RecursionError:
            self.state = None  # reported as unverified by plain_reading
        self.proto = a.proto
        self.pos = a.r.pos
        self.replay = a.r.fork(a.limits.max_plain_reading_bytes)


def _snapshot(v: Any, done: dict[int, Any]) -> Any:
    """A copy of the analyser's symbolic state that later opcodes cannot change: containers and
    call results are copied, everything else is immutable and shared. Each object is copied
    once (``done``), so values shared through the memo stay shared: copy.deepcopy does not
    memoise tuples, and walked a tuple holding one tuple twice, 20 levels over, for 13 s."""
    if v is None or type(v) in (int, float, str, bytes, bool, complex, _Glob, _Opaque, _Blob):
        return v
    hit = done.get(id(v))
    if hit is not None:
        return hit[1]
    if type(v) is tuple:
        out: Any = tuple(_snapshot(x, done) for x in v)
        done[id(v)] = (v, out)  # (v, ...) keeps v alive, so its id is not reused meanwhile
        return out
    if type(v) is list:
        out = []
        done[id(v)] = (v, out)
        out.extend(_snapshot(x, done) for x in v)
        return out
    if type(v) is dict:
        out = {}
        done[id(v)] = (v, out)
        for k, x in v.items():
            out[k] = _snapshot(x, done)
        return out
    if type(v) is _List:
        out = _List()
        done[id(v)] = (v, out)
        out.items, out.n = _snapshot(v.items, done), v.n
        return out
    if type(v) is _Dict:
        out = _Dict()
        done[id(v)] = (v, out)
        out.pairs, out.n = _snapshot(v.pairs, done), v.n
        return out
    if type(v) is _Obj:
        out = _Obj(v.origin, None, new=v.new)
        done[id(v)] = (v, out)
        out.args, out.state, out.filled = (
            _snapshot(v.args, done),
            _snapshot(v.state, done),
            v.filled,
        )
        return out
    return v  # any other symbolic value is not changed after it is made


def _plain_reading(fork: _Fork, sink: Sink, *, limits: ScanLimits, torch: bool) -> None:
    """Analyse the stream as pickle.load reads it from the fork on; findings count only if
    that reading imports something (as for a pickle at byte 0 of a container)."""
    if fork.replay is None:
        return
    reader, truncated = fork.replay()
    if fork.state is None:
        sink.add(
            Severity.MEDIUM,
            "unverifiable",
            "joblib array in a pickle too deeply nested to also read as pickle.load does",
            fork.pos,
        )
        return
    scratch = sink.scratch()
    a = _Analyzer(reader, scratch, limits=limits, torch=torch, joblib_arrays=False)
    a.stack, a.metastack, a.memo = fork.state
    a.built = _UNCOUNTED  # its values were made by another reading: STOP always walks
    a.proto = fork.proto
    imports, error = 0, None
    try:
        a.run()
    except _Malformed as exc:
        error = str(exc)
    except _Abort:
        error = "aborted"
    # Unregistered extension codes make pickle.load fail (no library registers any): in raw
    # array bytes, read as opcodes, they are noise rather than a way to run code.
    imports += a.imports - a.extensions
    count = 1
    while error is None and not reader.at_eof() and count < limits.max_pickles_per_stream:
        b, _value, error = _analyze_one(
            reader, scratch, limits=limits, torch=torch, joblib_arrays=False
        )
        imports += b.imports - b.extensions
        count += 1
    ended_early = truncated and reader.at_eof() and error is not None
    if imports:
        sink.merge(scratch)
        sink.add(
            Severity.MEDIUM,
            "joblib-plain-reading",
            "read as a plain pickle (pickle.load, np.load), the bytes joblib takes as array "
            "data are opcodes that import code",
            fork.pos,
        )
    elif ended_early:
        sink.add(
            Severity.MEDIUM,
            "limit",
            f"read as a plain pickle, the stream after a joblib array header runs past the "
            f"{size_text(limits.max_plain_reading_bytes)} the scanner keeps of a stream it "
            "cannot read twice (ScanLimits.max_plain_reading_bytes); the rest was not verified",
            fork.pos,
        )


def _looks_like_pickle(a: _Analyzer, error: str | None) -> bool:
    return error is None or a.started_with_proto or a.imports > 0


def probe_pickle_imports(
    reader: ByteReader, sink: Sink, *, limits: ScanLimits, torch: bool
) -> bool:
    """Read the stream as ``pickle.load`` would (one pickle from here) and keep the findings only
    if that pickle imports anything: a pickle that imports nothing runs nothing, so a container
    whose first bytes happen to form opcodes is not flagged for it. Joblib's reading of it is
    analysed too (it may skip array data that pickle.load reads as opcodes, or the reverse)."""
    scratch = sink.scratch()
    fork = _Fork()
    a, _value, error = _analyze_one(reader, scratch, limits=limits, torch=torch, fork=fork)
    if a.imports == 0:
        plain = sink.scratch()
        _plain_reading(fork, plain, limits=limits, torch=torch)
        if plain.worst < Severity.MEDIUM:
            return False
        sink.merge(plain)
        return True
    sink.merge(scratch)
    if error is not None and error != "aborted":
        sink.add(Severity.MEDIUM, "malformed", f"malformed pickle: {error}", a.pos)
    _plain_reading(fork, sink, limits=limits, torch=torch)
    return True


def scan_pickle_stream(
    reader: ByteReader,
    sink: Sink,
    *,
    limits: ScanLimits,
    torch: bool = False,
    probe: bool = False,
    joblib_arrays: bool = True,
) -> PickleOutcome:
    """Analyse every pickle in a stream (several may be concatenated).

    With ``probe`` the stream is not known to be a pickle: if the first opcodes do not form one
    (and import nothing) the outcome's format is "" and nothing is reported. With
    ``joblib_arrays`` (a stream joblib.load may read) both readings are analysed: joblib's,
    which reads array data after each NumpyArrayWrapper, and pickle.load's, which does not.
    """
    fork = _Fork() if joblib_arrays else None
    outcome = _scan_stream(
        reader,
        sink,
        limits=limits,
        torch=torch,
        probe=probe,
        joblib_arrays=joblib_arrays,
        fork=fork,
    )
    if fork is not None and outcome.format:
        _plain_reading(fork, sink, limits=limits, torch=torch)
    return outcome


def _scan_stream(
    reader: ByteReader,
    sink: Sink,
    *,
    limits: ScanLimits,
    torch: bool,
    probe: bool,
    joblib_arrays: bool,
    fork: _Fork | None,
) -> PickleOutcome:
    start = reader.pos
    first_sink = sink.scratch() if probe else sink
    a, value, error = _analyze_one(
        reader, first_sink, limits=limits, torch=torch, joblib_arrays=joblib_arrays, fork=fork
    )
    if probe:
        if error is not None and not _looks_like_pickle(a, error):
            return PickleOutcome(format="", pickles=0)
        sink.merge(first_sink)
    if error is not None:
        if error != "aborted":
            sink.add(Severity.MEDIUM, "malformed", f"malformed pickle: {error}", a.pos)
        return PickleOutcome(format="joblib" if a.joblib else "pickle", pickles=1)
    fmt = "joblib" if a.joblib else "pickle"
    if value == TORCH_LEGACY_MAGIC and type(value) is int and start == 0:
        return _torch_legacy(reader, sink, limits=limits)
    count = 1
    while not reader.at_eof():
        if count >= limits.max_pickles_per_stream:
            sink.add(Severity.MEDIUM, "limit", "too many concatenated pickles", reader.pos)
            break
        b, _value, error = _analyze_one(
            reader, sink, limits=limits, torch=torch, joblib_arrays=joblib_arrays, fork=fork
        )
        if error is not None:
            if b.ops <= 1 and b.imports == 0 and error != "aborted":
                sink.add(
                    Severity.LOW,
                    "trailing-data",
                    "data after the last pickle is not a pickle (pickle.load ignores it)",
                    b.pos,
                )
            elif error != "aborted":
                sink.add(Severity.MEDIUM, "malformed", f"malformed pickle: {error}", b.pos)
            break
        count += 1
        if b.joblib:
            fmt = "joblib"
    return PickleOutcome(format=fmt, pickles=count)


def _torch_legacy(reader: ByteReader, sink: Sink, *, limits: ScanLimits) -> PickleOutcome:
    """Legacy ``torch.save``: magic, protocol, sys_info, the object, storage keys, raw bytes."""
    for index, what in enumerate(("protocol version", "sys_info", "object", "storage keys")):
        a, value, error = _analyze_one(reader, sink, limits=limits, torch=True, joblib_arrays=False)
        if error is not None:
            if error != "aborted":
                sink.add(
                    Severity.MEDIUM,
                    "malformed",
                    f"legacy torch file: malformed {what} pickle: {error}",
                    a.pos,
                )
            return PickleOutcome(format="torch-legacy", pickles=index + 1)
        if what == "storage keys" and not (
            isinstance(value, _List) and all(type(k) is str for k in value.items)
        ):
            sink.add(
                Severity.MEDIUM,
                "malformed",
                "legacy torch file: storage key list is not a list of strings",
                a.pos,
            )
    # What follows is raw storage bytes, which torch copies without unpickling.
    return PickleOutcome(format="torch-legacy", pickles=5)


# Element sizes of the storage classes a legacy tar names (torch._utils._element_size).
_STORAGE_ELEMENT_SIZES = {
    "Bool": 1, "Byte": 1, "Char": 1, "QInt8": 1, "QUInt8": 1, "QUInt4x2": 1, "QUInt2x4": 1,
    "Short": 2, "Half": 2, "BFloat16": 2, "Int": 4, "Float": 4, "QInt32": 4, "Long": 8,
    "Double": 8, "ComplexFloat": 8, "ComplexDouble": 16,
}  # fmt: skip


def scan_torch_tar_member(
    reader: ByteReader, sink: Sink, *, limits: ScanLimits, member: str
) -> PickleOutcome:
    """The ``storages`` or ``tensors`` member of a legacy (tar) ``torch.save`` file, read as
    torch's ``legacy_load`` reads it: a count, then per record a pickle followed by raw bytes
    whose length the record gives, then (storages only) one more pickle. torch unpickles every
    one of those pickles, so each is analysed; raw bytes whose length cannot be worked out
    leave the rest unverifiable (medium), never skipped as trailing data."""

    def unverifiable(why: str) -> PickleOutcome:
        sink.add(
            Severity.MEDIUM,
            "unverifiable",
            f"legacy torch tar member {member!r}: {why}; torch.load unpickles what follows, "
            "which the scanner cannot locate",
            reader.pos,
        )
        return PickleOutcome(format="torch-legacy-tar", pickles=pickles)

    pickles = 0

    def one(what: str) -> tuple[bool, Any]:
        nonlocal pickles
        a, value, error = _analyze_one(
            reader, sink, limits=limits, torch=False, joblib_arrays=False
        )
        pickles += 1
        if error is not None:
            if error != "aborted":
                sink.add(
                    Severity.MEDIUM,
                    "malformed",
                    f"legacy torch tar member {member!r}: malformed {what} pickle: {error}",
                    a.pos,
                )
            return False, None
        return True, value

    ok, count = one("count")
    if not ok:
        return PickleOutcome(format="torch-legacy-tar", pickles=pickles)
    if type(count) is not int or not 0 <= count <= limits.max_pickles_per_stream:
        return unverifiable(f"record count {brief(count)} is not a count the scanner follows")
    for _ in range(count):
        check_time()
        ok, record = one("record")
        if not ok:
            return PickleOutcome(format="torch-legacy-tar", pickles=pickles)
        if member == "storages":
            kind = record[2] if type(record) is tuple and len(record) == 3 else None
            size = None
            if isinstance(kind, _Glob) and kind.module in ("torch", "torch.cuda"):
                size = _STORAGE_ELEMENT_SIZES.get(kind.name.removesuffix("Storage"))
            if size is None:
                return unverifiable(f"storage record {brief(record)} names no known storage type")
            head = reader.take(8)
            if len(head) != 8:
                return unverifiable("storage size header is truncated")
            numel = int.from_bytes(head, "little", signed=True)
            if numel < 0 or reader.skip(numel * size) != numel * size:
                return unverifiable(f"storage of {numel} elements does not fit the member")
        else:
            head = reader.take(8)
            ndim = int.from_bytes(head[:4], "little", signed=True) if len(head) == 8 else -1
            want = 16 * ndim + 8
            if ndim < 0 or reader.skip(want) != want:
                return unverifiable("tensor record header is truncated or has a negative ndim")
    if member == "storages":
        ok, _views = one("storage views")
        if not ok:
            return PickleOutcome(format="torch-legacy-tar", pickles=pickles)
    if not reader.at_eof():
        sink.add(
            Severity.LOW,
            "trailing-data",
            f"legacy torch tar member {member!r}: data after its last record (torch ignores it)",
            reader.pos,
        )
    return PickleOutcome(format="torch-legacy-tar", pickles=pickles)
