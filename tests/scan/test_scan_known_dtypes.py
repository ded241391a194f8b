"""The scanner's NumPy-free dtype layouts agree with the dtypes NumPy builds.

``pickle_scan._known_dtype`` answers (itemsize, hasobject) for NumPy's plain dtypes and packed
structured ones without importing NumPy (~0.1 CPU-s per scan). Whenever it answers, the NumPy
route it replaces (``_real_dtype``: NumPy's ``__setstate__`` then its validating constructor)
must give the same layout and refuse nothing; anything else must be left to that route.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import UnsafeModelError
from shoal.scan import ScanLimits, Severity, scan_bytes
from shoal.scan import pickle_scan as ps
from shoal.scan.builders import DtypeLayoutError
from shoal.scan.streams import ByteReader


def _symbolic(data: bytes) -> Any:
    """The symbolic value the scanner's analyser makes of a pickle."""
    sink = ps.Sink(limit=100)
    _a, value, error = ps._analyze_one(
        ByteReader(io.BytesIO(data)), sink, limits=ScanLimits(), torch=False
    )
    assert error is None, error
    return value


def _numpy_route(dtype: Any) -> tuple[int, bool] | str:
    """What the scanner concluded before the fast path: a layout, or why it was refused."""
    try:
        built = ps._real_dtype(dtype, 0)
    except DtypeLayoutError:
        return "layout lie"
    except UnsafeModelError:
        return "not built"
    if built is None:
        return "not literal"
    return built.itemsize, bool(built.hasobject)


def _glob(qual: str) -> Any:
    module, name = qual.rsplit(".", 1)
    return ps._Glob(module, name, Severity.NONE)


def _dtype(code: Any, state: Any) -> Any:
    obj = ps._Obj(_glob("numpy.dtype"), (code, False, True))
    obj.state = state
    return obj


def _fields(pairs: list[tuple[Any, Any]]) -> Any:
    d = ps._Dict()
    d.pairs = list(pairs)
    d.n = len(pairs)
    return d


PLAIN = sorted(ps._PLAIN_DTYPES)


@pytest.mark.parametrize("code", PLAIN)
def test_every_plain_entry_is_what_numpy_writes_and_builds(code: str) -> None:
    orders, _flags, itemsize, hasobject = ps._PLAIN_DTYPES[code]
    for order in orders:
        real = np.dtype(code).newbyteorder(order) if order in "<>" else np.dtype(code)
        got = _symbolic(pickle.dumps(real, protocol=2))
        assert got.args[0] == code
        assert ps._known_dtype(got) == (itemsize, hasobject) == (real.itemsize, real.hasobject)
        assert _numpy_route(got) == (itemsize, hasobject)
    bare = ps._Obj(_glob("numpy.dtype"), (code, False, True))  # no BUILD state (yet)
    assert ps._known_dtype(bare) == _numpy_route(bare) == (itemsize, hasobject)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from([c for c in PLAIN if c != "O8"]), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 8),
    st.booleans(),
)
def test_packed_structured_dtypes_numpy_pickles_are_known(
    spec: list[tuple[str, int]], tail: int, swap: bool
) -> None:
    # scikit-learn's tree nodes are such a dtype: fields at increasing offsets, maybe gaps
    names, formats, offsets, at = [], [], [], 0
    for k, (code, gap) in enumerate(spec):
        at += gap
        names.append(f"f_{k}")
        field = np.dtype(code)
        formats.append(field.newbyteorder(">") if swap and field.itemsize > 1 else field)
        offsets.append(at)
        at += field.itemsize
    real = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": at + tail})
    got = _symbolic(pickle.dumps(real, protocol=2))
    assert ps._known_dtype(got) == (real.itemsize, False)
    assert _numpy_route(got) == (real.itemsize, False)


def test_scikit_learn_tree_nodes_are_known() -> None:
    from sklearn.tree._tree import NODE_DTYPE

    got = _symbolic(pickle.dumps(NODE_DTYPE, protocol=2))
    assert ps._known_dtype(got) == _numpy_route(got) == (NODE_DTYPE.itemsize, False)


