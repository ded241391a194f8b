"""Exact integer sums through SecureSum: fixed-point histograms add up bit for bit.

SecureSum quantizes floats in [-c, c] onto a grid of ``levels`` steps. With ``2c = levels``
the step is exactly 1, so a node that sends ``limb - c`` for an integer ``limb`` in
[0, 2**16) is quantized without rounding. Each signed integer (|x| < 2**47) travels as three
16-bit limbs of ``x + 2**47``; a trailing 1 counts the nodes that made it into the sum.
"""

from __future__ import annotations

import numpy as np

from shoal.crypto.quantize import Quantizer
from shoal.errors import AggregationError, DataError

__all__ = ["BITS", "LIMIT", "decode", "encode", "offset_for"]

BITS = 32  # SecAgg+ modulus; 16-bit limbs of up to 65535 nodes fit it
LIMIT = 2**47  # |x| must stay below this at each node
_LIMB = 2**16


def offset_for(nodes: int) -> float:
    """The value range ``c`` (half the grid) for a secure sum over ``nodes`` holders."""
    return Quantizer(clip=1.0, max_inputs=nodes, bits=BITS).levels / 2.0


def encode(x: np.ndarray, *, offset: float | None) -> np.ndarray:
    """A node's integers as what it contributes: limbs shifted by ``-offset`` for a secure
    sum, or the integers themselves (as float64, exact) for a plain one."""
    x = np.asarray(x, dtype=np.int64).ravel()
    if x.size and int(np.abs(x).max()) >= LIMIT:
        raise DataError(
            "a histogram sum is too large for the fixed-point encoding; lower "
            "fixed_point_bits or bound the gradients (e.g. scale regression targets)"
        )
    if offset is None:
        return np.concatenate([x.astype(np.float64), [1.0]])
    u = x + LIMIT
    limbs = np.stack([u % _LIMB, (u // _LIMB) % _LIMB, u // _LIMB**2]).ravel()
    return np.concatenate([limbs.astype(np.float64), [1.0]]) - offset


def decode(total: np.ndarray, *, offset: float | None) -> tuple[np.ndarray, int]:
    """The exact integer sums and the number of nodes in them, from a (secure) sum."""
    total = np.asarray(total, dtype=np.float64).ravel()
    if offset is None:
        count = total[-1]
        sums = total[:-1]
    else:
        count = total[-1] / (1.0 - offset)
        sums = total[:-1] + round(count) * offset
    if count != round(count) or count < 1 or not np.array_equal(sums, np.round(sums)):
        raise AggregationError("the sum is not a sum of exact integer encodings")
    n = round(count)
    if offset is None:
        return sums.astype(np.int64), n
    limbs = sums.astype(np.int64).reshape(3, -1)
    value = limbs[0] + limbs[1] * _LIMB + limbs[2] * _LIMB**2 - n * LIMIT
    return value, n
