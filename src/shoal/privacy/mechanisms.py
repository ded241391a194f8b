"""Differential-privacy math as pure functions: the noise source, adaptive clipping, noise shares.

``make_rng(None)`` seeds a fresh NumPy generator from ``os.urandom``, so noise is never
predictable from the outside. Pass an int seed only in tests.
"""

from __future__ import annotations

import math
import os

import numpy as np

from shoal.errors import ConfigError

__all__ = [
    "RngLike",
    "adaptive_update_noise_multiplier",
    "distributed_noise_std",
    "make_rng",
    "next_clip_norm",
    "skellam_noise",
]

RngLike = np.random.Generator | int | None


# ---------------------------------------------------------------------------------------------
# noise source


def make_rng(rng: RngLike = None) -> np.random.Generator:
    """Return the generator to draw DP noise from.

    ``None`` seeds a new PCG64 generator with 128 bits from ``os.urandom`` (the default that
    production code should use); an ``int`` gives a reproducible stream for tests; a
    ``Generator`` is used as is, so several calls can share one stream.

    Like every floating-point sampler, the noise is not hardened against the least-significant-bit
    attacks of Mironov (2012); that matters only if the exact float released can be observed.
    """
    if rng is None:
        return np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ConfigError(f"a noise seed must be a non-negative int, got {rng}")
        return np.random.default_rng(int(rng))
    raise ConfigError(
        f"rng must be None (secure default), an int seed or a numpy Generator, "
        f"got {type(rng).__name__}"
    )


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    ok = v >= 0 if allow_zero else v > 0
    if not (ok and math.isfinite(v)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# adaptive clipping to a quantile (Andrew et al. 2021)


def next_clip_norm(
    clip: float, unclipped_fraction_noised: float, target_quantile: float, lr: float
) -> float:
    """Geometric update of the clip norm towards the ``target_quantile`` of update norms.

    ``C * exp(-lr * (b - target_quantile))`` where ``b`` is the noised fraction of updates that
    were not clipped, clamped to [0, 1] first (noise can push it outside, and a fraction
    beyond that range would move the clip further than any real one could; TF Privacy clamps
    too): too many unclipped shrinks C, too few grows it. ``lr`` around 0.2 is the paper's
    default.
    """
    clip = _check_positive("clip", clip)
    lr = _check_positive("lr", lr, allow_zero=True)
    q = float(target_quantile)
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    b = float(unclipped_fraction_noised)
    if not math.isfinite(b):
        raise ConfigError(f"unclipped_fraction_noised must be finite, got {b!r}")
    b = min(max(b, 0.0), 1.0)
    return clip * math.exp(-lr * (b - q))


def adaptive_update_noise_multiplier(*, noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier for the update sum so that update and count together cost the given one.

    Andrew et al. (2021): releasing the update sum with multiplier z_u and the centred count with
    std sigma_b is one Gaussian mechanism with multiplier (z_u^-2 + (2 sigma_b)^-2)^-1/2. Record
    ``noise_multiplier`` in the ledger and use the returned z_u for the update noise.
    """
    z = _check_positive("noise_multiplier", noise_multiplier)
    sb = _check_positive("count_noise_std", count_noise_std)
    rest = z**-2 - (2.0 * sb) ** -2
    if rest <= 0:
        raise ConfigError(
            f"count_noise_std={sb} is too small for noise_multiplier={z}: it must exceed "
            f"{z / 2:g} (the paper uses expected_count / 20)"
        )
    return rest**-0.5


# ---------------------------------------------------------------------------------------------
# distributed DP, composed with secure aggregation


def distributed_noise_std(
    *, total_std: float, nodes: int, min_survivors: int | None = None
) -> float:
    """Std each node adds so that the secure sum of their noises has std ``total_std``.

    Independent Gaussians add in variance, so n nodes each adding ``total_std / sqrt(n)`` give
    ``total_std`` in the sum. Caveat: if only m < n nodes survive the round, the sum carries
    only ``total_std * sqrt(m/n)`` and the guarantee is weaker than accounted. Pass
    ``min_survivors`` (the round's minimum, below which it aborts) to size the noise for the
    worst case instead; nodes that do not add their share (malicious or colluding) count as
    not surviving. Noise is added before any quantization for secure aggregation.
    """
    total_std = _check_positive("total_std", total_std, allow_zero=True)
    if int(nodes) != nodes or nodes < 1:
        raise ConfigError(f"nodes must be a positive int, got {nodes!r}")
    n = int(nodes)
    if min_survivors is not None:
        if int(min_survivors) != min_survivors or not 1 <= min_survivors <= n:
            raise ConfigError(
                f"min_survivors must be an int in [1, nodes={n}], got {min_survivors!r}"
            )
        n = int(min_survivors)
    return total_std / math.sqrt(n)


def skellam_noise(rng: np.random.Generator, *, mu: float, size: int) -> np.ndarray:
    """Symmetric Skellam noise: Poisson(mu) - Poisson(mu) per coordinate (variance 2 mu),
    integers. Sums of independent Skellam(mu_i) are Skellam(sum mu_i) (Poisson laws add),
    so k parties each adding Skellam(mu / k) put exactly Skellam(mu) into a secure sum."""
    mu = _check_positive("mu", mu, allow_zero=True)
    noise: np.ndarray = (rng.poisson(mu, size) - rng.poisson(mu, size)).astype(np.int64)
    return noise
