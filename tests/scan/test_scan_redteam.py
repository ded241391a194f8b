"""Red-team regressions for shoal.scan.load: files built by our own generators that broke (or
tried to break) the loader's guarantees, each with the specific refusal it must now get."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import loads


class _Reduce:
    """Pickles as ``func(*args)`` followed by BUILD ``state``: lets a test write any
    reconstructor call and state, exactly as an attacker's file would."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


def _dtype(code: str, state: tuple[Any, ...]) -> _Reduce:
    return _Reduce(np.dtype, (code, False, True), state)


def _array(dtype: Any, shape: tuple[int, ...], raw: bytes) -> bytes:
    from numpy._core.multiarray import _reconstruct as recon

    arr = _Reduce(recon, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))
    return pickle.dumps(arr, protocol=2)


def object_dtype_with_cleared_flags() -> bytes:
    """An object dtype whose state clears NumPy's has-object flag: the array's raw bytes
    (0x4141...) would be read as PyObject pointers."""
    return _array(_dtype("O", (3, "|", None, None, None, -1, -1, 0)), (1,), b"A" * 8)


def struct_field_past_itemsize() -> bytes:
    """A structured dtype whose one field lies 1 MiB past its 8-byte element: reading the
    field reads memory the array does not own."""
    state = (3, "|", None, ("a",), {"a": (np.dtype("f8"), 1 << 20)}, 8, 1, 0)
    return _array(_dtype("V8", state), (1,), b"A" * 8)


def struct_object_field_cleared_flags() -> bytes:
    """A structured dtype with an object field and its has-object flag cleared."""
    state = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)
    return _array(_dtype("V8", state), (1,), b"A" * 8)


def subarray_larger_than_itemsize() -> bytes:
    """A subarray dtype of 2**20 float64 whose state claims an 8-byte element."""
    state = (3, "|", (np.dtype("f8"), (1 << 20,)), None, None, 8, 8, 0)
    return _array(_dtype("V8", state), (1,), b"A" * 8)


