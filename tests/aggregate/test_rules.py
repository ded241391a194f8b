"""Tests for shoal.aggregate.rules: each rule against a naive loop reference, plus invariants."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.aggregate.rules import (
    all_finite,
    clip_l2,
    coordinate_median,
    geometric_median,
    krum,
    krum_scores,
    l2_norm,
    multi_krum,
    pairwise_sq_distances,
    total,
    trimmed_mean,
    weighted_mean,
)
from shoal.core import reduce
from shoal.errors import AggregationError, ShoalError

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values drawn from a small set as well as a range, so that ties, duplicate rows and
# coinciding points (the hard cases for medians and Weiszfeld) come up often.
ELEMENTS = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
    st.sampled_from([0.0, 1.0, -1.0, 2.5]),
)
GRID = st.integers(-6, 6).map(float)
MAX = float(np.finfo(np.float64).max)
EXTREME = ELEMENTS | st.sampled_from([MAX, -MAX, 1e300, -1e300, 1e200, -1e160, 5e-324])


@st.composite
def matrices(
    draw: st.DrawFn,
    *,
    min_n: int = 1,
    max_n: int = 9,
    max_d: int = 5,
    elements: st.SearchStrategy[float] = ELEMENTS,
) -> np.ndarray:
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    return draw(hnp.arrays(np.float64, (n, d), elements=elements))


def weights_for(n: int) -> st.SearchStrategy[np.ndarray]:
    w = hnp.arrays(np.float64, (n,), elements=st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.25]))
    return w.filter(lambda a: a.sum() > 0)


# Every rule's scratch memory is bounded by processing columns in blocks; shrinking the
# block size exercises the multi-block paths (including one column per block).
BLOCKS = st.sampled_from([1, 3, 7, reduce._BLOCK_ELEMENTS])


@contextmanager
def block_size(elements: int) -> Iterator[None]:
    with mock.patch.object(reduce, "_BLOCK_ELEMENTS", elements):
        yield


def scale_of(x: np.ndarray) -> float:
    return float(np.abs(x).max()) + 1.0


# --------------------------------------------------------------------------- references


def ref_weighted_mean(x: np.ndarray, w: np.ndarray | None) -> list[float]:
    n, d = x.shape
    ws = [1.0] * n if w is None else [float(v) for v in w]
    wsum = math.fsum(ws)
    return [math.fsum(ws[i] * x[i, j] for i in range(n)) / wsum for j in range(d)]


def ref_total(x: np.ndarray) -> list[float]:
    return [math.fsum(x[:, j]) for j in range(x.shape[1])]


def ref_norm(row: np.ndarray) -> float:
    return math.sqrt(math.fsum(float(v) * float(v) for v in row))


def ref_clip(x: np.ndarray, c: float) -> list[list[float]]:
    out = []
    for row in x:
        norm = ref_norm(row)
        factor = 1.0 if norm <= c else c / norm
        out.append([float(v) * factor for v in row])
    return out


def ref_median(x: np.ndarray) -> list[float]:
    n, d = x.shape
    out = []
    for j in range(d):
        col = sorted(float(v) for v in x[:, j])
        out.append(col[n // 2] if n % 2 else (col[n // 2 - 1] + col[n // 2]) / 2)
    return out


def ref_trimmed_mean(x: np.ndarray, beta: float) -> list[float]:
    n, d = x.shape
    k = math.floor(round(beta * n, 9))  # beta * n as meant, not its float rounding
    out = []
    for j in range(d):
        kept = sorted(float(v) for v in x[:, j])[k : n - k]
        out.append(math.fsum(kept) / len(kept))
    return out


def ref_sq_dist(a: np.ndarray, b: np.ndarray) -> float:
    return math.fsum((float(p) - float(q)) ** 2 for p, q in zip(a, b))


def ref_krum_scores(x: np.ndarray, f: int) -> list[float]:
    n = x.shape[0]
    scores = []
    for i in range(n):
        dists = sorted(ref_sq_dist(x[i], x[j]) for j in range(n) if j != i)
        scores.append(math.fsum(dists[: n - f - 2]))
    return scores


def objective(x: np.ndarray, w: np.ndarray | None, y: np.ndarray) -> float:
    ws = np.ones(len(x)) if w is None else w
    return float(ws @ np.sqrt(((x - y) ** 2).sum(axis=1)))


def ref_weiszfeld(x: np.ndarray, w: np.ndarray | None, iters: int = 2000) -> np.ndarray:
    """Plain Weiszfeld, skipping points the iterate sits on."""
    n, d = x.shape
    ws = [1.0] * n if w is None else [float(v) for v in w]
    y = np.array(ref_weighted_mean(x, w))
    for _ in range(iters):
        num = np.zeros(d)
        den = 0.0
        for i in range(n):
            dist = math.sqrt(ref_sq_dist(x[i], y))
            if dist > 1e-12 and ws[i] > 0:
                num += ws[i] * x[i] / dist
                den += ws[i] / dist
        if den == 0.0:
            break
        y = num / den
    return y


# --------------------------------------------------------------------------- means


@PROPS
@given(data=st.data(), x=matrices(), blocks=BLOCKS)
def test_weighted_mean_matches_reference(data: st.DataObject, x: np.ndarray, blocks: int) -> None:
    w = data.draw(st.none() | weights_for(len(x)))
    with block_size(blocks):
        got = weighted_mean(x, w)
    np.testing.assert_allclose(got, ref_weighted_mean(x, w), rtol=1e-12, atol=1e-12 * scale_of(x))


@PROPS
@given(x=matrices())
def test_total_matches_reference(x: np.ndarray) -> None:
    np.testing.assert_allclose(total(x), ref_total(x), rtol=1e-12, atol=1e-12 * scale_of(x))


@PROPS
@given(data=st.data(), row=hnp.arrays(np.float64, st.integers(1, 6), elements=ELEMENTS))
def test_weighted_mean_of_equal_rows_is_that_row(data: st.DataObject, row: np.ndarray) -> None:
    n = data.draw(st.integers(1, 8))
    x = np.tile(row, (n, 1))
    w = data.draw(st.none() | weights_for(n))
    np.testing.assert_allclose(weighted_mean(x, w), row, rtol=1e-14, atol=1e-300)


def test_zero_weight_leaves_a_row_out() -> None:
    x = np.array([[1.0, 2.0], [100.0, -50.0], [3.0, 4.0]])
    np.testing.assert_allclose(weighted_mean(x, [1, 0, 3]), weighted_mean(x[[0, 2]], [1, 3]))


def test_huge_weights_do_not_overflow() -> None:
    x = np.array([[0.0], [4.0]])
    np.testing.assert_allclose(weighted_mean(x, [1e308, 1e308]), [2.0])


# --------------------------------------------------------------------------- clipping


@PROPS
@given(
    x=matrices(elements=ELEMENTS | st.just(0.0)),
    c=st.floats(1e-3, 1e4),
    blocks=BLOCKS,
)
def test_clip_matches_reference(x: np.ndarray, c: float, blocks: int) -> None:
    with block_size(blocks):
        clipped, norms = clip_l2(x, c)
    np.testing.assert_allclose(clipped, ref_clip(x, c), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(norms, [ref_norm(r) for r in x], rtol=1e-12)
    assert norms.dtype == np.float64


@PROPS
@given(x=matrices(), c=st.floats(1e-3, 1e4), dtype=st.sampled_from([np.float32, np.float64]))
def test_clip_never_increases_a_norm_and_bounds_it(x: np.ndarray, c: float, dtype: Any) -> None:
    x = x.astype(dtype)
    clipped, _ = clip_l2(x, c)
    assert clipped.dtype == dtype
    before = np.linalg.norm(x.astype(np.float64), axis=1)
    after = np.linalg.norm(clipped.astype(np.float64), axis=1)
    # Scaling by a factor <= 1 cannot grow any entry, so not even rounding can grow a norm.
    assert (np.abs(clipped) <= np.abs(x)).all()
    assert (after <= before).all()
    assert (after <= c * (1 + 4 * np.finfo(dtype).eps)).all()
    # Rows already inside the ball are untouched.
    inside = before <= c * (1 - 1e-6)
    np.testing.assert_array_equal(clipped[inside], x[inside])


def test_clip_keeps_zero_rows_zero_and_handles_huge_entries() -> None:
    x = np.array([[0.0, 0.0, 0.0], [1e200, -1e200, 0.0], [3.0, 4.0, 0.0]])
    clipped, norms = clip_l2(x, 1.0)
    np.testing.assert_array_equal(clipped[0], 0.0)
    np.testing.assert_allclose(norms, [0.0, math.sqrt(2) * 1e200, 5.0])
    np.testing.assert_allclose(np.linalg.norm(clipped[1:], axis=1), [1.0, 1.0])
    np.testing.assert_allclose(clipped[1], [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0])


# --------------------------------------------------------------------------- coordinate-wise


@PROPS
@given(x=matrices(max_n=12), blocks=BLOCKS)
@example(x=np.array([[-535.12991988], [489.0]]), blocks=1)  # the middle rounds at 535's scale
def test_median_matches_reference_and_lies_within_range(x: np.ndarray, blocks: int) -> None:
    with block_size(blocks):
        got = coordinate_median(x)
    # lower + (upper - lower) / 2 (which cannot overflow) rounds at the inputs' scale, so a
    # middle near 0 between large values of opposite sign may differ from (a + b) / 2 there
    tol = 2 * np.finfo(np.float64).eps * scale_of(x)
    np.testing.assert_allclose(got, ref_median(x), rtol=1e-15, atol=tol)
    assert (got >= x.min(axis=0)).all()
    assert (got <= x.max(axis=0)).all()


@PROPS
@given(data=st.data(), x=matrices(max_n=12), blocks=BLOCKS)
def test_trimmed_mean_matches_reference_and_lies_within_range(
    data: st.DataObject, x: np.ndarray, blocks: int
) -> None:
    beta = data.draw(st.floats(0.0, 0.49))
    with block_size(blocks):
        got = trimmed_mean(x, beta)
    want = ref_trimmed_mean(x, beta)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale_of(x))
    assert (got >= x.min(axis=0)).all()
    assert (got <= x.max(axis=0)).all()


def test_trimmed_mean_trims_f_values_for_beta_f_over_n() -> None:
    # 0.29 * 100 is 28.999999999999996 in floats; 29 outliers at each end must all go
    x = np.concatenate([np.full(29, -1e9), np.arange(42.0), np.full(29, 1e9)])[:, None]
    np.testing.assert_allclose(trimmed_mean(x, 0.29), [20.5])


def test_trimmed_mean_ignores_extremes_and_beta_zero_is_the_mean() -> None:
    x = np.array([[1.0], [2.0], [3.0], [1e9], [-1e9]])
    np.testing.assert_allclose(trimmed_mean(x, 0.2), [2.0])
    np.testing.assert_allclose(trimmed_mean(x, 0.0), weighted_mean(x))
    # The plain mean of seven copies of this value rounds to a neighbour of it.
    same = np.full((7, 1), 714.8085531751387)
    assert same.sum() / 7 != same[0, 0]
    assert trimmed_mean(same, 0.0)[0] == trimmed_mean(same, 0.2)[0] == same[0, 0]


def test_median_of_float32_stays_float32_and_is_a_midpoint() -> None:
    x = np.array([[3e38], [3e38], [1.0], [2.0]], dtype=np.float32)
    got = coordinate_median(x)
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [1.5e38], rtol=1e-6)


# --------------------------------------------------------------------------- distances, Krum


@PROPS
@given(x=matrices(), blocks=BLOCKS)
def test_pairwise_sq_distances_match_reference(x: np.ndarray, blocks: int) -> None:
    with block_size(blocks):
        got = pairwise_sq_distances(x)
    n = len(x)
    want = [[ref_sq_dist(x[i], x[j]) for j in range(n)] for i in range(n)]
    spread = float(np.ptp(x, axis=0).max()) if n > 1 else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * (spread + 1) ** 2 * x.shape[1])
    assert (got >= 0).all()
    np.testing.assert_array_equal(np.diag(got), 0.0)
    np.testing.assert_array_equal(got, got.T)


def test_pairwise_sq_distances_are_accurate_far_from_the_origin() -> None:
    # Without centring, |a|^2 + |b|^2 - 2ab at 1e6 loses every digit of a 1e-3 distance.
    rng = np.random.default_rng(0)
    for offset, noise, dtype in [(1e6, 1e-3, np.float64), (1e3, 1e-2, np.float32)]:
        x = (offset + noise * rng.standard_normal((6, 50))).astype(dtype)
        exact = x.astype(np.float64)
        want = ((exact[:, None, :] - exact[None, :, :]) ** 2).sum(axis=2)
        np.testing.assert_allclose(pairwise_sq_distances(x), want, rtol=1e-6)


@PROPS
@given(data=st.data(), x=matrices(min_n=3, max_n=10))
def test_krum_scores_match_reference(data: st.DataObject, x: np.ndarray) -> None:
    n = len(x)
    f = data.draw(st.integers(0, (n - 3) // 2))
    got = krum_scores(x, f)
    want = ref_krum_scores(x, f)
    spread = float(np.ptp(x, axis=0).max())
    tol = 1e-9 * (spread + 1) ** 2 * x.shape[1] * n
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=tol)
    best = krum(x, f)
    assert want[best] <= min(want) + 2 * tol + 1e-9 * min(want)


@st.composite
def honest_and_attackers(draw: st.DrawFn) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Honest updates: small noise around a point; f attackers far away."""
    f = draw(st.integers(0, 4))
    honest = draw(st.integers(f + 3, f + 8))
    d = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**32 - 1))
    colluding = draw(st.booleans())
    # Byzantine nodes may send any finite value, including ones whose squares overflow.
    far = draw(st.sampled_from([1e3, 1e200, 1e300, MAX]))
    rng = np.random.default_rng(seed)
    center = rng.uniform(-10, 10, size=d)
    good = center + 0.01 * rng.standard_normal((honest, d))
    if far == MAX:
        bad = MAX * rng.choice([-1.0, 1.0], size=(1 if colluding else f, d))
    else:
        bad = center + far * rng.standard_normal((1 if colluding else f, d))
    bad = np.broadcast_to(bad, (f, d))
    x = np.vstack([good, bad])
    order = rng.permutation(len(x))
    return x[order], f, honest, order


