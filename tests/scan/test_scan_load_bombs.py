"""shoal.scan.load against values whose mere use is unbounded: dict and set keys that Python
hashes recursively in C (a crash) or exponentially (a hang), and refusal messages that would
quote such a value in full. Each load runs in a subprocess so a regression fails the test
instead of killing or hanging the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_RUN = """
import sys
from shoal.errors import ShoalError
from shoal.scan import loads
from shoal.scan.report import ScanLimits
try:
    loads(open(sys.argv[1], "rb").read(), limits=ScanLimits(max_container_items=1_000_000))
    print("LOADED")
except ShoalError as exc:
    print("REFUSED", str(exc)[:300])
"""


def _load_in_subprocess(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "bomb.pkl"
    path.write_bytes(data)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUN, str(path)], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the load did not finish in 30 s")
    assert done.returncode == 0, f"the loader crashed ({done.returncode}): {done.stderr[-500:]}"
    return done.stdout


def _shared_tuple(levels: int) -> bytes:
    """T0 = (); Ti = (T(i-1), T(i-1)) through the memo: a few bytes per level, 2**levels
    leaves once walked (hashing or repr walk it)."""
    out = bytearray(b")")
    for i in range(levels):
        out += b"\x94h" + bytes([i]) + b"\x86"  # MEMOIZE, BINGET i, TUPLE2
    return bytes(out)


def _nested_tuple(depth: int) -> bytes:
    return b"K\x00" + b"\x85" * depth  # BININT1 0, then TUPLE1 depth times


P4 = b"\x80\x04"
GLOBAL_COMPLEX = b"\x8c\x08builtins\x8c\x07complex\x93"
GLOBAL_DTYPE = b"\x8c\x05numpy\x8c\x05dtype\x93"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        # {((...((0,),)...),): 0}: hash() recurses in C with no depth check (SIGSEGV)
        ("deep dict key", P4 + b"}" + _nested_tuple(300_000) + b"K\x00s."),
        ("deep set item", P4 + b"\x8f(" + _nested_tuple(300_000) + b"\x90."),
        ("deep frozenset item", P4 + b"(" + _nested_tuple(300_000) + b"\x91."),
        # {T48: 0}: hashing a shared tuple walks every path (2**48 steps)
        ("shared dict key", P4 + b"}" + _shared_tuple(48) + b"K\x00s."),
        ("shared set item", P4 + b"\x8f(" + _shared_tuple(48) + b"\x90."),
    ],
)
def test_keys_that_hash_without_bound_are_refused(tmp_path, name, data):
    out = _load_in_subprocess(tmp_path, data)
    assert out.startswith("REFUSED"), f"{name}: {out}"
    assert "key" in out, f"{name}: {out}"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        # a refusal quoting its arguments must not repr 2**48 items
        ("complex of a shared tuple", P4 + GLOBAL_COMPLEX + _shared_tuple(48) + b"\x85R."),
        ("dtype code a shared tuple", P4 + GLOBAL_DTYPE + _shared_tuple(48) + b"\x85R."),
    ],
)
def test_refusal_messages_quote_bounded_text(tmp_path, name, data):
    out = _load_in_subprocess(tmp_path, data)
    assert out.startswith("REFUSED"), f"{name}: {out}"
    assert len(out) < 400 and "..." in out, f"{name}: {out}"


def test_a_plain_tuple_key_still_loads():
    import pickle

    from shoal.scan import loads

    value = {("layer", 1, (2, 3)): 0.5, frozenset({("a", 1)}): [1]}
    assert loads(pickle.dumps(value, protocol=4)) == value
