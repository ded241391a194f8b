"""A pickle interpreter that never calls anything the file names.

``Unpickler`` reads pickle opcodes itself and builds only:

* plain values: None, bools, ints, floats, complex, str, bytes, bytearray, tuple, list, dict,
  set, frozenset, ``collections.OrderedDict``;
* NumPy dtypes, arrays and scalars of plain (non-object, non-structured) dtypes, through
  ``shoal.scan.builders`` from raw bytes whose length must match the shape exactly;
* whatever a format adds through ``extra``: torch tensors and parameters for torch files,
  joblib's array wrapper for joblib files (see ``shoal.scan.load``).

A global the file names (``numpy.core.multiarray._reconstruct``, ``collections.OrderedDict``,
...) only selects one of shoal's own reconstructors, which checks every argument; any other name
is refused by name. BUILD works only on objects shoal is building (an array or dtype awaiting
its state, joblib's wrapper, an OrderedDict's ``_metadata``); SETITEM, APPEND and ADDITEMS only
on dicts, lists and sets the interpreter made itself. Attribute names starting with ``_`` are
refused (the one exception is ``_metadata`` on an OrderedDict, which is how torch state dicts
carry their version numbers). A global (or a torch storage) is only ever an argument: one
left in the result is refused. Every limit of ``ScanLimits`` that applies is enforced and
reported as ``UnsafeModelError("refused: ...")``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any

from shoal.errors import UnsafeModelError
from shoal.scan.allowlist import normalize_global
from shoal.scan.brief import brief
from shoal.scan.builders import build_array, build_dtype, build_object_array, build_scalar
from shoal.scan.depth import nesting
from shoal.scan.opcodes import F8, I4, U1, U2, U4, U8, dispatch_table, text_literal
from shoal.scan.report import ScanLimits
from shoal.scan.streams import ByteReader, check_time

__all__ = ["INTERNAL", "Budget", "Reconstructor", "Unpickler", "internal", "refuse"]

_LINE_LIMIT = 1 << 20
_KEY_DEPTH = 100  # tuples within a dict or set key
# Bytes charged per container item, at or above CPython's (a list slot is a pointer; a dict
# entry is 24 bytes plus its index, tables at most two-thirds full; a set entry 16, at most
# three-fifths full and grown fourfold), and per opcode for the number or text it may make.
_LIST_SLOT, _DICT_SLOT, _SET_SLOT = 8, 48, 64
_EMPTY = {list: 56, dict: 64, set: 216, "ordered": 128}
_TUPLE = 40
_OP_BYTES = 48
_STR_HEADER = 80  # at or above sys.getsizeof('') of every str kind


def refuse(what: str) -> UnsafeModelError:
    return UnsafeModelError(f"refused: {what}")


class Budget:
    """What one load may build: container items, Python objects' memory, keys that share a hash,
    and array bytes relative to bytes read."""

    __slots__ = ("built", "collisions", "hashed", "items", "limits", "objects", "read")

    def __init__(self, limits: ScanLimits) -> None:
        self.limits = limits
        self.items = 0
        self.hashed = 0  # tuple nodes walked to check dict and set keys
        self.built = 0  # bytes of arrays and tensors made
        self.read = 0  # bytes of raw data taken from the input
        self.objects = 0  # estimated bytes of the Python objects made (containers, numbers, text)
        self.collisions: dict[int, int] = {}  # hash of (container, key hash) -> keys seen

    def add_items(self, n: int, *, slot: int = _LIST_SLOT) -> None:
        """``n`` more items in containers, each taking ``slot`` bytes of the container."""
        self.items += n
        if self.items > self.limits.max_container_items:
            raise refuse(
                f"more than {self.limits.max_container_items} container items "
                "(ScanLimits.max_container_items)"
            )
        self.add_objects(n * slot)

    def add_objects(self, n: int) -> None:
        """Python objects cost memory the file does not hold: one byte of pickle makes an empty
        set of 216 bytes, so a 19 MB pickle of empty sets took 4.4 GB. Estimates (never below
        CPython's own sizes) are added up and bounded."""
        self.objects += n
        if self.objects > self.limits.max_object_bytes:
            raise refuse(
                f"the file would build more than {self.limits.max_object_bytes} bytes of Python "
                "objects (ScanLimits.max_object_bytes)"
            )

    def check_keys(self, keys: Any, container: object = None) -> None:
        """Refuse keys whose hashing is unbounded. Python hashes a tuple afresh at every use,
        recursing in C with no depth check: a key nested a million deep crashes the process,
        and a tuple holding one tuple twice, forty times over (a few hundred bytes of pickle),
        takes 2**40 steps. Each tuple key is walked once here, at most ``_KEY_DEPTH`` deep,
        and the walks of one load together are bounded like its container items.

        Then ``container``'s keys are counted by hash value. Ints, floats, complex numbers and
        tuples of them hash the same in every process (only str and bytes are salted), so a
        file can hold thousands of distinct keys with one hash (``i * (2**61 - 1) + 7``, or
        ``complex(c - 1000003 * j, j)``), and each insertion then compares against all of them:
        60,000 such int keys (780 KB) took 67 s to load, in C, where no time check runs."""
        walked = []
        for key in keys:
            walked.append(key)
            if type(key) is int:
                self._hash_cost(key)
            if type(key) is not tuple:
                continue
            todo = [(key, 0)]
            while todo:
                value, depth = todo.pop()
                self.hashed += 1
                if depth > _KEY_DEPTH:
                    raise refuse(f"a dict or set key nested more than {_KEY_DEPTH} deep")
                if type(value) is tuple:
                    todo.extend((v, depth + 1) for v in value)
                elif type(value) is int:
                    self._hash_cost(value)
                if self.hashed > self.limits.max_container_items:
                    self._too_many_keys()
        self._count_hashes(walked, id(container) if container is not None else object())

    def _hash_cost(self, value: int) -> None:
        """An int's hash is not cached and takes time in its size (1.8 ms for a 1 MiB one):
        a tuple key holding one such int many times through the memo, or one int put into many
        sets, is bytes of pickle and seconds of hashing, all within one opcode where no time
        check runs. Counted with the tuple values walked: one per 128 bytes of the int."""
        cost = value.bit_length() >> 10
        if cost:
            self.hashed += cost
            if self.hashed > self.limits.max_container_items:
                self._too_many_keys()

    def _too_many_keys(self) -> None:
        raise refuse(
            f"dict and set keys holding more than {self.limits.max_container_items} values in "
            "all, long integers counted by size (ScanLimits.max_container_items)"
        )

    def _count_hashes(self, keys: list[Any], container: object) -> None:
        seen = self.collisions
        most = self.limits.max_key_collisions
        for key in keys:
            if type(key) is str or type(key) is bytes:
                continue  # salted per process: a file cannot aim them at one value
            slot = hash((container, hash(key)))
            count = seen.get(slot, 0) + 1
            seen[slot] = count
            if count > most:
                raise refuse(
                    f"more than {most} keys of one dict or set share one hash value (each "
                    "insertion would compare against all of them; ScanLimits.max_key_collisions)"
                )

    def add_read(self, n: int) -> None:
        self.read += n

    def add_built(self, n: int) -> None:
        """Arrays come from bytes the file holds: building much more than was read means the
        file reuses one buffer many times (a memory bomb)."""
        self.built += n
        if self.built > 2 * self.read + (64 << 20) or self.built > self.limits.max_load_bytes:
            raise refuse(
                f"the file would build {self.built} bytes of arrays from {self.read} bytes "
                "of data (a buffer reused to multiply memory)"
            )


class Reconstructor:
    """What a global named by the file stands for: shoal's own function, or an inert tag."""

    __slots__ = ("call", "new", "qual", "tag")

    def __init__(
        self,
        qual: str,
        *,
        call: Callable[[Unpickler, tuple[Any, ...]], Any] | None = None,
        new: Callable[[Unpickler, tuple[Any, ...]], Any] | None = None,
        tag: Any = None,
    ) -> None:
        self.qual = qual
        self.call = call
        self.new = new
        self.tag = tag

    def __repr__(self) -> str:
        return f"<shoal reconstructor {self.qual}>"


class Pending:
    """An object whose state a later BUILD supplies (an array, a dtype, a joblib wrapper)."""

    __slots__ = ("attrs", "kind", "result")

    def __init__(self, kind: str, attrs: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.attrs = attrs or {}
        self.result: Any = _UNSET


_UNSET = object()


def _check(values: Any) -> None:
    for v in values:
        if type(v) is Pending:
            raise refuse(f"a {v.kind} used before its state was set")


# --- reconstructors for plain Python and NumPy ------------------------------------------------


def _args(args: tuple[Any, ...], qual: str, lo: int, hi: int) -> tuple[Any, ...]:
    if type(args) is not tuple or not lo <= len(args) <= hi:
        raise refuse(f"{qual} with arguments {_short(args)}")
    return args


def _short(v: Any) -> str:
    return brief(v)


def _reconstruct(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    cls, shape, code = _args(args, "numpy _reconstruct", 3, 3)
    if not (isinstance(cls, Reconstructor) and cls.tag == "numpy.ndarray"):
        raise refuse(f"numpy _reconstruct of {_short(cls)}: only numpy.ndarray is built")
    if shape != (0,) or code not in (b"b", "b"):
        raise refuse(f"numpy _reconstruct arguments {_short(args)}")
    return Pending("numpy array")


def _build_array(vm: Unpickler, p: Pending, state: Any) -> Any:
    if type(state) is tuple and len(state) == 5:
        version, shape, dtype, fortran, raw = state
        if version != 1 or type(version) is not int:
            raise refuse(f"array state version {_short(version)}")
    elif type(state) is tuple and len(state) == 4:
        shape, dtype, fortran, raw = state
    else:
        raise refuse("an array state that is not (version, shape, dtype, fortran, data)")
    if getattr(dtype, "hasobject", False):
        arr = build_object_array(raw, shape, fortran=fortran)
        vm.budget.add_items(arr.size)
        return arr
    arr = build_array(raw, dtype, shape, fortran=fortran)
    vm.budget.add_built(arr.nbytes)
    if arr.dtype.byteorder == ">":  # ndarray.__setstate__ swaps to native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _dtype(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    code = _args(args, "numpy.dtype", 1, 3)[0]
    if not all(type(a) is bool for a in args[1:]):
        raise refuse(f"numpy.dtype arguments {_short(args)}")
    build_dtype(code)  # refuse bad codes now, before any state arrives
    return Pending("numpy dtype", {"code": code})


def _build_dtype(vm: Unpickler, p: Pending, state: Any) -> Any:
    return build_dtype(p.attrs["code"], state)


def _scalar(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    dtype, data = _args(args, "numpy scalar", 2, 2)
    return build_scalar(dtype, data)


def _frombuffer(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    buf, dtype, shape, order = _args(args, "numpy _frombuffer", 4, 4)
    if order not in ("C", "F"):
        raise refuse(f"array order {_short(order)}")
    arr = build_array(buf, dtype, shape, fortran=order == "F")
    vm.budget.add_built(arr.nbytes)
    return arr


def _ordered_dict(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    _args(args, "collections.OrderedDict", 0, 1)
    vm.budget.add_objects(_EMPTY["ordered"])
    out: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    if args:
        pairs = args[0]
        if type(pairs) is not list or not all(type(p) is tuple and len(p) == 2 for p in pairs):
            raise refuse("collections.OrderedDict from anything but a list of pairs")
        _check(x for p in pairs for x in p)
        vm.budget.add_items(len(pairs), slot=_DICT_SLOT)
        vm.budget.check_keys((p[0] for p in pairs), out)
        out.update(pairs)
    return out


def _set(kind: type) -> Callable[[Unpickler, tuple[Any, ...]], Any]:
    def build(vm: Unpickler, args: tuple[Any, ...]) -> Any:
        _args(args, f"builtins.{kind.__name__}", 0, 1)
        if args and type(args[0]) not in (list, tuple):
            raise refuse(f"builtins.{kind.__name__} from {type(args[0]).__name__}")
        items = args[0] if args else ()
        _check(items)
        vm.budget.add_objects(_EMPTY[set])
        vm.budget.add_items(len(items), slot=_SET_SLOT)
        vm.budget.check_keys(items)
        return kind(items)

    return build


def _bytearray(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    _args(args, "builtins.bytearray", 0, 2)
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
        return bytearray(args[0].encode("latin-1"))
    raise refuse(f"builtins.bytearray with arguments {_short(args)} (only from bytes)")


def _bytes(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    _args(args, "builtins.bytes", 0, 1)
    if args and type(args[0]) is not bytes:
        raise refuse(f"builtins.bytes with arguments {_short(args)} (only empty or from bytes)")
    return args[0] if args else b""


def _complex(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    _args(args, "builtins.complex", 1, 2)
    if not all(type(a) in (int, float) for a in args):
        raise refuse(f"builtins.complex with arguments {_short(args)}")
    return complex(*args)


def _encode(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    text, codec = _args(args, "_codecs.encode", 2, 2)
    if type(text) is not str or codec not in ("latin1", "latin-1"):
        raise refuse(f"_codecs.encode with arguments {_short(args)} (only latin-1 text)")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise refuse("_codecs.encode of text outside latin-1") from None


def _table() -> dict[tuple[str, str], Reconstructor]:
    t: dict[tuple[str, str], Reconstructor] = {}

    def add(qual: str, **kw: Any) -> None:
        module, _, name = qual.rpartition(".")
        t[(module, name)] = Reconstructor(qual, **kw)

    for core in ("numpy.core", "numpy._core"):
        add(f"{core}.multiarray._reconstruct", call=_reconstruct)
        add(f"{core}.multiarray.scalar", call=_scalar)
        add(f"{core}.numeric._frombuffer", call=_frombuffer)
    add("numpy.ndarray", tag="numpy.ndarray")
    add("numpy.dtype", call=_dtype)
    add("collections.OrderedDict", call=_ordered_dict)
    add("builtins.set", call=_set(set))
    add("builtins.frozenset", call=_set(frozenset))
    add("builtins.bytearray", call=_bytearray)
    add("builtins.bytes", call=_bytes)
    add("builtins.complex", call=_complex)
    add("_codecs.encode", call=_encode)
    return t


BUILTIN_GLOBALS: Mapping[tuple[str, str], Reconstructor] = _table()
# shoal's stand-ins that arguments may hold but a load's result may not
INTERNAL: list[type] = [Reconstructor]


def internal(kind: type) -> None:
    """Refuse values of ``kind`` in a load's result, as ``Reconstructor`` (torch's storages)."""
    INTERNAL.append(kind)
    _containers()[kind] = _not_a_value


_BUILDERS: dict[str, Callable[[Unpickler, Pending, Any], Any]] = {
    "numpy array": _build_array,
    "numpy dtype": _build_dtype,
}


# --- the interpreter ---------------------------------------------------------------------------

_U1, _U2, _I4, _U4, _U8, _F8 = U1, U2, I4, U4, U8, F8


class _Stop(Exception):
    pass


def _dict_items(d: Any) -> Any:
    return itertools.chain(d, d.values())


def _ordered_items(d: Any) -> Any:
    # _metadata is the one attribute a load keeps (torch state dicts): part of the value
    return itertools.chain(d, d.values(), (getattr(d, "_metadata", None),))


def _object_items(a: Any) -> Any:
    return a.flat if a.dtype.hasobject else None


def _not_a_value(v: Any) -> Any:
    # a global the file named, or a torch storage: pickle.load would return the class (or a
    # storage object) itself; shoal's stand-ins for them must not leave the interpreter
    raise refuse(f"{_kind(v)} as a value (a load returns only plain values, arrays, tensors)")


@functools.cache
def _containers() -> dict[type, Callable[[Any], Any]]:
    """What the depth walk of a load's result descends into; the stand-ins in ``INTERNAL``
    are refused when met."""
    import numpy as np  # not at import: shoal.scan loads without NumPy until an array comes

    kinds: dict[type, Callable[[Any], Any]] = {t: iter for t in (tuple, list, set, frozenset)}
    kinds.update({dict: _dict_items, collections.OrderedDict: _ordered_items})
    kinds[np.ndarray] = _object_items
    kinds.update({t: _not_a_value for t in INTERNAL})
    return kinds


class Unpickler:
    """One pickle from ``reader``; ``load()`` returns what shoal built or raises
    ``UnsafeModelError`` (``ShoalError``) naming what it refused."""

    def __init__(
        self,
        reader: ByteReader,
        *,
        limits: ScanLimits,
        budget: Budget | None = None,
        extra: Mapping[tuple[str, str], Reconstructor] | None = None,
        builders: Mapping[str, Callable[[Unpickler, Pending, Any], Any]] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
        depth: int = 0,
    ) -> None:
        self.r = reader
        self.limits = limits
        self.budget = budget or Budget(limits)
        self.globals = {**BUILTIN_GLOBALS, **(extra or {})}
        self.builders = {**_BUILDERS, **(builders or {})}
        self.persistent_load = persistent_load
        self.depth = depth
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0

    def nested(self) -> Unpickler:
        """A fresh interpreter on the same reader and budget (joblib's object arrays). joblib
        reads those with plain ``pickle.load``, where a NumpyArrayWrapper reads no array data:
        so the nested one builds no joblib wrappers (it refuses the name)."""
        if self.depth >= 16:
            raise refuse("pickles nested more than 16 deep")
        return Unpickler(
            self.r,
            limits=self.limits,
            budget=self.budget,
            persistent_load=self.persistent_load,
            depth=self.depth + 1,
        )

    # -- reading ------------------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        data = self.r.take(n) if n <= 1 << 16 else self.r.take_large(n)
        if len(data) != n:
            raise refuse(f"the pickle is truncated ({n} bytes declared, {len(data)} present)")
        return data

    def _u(self, s: struct.Struct) -> Any:
        return s.unpack(self._take(s.size))[0]

    def _line(self) -> bytes:
        data, total, newline = self.r.line(_LINE_LIMIT)
        if not newline or total > _LINE_LIMIT:
            raise refuse("a text argument that is truncated or longer than 1 MiB")
        return data

    def _literal(self, op: bytes) -> Any:
        """A protocol-0 literal, parsed by pickle's own C code: a one-opcode pickle of the
        same line can only produce a str, int, bool, float or bytes."""
        line = self._line()
        try:
            return text_literal(op, line)
        except Exception as exc:
            raise refuse(f"a malformed {op.decode()} literal: {exc}") from None

    def blob(self, n: int) -> bytes:
        if n < 0:
            raise refuse("a negative length")
        data = self._take(n)
        self.budget.add_read(n)
        return data

    # -- stack --------------------------------------------------------------------------------

    def push(self, v: Any) -> None:
        self.stack.append(v)
        if len(self.stack) > self.limits.max_pickle_stack:
            raise refuse(f"the pickle stack exceeds {self.limits.max_pickle_stack} entries")

    def pop(self) -> Any:
        if not self.stack:
            raise refuse("a malformed pickle (stack underflow)")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise refuse("a malformed pickle (stack underflow)")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise refuse("a malformed pickle (MARK missing)")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # -- main loop ----------------------------------------------------------------------------

    def load(self) -> Any:
        dispatch = _DISPATCH
        r = self.r
        ops = 0
        max_ops = self.limits.max_pickle_ops
        try:
            while True:
                code = r.byte()
                if code < 0:
                    raise refuse("the pickle ends without STOP")
                handler = dispatch[code]
                if handler is None:
                    raise refuse(f"invalid pickle opcode 0x{code:02x} at byte {r.pos - 1}")
                ops += 1
                if not ops & 0xFFF:
                    check_time()
                    self.budget.add_objects(0x1000 * _OP_BYTES)
                    if ops > max_ops:
                        raise refuse(f"more than {max_ops} opcodes (ScanLimits.max_pickle_ops)")
                handler(self)
        except _Stop:
            value = self.pop()
            _check((value,))
            if self.depth == 0:  # a nested pickle's value is measured inside its parent
                self.memo.clear()  # so that only the value's own references count as sharing
                self._check_depth(value)
            return value
        except RecursionError:
            raise refuse("values nested too deeply") from None
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            # e.g. an unhashable dict key: pickle.load would fail here too
            if isinstance(exc, UnsafeModelError):
                raise
            raise refuse(f"malformed pickle: {exc}") from None

    def _check_depth(self, value: Any) -> None:
        limit = self.limits.max_value_depth
        if nesting(value, limit, _containers()) is None:
            raise refuse(
                f"values nested more than {limit} deep (ScanLimits.max_value_depth): repr, == "
                "and json.dumps of them would recurse past Python's limit"
            )

    # -- opcodes: constants -------------------------------------------------------------------

    def op_PROTO(self) -> None:
        proto = self._u(_U1)
        if proto > 5:
            raise refuse(f"unsupported pickle protocol {proto}")
        self.proto = proto

    def op_FRAME(self) -> None:
        self._u(_U8)

    def op_STOP(self) -> None:
        raise _Stop

    def op_INT(self) -> None:
        self.push(self._literal(b"I"))

    def op_LONG(self) -> None:
        self.push(self._literal(b"L"))

    def op_FLOAT(self) -> None:
        self.push(self._literal(b"F"))

    def op_STRING(self) -> None:
        self.push(self._literal(b"S"))

    def op_UNICODE(self) -> None:
        text = self._literal(b"V")
        self._widened(text, len(text))  # its line held at least a byte per character
        self.push(text)

    def op_BININT(self) -> None:
        self.push(self._u(_I4))

    def op_BININT1(self) -> None:
        self.push(self._u(_U1))

    def op_BININT2(self) -> None:
        self.push(self._u(_U2))

    def op_LONG1(self) -> None:
        self.push(int.from_bytes(self._take(self._u(_U1)), "little", signed=True))

    def op_LONG4(self) -> None:
        n = self._u(_I4)
        if n < 0 or n > 1 << 20:
            raise refuse(f"a {n}-byte integer")
        self.push(int.from_bytes(self._take(n), "little", signed=True))

    def op_BINFLOAT(self) -> None:
        self.push(self._u(_F8))

    def op_NONE(self) -> None:
        self.push(None)

    def op_NEWTRUE(self) -> None:
        self.push(True)

    def op_NEWFALSE(self) -> None:
        self.push(False)

    def _text(self, n: int) -> str:
        try:
            text = self.blob(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise refuse("a string that is not valid UTF-8") from None
        self._widened(text, n)
        return text

    def _widened(self, text: str, n: int) -> None:
        """Charge what a str takes beyond the ``n`` bytes read for it: CPython stores every
        character of a str in the width of its widest, so ASCII text with one astral character
        takes 4 bytes a character (a 256 MiB bz2 string of 234 bytes was a 1 GiB str)."""
        extra = sys.getsizeof(text) - n - _STR_HEADER
        if extra > 0:
            self.budget.add_objects(extra)

    def _py2str(self, n: int) -> str:
        # pickle.load's default encoding for protocol 0-2 str is ASCII, strict
        try:
            return self.blob(n).decode("ascii")
        except UnicodeDecodeError:
            raise refuse("a Python 2 str that is not ASCII") from None

    def op_BINSTRING(self) -> None:
        self.push(self._py2str(self._u(_I4)))

    def op_SHORT_BINSTRING(self) -> None:
        self.push(self._py2str(self._u(_U1)))

    def op_BINBYTES(self) -> None:
        self.push(self.blob(self._u(_U4)))

    def op_SHORT_BINBYTES(self) -> None:
        self.push(self.blob(self._u(_U1)))

    def op_BINBYTES8(self) -> None:
        self.push(self.blob(self._u(_U8)))

    def op_BYTEARRAY8(self) -> None:
        self.push(bytearray(self.blob(self._u(_U8))))

    def op_SHORT_BINUNICODE(self) -> None:
        self.push(self._text(self._u(_U1)))

    def op_BINUNICODE(self) -> None:
        self.push(self._text(self._u(_U4)))

    def op_BINUNICODE8(self) -> None:
        self.push(self._text(self._u(_U8)))

    def op_NEXT_BUFFER(self) -> None:
        raise refuse("out-of-band buffers (NEXT_BUFFER): their data is not in the file")

    def op_READONLY_BUFFER(self) -> None:
        self.top()

    # -- containers ---------------------------------------------------------------------------

    def op_MARK(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []
        if len(self.metastack) > self.limits.max_pickle_stack:
            raise refuse(f"MARKs nested more than {self.limits.max_pickle_stack} deep")

    def op_POP(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_POP_MARK(self) -> None:
        self.pop_mark()

    def op_DUP(self) -> None:
        self.push(self.top())

    def _tuple(self, items: list[Any]) -> None:
        _check(items)
        self.budget.add_items(len(items))
        self.budget.add_objects(_TUPLE)
        self.push(tuple(items))

    def op_EMPTY_TUPLE(self) -> None:
        self.push(())

    def op_TUPLE(self) -> None:
        self._tuple(self.pop_mark())

    def op_TUPLE1(self) -> None:
        self._tuple([self.pop()])

    def op_TUPLE2(self) -> None:
        b = self.pop()
        self._tuple([self.pop(), b])

    def op_TUPLE3(self) -> None:
        c = self.pop()
        b = self.pop()
        self._tuple([self.pop(), b, c])

    def op_EMPTY_LIST(self) -> None:
        self.budget.add_objects(_EMPTY[list])
        self.push([])

    def op_LIST(self) -> None:
        items = self.pop_mark()
        _check(items)
        self.budget.add_objects(_EMPTY[list])
        self.budget.add_items(len(items))
        self.push(items)

    def op_EMPTY_DICT(self) -> None:
        self.budget.add_objects(_EMPTY[dict])
        self.push({})

    def op_DICT(self) -> None:
        items = self.pop_mark()
        self.budget.add_objects(_EMPTY[dict])
        d: dict[Any, Any] = {}
        self._set_items(d, items)
        self.push(d)

    def op_EMPTY_SET(self) -> None:
        self.budget.add_objects(_EMPTY[set])
        self.push(set())

    def op_FROZENSET(self) -> None:
        items = self.pop_mark()
        _check(items)
        self.budget.add_objects(_EMPTY[set])
        self.budget.add_items(len(items), slot=_SET_SLOT)
        self.budget.check_keys(items)
        self.push(frozenset(items))

    def op_APPEND(self) -> None:
        v = self.pop()
        self._append(self.top(), [v])

    def op_APPENDS(self) -> None:
        items = self.pop_mark()
        self._append(self.top(), items)

    def _append(self, target: Any, items: list[Any]) -> None:
        if type(target) is not list:
            raise refuse(f"APPEND to {_kind(target)}: only lists shoal built take items")
        _check(items)
        self.budget.add_items(len(items))
        target.extend(items)

    def op_SETITEM(self) -> None:
        v = self.pop()
        k = self.pop()
        self._set_items(self.top(), [k, v])

    def op_SETITEMS(self) -> None:
        items = self.pop_mark()
        self._set_items(self.top(), items)

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if type(target) is not dict and type(target) is not collections.OrderedDict:
            raise refuse(f"SETITEM on {_kind(target)}: only dicts shoal built take items")
        if len(items) % 2:
            raise refuse("a malformed pickle (odd number of dict items)")
        _check(items)
        self.budget.add_items(len(items) // 2, slot=_DICT_SLOT)
        self.budget.check_keys(items[0::2], target)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def op_ADDITEMS(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if type(target) is not set:
            raise refuse(f"ADDITEMS on {_kind(target)}: only sets shoal built take items")
        _check(items)
        self.budget.add_items(len(items), slot=_SET_SLOT)
        self.budget.check_keys(items, target)
        target.update(items)

    # -- memo ---------------------------------------------------------------------------------

    def _put(self, index: int) -> None:
        if not 0 <= index < self.limits.max_memo:
            raise refuse(f"memo index {index} (the memo is limited to {self.limits.max_memo})")
        if len(self.memo) >= self.limits.max_memo and index not in self.memo:
            raise refuse(f"more than {self.limits.max_memo} memo entries")
        self.memo[index] = self.top()

    def _get(self, index: int) -> None:
        try:
            v = self.memo[index]
        except KeyError:
            raise refuse(f"a malformed pickle (memo key {index} was never stored)") from None
        if type(v) is Pending:
            if v.result is _UNSET or v.kind == "joblib array":
                raise refuse(f"a {v.kind} fetched from the memo before or after being built")
            v = v.result
        self.push(v)

    def _index_line(self) -> int:
        line = self._line()
        try:
            return int(line)  # what pickle's C code does: PyLong_FromString, base 10
        except ValueError:
            raise refuse("a malformed memo index") from None

    def op_PUT(self) -> None:
        self._put(self._index_line())

    def op_BINPUT(self) -> None:
        self._put(self._u(_U1))

    def op_LONG_BINPUT(self) -> None:
        self._put(self._u(_U4))

    def op_MEMOIZE(self) -> None:
        self._put(len(self.memo))

    def op_GET(self) -> None:
        self._get(self._index_line())

    def op_BINGET(self) -> None:
        self._get(self._u(_U1))

    def op_LONG_BINGET(self) -> None:
        self._get(self._u(_U4))

    # -- globals and calls --------------------------------------------------------------------

    def _global(self, module: Any, name: Any) -> Reconstructor:
        if type(module) is not str or type(name) is not str:
            raise refuse("a global whose name is not text")
        if self.proto < 3:
            module, name = normalize_global(module, name)
        rec = self.globals.get((module, name))
        if rec is None:
            raise UnsafeModelError(
                f"refused: the file names {module}.{name}, which shoal.scan.load does not build "
                "(it builds plain containers, NumPy arrays and torch tensors only)"
            )
        return rec

    def _name_line(self) -> str:
        try:
            return self._line().decode("utf-8")
        except UnicodeDecodeError:
            raise refuse("a global name that is not UTF-8") from None

    def op_GLOBAL(self) -> None:
        module = self._name_line()
        self.push(self._global(module, self._name_line()))

    def op_STACK_GLOBAL(self) -> None:
        name = self.pop()
        self.push(self._global(self.pop(), name))

    def _ext(self, code: int) -> None:
        raise refuse(f"extension code {code} (EXT opcodes import from the copyreg registry)")

    def op_EXT1(self) -> None:
        self._ext(self._u(_U1))

    def op_EXT2(self) -> None:
        self._ext(self._u(_U2))

    def op_EXT4(self) -> None:
        self._ext(self._u(_I4))

    def _call(self, func: Any, args: Any, how: str, new: bool = False) -> Any:
        if not isinstance(func, Reconstructor):
            raise refuse(f"{how} of {_kind(func)}: only globals that name a shoal builder run")
        if type(args) is not tuple:
            raise refuse(f"{how} {func.qual} with arguments that are not a tuple")
        _check(args)
        impl = func.new if new else func.call
        if impl is None:
            raise refuse(f"{how} {func.qual}: shoal does not build it that way")
        return impl(self, args)

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
        if kwargs != {}:
            raise refuse("NEWOBJ_EX with keyword arguments")
        self.push(self._call(cls, args, "NEWOBJ_EX", new=True))

    def op_OBJ(self) -> None:
        items = self.pop_mark()
        if not items:
            raise refuse("a malformed pickle (OBJ without a class)")
        self.push(self._call(items[0], tuple(items[1:]), "OBJ"))

    def op_INST(self) -> None:
        module = self._name_line()
        cls = self._global(module, self._name_line())
        self.push(self._call(cls, tuple(self.pop_mark()), "INST"))

    def op_BUILD(self) -> None:
        state = self.pop()
        inst = self.top()
        _check((state,))
        if type(inst) is Pending:
            if inst.result is not _UNSET:
                raise refuse(f"a second BUILD on a {inst.kind}")
            builder = self.builders.get(inst.kind)
            if builder is None:
                raise refuse(f"BUILD on a {inst.kind}")
            inst.result = builder(self, inst, state)
            self.stack[-1] = inst.result
            return
        if type(inst) is collections.OrderedDict:
            _ordered_dict_state(inst, state)
            return
        raise refuse(f"BUILD on {_kind(inst)}: only objects shoal is building take a state")

    # -- persistent ids -----------------------------------------------------------------------

    def op_PERSID(self) -> None:
        self._persistent(self._line().decode("latin-1"))

    def op_BINPERSID(self) -> None:
        self._persistent(self.pop())

    def _persistent(self, pid: Any) -> None:
        if self.persistent_load is None:
            raise refuse("a persistent id (plain pickle.load refuses them too)")
        _check((pid,))
        self.push(self.persistent_load(pid))


def _ordered_dict_state(inst: collections.OrderedDict[Any, Any], state: Any) -> None:
    if state is None:
        return
    if type(state) is not dict or set(state) - {"_metadata"}:
        names = sorted(map(str, state)) if type(state) is dict else [_kind(state)]
        raise refuse(f"attributes {names} on an OrderedDict (only torch's _metadata is kept)")
    meta = state.get("_metadata")
    if meta is not None:
        if type(meta) not in (dict, collections.OrderedDict) or not all(
            type(k) is str and type(v) is dict for k, v in meta.items()
        ):
            raise refuse("an OrderedDict _metadata that is not a dict of dicts")
        inst._metadata = meta  # type: ignore[attr-defined]


def _kind(v: Any) -> str:
    if isinstance(v, Reconstructor):
        return f"global {v.qual}"
    if type(v) is Pending:
        return f"a {v.kind}"
    return f"a {type(v).__name__}"


_DISPATCH: list[Callable[[Unpickler], None] | None] = dispatch_table(Unpickler)