@PROPS
@given(case=honest_and_attackers(), data=st.data())
def test_krum_and_multi_krum_select_honest_updates(
    case: tuple[np.ndarray, int, int, np.ndarray], data: st.DataObject
) -> None:
    x, f, honest, order = case
    is_honest = order < honest
    assert is_honest[krum(x, f)]
    m = data.draw(st.integers(1, honest))
    mean, selected = multi_krum(x, f, m)
    assert len(selected) == m == len(set(selected.tolist()))
    assert is_honest[selected].all()
    np.testing.assert_allclose(mean, x[selected].mean(axis=0), rtol=1e-12, atol=1e-12)
    scores = krum_scores(x, f)
    assert (np.diff(scores[selected]) >= 0).all()


def test_krum_of_one_far_attacker_among_identical_honest() -> None:
    x = np.array([[1.0, 1.0]] * 4 + [[1e9, -1e9]])
    assert krum(x, 1) == 0  # ties between identical rows go to the lowest index
    mean, selected = multi_krum(x, 1, 4)
    np.testing.assert_array_equal(selected, [0, 1, 2, 3])
    np.testing.assert_array_equal(mean, [1.0, 1.0])


# --------------------------------------------------------------------------- geometric median


@PROPS
@given(data=st.data(), x=matrices(max_n=7, max_d=3, elements=GRID))
def test_geometric_median_is_at_least_as_good_as_reference(
    data: st.DataObject, x: np.ndarray
) -> None:
    w = data.draw(st.none() | weights_for(len(x)))
    got = geometric_median(x, w, eps=1e-10, max_iter=5000)
    best_known = min(
        objective(x, w, ref_weiszfeld(x, w)),
        *(objective(x, w, row) for row in x),
    )
    assert objective(x, w, got) <= best_known * (1 + 1e-7) + 1e-9


