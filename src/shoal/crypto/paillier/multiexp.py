"""Multi-exponentiation ``prod b_i ** e_i mod m`` by Pippenger's bucket method.

For k bases with b-bit exponents it costs about ``b/c * (k + 2**(c+1))`` multiplications
instead of the ``~1.2 * b * k`` of k separate exponentiations; this is what makes an
encrypted vector times a plaintext matrix affordable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gmpy2
import numpy as np

__all__ = ["multi_exp"]


def _window(k: int, bits: int) -> int:
    best, best_cost = 1, float("inf")
    for c in range(1, 17):
        cost = -(-bits // c) * (k + (2 << c))
        if cost < best_cost:
            best, best_cost = c, cost
    return best


def multi_exp(bases: Sequence[Any], exps: np.ndarray | Sequence[int], mod: Any) -> Any:
    """``prod(bases[i] ** exps[i]) mod mod`` for non-negative exponents."""
    if isinstance(exps, np.ndarray) and exps.dtype.kind in "iu":
        if exps.size and int(exps.min()) < 0:
            raise ValueError("multi_exp takes non-negative exponents")
        ex = exps.astype(np.uint64)
        keep = np.flatnonzero(ex)
        pairs_b = [bases[i] for i in keep.tolist()]
        ex = ex[keep]
        bits = int(ex.max()).bit_length() if ex.size else 0
        if len(pairs_b) < 8:
            return _naive(pairs_b, [int(e) for e in ex.tolist()], mod)
        return _pippenger_np(pairs_b, ex, bits, mod)
    ints = [int(e) for e in exps]
    if any(e < 0 for e in ints):
        raise ValueError("multi_exp takes non-negative exponents")
    pb = [b for b, e in zip(bases, ints) if e]
    pe = [e for e in ints if e]
    return _naive(pb, pe, mod)


def _naive(bases: Sequence[Any], exps: Sequence[int], mod: Any) -> Any:
    acc = gmpy2.mpz(1)
    for b, e in zip(bases, exps):
        acc = acc * gmpy2.powmod(b, e, mod) % mod
    return acc


def _pippenger_np(bases: list[Any], ex: np.ndarray, bits: int, mod: Any) -> Any:
    c = _window(len(bases), bits)
    mask = np.uint64((1 << c) - 1)
    windows = -(-bits // c)
    acc: Any = None
    for w in range(windows - 1, -1, -1):
        if acc is not None:
            for _ in range(c):
                acc = acc * acc % mod
        digits = ((ex >> np.uint64(w * c)) & mask).tolist()
        buckets: list[Any] = [None] * (1 << c)
        for b, d in zip(bases, digits):
            if d:
                cur = buckets[d]
                buckets[d] = b if cur is None else cur * b % mod
        # sum_d d * bucket[d] as a running product from the top digit down
        running: Any = None
        total: Any = None
        for d in range((1 << c) - 1, 0, -1):
            bd = buckets[d]
            if bd is not None:
                running = bd if running is None else running * bd % mod
            if running is not None:
                total = running if total is None else total * running % mod
        if total is not None:
            acc = total if acc is None else acc * total % mod
    return gmpy2.mpz(1) if acc is None else acc
