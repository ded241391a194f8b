"""The inline opcode loop is an optimisation only: with it off, every report must be the same."""

from __future__ import annotations

import importlib.util
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.scan import ScanLimits, pickle_scan, scan_bytes
from shoal.scan.streams import ByteReader


def _sibling(name: str) -> ModuleType:
    # The suite runs in importlib mode (no test packages), so load the module by path.
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pickle_tests = _sibling("test_scan_pickle")
BYPASSES = _pickle_tests.BYPASSES
evil_bytes = _pickle_tests.evil_bytes

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.binary(max_size=300),
)
_values = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=6),
        st.tuples(kids),
        st.tuples(kids, kids),
        st.tuples(kids, kids, kids),
        st.lists(kids, max_size=5).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), kids, max_size=6),
    ),
    max_leaves=40,
)


def _both(scan: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = scan()
    with monkeypatch.context() as m:
        m.setattr(pickle_scan, "_INLINE", False)
        slow = scan()
    assert fast == slow


def _render(v: Any, depth: int = 0) -> Any:
    """The symbolic values as plain data, so two analyses can be compared."""
    if depth > 50:
        return "..."
    d = depth + 1
    if isinstance(v, pickle_scan._List):
        return ("list", v.n, [_render(x, d) for x in v.items])
    if isinstance(v, pickle_scan._Dict):
        return ("dict", v.n, [(_render(k, d), _render(x, d)) for k, x in v.pairs])
    if isinstance(v, pickle_scan._Obj):
        origin = v.origin.qual if v.origin else None
        return ("obj", origin, _render(v.args, d), _render(v.state, d))
    if isinstance(v, pickle_scan._Glob):
        return ("glob", v.qual, v.severity)
    if isinstance(v, pickle_scan._Opaque):
        return ("opaque", v.what)
    if isinstance(v, pickle_scan._Blob):
        return ("blob", v.kind, v.size)
    if isinstance(v, tuple):
        return tuple(_render(x, d) for x in v)
    return (type(v).__name__, v if v == v else "nan")


def _analysis(data: bytes, limits: ScanLimits) -> Any:
    """Symbolic result, opcode and import counts, stop position, memo and findings of the first
    pickle (the memo as STOP finds it: STOP then drops it, to measure the value's depth)."""
    sink = pickle_scan.Sink(limit=100)
    seen: list[Any] = []
    stop = pickle_scan._HANDLERS[ord(".")]
    assert stop is not None

    def record(a: Any) -> Any:
        seen.append(sorted((k, _render(v)) for k, v in a.memo.items()))
        return stop(a)

    pickle_scan._HANDLERS[ord(".")] = record
    try:
        a, value, error = pickle_scan._analyze_one(
            ByteReader(io.BytesIO(data)), sink, limits=limits, torch=False
        )
    finally:
        pickle_scan._HANDLERS[ord(".")] = stop
    memo = seen[-1] if seen else sorted((k, _render(v)) for k, v in a.memo.items())
    return _render(value), error, a.ops, a.imports, a.r.pos, memo, sink.items()


_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(value=_values, protocol=st.integers(0, 5), shared=st.booleans())
def test_same_report_for_real_pickles(monkeypatch, value, protocol, shared):
    if shared:  # the same object twice: memo PUT/GET, BINPUT/BINGET, MEMOIZE
        value = [value, value, (value,)]
    data = pickle.dumps(value, protocol=protocol)
    _both(lambda: scan_bytes(data), monkeypatch)
    _both(lambda: _analysis(data, ScanLimits()), monkeypatch)


@_SETTINGS
@given(
    value=_values,
    protocol=st.integers(0, 5),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
    stack=st.integers(1, 40),
    ops=st.integers(1, 200),
)
def test_same_report_for_damaged_pickles_and_small_limits(
    monkeypatch, value, protocol, edits, cut, stack, ops
):
    raw = bytearray(pickle.dumps([value, evil_bytes(protocol)], protocol=protocol))
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    data = bytes(raw[: max(1, cut % (len(raw) + 1))])
    limits = ScanLimits(max_pickle_stack=stack, max_pickle_ops=ops)
    _both(lambda: scan_bytes(data), monkeypatch)
    _both(lambda: scan_bytes(data, limits=limits), monkeypatch)
    _both(lambda: _analysis(data, limits), monkeypatch)


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_same_report_for_bypasses(monkeypatch, name):
    data = BYPASSES[name][0]
    _both(lambda: scan_bytes(data), monkeypatch)


_RARE = [
    b"N0",
    b"20",
    b"(1",
    b"\x8f0",
    b"(l0",
    b"(d0",
    b"(\x910",
    b"\x80\x04",
    b"U\x01a0",
    b"(N\x91",
]


@_SETTINGS
@given(
    parts=st.lists(st.sampled_from(_RARE), max_size=60),
    edits=st.lists(st.tuples(st.integers(0, 1_000), st.integers(0, 255)), max_size=3),
    stack=st.integers(1, 20),
)
def test_same_report_for_stack_opcodes(monkeypatch, parts, edits, stack):
    """POP, DUP, POP_MARK, EMPTY_SET, FROZENSET, LIST, DICT, ADDITEMS, PROTO and
    SHORT_BINSTRING, inlined so that a file repeating them costs no trip through the handlers."""
    raw = bytearray(b"\x80\x04N\x8f(N" + b"".join(parts) + b"\x90N.")
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    data = bytes(raw)
    limits = ScanLimits(max_pickle_stack=stack)
    _both(lambda: scan_bytes(data), monkeypatch)
    _both(lambda: _analysis(data, ScanLimits()), monkeypatch)
    _both(lambda: _analysis(data, limits), monkeypatch)


_GLOBALS = [
    b"ccollections\nOrderedDict\n",
    b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93",  # STACK_GLOBAL
    b"\x8c\x02os\x8c\x06system\x93",
    b"\x8c\x02os\x8c\x06system\x86\x93",  # a tuple as the name: computed
    b"c__builtin__\nlist\n",  # a Python 2 name
    b"cbuiltins\nli\xffst\n",  # not UTF-8
    b"cbuiltins\nlist\n",
    b"cbuiltins\nbytearray\n",
    b"cnumpy\ndtype\n",
    b"ccopyreg\n_reconstructor\n",
    b"cjoblib.numpy_pickle\nNumpyArrayWrapper\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"c_codecs\nencode\n",
    b"cos\nsystem\n",
    b"h\x00",  # whatever memo 0 holds
    b"N",  # not a global: a computed call
]
_ARGS = [
    b")",
    b"N\x85",
    b"J\x00\x00\x00\x7f\x85",
    b"\x8c\x02i8\x85",
    b"\x8c\x01x\x8c\x03bad\x86",
    b"cjoblib.numpy_pickle\nNumpyArrayWrapper\ncbuiltins\nobject\nN\x87",
    b"(NNNNN}t",
    b"]",
    b"h\x01",
]
_STATES = [
    b"",  # no BUILD
    b"}",
    b"}\x8c\x01aK\x01s",  # {'a': 1}
    b"}\x8c\t__class__K\x01s",  # a dunder key
    b"}K\x01K\x01s",  # a key that is not a string
    b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t",  # a dtype's state
    b"N}\x86",  # (None, {})
    b"h\x01\x85",  # a tuple holding a call's result
    b"N",
    b"\x8c\x01s",
]
_AFTER = [b"", b"\x94", b"0", b"2", b"h\x00"]
_STEP = st.tuples(
    st.sampled_from(_GLOBALS),
    st.sampled_from(_ARGS),
    st.sampled_from([b"R", b"\x81"]),
    st.sampled_from(_STATES),
    st.sampled_from(_AFTER),
).map(lambda t: t[0] + t[1] + t[2] + (t[3] + b"b" if t[3] else b"") + t[4])


@_SETTINGS
@given(steps=st.lists(_STEP, min_size=1, max_size=8))
def test_same_report_for_calls_and_builds(monkeypatch, steps):
    """REDUCE and NEWOBJ of globals with nothing to check, and BUILD of states with nothing to
    report, are inlined: every other call and build goes to its handler, with the same result."""
    data = b"\x80\x04" + b"".join(steps) + b"."
    _both(lambda: scan_bytes(data), monkeypatch)
    _both(lambda: _analysis(data, ScanLimits()), monkeypatch)


@pytest.mark.parametrize("op", [b"I", b"V", b"p", b"g"])
@pytest.mark.parametrize("extra", [-2, -1, 0, 1, 2])
def test_same_report_for_text_lines_at_the_length_limit(monkeypatch, op, extra):
    """INT, UNICODE, PUT and GET lines around _LINE_LIMIT (the loop looks for the newline
    without an end bound, then checks the distance). The reader never holds a whole unread line
    of the limit (its window is under 64 KiB past a refill), so the loop leaves such lines to
    the handlers either way: this holds the two readings equal at the boundary."""
    n = pickle_scan._LINE_LIMIT + extra
    line = b"0" * (n - 1) + b"7"
    head = b"N" if op in (b"p", b"g") else b""
    data = head + op + line + b"\n" + (b"0" if op == b"p" else b"") + b"N."
    if op == b"g":
        data = b"Np" + line + b"\n0" + data
    # and after a 64 KiB string read through the handler, which refills the reader's buffer
    data = b"X" + (1 << 16).to_bytes(4, "little") + b"a" * (1 << 16) + b"0" + data
    _both(lambda: scan_bytes(data), monkeypatch)
    _both(lambda: _analysis(data, ScanLimits()), monkeypatch)


def test_each_branch_of_the_loop_reads_the_opcodes_its_slot_gives_it():
    """The loop finds an opcode's branch by ``_SLOTS[code]``, then compares that index (``br``),
    not the opcode: a table that sent one opcode to another's branch would read it as the
    other. Each opcode has one branch; the table and the loop's branches agree (each branch
    ``br == N`` says in its comment which opcodes it reads), and each branch sits in the group
    ``br < M`` that holds it."""
    import inspect
    import pickletools
    import re

    names = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
    table = pickle_scan._BRANCH_CODES
    codes = [c for row in table for c in row]
    assert len(codes) == len(set(codes))
    assert all(c in names for c in codes)
    for code in range(256):
        want = next((k for k, row in enumerate(table) if code in row), len(table))
        assert pickle_scan._SLOTS[code] == want, hex(code)

    source = inspect.getsource(pickle_scan._Analyzer.run)
    seen: list[int] = []
    group = None
    for line in source.splitlines():
        m = re.match(r"\s*(?:if|elif) br < (\d+):$", line)
        if m:
            group = int(m.group(1))
            continue
        m = re.match(r"\s*(?:if|elif) br == (\d+):  # ([A-Z0-9_, ]+)", line)
        if m:
            k = int(m.group(1))
            assert group is not None and group - 6 <= k < group, line
            assert m.group(2).rstrip().startswith(", ".join(names[c] for c in table[k])), line
            seen.append(k)
    assert seen == list(range(len(table)))


def test_a_table_that_sends_an_opcode_elsewhere_changes_the_analysis(monkeypatch):
    """What the test above guards against: BININT1 (K) sent to BININT's branch is read as a
    four-byte int, and the analysis differs from the handlers' (which the inline-vs-handler
    tests compare); with the table as it is, the two agree."""
    limits = ScanLimits()
    data = pickle.dumps([7, 200, 3, 1000], protocol=2)
    with monkeypatch.context() as m:
        m.setattr(pickle_scan, "_INLINE", False)
        slow = _analysis(data, limits)
    assert _analysis(data, limits) == slow
    slots = list(pickle_scan._SLOTS)
    slots[0x4B] = pickle_scan._SLOTS[0x4A]
    with monkeypatch.context() as m:
        m.setattr(pickle_scan, "_SLOTS", slots)
        assert _analysis(data, limits) != slow
