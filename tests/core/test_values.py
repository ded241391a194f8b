"""Tests for NodeValues: plain aggregates against NumPy, validation and exclusion, reveal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.core import Federation, NodeValues, unflatten
from shoal.errors import AggregationError, NotEnoughNodes
from shoal.runtime import FETCH_TASK, FailureKind, Faults, LocalEngine, NodeApp, TaskContext

Result = dict[str, Any]


def federation_of(
    results: list[Result] | Callable[[int], Result], n: int | None = None, **kw: Any
) -> Federation:
    """A federation whose node i returns ``results[i]`` (or ``results(i)``) from task 'out'."""
    app = NodeApp(max_kept=kw.pop("max_kept", 4))

    @app.task("out")
    def out(ctx: TaskContext, payload: dict[str, Any]) -> Result:
        i = int(ctx.node_id[1:])
        return results(i) if callable(results) else results[i]

    count = n if n is not None else len(results)  # type: ignore[arg-type]
    engine_kw = {k: kw.pop(k) for k in ("faults",) if k in kw}
    return Federation(LocalEngine(app, nodes=count, **engine_kw), **kw)


def mapped(results: list[Result], **kw: Any) -> NodeValues:
    return federation_of(results, **kw).all().map("out")


# -- sums and means against NumPy ---------------------------------------------------------------

node_rows = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(
        hnp.arrays(
            np.float64,
            st.tuples(st.just(n), st.integers(min_value=0, max_value=4)),
            elements=st.floats(-1e6, 1e6),
        ),
        st.lists(st.integers(min_value=1, max_value=1000), min_size=n, max_size=n),
    )
)


@settings(max_examples=30, deadline=None)
@given(node_rows)
def test_sum_mean_and_weighted_mean_match_numpy(case: tuple[np.ndarray, list[int]]) -> None:
    rows, counts = case
    out = mapped([{"x": row, "n": c} for row, c in zip(rows, counts)])
    np.testing.assert_allclose(out["x"].sum(), rows.sum(axis=0), rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(out["x"].mean(), rows.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(
        out["x"].mean(weights=out["n"]),
        np.average(rows, axis=0, weights=counts),
        rtol=1e-12,
        atol=1e-9,
    )


def test_results_keep_shape_and_float_dtype() -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(4)]
    out = mapped([{"w": v} for v in values])
    total = out["w"].sum()
    assert total.shape == (2, 3) and total.dtype == np.float32
    np.testing.assert_allclose(total, np.sum(values, axis=0), rtol=1e-6)


def test_integer_and_json_fields_aggregate_as_float() -> None:
    out = mapped([{"c": np.array([i, 2 * i]), "n": i, "tag": "x"} for i in range(4)])
    np.testing.assert_array_equal(out["c"].sum(), [6.0, 12.0])
    assert out["n"].sum() == 6.0 and isinstance(out["n"].sum(), float)
    assert out["n"].mean() == 1.5
    # A whole result aggregates its arrays and skips its JSON fields.
    np.testing.assert_array_equal(out.mean(), [1.5, 3.0])


def test_select_treats_several_fields_as_one_vector() -> None:
    rng = np.random.default_rng(1)
    results = [{"w": rng.normal(size=(2, 2)), "b": rng.normal(size=3), "n": 1} for _ in range(5)]
    out = mapped(results)
    both = out.select("w", "b")
    assert both.field_names == ("w", "b")
    mean = both.mean()
    assert set(mean) == {"w", "b"}
    np.testing.assert_allclose(mean["w"], np.mean([r["w"] for r in results], axis=0))
    np.testing.assert_allclose(mean["b"], np.mean([r["b"] for r in results], axis=0))
    gathered = both.gather()
    assert gathered.rows.shape == (5, 7)
    assert gathered.layout == (("w", (2, 2), "<f8"), ("b", (3,), "<f8"))
    np.testing.assert_array_equal(
        gathered.rows[0], np.concatenate([results[0]["w"].ravel(), results[0]["b"]])
    )
    round_trip = gathered.unflatten(gathered.rows[2])
    np.testing.assert_array_equal(round_trip["w"], results[2]["w"])
    assert "w, b" in repr(both)


def test_unflatten_restores_fields() -> None:
    layout = (("a", (2,), "<f4"), ("k", (), "json"), ("c", (1, 2), "<i8"))
    out = unflatten(np.arange(5.0), layout)
    assert out["a"].dtype == np.float32 and out["k"] == 2.0 and out["c"].shape == (1, 2)


def test_select_errors() -> None:
    out = mapped([{"x": np.ones(2)}] * 2)
    with pytest.raises(AggregationError, match="no field"):
        out.select("x", "y")
    with pytest.raises(AggregationError):
        out.select()


# -- validation and exclusion --------------------------------------------------------------------


def good(i: int) -> Result:
    return {"x": np.full(3, float(i)), "n": 1}


def excluded_mean(bad: dict[int, Result], n: int = 6) -> tuple[np.ndarray, dict[str, str]]:
    out = mapped([bad.get(i, good(i)) for i in range(n)])
    gathered = out["x"].gather()
    keep = [i for i in range(n) if i not in bad]
    assert gathered.node_ids == tuple(f"n{i}" for i in keep)
    np.testing.assert_allclose(out["x"].mean(), np.full(3, np.mean(keep)))
    return gathered.rows, dict(gathered.excluded)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"x": np.zeros(4), "n": 1}, "shape"),
        ({"x": np.zeros((3, 1)), "n": 1}, "shape"),
        ({"x": np.zeros(3, dtype=np.int64), "n": 1}, "dtype"),
        ({"x": np.array([0.0, np.nan, 1.0]), "n": 1}, "NaN or infinity"),
        ({"x": np.array([0.0, np.inf, 1.0]), "n": 1}, "NaN or infinity"),
        ({"x": np.array([0, -np.inf, 1], dtype=np.float16), "n": 1}, "NaN or infinity"),
        ({"x": [1.0, 2.0, 3.0], "n": 1}, "not an array"),
        ({"x": np.zeros(3, dtype=np.complex128), "n": 1}, "dtype"),
        ({"y": np.zeros(3)}, "no field"),
    ],
)
def test_nodes_with_bad_values_are_excluded_with_a_reason(
    bad: Result, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="shoal.core"):
        _, excluded = excluded_mean({2: bad, 4: bad})
    assert set(excluded) == {"n2", "n4"}
    assert all(reason in why for why in excluded.values()), excluded
    assert "n2" in caplog.text


def test_float32_and_float64_nodes_mix() -> None:
    # Same kind of dtype: the value is usable, so it is not excluded.
    _, excluded = excluded_mean({})
    out = mapped([{"x": np.ones(2, np.float32)}, {"x": np.ones(2)}, {"x": np.ones(2)}])
    assert out["x"].gather().excluded == {} and not excluded


@pytest.mark.parametrize(
    ("weight", "reason"),
    [
        (-1, "non-negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("ten", "not a number"),
        (True, "not a number"),
        (None, "not a number"),
        ([1, 2], "not a number"),
        (10**400, "too large"),
    ],
)
def test_bad_weights_are_excluded(weight: Any, reason: str) -> None:
    results = [{"x": np.full(2, float(i)), "n": i + 1} for i in range(5)]
    results[1]["n"] = weight
    out = mapped(results)
    gathered = out["x"].gather(weights=out["n"])
    assert gathered.node_ids == ("n0", "n2", "n3", "n4")
    assert reason in gathered.excluded["n1"]
    keep = [0, 2, 3, 4]
    expected = np.average([float(i) for i in keep], weights=[i + 1 for i in keep])
    np.testing.assert_allclose(out["x"].mean(weights=out["n"]), np.full(2, expected))


def test_array_weights_of_one_element_are_numbers() -> None:
    out = mapped([{"x": np.full(2, float(i)), "n": np.array([i + 1])} for i in range(3)])
    np.testing.assert_allclose(out["x"].mean(weights=out["n"]), np.full(2, 8 / 6))


def test_weight_errors() -> None:
    out = mapped([{"x": np.ones(2), "n": 0, "m": 1}] * 3)
    with pytest.raises(AggregationError, match="sum to zero"):
        out["x"].mean(weights=out["n"])
    with pytest.raises(AggregationError, match="single field"):
        out["x"].mean(weights=out.select("n", "m"))
    other = mapped([{"x": np.ones(2), "n": 1}] * 3)  # another federation, same handle
    assert other.handle == out.handle
    with pytest.raises(AggregationError, match="same map"):
        out["x"].mean(weights=other["n"])
    later = out.federation.all().map("out")
    with pytest.raises(AggregationError, match="same map"):
        out["x"].mean(weights=later["n"])


def test_huge_json_numbers_are_excluded_not_crashing() -> None:
    out = mapped([{"k": 10**400 if i == 0 else i} for i in range(4)])
    gathered = out["k"].gather()
    assert "too large" in gathered.excluded["n0"]
    assert out["k"].sum() == 6.0


def test_non_numeric_values_cannot_be_aggregated() -> None:
    for value in ("text", np.array([1 + 2j, 3j]), {"a": 1}):
        out = mapped([{"v": value}] * 3)
        with pytest.raises(AggregationError, match="real-valued"):
            out["v"].sum()


def test_not_enough_valid_nodes_after_exclusion() -> None:
    results = [good(i) for i in range(5)]
    for i in (0, 1, 2):
        results[i] = {"x": np.array([np.nan, 0.0, 0.0]), "n": 1}
    out = mapped(results, min_nodes=3)
    assert len(out) == 5  # the map itself succeeded everywhere
    with pytest.raises(NotEnoughNodes) as info:
        out["x"].mean()
    message = str(info.value)
    assert "only 2 node(s)" in message and "minimum of 3" in message
    assert "n0 (" in message and "NaN" in message
    # A lower minimum for this aggregate lets the two valid nodes through.
    np.testing.assert_allclose(
        out["x"].gather(min_nodes=2).rows, [np.full(3, 3.0), np.full(3, 4.0)]
    )


def test_the_majority_layout_wins() -> None:
    results = [{"x": np.zeros(2)}, {"x": np.zeros(2)}, {"x": np.zeros(5)}]
    assert mapped(results)["x"].gather().layout == (("x", (2,), "<f8"),)
    results = [{"x": np.zeros(5)}, {"x": np.zeros(2)}, {"x": np.zeros(5)}]
    gathered = mapped(results)["x"].gather()
    assert gathered.layout == (("x", (5,), "<f8"),) and set(gathered.excluded) == {"n1"}


# -- nodes failing between map and fetch -------------------------------------------------------


def test_nodes_that_drop_before_the_fetch_are_reported() -> None:
    fed = federation_of(good, n=6)
    out = fed.all().map("out")
    fed.engine.set_offline(["n1", "n4"])  # type: ignore[attr-defined]
    x = out["x"]
    gathered = x.gather()
    assert gathered.node_ids == ("n0", "n2", "n3", "n5")
    assert set(gathered.excluded) == {"n1", "n4"}
    assert all(why.startswith("dropped") for why in gathered.excluded.values())
    assert x.failures["n1"].kind is FailureKind.DROPPED
    assert x.node_ids == ("n0", "n2", "n3", "n5")
    np.testing.assert_allclose(x.mean(), np.full(3, 2.5))


def test_all_nodes_gone_before_the_fetch_is_not_enough_nodes() -> None:
    fed = federation_of(good, n=3)
    out = fed.all().map("out")
    fed.engine.set_offline(["n0", "n1", "n2"])  # type: ignore[attr-defined]
    with pytest.raises(NotEnoughNodes, match=r"only 0 .*n0 \(dropped: node is offline\)"):
        out["x"].sum()


def test_faults_during_fetch_only() -> None:
    faults = Faults(always_drop=frozenset({"n0"}), tasks=frozenset({FETCH_TASK}))
    fed = federation_of(good, n=4, faults=faults, min_nodes=2)
    out = fed.all().map("out")
    assert len(out) == 4
    gathered = out["x"].gather()
    assert set(gathered.excluded) == {"n0"}
    fed2 = federation_of(good, n=4, faults=faults, min_nodes=4)
    with pytest.raises(NotEnoughNodes, match="only 3"):
        fed2.all().map("out")["x"].mean()


def test_values_evicted_at_the_node_are_reported() -> None:
    fed = federation_of(good, n=3, max_kept=2)
    first = fed.all().map("out")
    fed.all().map("out")
    fed.all().map("out")
    with pytest.raises(NotEnoughNodes, match="no longer holds"):
        first["x"].mean()


def test_without_moves_nodes_to_the_failures() -> None:
    out = mapped([good(i) for i in range(4)])
    fewer = out.without(["n1", "n3"], FailureKind.INVALID, "flagged by a robust rule")
    assert fewer.node_ids == ("n0", "n2") and len(out) == 4
    assert fewer.failures["n3"].detail == "flagged by a robust rule"
    np.testing.assert_allclose(fewer["x"].mean(), np.full(3, 1.0))


# -- reveal --------------------------------------------------------------------------------------


def test_reveal_returns_values_audits_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    fed = federation_of([{"x": np.full(2, float(i)), "n": i} for i in range(3)])
    out = fed.all().map("out")
    assert fed.audit_log == ()
    with caplog.at_level(logging.WARNING, logger="shoal.core"):
        revealed = out["x"].reveal()
    assert set(revealed) == {"n0", "n1", "n2"}
    np.testing.assert_array_equal(revealed["n2"], [2.0, 2.0])
    (entry,) = fed.audit_log
    assert entry.action == "reveal"
    assert entry.detail == {"handle": out.handle, "fields": ["x"], "nodes": 3}
    assert any(r.levelno == logging.WARNING and "reveal" in r.getMessage() for r in caplog.records)
    whole = out.reveal()
    assert whole["n1"]["n"] == 1 and set(whole["n1"]) == {"x", "n"}
    assert len(fed.audit_log) == 2


def test_nodevalues_repr_and_len() -> None:
    out = mapped([good(i) for i in range(3)])
    assert len(out) == 3 and "3 nodes" in repr(out) and "all fields" in repr(out)
