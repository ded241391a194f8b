"""Exact integer sums through SecureSum's quantizer: no rounding, for any node count."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.crypto.quantize import Quantizer
from shoal.errors import AggregationError, DataError
from shoal.trees import exact


@given(
    nodes=st.integers(min_value=1, max_value=70_000),
    present=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_secure_sum_of_limbs_is_the_exact_integer_sum(nodes: int, present: int, seed: int) -> None:
    if nodes > 65_537:  # (2**32 - 1) // nodes < 2**16 - 1: a 16-bit limb no longer fits
        with pytest.raises(AggregationError, match="too many nodes"):
            exact.encode(np.zeros(2, np.int64), offset=exact.offset_for(nodes))
        return
    rng = np.random.default_rng(seed)
    count = min(present, nodes)
    xs = [rng.integers(-(2**47) + 1, 2**47, size=7) for _ in range(count)]
    offset = exact.offset_for(nodes)
    quantizer = Quantizer(clip=offset, max_inputs=nodes, bits=exact.BITS)
    codes = [quantizer.quantize(exact.encode(x, offset=offset)) for x in xs]
    # the worst case for wrap-around: every holder at the largest code
    assert int(max(c.max() for c in codes)) * nodes <= 2**exact.BITS - 1
    total = np.sum([c.astype(np.uint64) for c in codes], axis=0) % 2**exact.BITS
    value, n = exact.decode(quantizer.dequantize_sum(total, count=count), offset=offset)
    assert n == count
    np.testing.assert_array_equal(value, np.sum(xs, axis=0))


def test_plain_sums_are_exact_too_and_bad_sums_are_refused() -> None:
    xs = [np.array([2**46, -(2**46), 5]), np.array([3, 4, -5])]
    total = np.sum([exact.encode(x, offset=None) for x in xs], axis=0)
    value, n = exact.decode(total, offset=None)
    assert n == 2 and value.tolist() == [2**46 + 3, -(2**46) + 4, 0]
    with pytest.raises(DataError, match="too large"):
        exact.encode(np.array([2**47]), offset=None)
    with pytest.raises(AggregationError, match="not a sum"):
        exact.decode(np.array([0.5, 1.0]), offset=None)