def _load_in_child(data: bytes) -> str:
    """Load ``data`` in a child process and touch the result: a pointer built from raw bytes
    crashes the child (a failure here), not the test run."""
    code = textwrap.dedent(
        f"""
        import sys
        from shoal.errors import UnsafeModelError
        from shoal.scan import loads
        try:
            v = loads({data!r})
        except UnsafeModelError as exc:
            print("REFUSED", exc)
            sys.exit(0)
        print("LOADED", v.dtype.kind, v.dtype.hasobject)
        repr(v.tolist())
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.mark.parametrize(
    "make", [object_dtype_with_cleared_flags, struct_object_field_cleared_flags]
)
def test_object_dtype_state_cannot_turn_raw_bytes_into_pointers(make: Any) -> None:
    # before the fix both loaded as arrays whose 0x4141414141414141 was dereferenced (SIGSEGV)
    out = _load_in_child(make())
    # the raw bytes are not a list of values shoal built: refused, never reinterpreted
    assert out.startswith("REFUSED") and "refus" in out, out


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (struct_field_past_itemsize, "invalid layout"),
        (subarray_larger_than_itemsize, "disagrees with its layout"),
    ],
)
def test_dtype_state_cannot_describe_memory_past_the_element(make: Any, words: str) -> None:
    with pytest.raises(UnsafeModelError, match=words):
        loads(make())


# --- scanner: torch._tensor._rebuild_from_type_v2 is a call and a BUILD in one ---------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def rebuild_from_type_chosen_function() -> bytes:
    """``_rebuild_from_type_v2(bytearray, bytearray, (16,), {'__class__': bytes})``: pickle.load
    calls the function the file chose with the file's arguments, then setattr()s a dunder."""
    return (
        b"\x80\x02"
        + _global("torch._tensor", "_rebuild_from_type_v2")
        + b"("
        + _global("builtins", "bytearray")
        + _global("builtins", "bytearray")
        + b"(J\x10\x00\x00\x00t"
        + b"}"
        + _text("__class__")
        + _global("builtins", "bytes")
        + b"stR."
    )


def test_rebuild_from_type_with_a_chosen_function_is_high() -> None:
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    data = rebuild_from_type_chosen_function()
    pytest.importorskip("torch")
    # the real loader does call it: bytearray(16), then setattr(__class__) fails
    with pytest.raises(TypeError, match="__class__ assignment"):
        pickle.loads(data)  # the point: what pickle.load runs
    report = scan_bytes(data)
    assert report.severity >= Severity.HIGH, report.findings
    assert any(f.kind == "chosen-function" for f in report.findings), report.findings
    with pytest.raises(UnsafeModelError, match="_rebuild_from_type_v2"):
        loads(data)


def test_rebuild_from_type_dunder_state_is_high_even_around_a_torch_rebuilder() -> None:
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    data = (
        b"\x80\x02"
        + _global("torch._tensor", "_rebuild_from_type_v2")
        + b"("
        + _global("torch._utils", "_rebuild_tensor_v2")
        + _global("torch", "Tensor")
        + b")"
        + b"}"
        + _text("__array_interface__")
        + b"}stR."
    )
    report = scan_bytes(data)
    assert report.severity >= Severity.HIGH, report.findings
    assert any(f.kind == "dunder-state" for f in report.findings), report.findings


# --- scanner: dtype states that lie make pickle.load itself read memory it does not own ------


@pytest.mark.parametrize(
    "make",
    [
        object_dtype_with_cleared_flags,
        struct_field_past_itemsize,
        struct_object_field_cleared_flags,
        subarray_larger_than_itemsize,
    ],
)
def test_scanner_rates_a_lying_dtype_state_high(make: Any) -> None:
    # only allowlisted NumPy names, but pickle.load segfaults on the first two (raw bytes read
    # as PyObject pointers, a field 1 MiB past the buffer): was "none"
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    report = scan_bytes(make())
    assert report.severity >= Severity.HIGH, report.findings
    assert any(f.kind == "dtype-state" for f in report.findings), report.findings


def test_honest_structured_and_object_dtypes_still_scan_clean() -> None:
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    honest = [
        np.zeros(3, dtype=[("a", "<f4"), ("b", "<i8", (2,))]),
        np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<f8")], align=True)),
        np.array([1, "x", None], dtype=object),
        np.zeros(2, dtype="datetime64[ms]"),
    ]
    for arr in honest:
        data = pickle.dumps(arr, protocol=2)
        report = scan_bytes(data)
        assert report.severity <= Severity.LOW, (arr.dtype, report.findings)
        got = loads(data)
        assert got.dtype == arr.dtype and np.array_equal(got, arr)


# --- dtype states that crash NumPy's own __setstate__ (found by fuzzing mutated real states) ---

_CRASHING_STATES = [
    ("M8", (3, "<", None, None, None, -1, -1, 0)),  # a datetime without its unit metadata
    ("O", (3, ">", None, None, None, -1, -1, 63)),  # a byte order on an object type
]


@pytest.mark.parametrize(("code", "state"), _CRASHING_STATES)
def test_dtype_states_that_crash_numpy_are_refused_before_numpy_sees_them(
    code: str, state: tuple[Any, ...]
) -> None:
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    data = _array(_dtype(code, state), (1,), b"A" * 8)
    # before the fix shoal.scan.loads died with SIGSEGV inside NumPy: run it in a child
    out = _load_in_child(data)
    assert out.startswith("REFUSED") and "dtype state" in out, out
    report = scan_bytes(data)
    assert report.severity >= Severity.HIGH, report.findings


# --- scanner: an argument tuple computed by an allowlisted call hid the chosen function --------


def _computed_args(*items: bytes) -> bytes:
    """``builtins.tuple([items...])``: a tuple pickle.load hands to REDUCE like a literal one."""
    return _global("builtins", "tuple") + b"((" + b"".join(items) + b"ltR"


@pytest.mark.parametrize(
    ("helper", "args"),
    [
        # __generator_ctor('MT19937', builtins.list) calls list('MT19937')
        (
            ("numpy.random._pickle", "__generator_ctor"),
            (_text("MT19937"), _global("builtins", "list")),
        ),
        # __bit_generator_ctor(builtins.list) instantiates list()
        (("numpy.random._pickle", "__bit_generator_ctor"), (_global("builtins", "list"),)),
        # _rebuild_from_type_v2(bytearray, bytearray, (16,), {}) calls bytearray(16)
        (
            ("torch._tensor", "_rebuild_from_type_v2"),
            (
                _global("builtins", "bytearray"),
                _global("builtins", "bytearray"),
                b"(J\x10\x00\x00\x00t",
                b"}",
            ),
        ),
    ],
)
def test_computed_argument_tuples_do_not_hide_a_chosen_function(
    helper: tuple[str, str], args: tuple[bytes, ...]
) -> None:
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    data = b"\x80\x02" + _global(*helper) + _computed_args(*args) + b"R."
    report = scan_bytes(data)  # was "none"
    assert report.severity >= Severity.HIGH, report.findings
    assert any(f.kind == "chosen-function" for f in report.findings), report.findings
    with pytest.raises(UnsafeModelError, match="refused"):
        loads(data)


# --- scanner: numpy.ndarray over a buffer at a negative offset is a heap read/write view -------


def ndarray_negative_offset(newobj_ex: bool = False) -> bytes:
    """``ndarray.__new__(ndarray, (64,), uint8, bytearray(16), -4096)``: only allowlisted names,
    and pickle.load returns a writable view of the 4 KiB of heap before the bytearray."""
    dtype = pickle.dumps(np.dtype("u1"), protocol=2)[2:-1]
    buf = _global("builtins", "bytearray") + b"C\x10" + b"B" * 16 + b"\x85R"
    if newobj_ex:
        return (
            b"\x80\x04"
            + _global("numpy", "ndarray")
            + b"(K@\x85"
            + dtype
            + b"t}("
            + _text("buffer")
            + buf
            + _text("offset")
            + b"J\x00\xf0\xff\xffu\x92."
        )
    return (
        b"\x80\x02"
        + _global("numpy", "ndarray")
        + b"(K@\x85"
        + dtype
        + buf
        + b"J\x00\xf0\xff\xfft\x81."
    )


@pytest.mark.parametrize("newobj_ex", [False, True])
def test_ndarray_over_a_chosen_buffer_offset_is_high(newobj_ex: bool) -> None:
    from shoal.scan import scan_bytes
    from shoal.scan.report import Severity

    data = ndarray_negative_offset(newobj_ex)
    view = pickle.loads(data)  # what the real loader does: a view that starts before the buffer
    assert view.flags.writeable and view.size == 64
    report = scan_bytes(data)  # was "none"
    assert report.severity >= Severity.HIGH, report.findings
    assert any(f.kind == "raw-memory" for f in report.findings), report.findings
    with pytest.raises(UnsafeModelError, match="refused"):
        loads(data)
