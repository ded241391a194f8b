"""text_literal reads protocol 0's INT and UNICODE lines without building a pickle for each:
for every line, the value (type included: pickle makes 00 and 01 bools) or the error must be
pickle's own."""

from __future__ import annotations

import pickle
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.scan.opcodes import text_literal

_INT_ALPHABET = [*b"0123456789-+_ xXoObB\t\0", 0x80]
_UNICODE_PARTS = [b"a", b"\\", b"u", b"U", b"0", b"00e9", b"\\u00e9", b"\\U0001F600", b"\\x41"]
_UNICODE_PARTS += [b"\\u", b"\\U0011ffff", b"\r", b"\0", b"\xe9", b"\\\\"]


def _pickle(op: bytes, line: bytes) -> tuple[str, Any]:
    try:
        v = pickle.loads(op + line + b"\n.")
    except Exception as exc:
        return "error", (type(exc), str(exc))
    return type(v).__name__, v


def _ours(op: bytes, line: bytes) -> tuple[str, Any]:
    try:
        v = text_literal(op, line)
    except Exception as exc:
        return "error", (type(exc), str(exc))
    return type(v).__name__, v


@settings(max_examples=2000, deadline=None)
@given(line=st.lists(st.sampled_from(_INT_ALPHABET), max_size=24).map(bytes))
def test_int_lines_read_as_pickle_reads_them(line: bytes) -> None:
    assert _ours(b"I", line) == _pickle(b"I", line)


@settings(max_examples=500, deadline=None)
@given(digits=st.integers(-(2**70), 2**70))
def test_int_values_read_as_pickle_reads_them(digits: int) -> None:
    for line in (str(digits).encode(), b"0" + str(abs(digits)).encode()):
        assert _ours(b"I", line) == _pickle(b"I", line)


@settings(max_examples=2000, deadline=None)
@given(line=st.lists(st.sampled_from(_UNICODE_PARTS), max_size=12).map(b"".join))
def test_unicode_lines_read_as_pickle_reads_them(line: bytes) -> None:
    assert _ours(b"V", line) == _pickle(b"V", line)


def test_the_edge_cases_by_name() -> None:
    for line in (b"00", b"01", b"-0", b"0", b"010", b"0x10", b"1_0", b" 5", b"5\0x", b"9" * 19):
        assert _ours(b"I", line) == _pickle(b"I", line), line
    assert text_literal(b"I", b"01") is True and text_literal(b"I", b"00") is False
    assert text_literal(b"I", b"010") == 8