@PROPS
@given(data=st.data(), x=matrices(max_n=7, max_d=3, elements=GRID))
def test_geometric_median_satisfies_the_optimality_condition(
    data: st.DataObject, x: np.ndarray
) -> None:
    """0 is in the subdifferential: the pull of the other points is at most the weight at y."""
    w = data.draw(st.none() | weights_for(len(x)))
    ws = np.ones(len(x)) if w is None else w
    y = geometric_median(x, w, eps=1e-12, max_iter=10000)
    dist = np.sqrt(((x - y) ** 2).sum(axis=1))
    at_y = dist <= 1e-9 * (float(dist.max()) + 1.0)
    away = ~at_y & (ws > 0)
    pull = np.linalg.norm((ws[away] / dist[away]) @ (x[away] - y))
    assert pull <= ws[at_y].sum() + 1e-4 * ws.sum()


def test_geometric_median_lands_on_a_majority_of_coinciding_points() -> None:
    p = np.array([1.0, 2.0, 3.0])
    x = np.array([p, p, p, [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    np.testing.assert_array_equal(geometric_median(x), p)
    np.testing.assert_array_equal(geometric_median(np.tile(p, (4, 1))), p)
    np.testing.assert_array_equal(geometric_median(p[None, :]), p)
    # The weighted version: a weight of 3 on one point is the same as three copies.
    np.testing.assert_array_equal(geometric_median(x[2:], [3, 1, 1]), p)
    # Not a majority, but still optimal: the other two pull in opposite directions.
    y = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [-5.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(geometric_median(y), [0.0, 0.0])


def test_geometric_median_returns_an_optimal_update_exactly_even_from_elsewhere() -> None:
    # The iteration starts at the coordinate-wise median (1, 1) and only approaches (0, 0).
    x = np.array([[0.0, 0.0], [10.0, 1.0], [1.0, 10.0]])
    np.testing.assert_array_equal(geometric_median(x, [3, 1, 1]), [0.0, 0.0])


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_geometric_median_finds_an_update_holding_half_the_weight(scale: float) -> None:
    # Found by hypothesis: (-1, -1) holds half the weight and is optimal, but the pull of
    # the other two is within 0.1% of that weight, so Weiszfeld crawls towards it (100
    # iterations stopped near (-0.58, -0.55)). The defaults must still return it exactly,
    # at any scale of the data.
    x = np.array([[0.0, 0.0], [-1.0, -1.0], [-1.0, -1.0], [4.0, 5.0]]) * scale
    np.testing.assert_array_equal(geometric_median(x), [-scale, -scale])
    np.testing.assert_array_equal(geometric_median(x[[0, 1, 3]], [1, 2, 1]), [-scale, -scale])


def test_a_far_update_still_pulls_when_its_squared_distance_overflows() -> None:
    # Fermat point of a triangle with one vertex straight up at 1e200: the directions to
    # the two near vertices are 30 degrees below the horizontal.
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1e200]])
    got = geometric_median(x, eps=1e-12, max_iter=1000)
    np.testing.assert_allclose(got, [0.5, 0.5 * math.tan(math.pi / 6)], atol=1e-9)


def test_geometric_median_of_collinear_points() -> None:
    np.testing.assert_allclose(
        geometric_median(np.array([[0.0], [1.0], [2.0], [10.0], [3.0]])), [2.0]
    )
    mid = geometric_median(np.array([[0.0], [1.0], [2.0], [3.0]]))
    assert 1.0 <= mid[0] <= 2.0


@PROPS
@given(case=honest_and_attackers())
def test_geometric_median_is_robust_to_a_minority_of_outliers(
    case: tuple[np.ndarray, int, int, np.ndarray],
) -> None:
    x, f, honest, order = case
    good = x[order < honest]
    center = good.mean(axis=0)
    radius = float(np.linalg.norm(good - center, axis=1).max())
    alpha = f / len(x)
    # Minsker (2015), Lemma 2.1: with fewer than half of the points outside a ball of
    # radius r, the geometric median lies within (1-alpha)/sqrt(1-2 alpha) * r of it.
    bound = (1 - alpha) / math.sqrt(1 - 2 * alpha) * radius
    got = geometric_median(x, eps=1e-9, max_iter=1000)
    assert np.linalg.norm(got - center) <= bound * 1.01 + 1e-9
    # Starting from the coordinate-wise median, a few iterations are already robust (as
    # RFA uses it); a start at the mean would be dragged up to ~1e300 away.
    quick = geometric_median(x, max_iter=3)
    assert np.linalg.norm(quick - center) <= 2 * bound + 1e-9
    with np.errstate(over="ignore"):  # the mean's distance may exceed the float range
        assert np.linalg.norm(weighted_mean(x) - center) > bound or f == 0


@PROPS
@given(x=matrices(max_n=9, elements=EXTREME), blocks=BLOCKS)
def test_extreme_finite_values_give_finite_results_without_warnings(
    x: np.ndarray, blocks: int
) -> None:
    """Warnings are errors in this suite, so any overflow left unhandled fails here."""
    low, high = x.min(axis=0), x.max(axis=0)
    # Relative slack for rounding, absolute slack for subnormal products rounding to 0.
    slack = 1e-12 * np.maximum(np.abs(low), np.abs(high)) + 1e-300
    with np.errstate(over="ignore"):  # +-inf bounds are fine at the float limit
        low, high = low - slack, high + slack
    with block_size(blocks):
        for got in (
            weighted_mean(x),
            weighted_mean(x, np.arange(1.0, len(x) + 1)),
            coordinate_median(x),
            trimmed_mean(x, 0.25),
            geometric_median(x, max_iter=20),
        ):
            assert np.isfinite(got).all()
            assert (got >= low).all()
            assert (got <= high).all()
        clipped, norms = clip_l2(x, 2.0)
        assert np.isfinite(clipped).all()
        assert not np.isnan(norms).any()
        assert (np.linalg.norm(clipped, axis=1) <= 2.0 * (1 + 1e-12)).all()
        dist = pairwise_sq_distances(x)
        assert not np.isnan(dist).any()
        assert (dist >= 0).all()
        np.testing.assert_array_equal(dist, dist.T)
        if len(x) >= 3:
            assert not np.isnan(krum_scores(x, 0)).any()
            assert np.isfinite(multi_krum(x, 0, 1)[0]).all()
        try:
            assert np.isfinite(total(x)).all()
        except AggregationError as err:
            assert "overflows" in str(err)


# --------------------------------------------------------------------------- invariants


@PROPS
@given(data=st.data(), x=matrices(min_n=1, max_n=9))
def test_every_rule_is_permutation_invariant(data: st.DataObject, x: np.ndarray) -> None:
    n = len(x)
    perm = np.array(data.draw(st.permutations(range(n))))
    y = x[perm]
    w = data.draw(weights_for(n))
    atol = 1e-10 * scale_of(x)
    np.testing.assert_allclose(weighted_mean(y), weighted_mean(x), rtol=1e-12, atol=atol)
    np.testing.assert_allclose(weighted_mean(y, w[perm]), weighted_mean(x, w), atol=atol)
    np.testing.assert_allclose(total(y), total(x), rtol=1e-12, atol=atol)
    np.testing.assert_array_equal(clip_l2(y, 1.0)[0], clip_l2(x, 1.0)[0][perm])
    np.testing.assert_array_equal(coordinate_median(y), coordinate_median(x))
    np.testing.assert_allclose(trimmed_mean(y, 0.2), trimmed_mean(x, 0.2), rtol=1e-12, atol=atol)
    # Trimming sorts each column, so beyond the plain mean the result is bit-identical.
    np.testing.assert_array_equal(trimmed_mean(y, 0.34), trimmed_mean(x, 0.34))
    gm_x, gm_y = geometric_median(x, w), geometric_median(y, w[perm])
    assert math.isclose(objective(x, w, gm_x), objective(x, w, gm_y), rel_tol=1e-6, abs_tol=1e-9)
    if n >= 3:
        f = data.draw(st.integers(0, (n - 3) // 2))
        sx, sy = krum_scores(x, f), krum_scores(y, f)
        spread = float(np.ptp(x, axis=0).max()) + 1
        tol = 1e-9 * spread**2 * x.shape[1] * n
        np.testing.assert_allclose(sy, sx[perm], rtol=1e-9, atol=tol)
        ranked = np.sort(sx)
        if n == 1 or ranked[1] - ranked[0] > 4 * tol:  # a clear winner, not a tie
            assert perm[krum(y, f)] == krum(x, f)
        m = data.draw(st.integers(1, n - f))
        if m == n or ranked[m] - ranked[m - 1] > 4 * tol:
            sel_x = set(multi_krum(x, f, m)[1].tolist())
            sel_y = {int(perm[i]) for i in multi_krum(y, f, m)[1]}
            assert sel_x == sel_y


RULES: list[tuple[str, Callable[[np.ndarray], Any]]] = [
    ("weighted_mean", weighted_mean),
    ("weighted_mean_w", lambda x: weighted_mean(x, np.arange(1, len(x) + 1))),
    ("total", total),
    ("clip_l2", lambda x: clip_l2(x, 1.0)[0]),
    ("coordinate_median", coordinate_median),
    ("trimmed_mean", lambda x: trimmed_mean(x, 0.2)),
    ("multi_krum", lambda x: multi_krum(x, 1, 3)[0]),
    ("geometric_median", geometric_median),
]


@pytest.mark.parametrize(("name", "rule"), RULES, ids=[r[0] for r in RULES])
def test_rules_keep_float32_and_leave_the_input_alone(
    name: str, rule: Callable[[np.ndarray], Any]
) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 40)).astype(np.float32)
    before = x.copy()
    got32 = rule(x)
    assert got32.dtype == np.float32, name
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(got32, rule(x.astype(np.float64)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "rule"), RULES, ids=[r[0] for r in RULES])
def test_rules_accept_integer_and_list_input(name: str, rule: Callable[[np.ndarray], Any]) -> None:
    x = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [0, 0], [2, 2]]
    got = rule(x)  # type: ignore[arg-type]
    assert got.dtype == np.float64, name
    np.testing.assert_allclose(got, rule(np.array(x, dtype=np.float64)))


