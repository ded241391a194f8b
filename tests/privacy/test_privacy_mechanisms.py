"""Tests of the DP mechanisms: noise laws, clipping bounds, DP-FedAvg, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from shoal.errors import AggregationError, ConfigError
from shoal.privacy import (
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_by_l2_norm,
    distributed_noise_std,
    distributed_total_std,
    dp_fedavg_mean,
    dp_fedavg_mean_std,
    dp_fedavg_sum_std,
    gaussian_count,
    gaussian_sigma,
    gaussian_sum,
    l2_norm,
    laplace_count,
    laplace_mechanism,
    laplace_sum,
    make_rng,
    next_clip_norm,
    noised_unclipped_fraction,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    elements=st.floats(-1e6, 1e6, width=32),
)
clip_norms = st.floats(min_value=1e-3, max_value=1e3)


# -- noise source ---------------------------------------------------------------------------------


def test_default_rng_is_unpredictable_and_seeded_rng_is_reproducible() -> None:
    a = make_rng().normal(size=8)
    b = make_rng().normal(size=8)
    assert not np.array_equal(a, b)
    assert np.array_equal(make_rng(7).normal(size=8), make_rng(7).normal(size=8))
    gen = np.random.default_rng(1)
    assert make_rng(gen) is gen


@pytest.mark.parametrize("bad", [-1, 1.5, "seed", True])
def test_make_rng_rejects_bad_seeds(bad: object) -> None:
    with pytest.raises(ConfigError):
        make_rng(bad)  # type: ignore[arg-type]


# -- noise distributions --------------------------------------------------------------------------


def test_gaussian_noise_has_the_intended_std() -> None:
    std = 2.5
    noise = add_gaussian_noise(np.zeros(20_000), std=std, rng=123)
    # Right shape of distribution (KS) and right variance (chi-square on the sample variance).
    assert stats.kstest(noise, "norm", args=(0.0, std)).pvalue > 1e-3
    n = noise.size
    chi2 = (n - 1) * noise.var(ddof=1) / std**2
    p_var = 2 * min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1))
    assert p_var > 1e-3


def test_std_test_has_power_against_wrong_noise() -> None:
    # The same test must reject noise that is 5% too small, or it would prove nothing above.
    noise = add_gaussian_noise(np.zeros(20_000), std=2.5 * 0.95, rng=123)
    n = noise.size
    chi2 = (n - 1) * noise.var(ddof=1) / 2.5**2
    assert stats.chi2.cdf(chi2, n - 1) < 1e-6


def test_gaussian_noise_on_a_dict_keeps_keys_and_shapes() -> None:
    value = {"w": np.ones((3, 4), dtype=np.float32), "b": np.arange(5)}
    out = add_gaussian_noise(value, std=0.0, rng=0)
    assert set(out) == {"w", "b"}
    assert out["w"].shape == (3, 4) and out["w"].dtype == np.float64
    np.testing.assert_array_equal(out["b"], np.arange(5))
    a = add_gaussian_noise(value, std=1.0, rng=5)
    b = add_gaussian_noise(value, std=1.0, rng=5)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_laplace_mechanism_has_the_intended_scale() -> None:
    sens, eps = 2.0, 0.5
    noise = laplace_mechanism(np.zeros(20_000), sensitivity=sens, epsilon=eps, rng=9)
    assert stats.kstest(noise, "laplace", args=(0.0, sens / eps)).pvalue > 1e-3
    assert stats.kstest(noise, "laplace", args=(0.0, 1.1 * sens / eps)).pvalue < 1e-6


def test_laplace_count_and_sum() -> None:
    counts = np.array([laplace_count(10, epsilon=1.0, rng=s) for s in range(4000)])
    assert abs(counts.mean() - 10) < 0.1
    assert abs(counts.std() - math.sqrt(2)) < 0.1  # Laplace(b=1) has std sqrt(2)
    values = np.array([-5.0, 0.5, 2.0, 100.0])
    # Huge epsilon: almost no noise, so the clamped sum shows through.
    assert laplace_sum(values, epsilon=1e9, lower=-1, upper=1, rng=0) == pytest.approx(1.5)
    assert gaussian_sum(values, epsilon=1e3, delta=1e-5, lower=0, upper=2, rng=0) == (
        pytest.approx(4.5, abs=0.05)
    )
    assert gaussian_count(3, epsilon=1e3, delta=1e-5, rng=0) == pytest.approx(3, abs=0.05)


def test_sum_rejects_bad_bounds_and_values() -> None:
    with pytest.raises(ConfigError):
        laplace_sum([1.0], epsilon=1, lower=2, upper=1)
    with pytest.raises(AggregationError):
        laplace_sum([1.0, float("nan")], epsilon=1, lower=0, upper=1)
    with pytest.raises(ConfigError):
        laplace_count(1, epsilon=0)


@pytest.mark.parametrize(
    ("eps", "delta", "sens"), [(0.5, 1e-5, 1.0), (1.0, 1e-6, 2.0), (4, 1e-3, 1)]
)
def test_gaussian_sigma_meets_the_analytic_gaussian_bound(
    eps: float, delta: float, sens: float
) -> None:
    sigma = gaussian_sigma(epsilon=eps, delta=delta, sensitivity=sens)

    # Balle & Wang (2018), Theorem 8: the exact delta of the Gaussian mechanism at epsilon.
    def exact_delta(s: float) -> float:
        a = sens / (2 * s)
        b = eps * s / sens
        return float(stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b))

    assert exact_delta(sigma) <= delta * 1.001
    assert exact_delta(sigma * 0.99) > delta  # and no more noise than needed
    classic = sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    if eps < 1:
        assert sigma < classic


# -- clipping -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(value=arrays, clip=clip_norms)
def test_clip_bounds_the_norm_and_keeps_the_direction(value: np.ndarray, clip: float) -> None:
    out = clip_by_l2_norm(value, clip)
    assert out.shape == value.shape and out.dtype == value.dtype
    norm = l2_norm(value)
    assert l2_norm(out) <= clip * (1 + 1e-6)
    if norm <= clip:
        np.testing.assert_array_equal(out, value)
    else:
        # A positive multiple of the input, with the norm brought to the bound.
        scale = clip / norm
        np.testing.assert_allclose(out, value * scale, rtol=1e-5, atol=1e-30)
        assert l2_norm(out) == pytest.approx(clip, rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(
    parts=st.dictionaries(
        st.text("abcxyz", min_size=1, max_size=3),
        hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=5), elements=finite),
        min_size=1,
        max_size=4,
    ),
    clip=clip_norms,
)
def test_clip_of_a_dict_treats_it_as_one_vector(parts: dict[str, np.ndarray], clip: float) -> None:
    out = clip_by_l2_norm(parts, clip)
    assert set(out) == set(parts)
    keys = sorted(parts)
    flat_in = np.concatenate([parts[k].ravel() for k in keys])
    flat_out = np.concatenate([out[k].ravel() for k in keys])
    np.testing.assert_allclose(flat_out, clip_by_l2_norm(flat_in, clip), rtol=1e-9, atol=1e-300)
    assert l2_norm(out) <= clip * (1 + 1e-9)


def test_clip_rejects_nonfinite_and_bad_norms() -> None:
    with pytest.raises(AggregationError, match="NaN or infinity"):
        clip_by_l2_norm(np.array([1.0, np.inf]), 1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            clip_by_l2_norm(np.ones(3), bad)
    with pytest.raises(AggregationError):
        clip_by_l2_norm(np.array(["a"]), 1.0)


def test_clip_does_not_alias_its_input() -> None:
    v = np.ones(3)
    out = clip_by_l2_norm(v, 10.0)
    out[0] = 5
    assert v[0] == 1


# -- DP-FedAvg ------------------------------------------------------------------------------------


def test_dp_fedavg_without_noise_is_the_clipped_sum_over_the_expected_count() -> None:
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)} for _ in range(5)]
    out = dp_fedavg_mean(updates, clip_norm=0.5, noise_multiplier=0.0, expected_count=8, rng=0)
    expected = {k: sum(clip_by_l2_norm(u, 0.5)[k] for u in updates) / 8 for k in ("w", "b")}
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], expected[k])
    flat = dp_fedavg_mean(
        [np.ones(4) * 3, np.zeros(4)], clip_norm=1.0, noise_multiplier=0, expected_count=2
    )
    np.testing.assert_allclose(flat, np.full(4, 0.25))


def test_dp_fedavg_noise_has_the_documented_std() -> None:
    assert dp_fedavg_sum_std(clip_norm=2.0, noise_multiplier=1.5) == 3.0
    std = dp_fedavg_mean_std(clip_norm=2.0, noise_multiplier=1.5, expected_count=10)
    assert std == pytest.approx(0.3)
    out = dp_fedavg_mean(
        [np.zeros(50_000)], clip_norm=2.0, noise_multiplier=1.5, expected_count=10, rng=3
    )
    assert stats.kstest(out, "norm", args=(0.0, std)).pvalue > 1e-3


def test_dp_fedavg_rejects_mismatched_updates() -> None:
    with pytest.raises(AggregationError):
        dp_fedavg_mean([], clip_norm=1, noise_multiplier=1, expected_count=1)
    with pytest.raises(AggregationError):
        dp_fedavg_mean(
            [{"a": np.ones(2)}, {"b": np.ones(2)}],
            clip_norm=1,
            noise_multiplier=1,
            expected_count=2,
        )
    with pytest.raises(AggregationError):
        dp_fedavg_mean([np.ones(2), np.ones(3)], clip_norm=1, noise_multiplier=1, expected_count=2)


# -- adaptive clipping ----------------------------------------------------------------------------


def test_next_clip_norm_moves_towards_the_quantile() -> None:
    assert next_clip_norm(1.0, 0.9, 0.5, 0.2) < 1.0  # too many unclipped: shrink
    assert next_clip_norm(1.0, 0.1, 0.5, 0.2) > 1.0  # too many clipped: grow
    assert next_clip_norm(1.0, 0.5, 0.5, 0.2) == 1.0
    assert next_clip_norm(2.0, 0.8, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.2 * 0.3))
    with pytest.raises(ConfigError):
        next_clip_norm(1.0, 0.5, 1.5, 0.2)
    with pytest.raises(ConfigError):
        next_clip_norm(0.0, 0.5, 0.5, 0.2)


def test_adaptive_clipping_converges_to_the_target_quantile() -> None:
    rng = np.random.default_rng(0)
    clip = 0.01
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=100)
        b = noised_unclipped_fraction(
            unclipped_count=int((norms <= clip).sum()),
            participants=100,
            expected_count=100,
            noise_std=100 / 20,
            rng=rng,
        )
        clip = next_clip_norm(clip, b, 0.7, 0.2)
    true_quantile = float(np.exp(0.5 * stats.norm.ppf(0.7)))
    assert clip == pytest.approx(true_quantile, rel=0.15)


def test_noised_unclipped_fraction_without_noise_is_the_fraction() -> None:
    assert noised_unclipped_fraction(
        unclipped_count=3, participants=10, expected_count=10, noise_std=0
    ) == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        noised_unclipped_fraction(
            unclipped_count=11, participants=10, expected_count=10, noise_std=1
        )


def test_adaptive_noise_split_composes_back_to_the_total() -> None:
    z, sb = 1.0, 5.0
    zu = adaptive_update_noise_multiplier(noise_multiplier=z, count_noise_std=sb)
    assert zu > z
    assert (zu**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(ConfigError, match="too small"):
        adaptive_update_noise_multiplier(noise_multiplier=1.0, count_noise_std=0.4)


# -- distributed DP -------------------------------------------------------------------------------


def test_distributed_noise_sums_to_the_total_std() -> None:
    total, n = 3.0, 16
    per = distributed_noise_std(total_std=total, nodes=n)
    assert per == pytest.approx(total / 4)
    rng = np.random.default_rng(11)
    shares = [add_gaussian_noise(np.zeros(20_000), std=per, rng=rng) for _ in range(n)]
    summed = np.sum(shares, axis=0)
    assert stats.kstest(summed, "norm", args=(0.0, total)).pvalue > 1e-3
    assert distributed_total_std(per_node_std=per, survivors=n) == pytest.approx(total)


def test_conservative_distributed_noise_covers_dropouts() -> None:
    per = distributed_noise_std(total_std=2.0, nodes=100, min_survivors=60)
    assert distributed_total_std(per_node_std=per, survivors=60) == pytest.approx(2.0)
    assert distributed_total_std(per_node_std=per, survivors=100) > 2.0
    # The plain variant falls short when nodes drop, which is the documented caveat.
    plain = distributed_noise_std(total_std=2.0, nodes=100)
    assert distributed_total_std(per_node_std=plain, survivors=60) < 2.0
    for kwargs in (
        {"nodes": 0},
        {"nodes": 10, "min_survivors": 11},
        {"nodes": 10, "min_survivors": 0},
    ):
        with pytest.raises(ConfigError):
            distributed_noise_std(total_std=1.0, **kwargs)  # type: ignore[arg-type]
