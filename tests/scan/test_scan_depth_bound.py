"""STOP walks a value for its depth only when the analyser made more containers than
``ScanLimits.max_value_depth``: a chain of containers is never longer than the containers made.
These tests check that count against the walk itself, for every opcode that makes a container,
with the inline opcode loop on and off, so a container made without being counted fails here."""

from __future__ import annotations

import io
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.scan import ScanLimits, Severity, pickle_scan, scan_bytes
from shoal.scan.depth import nesting
from shoal.scan.streams import ByteReader

_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Opcodes that make, fill, share and call containers (and a few that move values around).
_PIECES = [
    b")",  # EMPTY_TUPLE
    b"]",  # EMPTY_LIST
    b"}",  # EMPTY_DICT
    b"N",
    b"K\x01",
    b"\x85",  # TUPLE1
    b"\x86",  # TUPLE2
    b"\x87",  # TUPLE3
    b"(",  # MARK
    b"t",  # TUPLE
    b"l",  # LIST
    b"d",  # DICT
    b"a",  # APPEND
    b"e",  # APPENDS
    b"s",  # SETITEM
    b"u",  # SETITEMS
    b"\x94",  # MEMOIZE
    b"h\x00",  # BINGET
    b"h\x01",
    b"h\x02",
    b"2",  # DUP
    b"0",  # POP
    b"R",  # REDUCE
    b"\x81",  # NEWOBJ
    b"b",  # BUILD
    b"o",  # OBJ
    b"\x8f",  # EMPTY_SET
    b"\x91",  # FROZENSET
    b"ccollections\nOrderedDict\n",
    b"cbuiltins\nlist\n",
    b"icollections\nOrderedDict\n",  # INST
    b"cnumpy\ndtype\n",
]


def _value_and_count(data: bytes) -> list[tuple[Any, int]]:
    """(value at STOP, containers counted) for the first pickle of ``data``."""
    seen: list[tuple[Any, int]] = []
    stop = pickle_scan._HANDLERS[ord(".")]
    assert stop is not None

    def record(a: Any) -> Any:
        if a.stack:
            seen.append((a.stack[-1], a.built))
        return stop(a)

    pickle_scan._HANDLERS[ord(".")] = record
    try:
        pickle_scan._analyze_one(
            ByteReader(io.BytesIO(data)),
            pickle_scan.Sink(limit=100),
            limits=ScanLimits(),
            torch=False,
        )
    finally:
        pickle_scan._HANDLERS[ord(".")] = stop
    return seen


def _check_bound(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    for inline in (True, False):
        with monkeypatch.context() as m:
            m.setattr(pickle_scan, "_INLINE", inline)
            for value, built in _value_and_count(data):
                depth = nesting(value, 1 << 30, pickle_scan._SYMBOLIC_CONTAINERS)
                assert depth is not None and depth <= built, (inline, depth, built)


@_SETTINGS
@given(parts=st.lists(st.sampled_from(_PIECES), max_size=80))
def test_containers_counted_bound_the_depth(monkeypatch, parts):
    _check_bound(b"\x80\x04" + b"".join(parts) + b".", monkeypatch)


@_SETTINGS
@given(
    value=st.recursive(
        st.one_of(st.none(), st.integers(), st.text(max_size=5)),
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.lists(kids, max_size=4).map(tuple),
            st.dictionaries(st.text(max_size=4), kids, max_size=4),
        ),
        max_leaves=60,
    ),
    protocol=st.integers(0, 5),
)
def test_containers_counted_bound_the_depth_of_real_pickles(monkeypatch, value, protocol):
    _check_bound(pickle.dumps([value, (value,), {"k": [value]}], protocol=protocol), monkeypatch)


@pytest.mark.parametrize("op", [b")", b"]", b"}", b"(t", b"(l", b"(d"])
def test_each_container_opcode_counts(op: bytes, monkeypatch) -> None:
    """A chain made by one opcode alone (and TUPLE1 around it) is refused one level past the
    limit, with the inline loop on and off: the count never lets STOP skip the walk."""
    limits = ScanLimits(max_value_depth=20)
    for inline in (True, False):
        with monkeypatch.context() as m:
            m.setattr(pickle_scan, "_INLINE", inline)
            ok = b"\x80\x04" + op + b"\x85" * 19 + b"."
            deep = b"\x80\x04" + op + b"\x85" * 20 + b"."
            assert scan_bytes(ok, limits=limits).severity == Severity.NONE
            report = scan_bytes(deep, limits=limits)
            assert any("max_value_depth" in f.detail for f in report.findings), report


# Call results chained without a tuple between them (the scanner follows arguments and states
# that pickle.load would refuse, so these chains must count too): each level keeps the last
# result in memo 1 and calls builtins.list (memo 0) on it, or sets it as a new result's state.
_CHAINS = {
    "REDUCE": b"q\x010h\x00h\x01R",
    "NEWOBJ": b"q\x010h\x00h\x01\x81",
    "BUILD": b"q\x010h\x00NRh\x01b",
    "OBJ": b"q\x010(h\x00h\x01o",
}


@pytest.mark.parametrize("how", sorted(_CHAINS))
def test_chains_of_call_results_count(how: str, monkeypatch) -> None:
    limits = ScanLimits(max_value_depth=20)
    head = b"\x80\x04cbuiltins\nlist\nq\x00N"
    for inline in (True, False):
        with monkeypatch.context() as m:
            m.setattr(pickle_scan, "_INLINE", inline)
            ok = scan_bytes(head + _CHAINS[how] * 19 + b".", limits=limits)
            assert not any("max_value_depth" in f.detail for f in ok.findings), ok
            deep = scan_bytes(head + _CHAINS[how] * 21 + b".", limits=limits)
            assert any("max_value_depth" in f.detail for f in deep.findings), deep
