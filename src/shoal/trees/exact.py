"""Exact integer sums through SecureSum: fixed-point histograms add up bit for bit.

SecureSum quantizes floats in [-c, c] onto a grid of ``levels`` steps. With ``2c = levels``
the step is exactly 1, so a node that sends ``limb - c`` for an integer ``limb`` in
[0, levels] is quantized without rounding. Each signed integer (|x| < 2**47) travels as
limbs of ``x + 2**47``: two of 24 bits for up to 256 nodes (where ``levels >= 2**24 - 1``),
three of 16 bits beyond; a trailing 1 counts the nodes that made it into the sum.
"""

from __future__ import annotations

import numpy as np

from shoal.crypto.quantize import Quantizer
from shoal.errors import AggregationError, DataError

__all__ = ["BITS", "LIMIT", "decode", "encode", "offset_for"]

BITS = 32  # SecAgg+ modulus
LIMIT = 2**47  # |x| must stay below this at each node


def offset_for(nodes: int) -> float:
    """The value range ``c`` (half the grid) for a secure sum over ``nodes`` holders."""
    return Quantizer(clip=1.0, max_inputs=nodes, bits=BITS).levels / 2.0


def _limb_bits(offset: float) -> int:
    # the grid holds codes up to levels = 2 * offset: 24-bit limbs when they fit
    return 24 if 2 * offset >= 2**24 - 1 else 16


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
    if 2 * offset < 2**16 - 1:
        raise AggregationError("too many nodes for an exact secure sum (at most 65537)")
    base = 2 ** _limb_bits(offset)
    u = x + LIMIT
    parts = [(u // base**i) % base for i in range(48 // _limb_bits(offset))]
    return np.concatenate([np.stack(parts).ravel().astype(np.float64), [1.0]]) - offset


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
    bits = _limb_bits(offset)
    limbs = sums.astype(np.int64).reshape(48 // bits, -1)
    value = sum(limbs[i] * 2 ** (bits * i) for i in range(len(limbs))) - n * LIMIT
    return np.asarray(value, dtype=np.int64), n
