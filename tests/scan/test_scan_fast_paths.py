"""The opcode loop calls an allowlisted global without ``_check_args`` when ``_call_checked``
says there is nothing to check: for every allowlisted global that says so, ``_check_args``
itself must find nothing, whatever the arguments."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.scan import ScanLimits, Severity, pickle_scan
from shoal.scan.allowlist import SAFE_GLOBALS
from shoal.scan.streams import ByteReader

_EVIL = pickle_scan._Glob("os", "system", Severity.CRITICAL)
_WRAPPER = pickle_scan._Glob("joblib.numpy_pickle", "NumpyArrayWrapper", Severity.NONE)
_CALLED = pickle_scan._Obj(None, ())
_DUNDER = pickle_scan._Dict()
_DUNDER.pairs.append(("__class__", _EVIL))
_DUNDER.n = 1
_FULL = pickle_scan._Dict()
_FULL.pairs.append(("hook", _EVIL))
_FULL.n = 1
_HUGE = 1 << 40
_SHAPE = (1 << 20, 1 << 20)
_ITEMS: list[Any] = [
    _EVIL,
    _WRAPPER,
    _CALLED,
    _DUNDER,
    _FULL,
    _HUGE,
    _SHAPE,
    "x",
    "rot13",
    None,
    pickle_scan._List(),
    (),
]
# What the arguments may be: none, each item alone and repeated up to eight times, a few mixes,
# and argument values that are not tuples at all.
_ARGUMENTS: list[Any] = [()]
_ARGUMENTS += [(x,) * n for x in _ITEMS for n in range(1, 9)]
_ARGUMENTS += [("x", "rot13"), (_EVIL, _SHAPE), ("x", _SHAPE, _SHAPE), ("MT19937", _EVIL)]
_ARGUMENTS += [(_EVIL, _EVIL, (), _DUNDER), (_WRAPPER, _EVIL, None), (1, 2, 3, 4, 5, _FULL)]
_ARGUMENTS += [_CALLED, _EVIL, None, pickle_scan._List(), "x"]

_NAMES = [
    *sorted(SAFE_GLOBALS),
    ("sklearn.tree._tree", "__pyx_unpickle_Tree"),
    ("sklearn.utils", "newObj"),
    ("numpy._core.multiarray", "_reconstruct"),
]


def _analyzer() -> Any:
    return pickle_scan._Analyzer(
        ByteReader(io.BytesIO(b"")),
        pickle_scan.Sink(limit=1000),
        limits=ScanLimits(),
        torch=True,
    )


@pytest.mark.parametrize(("module", "name"), _NAMES)
def test_globals_without_checks_have_nothing_checked(module: str, name: str) -> None:
    glob = pickle_scan._Glob(module, name, Severity.NONE)
    a = _analyzer()
    for args in _ARGUMENTS:
        a._check_args(glob, args, "REDUCE")
    found = a.sink.items()
    if glob.plain:
        assert found == [], (glob.qual, found)


def test_the_checked_ones_are_checked() -> None:
    """The other way round, for a few: their checks do fire on these arguments."""
    for module, name in [
        ("torch._utils", "_rebuild_tensor_v2"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("copyreg", "_reconstructor"),
    ]:
        glob = pickle_scan._Glob(module, name, Severity.NONE)
        assert not glob.plain
        a = _analyzer()
        for args in _ARGUMENTS:
            a._check_args(glob, args, "REDUCE")
        assert a.sink.items(), glob.qual


def _reference_state_findings(state: Any) -> list[tuple[Severity, str, str]]:
    """_check_state as it was written before it had a fast path (commit ed422b4)."""
    ps = pickle_scan
    out: list[tuple[Severity, str, str]] = []
    if isinstance(state, tuple):
        computed = [
            x
            for x in state
            if isinstance(x, (ps._Glob, ps._Opaque))
            or (
                isinstance(x, ps._Obj)
                and (
                    x.origin is None
                    or x.origin.severity != Severity.NONE
                    or x.origin.qual in ps._DICT_MAKERS
                )
            )
        ]
    if isinstance(state, tuple) and not computed:
        dicts = [x for x in state if isinstance(x, ps._Dict)]
    elif isinstance(state, ps._Dict):
        dicts = [state]
    elif state is None or isinstance(state, (ps._List, ps._Blob, str, bytes, int, float)):
        dicts = []
    else:
        return [(Severity.HIGH, "computed-state", ps._describe(state))]
    for d in dicts:
        if d.n > len(d.pairs):
            out.append((Severity.MEDIUM, "unverifiable", str(d.n)))
        for k, _v in d.pairs:
            if type(k) is not str:
                out.append((Severity.HIGH, "computed-state", ps._describe(k)))
            elif k.startswith("__") and k.endswith("__"):
                out.append((Severity.HIGH, "dunder-state", repr(k)))
    return out


def _dict(pairs: list[tuple[Any, Any]], extra: int) -> Any:
    d = pickle_scan._Dict()
    d.pairs.extend(pairs)
    d.n = len(pairs) + extra
    return d


_KEYS = st.one_of(
    st.sampled_from(["a", "_x", "__", "___", "__class__", "__dict__x", "x__", "__init__", ""]),
    st.integers(0, 3),
    st.just(_EVIL),
    st.just(None),
)
_LEAVES = st.sampled_from(
    [
        None,
        1,
        2.5,
        "s",
        b"b",
        _EVIL,
        _WRAPPER,
        _CALLED,
        pickle_scan._Obj(pickle_scan._Glob("collections", "OrderedDict", Severity.NONE), ()),
        pickle_scan._Obj(pickle_scan._Glob("numpy", "dtype", Severity.NONE), ("f8",)),
        pickle_scan._Opaque("set"),
        pickle_scan._Blob("str", 10**6),
        pickle_scan._List(),
    ]
)
_DICTS = st.builds(
    _dict, st.lists(st.tuples(_KEYS, _LEAVES), max_size=5), st.sampled_from([0, 0, 0, 1])
)
_STATES = st.one_of(
    _LEAVES,
    _DICTS,
    st.lists(st.one_of(_LEAVES, _DICTS), max_size=5).map(tuple),
)


@settings(max_examples=1000, deadline=None)
@given(state=_STATES)
def test_state_findings_are_the_checks_they_were(state: Any) -> None:
    got = [(sev, kind) for sev, kind, _detail in pickle_scan._state_findings(state)]
    want = [(sev, kind) for sev, kind, _detail in _reference_state_findings(state)]
    assert got == want


def _small_zip() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.pkl", b"\x80\x04N.")
    return buf.getvalue()


@settings(max_examples=500, deadline=None)
@given(
    size=st.integers(0, 2100),
    zipped=st.booleans(),
    signature_at=st.one_of(st.none(), st.integers(0, 2100)),
)
def test_the_appended_zip_check_answers_as_zipfile_does(size, zipped, signature_at) -> None:
    """The head of a small file stands in for reading its end again: the same answer as
    zipfile.is_zipfile for files shorter and longer than the head, with and without a zip (or
    a stray end-of-directory signature) at the end."""
    import zipfile

    from shoal.scan.scanner import _has_zip_directory, _size

    data = bytearray(b"\x80\x04N." + b"x" * size)
    if signature_at is not None:
        at = signature_at % len(data)
        data[at : at + 4] = b"PK\x05\x06"
    if zipped:
        data += _small_zip()
    f = io.BytesIO(bytes(data))
    head = f.read(1024)
    want = zipfile.is_zipfile(io.BytesIO(bytes(data)))
    assert _has_zip_directory(f, head, _size(f)) == want


@settings(max_examples=1000, deadline=None)
@given(
    name=st.text(alphabet=st.sampled_from("aZ/._-Kk\u212a\u0130\u00c9\u0391Data.PKL0"), max_size=20)
)
def test_member_names_fold_as_miniz_does(name: str) -> None:
    """ASCII names take str.lower(); the others still fold A-Z only (the KELVIN SIGN stays)."""
    from shoal.scan import archives

    assert archives._ascii_lower(name) == name.translate(archives._ASCII_LOWER)


_QUIET_ARGUMENTS: list[Any] = [
    *_ARGUMENTS,
    ("x", "latin1"),
    ("x", "utf8"),
    ("x", "rot13"),
    ("x",),
    (_EVIL, (0,), b"b"),
    (_EVIL, (1 << 16, 1 << 15), b"b"),
    (_EVIL, (1 << 16, 1 << 16), b"b"),
    (_EVIL, (1 << 40, -5, 0), b"b"),
    (_EVIL, "not a shape", b"b"),
    (1, 2, 3, 4, 5, None),
    (1, 2, 3, 4, 5, pickle_scan._Dict()),
    (1, 2, 3, 4, 5, _FULL),
    (
        1,
        2,
        3,
        4,
        5,
        pickle_scan._Obj(pickle_scan._Glob("collections", "OrderedDict", Severity.NONE), ()),
    ),
    (1, 2, 3, 4, 5, 6, _CALLED),
    (1, 2, _FULL),
]


@pytest.mark.parametrize(("module", "name"), _NAMES)
def test_quiet_calls_are_ones_check_args_finds_nothing_in(module: str, name: str) -> None:
    """The loop also takes NumPy's _reconstruct, _codecs.encode and torch's tensor rebuilders
    itself when _quiet_call says their checks pass: then _check_args must find nothing."""
    glob = pickle_scan._Glob(module, name, Severity.NONE)
    for args in _QUIET_ARGUMENTS:
        a = _analyzer()
        a._check_args(glob, args, "REDUCE")
        if pickle_scan._quiet_call(glob, args):
            assert a.sink.items() == [], (glob.qual, args)


def test_quiet_calls_happen() -> None:
    """...and it does say so for the calls these helpers are written with."""
    quiet = pickle_scan._quiet_call
    glob = pickle_scan._Glob
    assert quiet(glob("_codecs", "encode", Severity.NONE), ("x", "latin1"))
    assert quiet(glob("numpy._core.multiarray", "_reconstruct", Severity.NONE), (_EVIL, (0,), b"b"))
    hooks = pickle_scan._Obj(glob("collections", "OrderedDict", Severity.NONE), ())
    assert quiet(glob("torch._utils", "_rebuild_tensor_v2", Severity.NONE), (1, 2, 3, 4, 5, hooks))
    assert not quiet(
        glob("torch._utils", "_rebuild_tensor_v2", Severity.NONE), (1, 2, 3, 4, 5, _FULL)
    )


def test_the_symbolic_classes_have_no_subclasses() -> None:
    """The opcode loop and _state_findings test type(x) is C where the checks they stand for
    say isinstance(x, C): the same only while nothing subclasses these."""
    for cls in (
        pickle_scan._Glob,
        pickle_scan._Obj,
        pickle_scan._Dict,
        pickle_scan._List,
        pickle_scan._Opaque,
        pickle_scan._Blob,
    ):
        assert cls.__subclasses__() == [], cls
