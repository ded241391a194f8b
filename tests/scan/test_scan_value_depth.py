"""Values nested deeper than ScanLimits.max_value_depth. pickle.load builds any depth without
recursing (one byte per level), but what a caller then does with the value recurses (repr, ==,
json.dumps, pickling it again) and fails past Python's recursion limit: a 900,000-deep tuple
came back from shoal.scan.load. The scan reports such a value (medium, limit) and the loader
refuses it on its own, at exactly one level past the limit."""

from __future__ import annotations

import json
import pickle
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import ScanLimits, Severity, load, loads, scan_bytes

P4 = b"\x80\x04"


def tuples(depth: int) -> bytes:
    """None inside ``depth`` tuples (TUPLE1 repeated)."""
    return P4 + b"N" + b"\x85" * depth + b"."


def lists(depth: int) -> bytes:
    """``depth`` empty lists made first, each APPENDed into the one below: [[[...[]...]]]."""
    return P4 + b"]" * depth + b"a" * (depth - 1) + b"."


def dicts(depth: int) -> bytes:
    """{0: {0: ... {}}}: ``depth`` dicts, filled innermost first by SETITEM."""
    return P4 + b"}" + b"K\x00}" * (depth - 1) + b"s" * (depth - 1) + b"."


def lists_filled_late(depth: int) -> bytes:
    """Each list is put into its parent while still empty, and filled afterwards through the
    memo: a depth counted when a value is inserted would see 2 everywhere."""
    out = bytearray(P4 + b"]\x94")  # L0, memo 0
    for i in range(1, depth):
        out += b"]\x94a"  # Li, memo i, appended (empty) into L(i-1), which stays on the stack
        out += b"0j" + struct.pack("<I", i)  # POP L(i-1); LONG_BINGET Li: it is filled next
    out += b"0h\x00"  # POP the last list, BINGET L0
    return bytes(out) + b"."


def object_array(depth: int) -> bytes:
    """An object array (one level) holding a tuple ``depth - 1`` deep, as np.save writes it."""
    inner: object = None
    for _ in range(depth - 1):
        inner = (inner,)
    arr = np.empty(1, dtype=object)
    arr[0] = inner
    return pickle.dumps(arr, protocol=4)


SHAPES: dict[str, Callable[[int], bytes]] = {
    "tuples": tuples,
    "lists": lists,
    "dicts": dicts,
    "lists_filled_late": lists_filled_late,
}


def _depth(v: object) -> int:
    """Reference nesting (recursive: only for the small depths these tests build)."""
    if isinstance(v, np.ndarray):
        return 1 + max((_depth(x) for x in v.flat), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in (*v, *v.values())), default=0)
    if isinstance(v, (tuple, list)):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_one_level_past_the_limit_is_refused_by_scan_and_load(shape: str) -> None:
    make = SHAPES[shape]
    limits = ScanLimits(max_value_depth=40)
    value = loads(make(40), limits=limits)
    assert _depth(value) == 40
    assert scan_bytes(make(40), limits=limits).severity < Severity.MEDIUM
    with pytest.raises(UnsafeModelError, match=r"ScanLimits\.max_value_depth"):
        loads(make(41), limits=limits)
    report = scan_bytes(make(41), limits=limits)
    assert report.severity == Severity.MEDIUM, report.findings
    (finding,) = [f for f in report.findings if f.kind == "limit"]
    assert "more than 40 deep" in finding.detail and "max_value_depth" in finding.detail


def test_an_object_array_counts_as_a_level(tmp_path: Path) -> None:
    limits = ScanLimits(max_value_depth=30)
    value = loads(object_array(30), limits=limits)
    assert isinstance(value, np.ndarray) and _depth(value) == 30
    with pytest.raises(UnsafeModelError, match=r"max_value_depth"):
        loads(object_array(31), limits=limits)
    path = tmp_path / "deep.npy"
    inner: object = None
    for _ in range(30):
        inner = (inner,)
    arr = np.empty(1, dtype=object)
    arr[0] = inner
    np.save(path, arr, allow_pickle=True)  # the array (1) holding 30 tuples: 31 deep
    with pytest.raises(UnsafeModelError, match=r"max_value_depth"):
        load(path, limits=limits)
    assert load(path, limits=ScanLimits(max_value_depth=31)).shape == (1,)


