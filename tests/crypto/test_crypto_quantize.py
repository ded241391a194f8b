from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.crypto import Quantizer
from shoal.errors import AggregationError, ConfigError

floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 50), elements=floats),
    st.floats(1e-3, 1e2),
    st.integers(1, 1000),
    st.sampled_from([16, 24, 32, 48, 64]),
)
def test_each_input_within_one_step(x: np.ndarray, clip: float, n: int, bits: int) -> None:
    if (2**bits - 1) // n < 1:
        return
    q = Quantizer(clip=clip, max_inputs=n, bits=bits)
    codes = q.quantize(x, rng=np.random.default_rng(0))
    assert codes.dtype == q.dtype and codes.shape == x.shape
    assert int(codes.max()) <= q.levels
    assert q.levels * n <= 2**bits - 1  # a sum of n inputs never wraps
    err = np.abs(q.dequantize(codes) - np.clip(x, -clip, clip))
    assert np.all(err <= q.step * (1 + 1e-9) + 1e-12 * clip)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.floats(0.1, 10.0), st.integers(0, 2**32 - 1))
def test_sum_of_inputs_dequantizes_with_offset(count: int, clip: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = Quantizer(clip=clip, max_inputs=20, bits=32)
    xs = rng.uniform(-2 * clip, 2 * clip, size=(count, 30))
    total = np.zeros(30, dtype=np.uint32)
    for x in xs:
        total += q.quantize(x, rng=rng)
    estimate = q.dequantize_sum(total, count=count)
    exact = np.clip(xs, -clip, clip).sum(axis=0)
    assert np.all(np.abs(estimate - exact) <= count * q.step * (1 + 1e-9))


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantizer(clip=1.0, max_inputs=1, bits=3)  # coarse grid: 7 levels, step 2/7
    x = np.full(200_000, 0.1)
    values = q.dequantize(q.quantize(x, rng=np.random.default_rng(1)))
    assert len(np.unique(values)) == 2  # rounds to the two neighbouring grid points
    # standard error of the mean is < step / (2 sqrt(n)) ~ 3.2e-4; allow 6 of them
    assert abs(values.mean() - 0.1) < 2e-3


def test_default_rng_draws_fresh_randomness() -> None:
    q = Quantizer(clip=1.0, max_inputs=1, bits=4)
    x = np.full(1000, 0.05)
    assert not np.array_equal(q.quantize(x), q.quantize(x))


def test_validation() -> None:
    with pytest.raises(ConfigError, match="bits"):
        Quantizer(clip=1.0, max_inputs=300, bits=8)
    with pytest.raises(ConfigError):
        Quantizer(clip=0.0, max_inputs=1)
    with pytest.raises(ConfigError):
        Quantizer(clip=float("inf"), max_inputs=1)
    with pytest.raises(ConfigError):
        Quantizer(clip=1.0, max_inputs=0)
    with pytest.raises(ConfigError):
        Quantizer(clip=1.0, max_inputs=1, bits=65)
    q = Quantizer(clip=1.0, max_inputs=4, bits=16)
    with pytest.raises(AggregationError, match="non-finite"):
        q.quantize(np.array([0.0, np.nan]))
    with pytest.raises(ConfigError):
        q.dequantize_sum(np.zeros(2, dtype=np.uint32), count=5)
    with pytest.raises(AggregationError):
        q.dequantize_sum(np.array([q.levels * 2 + 1], dtype=np.uint32), count=2)
    with pytest.raises(AggregationError):
        q.dequantize_sum(np.array([0.5]), count=1)


def test_os_entropy_rounding_is_unbiased() -> None:
    # The default noise comes from an AES keystream, not a Generator: check it the same way.
    q = Quantizer(clip=1.0, max_inputs=1, bits=3)
    values = q.dequantize(q.quantize(np.full(200_000, 0.1)))
    assert len(np.unique(values)) == 2
    assert abs(values.mean() - 0.1) < 2e-3


def test_float32_input_rounds_like_its_float64_value() -> None:
    x = np.random.default_rng(3).uniform(-2, 2, size=1000).astype(np.float32)
    q = Quantizer(clip=1.5, max_inputs=10, bits=32)
    a = q.quantize(x, rng=np.random.default_rng(9))
    b = q.quantize(x.astype(np.float64), rng=np.random.default_rng(9))
    assert np.array_equal(a, b)


def test_results_do_not_share_the_scratch_buffers() -> None:
    q = Quantizer(clip=1.0, max_inputs=4, bits=32)
    first = q.quantize(np.full(500, -1.0))
    kept = first.copy()
    q.quantize(np.full(500, 1.0))
    q.quantize(np.full(2000, 0.5))  # a bigger call may regrow the scratch
    assert np.array_equal(first, kept)
    assert int(first.max()) == 0


def test_rounding_stays_unbiased_on_the_finest_grid() -> None:
    # levels = 2**52: scaled values near 2**51 have a float64 spacing of 0.5, where adding
    # noise before flooring would round the sum itself and round up 3 times in 4
    q = Quantizer(clip=1.0, max_inputs=1, bits=64)
    assert q.levels == 2**52
    x = np.full(100_000, 2.0**-52)  # scales to exactly 2**51 + 0.5
    codes = q.quantize(x) - np.uint64(2**51)
    assert set(np.unique(codes).tolist()) == {0, 1}
    assert abs(codes.mean() - 0.5) < 0.01


def test_values_at_the_clip_never_round_above_the_grid() -> None:
    """On a fine grid (48 bits, 3 inputs) scaling the clip value lands a hair above the top
    level; a code above it could make a sum of max_inputs codes wrap. Found by hypothesis."""
    q = Quantizer(clip=78.875, max_inputs=3, bits=48)
    for x in (78.875, 79.0, 1e6):
        codes = q.quantize(np.full(1000, x), rng=np.random.default_rng(1))
        assert int(codes.max()) == q.levels and int(codes.min()) == q.levels
