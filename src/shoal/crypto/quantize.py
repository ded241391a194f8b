"""Fixed-point quantization into Z_(2^bits) for secure sums, and dequantization of the sum.

Each input is clipped to [-clip, clip], shifted to [0, 2 clip] and stochastically rounded onto
``levels + 1`` grid points, with ``levels`` chosen so that the sum of ``max_inputs`` values
never wraps modulo 2**bits; the sum of ``count`` inputs is mapped back by undoing the shift
``count`` times. Rounding is unbiased, and each input is off by less than one grid step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.aggregate.rules import all_finite, as_float
from shoal.crypto.prg import SEED_BYTES, keystream
from shoal.crypto.scratch import scratch
from shoal.errors import AggregationError, ConfigError

__all__ = ["MAX_LEVELS", "Quantizer", "dtype_for_bits"]

# float64 carries 53 bits: a finer grid would round in the float arithmetic, not stochastically.
MAX_LEVELS = 2**52


def dtype_for_bits(bits: int) -> np.dtype[Any]:
    """The smallest unsigned dtype whose wraparound arithmetic holds Z_(2^bits) (2^bits
    divides it): a 12-bit secure sum travels as 2 bytes a coordinate, not 4."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 64:
        raise ConfigError(f"bits must be an integer in [1, 64], got {bits!r}")
    for width, dtype in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
        if bits <= width:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass(frozen=True, kw_only=True)
class Quantizer:
    """Quantize vectors in [-clip, clip] so that up to ``max_inputs`` of them sum exactly."""

    clip: float
    max_inputs: int
    bits: int = 32

    def __post_init__(self) -> None:
        dtype_for_bits(self.bits)
        if not isinstance(self.clip, (int, float)) or not (
            math.isfinite(self.clip) and self.clip > 0
        ):
            raise ConfigError(f"clip must be a positive finite number, got {self.clip!r}")
        if not isinstance(self.max_inputs, int) or self.max_inputs < 1:
            raise ConfigError(f"max_inputs must be a positive integer, got {self.max_inputs!r}")
        if (2**self.bits - 1) // self.max_inputs < 1:
            raise ConfigError(
                f"{self.bits} bits cannot hold a sum of {self.max_inputs} inputs without "
                f"wrapping; use at least {self.max_inputs.bit_length() + 1} bits (32 is typical)"
            )

    @property
    def levels(self) -> int:
        """The largest quantized value of one input (the grid has ``levels + 1`` points)."""
        return min((2**self.bits - 1) // self.max_inputs, MAX_LEVELS)

    @property
    def step(self) -> float:
        """Grid spacing in input units: each quantized input is within one step of its input."""
        return 2.0 * float(self.clip) / self.levels

    @property
    def dtype(self) -> np.dtype[Any]:
        return dtype_for_bits(self.bits)

    def quantize(self, x: Any, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Clip, shift and stochastically round ``x`` to integers in [0, levels].

        Each scaled value ``s`` rounds up with probability equal to its fraction (``u <
        s - floor(s)`` for ``u`` uniform in [0, 1)), so each value is unbiased; the fraction
        is exact in float64, which ``floor(s + u)`` would not be on fine grids. The arithmetic
        runs in this thread's scratch buffers; only the integer result is allocated.
        """
        arr = as_float(x)
        if not all_finite(arr):
            raise AggregationError(
                "cannot quantize non-finite values (nan/inf); fix or drop them before a secure sum"
            )
        c, levels = float(self.clip), self.levels
        work = scratch("quantize.work", arr.size, np.float64).reshape(arr.shape)
        np.maximum(arr, -c, out=work)
        np.minimum(work, c, out=work)
        np.add(work, c, out=work)
        np.multiply(work, levels / (2.0 * c), out=work)
        # (2c) * (levels / 2c) can round above levels on fine grids; a code above levels
        # could make the sum of max_inputs codes wrap, so clamp to the grid.
        np.minimum(work, levels, out=work)
        noise = scratch("quantize.noise", arr.size, np.float64).reshape(arr.shape)
        if rng is None:
            # Rounding noise protects nothing secret, but fresh OS entropy keeps it
            # unpredictable; an AES keystream is the cheapest source of that much of it.
            raw = scratch("quantize.bits", 4 * arr.size + 15, np.uint8)
            bits = keystream(os.urandom(SEED_BYTES), 4 * arr.size, out=raw).view(np.uint32)
            np.multiply(bits.reshape(arr.shape), 2.0**-32, out=noise)
        else:
            rng.random(out=noise)
        low = scratch("quantize.low", arr.size, np.float64).reshape(arr.shape)
        np.floor(work, out=low)
        np.subtract(work, low, out=work)  # the fraction
        up = scratch("quantize.up", arr.size, np.bool_).reshape(arr.shape)
        np.less(noise, work, out=up)
        np.add(low, up, out=low)
        return low.astype(self.dtype)

    def dequantize_sum(self, total: Any, *, count: int) -> np.ndarray:
        """Map the exact sum of ``count`` quantized inputs back to the sum of the inputs."""
        if not isinstance(count, int) or not 0 <= count <= self.max_inputs:
            raise ConfigError(
                f"count must be an integer in [0, {self.max_inputs}] (this quantizer's "
                f"max_inputs), got {count!r}"
            )
        arr = np.asarray(total)
        if arr.dtype.kind not in "ui":
            raise AggregationError(f"a quantized sum is an integer array, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or int(arr.max()) > count * self.levels):
            raise AggregationError(
                f"a sum of {count} quantized inputs lies in [0, {count * self.levels}]; this "
                "one does not, so it was not made by this quantizer with this count"
            )
        return arr.astype(np.float64) * self.step - count * float(self.clip)

    def dequantize(self, q: Any) -> np.ndarray:
        """One quantized input back to its (clipped, rounded) value."""
        return self.dequantize_sum(q, count=1)
