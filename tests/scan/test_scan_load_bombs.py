"""shoal.scan.load against values whose mere use is unbounded: dict and set keys that Python
hashes recursively in C (a crash) or exponentially (a hang), and refusal messages that would
quote such a value in full. Each load runs in a subprocess so a regression fails the test
instead of killing or hanging the suite."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import ScanLimits

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


# --- keys that share one hash, and objects that cost more than their bytes --------------------

_P61 = (1 << 61) - 1  # CPython reduces int hashes modulo this prime


def _long1(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _colliding_ints(n: int) -> list[bytes]:
    return [_long1(i * _P61 + 7) for i in range(1, n + 1)]  # hash() == 7 for all of them


def _colliding_complex(n: int) -> list[bytes]:
    # hash(complex(a, b)) == hash(a) + 1000003 * hash(b): one hash for every j
    c = 1 << 40
    return [
        GLOBAL_COMPLEX + b"G" + struct.pack(">d", c - 1000003 * j) + b"G"
        + struct.pack(">d", float(j)) + b"\x86R"
        for j in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("int dict keys", P4 + b"}(" + b"N".join(_colliding_ints(3000)) + b"Nu."),
        ("int set items", P4 + b"\x8f(" + b"".join(_colliding_ints(3000)) + b"\x90."),
        ("int frozenset", P4 + b"(" + b"".join(_colliding_ints(3000)) + b"\x91."),
        ("complex dict keys", P4 + b"}(" + b"N".join(_colliding_complex(3000)) + b"Nu."),
        (
            "one SETITEM at a time",
            P4 + b"}" + b"".join(k + b"Ns" for k in _colliding_ints(3000)) + b".",
        ),
    ],
)
def test_keys_sharing_one_hash_are_refused(tmp_path, name, data):
    """Each insertion compares against every key with the same hash, in C where no time check
    runs: 60,000 such int keys (a 780 KB file) took 67 s to load. 3,000 are refused."""
    import pickle

    assert len({hash(k) for k in pickle.loads(data)}) == 1  # they do share one hash
    out = _load_in_subprocess(tmp_path, data)
    assert out.startswith("REFUSED") and "share one hash" in out, f"{name}: {out}"


def test_many_distinct_int_and_float_keys_still_load():
    import pickle

    from shoal.scan import loads

    value = {i: float(i) for i in range(-50_000, 50_000)}
    value.update({-1: 1.0, -2: 2.0, 2.0**61: 3.0, 0.5: 4.0})  # -1 and -2 share a hash: 2 keys
    assert loads(pickle.dumps(value, protocol=4)) == value


def _empty_sets(n: int) -> bytes:
    return P4 + b"](" + b"\x8f" * n + b"e."


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty sets", _empty_sets(400_000)),  # 1 byte each, 216 bytes in memory
        ("empty dicts", P4 + b"](" + b"}" * 1_000_000 + b"e."),
        ("empty lists", P4 + b"](" + b"]" * 1_000_000 + b"e."),
    ],
)
def test_objects_that_cost_more_than_their_bytes_are_bounded(name, data):
    """One byte of pickle makes a 216-byte empty set: a 19 MB file took 4.4 GB to load under
    the default limits. Python objects are charged at or above CPython's sizes and bounded by
    ScanLimits.max_object_bytes (here 40 MB)."""
    from shoal.scan import loads

    with pytest.raises(UnsafeModelError, match="max_object_bytes"):
        loads(data, limits=ScanLimits(max_object_bytes=40 << 20))


@pytest.mark.parametrize(
    "value",
    [
        [set() for _ in range(200_000)],
        [{} for _ in range(200_000)],
        [{"k": i} for i in range(100_000)],
        {i: [float(i)] for i in range(100_000)},
        [(i, str(i)) for i in range(100_000)],
        [frozenset({i, i + 1}) for i in range(100_000)],
        set(range(300_000)),
    ],
    ids=[
        "empty sets",
        "empty dicts",
        "small dicts",
        "dict of lists",
        "tuples",
        "frozensets",
        "a set",
    ],
)
def test_the_object_charge_is_not_below_what_python_allocates(value):
    """The bound is only a bound if the estimate is at least the real size: pickle.loads of
    the same bytes, measured by tracemalloc, allocates no more than shoal charges."""
    import pickle
    import tracemalloc

    from shoal.scan.streams import ByteReader
    from shoal.scan.unpickle import Unpickler

    data = pickle.dumps(value, protocol=4)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        real = pickle.loads(data)
        allocated = tracemalloc.get_traced_memory()[0] - before
        del real
    finally:
        tracemalloc.stop()
    vm = Unpickler(ByteReader(io.BytesIO(data)), limits=ScanLimits())
    assert vm.load() == value
    assert vm.budget.objects >= allocated, (vm.budget.objects, allocated)


def test_tensor_views_are_charged_as_objects(tmp_path):
    """A tensor view costs about 600 bytes and 15 bytes of pickle name one: 3,000,000 of them
    (45 MB) reached 1.3 GB before tensors were charged. Here 50,000 views (under 30 MB charged
    for their opcodes and containers alone) against a 48 MiB bound are refused; 1,000 load."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import payloads as P

    from shoal.scan import load

    path = tmp_path / "views.pt"
    limits = ScanLimits(max_object_bytes=48 << 20)
    path.write_bytes(P.torch_views(50_000))
    with pytest.raises(UnsafeModelError, match="max_object_bytes"):
        load(path, limits=limits)
    path.write_bytes(P.torch_views(1_000))
    views = load(path, limits=limits)
    assert len(views) == 1_000 and views[0].tolist() == [1.0, 2.0, 3.0, 4.0]