# --------------------------------------------------------------------------- errors

GOOD = np.arange(12.0).reshape(6, 2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: weighted_mean(np.arange(4.0)), r"2-D.*reshape\(1, -1\)"),
        (lambda: total(np.zeros((2, 2, 2))), "2-D"),
        (lambda: coordinate_median(np.zeros((0, 3))), "no rows"),
        (lambda: weighted_mean(np.array([[1.0, np.nan], [1.0, 2.0]])), r"rows \[0\].*NaN"),
        (lambda: total(np.array([[1.0], [2.0], [np.inf]])), r"rows \[2\]"),
        (lambda: weighted_mean(np.array([["a"]])), "real numbers"),
        (lambda: weighted_mean(np.ones((2, 2), dtype=complex)), "real numbers"),
        (lambda: weighted_mean(GOOD, [1.0, 2.0]), r"shape \(6,\)"),
        (lambda: weighted_mean(GOOD, np.ones((6, 1))), r"shape \(6,\)"),
        (lambda: weighted_mean(GOOD, [1, 1, 1, -1, 1, 1]), "non-negative"),
        (lambda: weighted_mean(GOOD, [0] * 6), "sum to zero"),
        (lambda: weighted_mean(GOOD, [1, 1, 1, np.nan, 1, 1]), "NaN"),
        (lambda: geometric_median(GOOD, [0] * 6), "sum to zero"),
        (lambda: clip_l2(GOOD, 0.0), "max_norm must be a positive"),
        (lambda: clip_l2(GOOD, -1.0), "max_norm must be a positive"),
        (lambda: clip_l2(GOOD, math.inf), "max_norm must be a positive"),
        (lambda: clip_l2(GOOD, "big"), "max_norm must be a number"),
        (lambda: trimmed_mean(GOOD, 0.5), r"beta must be in \[0, 0.5\)"),
        (lambda: trimmed_mean(GOOD, -0.1), r"beta must be in \[0, 0.5\)"),
        (lambda: trimmed_mean(GOOD, math.nan), r"beta must be in"),
        (lambda: krum(GOOD, 2), r"at least n = 2f\+3 = 7 updates, got 6"),
        (lambda: krum_scores(GOOD[:2], 0), r"2f\+3 = 3"),
        (lambda: krum(GOOD, -1), "f must be at least 0"),
        (lambda: krum(GOOD, 1.5), "f must be an integer"),
        (lambda: krum(GOOD, True), "f must be an integer"),
        (lambda: multi_krum(GOOD, 1, 6), r"at most n - f = 5"),
        (lambda: multi_krum(GOOD, 1, 0), "m must be at least 1"),
        (lambda: multi_krum(GOOD[:2], 0, 1), "2f\\+3"),
        (lambda: geometric_median(GOOD, eps=0.0), "eps must be a positive"),
        (lambda: geometric_median(GOOD, max_iter=0), "max_iter must be at least 1"),
    ],
)
def test_bad_input_raises_a_clear_aggregation_error(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(AggregationError, match=match) as info:
        call()
    assert isinstance(info.value, ShoalError)
    assert isinstance(info.value, ValueError)


def test_errors_name_at_most_ten_bad_rows() -> None:
    x = np.full((15, 2), np.nan)
    with pytest.raises(AggregationError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\]"):
        coordinate_median(x)


def test_single_update_passes_through_every_rule() -> None:
    row = np.array([[0.5, -2.0, 3.0]])
    for got in (
        weighted_mean(row),
        total(row),
        coordinate_median(row),
        trimmed_mean(row, 0.4),
        geometric_median(row),
    ):
        np.testing.assert_array_equal(got, row[0])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=40),
    st.sampled_from([np.float32, np.float64]),
)
def test_l2_norm_sums_in_float64(values: list[float], dtype: Any) -> None:
    v = np.array(values, dtype=dtype)
    exact = math.sqrt(math.fsum(float(a) ** 2 for a in v.astype(np.float64)))
    assert math.isclose(l2_norm(v), exact, rel_tol=1e-12, abs_tol=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(width=32), min_size=0, max_size=30),
    st.sampled_from([np.float32, np.float64]),
)
def test_all_finite_agrees_with_isfinite(values: list[float], dtype: Any) -> None:
    v = np.array(values, dtype=dtype)
    assert all_finite(v) == bool(np.isfinite(v).all())
    assert all_finite(np.arange(5))
