"""Pickle opcode analysis: allowlist classification and every bypass class."""

from __future__ import annotations

import collections
import os
import pickle
import struct
from typing import Any

import numpy as np
import pytest

from shoal.scan import Severity, classify_global, is_allowed, scan_bytes

MARK, STOP, TUPLE, REDUCE = pickle.MARK, pickle.STOP, pickle.TUPLE, pickle.REDUCE


def su(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def sglob(module: str, name: str) -> bytes:
    return su(module) + su(name) + pickle.STACK_GLOBAL


def call(func: bytes, *args: bytes) -> bytes:
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def p4(body: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + body + STOP


def p2(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + STOP


class Evil:
    """Pickles as a call to os.system; only ever dumped, never loaded."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo should-not-run",))


def evil_bytes(protocol: int = 2) -> bytes:
    return pickle.dumps(Evil(), protocol=protocol)


def kinds(report) -> set[str]:
    return {f.kind for f in report.findings}


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize(
    "obj",
    [
        {"a": [1, 2.5, "x", b"y", None, True]},
        np.arange(12, dtype=np.float32).reshape(3, 4),
        collections.OrderedDict(a=1),
        {1, 2},
        frozenset({3}),
        complex(1, 2),
        bytearray(b"ab"),
        slice(1, 5, 2),
        np.float64(2.5),
        np.array(["a", "bc"]),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]),
        np.random.RandomState(0),
        np.random.default_rng(0),
    ],
    ids=lambda o: type(o).__name__,
)
def test_benign_pickles_are_clean_at_every_protocol(obj, protocol):
    report = scan_bytes(pickle.dumps(obj, protocol=protocol))
    assert report.format == "pickle"
    assert report.severity == Severity.NONE, report.findings


@pytest.mark.parametrize("protocol", range(6))
def test_os_system_is_critical_at_every_protocol(protocol):
    report = scan_bytes(evil_bytes(protocol))
    assert report.severity == Severity.CRITICAL
    assert "unsafe-import" in kinds(report)
    assert any("system" in f.detail for f in report.findings)


CMD = su("echo x")

BYPASSES = {
    "collect_env_run": (p4(call(sglob("torch.utils.collect_env", "run"), CMD)), Severity.CRITICAL),
    "timeit": (p4(call(sglob("timeit", "timeit"), su("1"))), Severity.CRITICAL),
    "numpy_runstring": (
        p4(call(sglob("numpy.testing._private.utils", "runstring"), su("x=1"), b"}")),
        Severity.CRITICAL,
    ),
    "methodcaller": (
        p4(call(call(sglob("operator", "methodcaller"), su("system"), CMD), su("os"))),
        Severity.CRITICAL,
    ),
    "attrgetter_chain": (
        p4(call(call(sglob("operator", "attrgetter"), su("path.os.system")), su("x"))),
        Severity.CRITICAL,
    ),
    "builtins_getattr": (
        p4(call(sglob("builtins", "getattr"), su("a"), su("b"))),
        Severity.CRITICAL,
    ),
    "builtins_eval": (p4(call(sglob("builtins", "eval"), su("1"))), Severity.CRITICAL),
    "py2_builtin_eval": (p2(call(glob("__builtin__", "eval"), su("1"))), Severity.CRITICAL),
    "dunder_import": (p4(call(sglob("builtins", "__import__"), su("os"))), Severity.CRITICAL),
    "numpy_dunder_builtins": (p4(sglob("numpy", "__builtins__")), Severity.CRITICAL),
    "functools_partial": (
        p4(call(sglob("functools", "partial"), sglob("os", "system"))),
        Severity.CRITICAL,
    ),
    "importlib": (p4(call(sglob("importlib", "import_module"), su("os"))), Severity.CRITICAL),
    "pkgutil": (p4(call(sglob("pkgutil", "resolve_name"), su("os:system"))), Severity.CRITICAL),
    "pickle_loads": (p4(call(sglob("_pickle", "loads"), b"C\x01.")), Severity.CRITICAL),
    "pydoc_locate": (p4(call(sglob("pydoc", "locate"), su("os.system"))), Severity.CRITICAL),
    "ctypes": (p4(call(sglob("ctypes", "CDLL"), su("libc.so.6"))), Severity.CRITICAL),
    "sys": (p4(sglob("sys", "modules")), Severity.CRITICAL),
    "torch_load": (p4(call(sglob("torch.serialization", "load"), su("x"))), Severity.CRITICAL),
    "numpy_load": (p4(call(sglob("numpy", "load"), su("x.npy"))), Severity.CRITICAL),
    "dotted_name": (p4(sglob("numpy", "core._internal.sys.modules")), Severity.HIGH),
    "unknown_class": (p4(call(sglob("somepkg.models", "Net"))), Severity.MEDIUM),
}


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_bypass_classes(name):
    data, expected = BYPASSES[name]
    report = scan_bytes(data)
    assert report.severity >= expected, report.findings


def test_memo_indirected_stack_global_is_resolved():
    body = (
        su("os")
        + pickle.MEMOIZE
        + su("system")
        + pickle.MEMOIZE
        + pickle.POP
        + pickle.POP
        + pickle.BINGET
        + b"\x00"
        + pickle.BINGET
        + b"\x01"
        + pickle.STACK_GLOBAL
    )
    report = scan_bytes(p4(call(body, CMD)))
    assert report.severity == Severity.CRITICAL
    assert any("os.system" in f.detail for f in report.findings)


def test_binput_long_binput_and_put_are_followed():
    body = su("subprocess") + pickle.LONG_BINPUT + struct.pack("<I", 70000) + pickle.POP
    body += su("Popen") + pickle.PUT + b"7\n" + pickle.POP
    body += (
        pickle.LONG_BINGET + struct.pack("<I", 70000) + pickle.GET + b"7\n" + pickle.STACK_GLOBAL
    )
    report = scan_bytes(p4(call(body, CMD)))
    assert any("subprocess.Popen" in f.detail for f in report.findings)


def test_computed_stack_global_is_high():
    # module name is the result of a call, not a string constant
    body = call(sglob("builtins", "str"), su("os")) + su("system") + pickle.STACK_GLOBAL
    report = scan_bytes(p4(call(body, CMD)))
    assert report.severity == Severity.HIGH
    assert "computed-import" in kinds(report)


def test_inst_and_obj_opcodes():
    inst = MARK + pickle.STRING + b"'echo'\n" + pickle.INST + b"os\nsystem\n" + pickle.STOP
    obj = p2(MARK + glob("os", "system") + CMD + pickle.OBJ)
    for data in (inst, obj):
        report = scan_bytes(data)
        assert report.severity == Severity.CRITICAL, report.findings


def test_newobj_and_newobj_ex():
    newobj = p4(sglob("subprocess", "Popen") + MARK + CMD + TUPLE + pickle.NEWOBJ)
    newobj_ex = p4(sglob("subprocess", "Popen") + MARK + CMD + TUPLE + b"}" + pickle.NEWOBJ_EX)
    for data in (newobj, newobj_ex):
        assert scan_bytes(data).severity == Severity.CRITICAL


@pytest.mark.parametrize("op", [b"\x82\x01", b"\x83\x01\x02", b"\x84\x01\x02\x03\x04"])
def test_ext_opcodes_are_high(op):
    report = scan_bytes(p2(op + MARK + CMD + TUPLE + REDUCE))
    assert report.severity == Severity.HIGH
    assert "extension-import" in kinds(report)


def test_build_on_imported_global_is_flagged():
    body = glob("numpy", "prod") + pickle.NONE + MARK + su("a") + su("os") + pickle.DICT
    body += pickle.TUPLE2 + pickle.BUILD
    report = scan_bytes(p4(body))
    assert "global-mutation" in kinds(report)
    assert report.severity >= Severity.HIGH


def test_setitem_on_imported_global_is_flagged():
    body = sglob("collections", "OrderedDict") + su("k") + su("v") + pickle.SETITEM
    assert "global-mutation" in kinds(scan_bytes(p4(body)))


def test_call_of_computed_value_is_high():
    # calling the result of an allowlisted call (a dtype) is an indirect call
    body = call(call(sglob("numpy", "dtype"), su("f8")), su("x"))
    report = scan_bytes(p4(body))
    assert report.severity == Severity.HIGH
    assert "computed-call" in kinds(report)


def test_dunder_state_keys_are_flagged():
    body = call(sglob("collections", "OrderedDict")) + MARK + su("__class__") + su("x")
    body += pickle.DICT + pickle.BUILD
    assert "dunder-state" in kinds(scan_bytes(p4(body)))


def test_persistent_id_outside_torch_is_medium():
    report = scan_bytes(p2(su("x") + pickle.BINPERSID))
    assert report.severity == Severity.MEDIUM
    assert "persistent-id" in kinds(report)


def test_concatenated_pickles_are_all_scanned():
    report = scan_bytes(pickle.dumps([1, 2]) + evil_bytes())
    assert report.severity == Severity.CRITICAL


def test_trailing_garbage_is_low():
    report = scan_bytes(pickle.dumps({"a": 1}) + b"\xff\xfe trailing")
    assert report.severity == Severity.LOW
    assert "trailing-data" in kinds(report)


@pytest.mark.parametrize("cut", [1, 3, 10, -2])
def test_truncated_pickle_is_medium(cut):
    data = pickle.dumps({"a": np.arange(10)}, protocol=4)
    report = scan_bytes(data[:cut])
    assert report.severity >= Severity.MEDIUM
    assert "malformed" in kinds(report)


def test_payload_before_truncation_is_still_reported():
    data = evil_bytes()
    report = scan_bytes(data[:-1])  # no STOP: pickle.load would still have run os.system
    assert report.severity == Severity.CRITICAL


def test_huge_declared_length_does_not_allocate():
    data = pickle.PROTO + b"\x04" + b"\x8e" + struct.pack("<Q", 2**62) + b"abc"
    report = scan_bytes(data)
    assert "malformed" in kinds(report)


def test_large_bytes_argument_is_skipped_not_kept():
    payload = pickle.dumps(np.zeros(2_000_000), protocol=4)
    report = scan_bytes(payload)
    assert report.severity == Severity.NONE


def test_next_buffer_needs_custom_loader():
    data = pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5, buffer_callback=lambda b: False)
    assert "out-of-band-buffer" in kinds(scan_bytes(data))


def test_codecs_encode_with_unknown_codec():
    body = call(sglob("_codecs", "encode"), su("x"), su("rot13"))
    assert scan_bytes(p4(body)).severity == Severity.MEDIUM


def test_allocation_bomb_is_flagged():
    body = call(
        sglob("builtins", "bytearray"), pickle.LONG1 + b"\x08" + (2**40).to_bytes(8, "little")
    )
    assert "allocation" in kinds(scan_bytes(p4(body)))


def test_sklearn_models_are_clean():
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    models = [
        LogisticRegression(max_iter=500).fit(x, y),
        RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y),
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y),
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.append(MLPClassifier(max_iter=5, random_state=0).fit(x, y))
    for model in models:
        for protocol in (0, 2, 5):
            report = scan_bytes(pickle.dumps(model, protocol=protocol))
            assert report.severity == Severity.NONE, (model, protocol, report.findings)


class TestClassify:
    def test_allowlist_is_exact(self):
        assert is_allowed("numpy.core.multiarray", "_reconstruct")
        assert is_allowed("collections", "OrderedDict")
        assert is_allowed("copy_reg", "_reconstructor")  # Python 2 name maps to copyreg
        assert not is_allowed("numpy.core.multiarray", "_reconstruct.__globals__")
        assert not is_allowed("collections", "namedtuple")

    def test_sklearn_names_need_sklearn_module(self):
        assert is_allowed("sklearn.linear_model._logistic", "LogisticRegression")
        assert not is_allowed("evil.linear_model", "LogisticRegression")
        assert not is_allowed("sklearn.linear_model", "LogisticRegression.__init__")

    @pytest.mark.parametrize(
        ("module", "name", "severity"),
        [
            ("os", "system", Severity.CRITICAL),
            ("builtins", "print", Severity.CRITICAL),
            ("numpy", "__builtins__", Severity.CRITICAL),
            ("numpy", "prod.a", Severity.HIGH),
            ("bad module", "x", Severity.HIGH),
            ("mypkg", "Model", Severity.MEDIUM),
            ("torch", "FloatStorage", Severity.NONE),
        ],
    )
    def test_severities(self, module, name, severity):
        assert classify_global(module, name)[0] == severity


def test_a_wrapper_rebuilt_many_times_keeps_one_value_per_name():
    """One joblib wrapper fetched from the memo and rebuilt N times merged every pair of every
    state: N**2 work (32,000 rebuilds in 600 KB took 2.4 s of scan, growing fourfold per
    doubling). The merged state keeps the last value of each name, and a state of more names
    than a wrapper has is opaque."""
    from shoal.scan.pickle_scan import _Dict, _merge_states, _Opaque

    def state(*names: str) -> _Dict:
        d = _Dict()
        d.pairs = [(n, i) for i, n in enumerate(names)]
        d.n = len(d.pairs)
        return d

    merged = state("shape", "order")
    for _ in range(10_000):
        merged = _merge_states(merged, state("allow_mmap", "shape"))
    assert isinstance(merged, _Dict)
    assert dict(merged.pairs) == {"order": 1, "allow_mmap": 0, "shape": 1}
    assert merged.n == 3
    wide = state(*(f"a{i}" for i in range(65)))
    assert isinstance(_merge_states(state("shape"), wide), _Opaque)
