"""Tests of the DP mechanisms: noise laws, adaptive clipping, distributed noise.

Clipping is the library's one L2 clip (tests/aggregate/test_kernels.py); DP-FedAvg is the
``NodeDP`` plan's chain (tests/privacy/test_plans.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from shoal.aggregate import Reduced
from shoal.errors import ConfigError
from shoal.privacy import (
    adaptive_update_noise_multiplier,
    distributed_noise_std,
    make_rng,
    next_clip_norm,
)
from shoal.privacy.stages import GaussianNoise

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


def gaussian(std: float, size: int, seed: int) -> np.ndarray:
    """The library's Gaussian noise stage, applied to a zero aggregate."""
    zero = Reduced(vector=np.zeros(size), count=1, weight=1.0, averaged=False, layout=None)
    return GaussianNoise(std, seed=seed).apply(zero).vector


def test_gaussian_noise_has_the_intended_std() -> None:
    std = 2.5
    noise = gaussian(std, 20_000, 123)
    # Right shape of distribution (KS) and right variance (chi-square on the sample variance).
    assert stats.kstest(noise, "norm", args=(0.0, std)).pvalue > 1e-3
    n = noise.size
    chi2 = (n - 1) * noise.var(ddof=1) / std**2
    p_var = 2 * min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1))
    assert p_var > 1e-3


def test_std_test_has_power_against_wrong_noise() -> None:
    # The same test must reject noise that is 5% too small, or it would prove nothing above.
    noise = gaussian(2.5 * 0.95, 20_000, 123)
    n = noise.size
    chi2 = (n - 1) * noise.var(ddof=1) / 2.5**2
    assert stats.chi2.cdf(chi2, n - 1) < 1e-6


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
        # What NodeDP's accounting does: nodes report b - 1/2, the server noises the sum.
        centred = (norms <= clip).sum() - 50 + rng.normal(0.0, 100 / 20)
        b = centred / 100 + 0.5
        clip = next_clip_norm(clip, b, 0.7, 0.2)
    true_quantile = float(np.exp(0.5 * stats.norm.ppf(0.7)))
    assert clip == pytest.approx(true_quantile, rel=0.15)


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
    shares = [rng.normal(0.0, per, size=20_000) for _ in range(n)]
    summed = np.sum(shares, axis=0)
    assert stats.kstest(summed, "norm", args=(0.0, total)).pvalue > 1e-3


def test_conservative_distributed_noise_covers_dropouts() -> None:
    per = distributed_noise_std(total_std=2.0, nodes=100, min_survivors=60)
    assert per * math.sqrt(60) == pytest.approx(2.0)  # independent shares add in variance
    assert per * math.sqrt(100) > 2.0
    # The plain variant falls short when nodes drop, which is the documented caveat.
    plain = distributed_noise_std(total_std=2.0, nodes=100)
    assert plain * math.sqrt(60) < 2.0
    for kwargs in (
        {"nodes": 0},
        {"nodes": 10, "min_survivors": 11},
        {"nodes": 10, "min_survivors": 0},
    ):
        with pytest.raises(ConfigError):
            distributed_noise_std(total_std=1.0, **kwargs)  # type: ignore[arg-type]
