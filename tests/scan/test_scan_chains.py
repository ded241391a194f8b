"""Chains through each allowlisted helper that calls something its arguments name.

The scanner's allowlist says which globals ``pickle.load`` may import for a file to be rated
"none". A few of those helpers call into one of their arguments (``base.__new__``,
``subtype.__new__``, ``obj.__new__``, ``data.to``), keep callables for later (torch's backward
hooks) or build a tensor nobody checks (``_rebuild_sparse_tensor``). For each one: what the
library itself writes is still "none"; a file that chooses the callee is at least "high" (the
sparse tensor "medium"); and ``shoal.scan.loads``, which calls nothing the file names, refuses
all of them by name.
"""

from __future__ import annotations

import collections
import copyreg
import pickle
from typing import Any

import numpy as np
import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import loads, scan_bytes
from shoal.scan.report import Severity

torch = pytest.importorskip("torch")


class _Reduce:
    """Pickles as ``func(*args)``: writes any helper call exactly as an attacker's file would."""

    def __init__(self, func: Any, args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _chosen(data: bytes) -> list[str]:
    report = scan_bytes(data)
    return [f.detail for f in report.findings if f.kind == "chosen-function"]


def _refused(data: bytes, name: str) -> None:
    with pytest.raises(UnsafeModelError, match=name):
        loads(data)


# (helper, hostile arguments, what the real helper would call)
HOSTILE = [
    pytest.param(
        copyreg._reconstructor,
        (collections.OrderedDict, np.ndarray, (1 << 20,)),
        "numpy.ndarray",
        id="reconstructor-base",
    ),
    pytest.param(
        copyreg._reconstructor,
        (_Reduce(bytearray, (8,)), object, None),
        "result of calling builtins.bytearray",
        id="reconstructor-computed-class",
    ),
    pytest.param(
        np.ma.core._mareconstruct,
        (bytearray, np.ndarray, (4,), np.dtype("f4")),
        "builtins.bytearray",
        id="mareconstruct-subtype",
    ),
    pytest.param(
        torch._utils._rebuild_wrapper_subclass,
        (np.ndarray, torch.float32, (2,), (1,), 0, torch.strided, "cpu", False),
        "numpy.ndarray",
        id="wrapper-subclass",
    ),
    pytest.param(
        torch._utils._rebuild_device_tensor_from_cpu_tensor,
        (_Reduce(collections.OrderedDict, ()), torch.float32, "cpu", False),
        "collections.OrderedDict",
        id="device-tensor-data",
    ),
]


@pytest.mark.parametrize(("helper", "args", "callee"), HOSTILE)
def test_a_helper_calling_into_what_the_file_chose_is_high(
    helper: Any, args: Any, callee: str
) -> None:
    data = pickle.dumps(_Reduce(helper, args), protocol=2)
    chosen = _chosen(data)
    assert chosen and callee in chosen[0], scan_bytes(data).findings
    assert scan_bytes(data).severity >= Severity.HIGH
    _refused(data, helper.__name__)


def test_the_reconstructor_calls_the_base_the_file_chose() -> None:
    """What pickle.load really does with it: ``base.__new__(cls, state)`` of the file's base
    (here an ndarray of a million elements the file sized), no questions asked."""
    data = pickle.dumps(_Reduce(copyreg._reconstructor, (np.ndarray, np.ndarray, (1 << 20,))), 2)
    assert pickle.loads(data).shape == (1 << 20,)
    assert _chosen(data)


@pytest.mark.parametrize("hooks_at", ["v2", "parameter"])
def test_backward_hooks_are_callables_the_file_chose(hooks_at: str) -> None:
    hooks = collections.OrderedDict([(0, np.random._pickle.__bit_generator_ctor)])
    if hooks_at == "v2":
        call = _Reduce(torch._utils._rebuild_tensor_v2, (None, 0, (1,), (1,), False, hooks))
    else:
        call = _Reduce(torch._utils._rebuild_parameter, (None, False, hooks))
    data = pickle.dumps(call, protocol=2)
    chosen = _chosen(data)
    assert chosen and "backward hooks" in chosen[0], scan_bytes(data).findings
    _refused(data, call.func.__name__)
    # empty hooks, as torch writes them, are fine
    empty = _Reduce(torch._utils._rebuild_parameter, (None, False, collections.OrderedDict()))
    assert not _chosen(pickle.dumps(empty, protocol=2))


def test_hooks_inside_rebuild_from_type_are_checked_too() -> None:
    hooks = collections.OrderedDict([(0, np.random._pickle.__bit_generator_ctor)])
    inner = (None, 0, (1,), (1,), False, hooks)
    call = _Reduce(
        torch._tensor._rebuild_from_type_v2,
        (torch._utils._rebuild_tensor_v2, torch.Tensor, inner, {}),
    )
    assert any("backward hooks" in c for c in _chosen(pickle.dumps(call, protocol=2)))


def test_a_sparse_tensor_is_not_called_safe() -> None:
    """pickle.load builds it with check_invariants=False and never checks its indices (only
    torch.load does, after loading): here an index 10**6 rows past a 4x4 tensor."""
    indices = torch.tensor([[0, 10**6], [0, 0]])
    call = _Reduce(
        torch._utils._rebuild_sparse_tensor,
        (torch.sparse_coo, (indices, torch.tensor([1.0, 2.0]), (4, 4))),
    )
    data = pickle.dumps(call, protocol=2)
    assert pickle.loads(data).shape == (4, 4)  # loads without a word
    report = scan_bytes(data)
    assert any(f.kind == "unchecked-tensor" for f in report.findings), report.findings
    assert report.severity >= Severity.MEDIUM
    _refused(data, "_rebuild_sparse_tensor")


@pytest.mark.parametrize(
    ("pyx", "cls"),
    [
        ("numpy.random.bit_generator", "SeedSequence"),
    ],
)
def test_a_cython_unpickler_of_another_class_is_high(pyx: str, cls: str) -> None:
    import importlib

    module = importlib.import_module(pyx)
    unpickle = getattr(module, f"__pyx_unpickle_{cls}")
    data = pickle.dumps(_Reduce(unpickle, (collections.OrderedDict, 0, None)), protocol=2)
    chosen = _chosen(data)
    assert chosen and "collections.OrderedDict" in chosen[0]
    _refused(data, f"__pyx_unpickle_{cls}")


def test_sklearn_new_obj_of_something_computed_is_high() -> None:
    dist = pytest.importorskip("sklearn.metrics._dist_metrics")
    data = pickle.dumps(_Reduce(dist.newObj, (_Reduce(bytearray, (4,)),)), protocol=2)
    assert _chosen(data)
    _refused(data, "newObj")


def test_what_the_libraries_write_is_still_none() -> None:
    """The same helpers as their own libraries use them stay "none" (no false alarm)."""
    sklearn = pytest.importorskip("sklearn.metrics")
    benign = [
        pickle.dumps(np.ma.masked_array([1.0, 2.0], mask=[0, 1]), protocol=2),
        pickle.dumps(np.random.SeedSequence(1), protocol=2),
        pickle.dumps(sklearn.DistanceMetric.get_metric("euclidean"), protocol=2),
        pickle.dumps(_Reduce(copyreg._reconstructor, (collections.OrderedDict, dict, {})), 2),
        pickle.dumps(_Reduce(copyreg._reconstructor, (collections.OrderedDict, object, None)), 2),
    ]
    for data in benign:
        report = scan_bytes(data)
        assert report.severity == Severity.NONE, report.findings