# Perturbations of the states NumPy writes: every slot, wrong types (bools for ints), fields
# that overlap, run past the element, are objects, structured or oddly named.
_ints = st.one_of(st.integers(-2, 70), st.booleans(), st.just(-1.0), st.none())
_order = st.sampled_from(["<", ">", "|", "=", "", "<<", 1])


def _rarely(draw: Any) -> bool:
    return draw(st.integers(0, 23)) == 0


def _plain_obj(draw: Any) -> Any:
    code = draw(st.sampled_from(PLAIN))
    if _rarely(draw):
        code = draw(st.sampled_from(["f16", "V8", "U2", "S3", "M8", "<f8", 8]))
    if _rarely(draw):
        return ps._Obj(_glob("numpy.dtype"), (code, False, True))
    orders = ps._PLAIN_DTYPES.get(code, (("|",),))[0] if type(code) is str else ("|",)
    state = [3, draw(st.sampled_from(orders)), None, None, None, -1, -1, 0]
    if code == "O8":
        state[7] = 63
    if _rarely(draw):
        state[draw(st.integers(0, 7))] = draw(st.one_of(_ints, _order))
    return _dtype(code, tuple(state))


@st.composite
def dtypes(draw: Any) -> Any:
    if _rarely(draw):
        return _plain_obj(draw)
    n = draw(st.integers(1, 5))
    pairs, names, at = [], [], 0
    for k in range(n):
        name: Any = f"f{k}"
        if _rarely(draw):
            name = draw(st.sampled_from(["", "a b", "\u00e9", "f0", 3]))
        inner = draw(dtypes()) if _rarely(draw) else _plain_obj(draw)
        size = ps._PLAIN_DTYPES.get(inner.args[0], (0, 0, 8))[2]
        offset = at + (draw(st.integers(-3, -1)) if _rarely(draw) else draw(st.integers(0, 3)))
        at = max(at, offset + size)
        spec = (inner, offset, None) if _rarely(draw) else (inner, offset)
        pairs.append((name, spec))
        names.append(name)
    elsize = at + (draw(st.integers(-3, -1)) if _rarely(draw) else draw(st.integers(0, 3)))
    state = [3, "|", None, tuple(names), _fields(pairs), elsize, 1, 16]
    if _rarely(draw):
        state[draw(st.integers(0, 7))] = draw(st.one_of(_ints, _order))
    code = draw(st.sampled_from(["V8", "V", "f8"])) if _rarely(draw) else f"V{elsize}"
    return _dtype(code, tuple(state))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtypes())
def test_the_fast_answer_is_never_other_than_numpys(dtype: Any) -> None:
    known = ps._known_dtype(dtype)
    if known is not None:
        assert _numpy_route(dtype) == known


def test_lying_states_still_go_to_numpy_and_are_rated_high() -> None:
    # the object flag cleared on an object dtype; a field past the element
    lie = _dtype("O8", (3, "|", None, None, None, -1, -1, 0))
    assert ps._known_dtype(lie) is None and _numpy_route(lie) == "layout lie"
    f8 = _dtype("f8", (3, "<", None, None, None, -1, -1, 0))
    past = _dtype("V8", (3, "|", None, ("a",), _fields([("a", (f8, 4))]), 8, 1, 16))
    assert ps._known_dtype(past) is None and _numpy_route(past) == "layout lie"


def test_scanning_a_sklearn_forest_pickle_does_not_import_numpy(tmp_path: Any) -> None:
    # the saving this is for: the scan of plain and tree-node arrays never loads NumPy
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_digits(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=2, max_depth=3, random_state=0).fit(x, y)
    path = tmp_path / "forest.pkl"
    path.write_bytes(pickle.dumps(forest, protocol=4))
    code = (
        "import sys\nfrom shoal.scan import scan_file\n"
        f"r = scan_file({str(path)!r})\n"
        "print(r.severity.label, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["none", "False"], out
    assert scan_bytes(path.read_bytes()).severity == Severity.NONE