def test_the_default_keeps_what_callers_do_with_a_value_working(tmp_path: Path) -> None:
    """At the default (500) the deepest value that loads still survives repr, == and json.dumps
    from this test's call stack (pytest's frames included). pickle.dumps writes lists and dicts
    at most 499 deep under Python's default recursion limit, so no file it writes is refused."""
    limit = ScanLimits().max_value_depth
    assert limit == 500
    for shape in ("tuples", "lists", "dicts"):
        path = tmp_path / f"{shape}.pkl"
        path.write_bytes(SHAPES[shape](limit))
        value = load(path)
        again = load(path)
        assert value == again
        assert len(repr(value)) > limit
        if shape == "lists":  # JSON has no tuples and no int keys
            assert len(json.dumps(value)) == 2 * limit
        path.write_bytes(SHAPES[shape](limit + 1))
        with pytest.raises(UnsafeModelError, match="max_value_depth"):
            load(path)


def test_a_value_900000_deep_is_refused_quickly(tmp_path: Path) -> None:
    data = tuples(900_000)
    path = tmp_path / "deep.pkl"
    path.write_bytes(data)
    start = time.monotonic()
    report = scan_bytes(data)
    assert report.severity == Severity.MEDIUM, report.findings
    assert any("max_value_depth" in f.detail for f in report.findings)
    with pytest.raises(UnsafeModelError, match="max_value_depth"):
        load(path)
    with pytest.raises(UnsafeModelError, match="max_value_depth"):
        loads(data)
    assert time.monotonic() - start < 60


def test_shared_and_self_holding_values_are_measured_once() -> None:
    """A tuple holding one tuple twice, 40 levels over, is 41 deep (walked once per value, not
    2**40 times); a list holding itself is as deep as its other items."""
    shared = bytearray(P4 + b")")
    for i in range(40):
        shared += b"\x94h" + bytes([i]) + b"\x86"  # MEMOIZE, BINGET i, TUPLE2
    data = bytes(shared) + b"."
    start = time.monotonic()
    value = loads(data, limits=ScanLimits(max_value_depth=41))
    assert time.monotonic() - start < 10
    with pytest.raises(UnsafeModelError, match="max_value_depth"):
        loads(data, limits=ScanLimits(max_value_depth=40))
    assert scan_bytes(data, limits=ScanLimits(max_value_depth=40)).severity == Severity.MEDIUM
    assert value[0] is value[1]
    # L = [L, [[]]]: itself adds nothing, the other item is 2 deep
    selfish = P4 + b"]\x94h\x00a]]aa."
    value = loads(selfish, limits=ScanLimits(max_value_depth=3))
    assert value[0] is value and value[1] == [[]]
    with pytest.raises(UnsafeModelError, match="max_value_depth"):
        loads(selfish, limits=ScanLimits(max_value_depth=2))


def test_a_deep_value_under_a_shallow_path_is_found() -> None:
    """A value met first near the top and then again at the end of a long chain: its depth
    counts from the long chain."""
    # S = [[[[]]]] (4 deep), memo 0; then [S, [[[[[S]]]]]]: S again under 5 lists = 10 deep
    s = b"]]]]aaa\x94"
    data = P4 + b"](" + s + b"]" * 5 + b"h\x00" + b"a" * 5 + b"e."
    value = loads(data, limits=ScanLimits(max_value_depth=10))
    assert _depth(value) == 10, value
    with pytest.raises(UnsafeModelError, match="max_value_depth"):
        loads(data, limits=ScanLimits(max_value_depth=9))


def test_the_walk_keeps_nothing_for_values_held_once() -> None:
    """Heights are kept only for values held more than once (told by their reference count):
    walking 100,000 tuples of lists keeps no table of them."""
    import itertools
    import tracemalloc

    from shoal.scan.depth import nesting

    kinds = {tuple: iter, list: iter, dict: lambda d: itertools.chain(d, d.values())}
    value = [(i, [i], {i: (i,)}) for i in range(100_000)]
    tracemalloc.start()
    try:
        assert nesting(value, 10, kinds) == 4
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000, peak
    shared = [value[0]] * 3  # one tuple held three times: kept once, same answer
    assert nesting(shared, 10, kinds) == 4
