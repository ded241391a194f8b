"""Fixed-point encoding of float and int arrays into Paillier plaintexts, negatives included.

A value x becomes ``round(x * 2**frac_bits) mod n``; a plaintext above ``n - n//3`` reads back
as negative and one in the middle third is an overflow, which is refused (as in phe), so a
sum that wrapped around n is never silently returned as a wrong number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shoal.errors import DataError, PlaintextOverflow

__all__ = ["decode_ints", "encode_ints", "from_fixed", "to_fixed"]


def to_fixed(values: Any, frac_bits: int) -> list[int]:
    """Exact signed integers ``round(x * 2**frac_bits)`` of a float or int array, flattened."""
    arr = np.asarray(values)
    if arr.dtype == object:
        # Python ints of any size (exact big integers); anything else is refused.
        items = arr.reshape(-1).tolist()
        if not all(isinstance(v, int) for v in items):
            raise DataError("object arrays can be encrypted only when they hold Python ints")
        return [int(v) << frac_bits for v in items]
    if arr.dtype.kind not in "biuf":
        raise DataError(f"only numeric arrays can be encrypted, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(flat)):
            raise DataError("cannot encrypt NaN or infinite values")
        # ldexp is exact and float64 holds every rounded integer exactly, so int() is exact.
        scaled = np.rint(np.ldexp(flat.astype(np.float64), frac_bits))
        return [int(v) for v in scaled.tolist()]
    scale = 1 << frac_bits
    return [int(v) * scale for v in flat.tolist()]


def encode_ints(ints: list[int], n: Any) -> list[int]:
    """Signed integers -> plaintexts in [0, n); refuses magnitudes a decryption would misread."""
    bound = int(n) // 3
    out = []
    for v in ints:
        if -bound > v or v > bound:
            raise PlaintextOverflow(
                f"a value of {abs(v).bit_length()} bits does not fit a {int(n).bit_length()}-bit "
                "key's plaintext (max n/3); lower frac_bits or scale the data"
            )
        out.append(v % int(n))
    return out


def decode_ints(plaintexts: list[Any], n: Any) -> list[int]:
    """Plaintexts in [0, n) -> signed integers; the middle third of Z_n means overflow."""
    n = int(n)
    bound = n // 3
    out = []
    for m in plaintexts:
        m = int(m)
        if m <= bound:
            out.append(m)
        elif m >= n - bound:
            out.append(m - n)
        else:
            raise PlaintextOverflow(
                "a decrypted value overflowed the plaintext space (a sum or product grew past "
                "n/3); use fewer additions, smaller scalars or fewer frac_bits"
            )
    return out


def from_fixed(ints: list[int], frac_bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Signed fixed-point integers -> float64; exact integers when ``frac_bits`` is 0
    (int64, or an object array of Python ints when some do not fit 64 bits)."""
    if frac_bits == 0:
        if all(-(1 << 63) <= v < (1 << 63) for v in ints):
            return np.array(ints, dtype=np.int64).reshape(shape)
        out = np.empty(len(ints), dtype=object)
        out[:] = ints
        return out.reshape(shape)
    return np.array([_to_float(v, frac_bits) for v in ints], dtype=np.float64).reshape(shape)


def _to_float(v: int, frac_bits: int) -> float:
    # Keep 64 significant bits before converting: float(v) alone raises past 2**1024.
    shift = max(0, abs(v).bit_length() - 64)
    return math.ldexp(float(v >> shift if v >= 0 else -((-v) >> shift)), shift - frac_bits)
