"""The library's one mean, sum, L2 norm and L2 clip: every path that averages agrees.

``values.mean(weights=...)`` and ``values.aggregate(Mean(), weights=...)`` (and the rules'
``weighted_mean``) must be the same numbers, on ordinary input and near float32's maximum,
where a naive sum overflows; the clip bounds the norm and keeps the direction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.aggregate import Clip, Mean, Sum, rules
from shoal.core import Federation, NodeValues
from shoal.core.reduce import clip_rows, l2_norm
from shoal.crypto.secagg import aggregate as secagg_aggregate
from shoal.errors import AggregationError
from shoal.runtime import LocalEngine, NodeApp, TaskContext

F32_MAX = float(np.finfo(np.float32).max)


def mapped(results: list[dict[str, Any]]) -> NodeValues:
    app = NodeApp()

    @app.task("update")
    def update(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return ctx.data  # type: ignore[no-any-return]

    return Federation(LocalEngine(app, data=results)).all().map("update")


float32_rows = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        hnp.arrays(
            np.float32,
            (n, 4),
            elements=st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False),
        ),
        st.lists(st.integers(0, 1000), min_size=n, max_size=n).filter(lambda w: sum(w) > 0),
    )
)


@settings(max_examples=60, deadline=None)
@given(case=float32_rows, weighted=st.booleans())
@example(case=(np.full((3, 4), F32_MAX, dtype=np.float32), [1, 2, 3]), weighted=True)
@example(case=(np.full((2, 4), -F32_MAX, dtype=np.float32), [5, 5]), weighted=False)
def test_values_mean_and_the_mean_stage_agree(
    case: tuple[np.ndarray, list[int]], weighted: bool
) -> None:
    rows, counts = case
    out = mapped([{"x": row, "n": c} for row, c in zip(rows, counts)])
    weights = out["n"] if weighted else None
    direct = out["x"].mean(weights=weights)
    staged = out["x"].aggregate(Mean(), weights=weights)
    ruled = rules.weighted_mean(rows, np.asarray(counts) if weighted else None)
    np.testing.assert_array_equal(direct, staged)
    np.testing.assert_array_equal(direct, ruled)
    assert direct.dtype == np.float32
    # A mean of finite values is finite and lies between the extremes (up to a few ulps of
    # rounding in the weights), even when the sum of the values overflows float32.
    assert np.isfinite(direct).all()
    kept = rows if not weighted else rows[np.asarray(counts) > 0]
    low, high = kept.min(axis=0), kept.max(axis=0)
    scale = np.maximum(np.abs(low), np.abs(high)).astype(np.float64)
    slack = 4 * float(np.finfo(np.float32).eps) * scale
    wide = direct.astype(np.float64)
    assert (wide >= low - slack).all() and (wide <= high + slack).all()


def test_sum_is_one_kernel_and_refuses_overflow() -> None:
    rows = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = mapped([{"x": row} for row in rows])
    np.testing.assert_array_equal(out["x"].sum(), rows.sum(axis=0))
    np.testing.assert_array_equal(out["x"].aggregate(Sum()), rows.sum(axis=0))
    big = mapped([{"x": np.full(2, F32_MAX, dtype=np.float32)} for _ in range(3)])
    with pytest.raises(AggregationError, match="overflows"):
        big["x"].sum()
    with pytest.raises(AggregationError, match="overflows"):
        big["x"].aggregate(Sum())


vectors = hnp.arrays(
    st.sampled_from([np.float32, np.float64]),
    st.integers(1, 20),
    elements=st.floats(-1e20, 1e20, allow_nan=False).map(lambda v: float(np.float32(v))),
)


@settings(max_examples=100, deadline=None)
@given(value=vectors, clip=st.floats(1e-3, 1e3))
def test_the_one_clip_bounds_the_norm_and_keeps_the_direction(
    value: np.ndarray, clip: float
) -> None:
    clipped, norms = clip_rows(value.reshape(1, -1), clip)
    out = clipped[0]
    assert out.dtype == value.dtype
    norm = l2_norm(value)
    assert norms[0] == pytest.approx(norm, rel=1e-6)
    assert l2_norm(out) <= clip * (1 + 1e-5)
    if norm <= clip:
        np.testing.assert_array_equal(out, value)
    else:
        np.testing.assert_allclose(out, value * (clip / norm), rtol=1e-5, atol=1e-30)
    # The stage and the secure sum's node-side clip are this same kernel.
    np.testing.assert_array_equal(Clip(clip).apply_rows(value.reshape(1, -1))[0], out)
    np.testing.assert_array_equal(secagg_aggregate._clip(value, clip), out)


def test_norm_survives_squares_beyond_float64() -> None:
    v = np.array([1e200, 1e200])
    assert l2_norm(v) == pytest.approx(np.sqrt(2) * 1e200)
    assert l2_norm(np.array([np.inf, 1.0])) == np.inf
