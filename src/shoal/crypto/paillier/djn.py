"""Damgård-Jurik-Nielsen obfuscators: ``r**n`` as ``h_s**a`` for a short uniform ``a``.

The key holder publishes ``h_s = (-x**2)**n mod n**2`` for a secret uniform x; anyone with
the public key then makes a fresh obfuscator from a ``ceil(bits/2)``-bit exponent and a
precomputed fixed-base table: about ``bits/16`` modular multiplications instead of a
full-size exponentiation. Security rests on DCRA plus the short-exponent assumption stated
in docs/paillier.md.
"""

from __future__ import annotations

import secrets
from typing import Any

import gmpy2

__all__ = ["FixedBase", "check_base", "exponent_bits"]

_WINDOW = 8  # bits per table row: 2**8 entries a row, one multiplication per row


def exponent_bits(key_bits: int) -> int:
    """DJN's exponent length for a ``key_bits``-bit modulus: half of it, rounded up."""
    return (key_bits + 1) // 2


def check_base(hs: Any, n: Any, nsquare: Any) -> Any:
    """A plausible ``h_s``: a unit of Z_{n^2} other than +-1 and not of order 2.

    Whether it is an n-th residue cannot be checked without the factors (that is the
    DCRA); like the key itself, the base is trusted to come from the key holder.
    """
    hs = gmpy2.mpz(hs)
    if not 1 < hs < nsquare - 1 or gmpy2.gcd(hs, n) != 1 or hs * hs % nsquare == 1:
        raise ValueError("the DJN base is not a unit of Z_{n^2} of order above 2")
    return hs


class FixedBase:
    """``base ** e mod m`` for exponents below ``2**bits`` by a table of ``base**(d * 256**i)``.

    Building the table costs ``255 * bits/8`` multiplications (once per key); each power is
    then one multiplication per nonzero exponent byte. The table holds powers of a public
    value only, so it is no secret.
    """

    def __init__(self, *, base: Any, modulus: Any, bits: int) -> None:
        self.modulus = gmpy2.mpz(modulus)
        self.bits = bits
        self.rows = -(-bits // _WINDOW)
        table: list[list[Any]] = []
        step = gmpy2.mpz(base) % self.modulus
        for _ in range(self.rows):
            row = [gmpy2.mpz(1), step]
            for _ in range(2, 1 << _WINDOW):
                row.append(row[-1] * step % self.modulus)
            table.append(row)
            step = row[-1] * step % self.modulus  # base ** (256 ** (i + 1))
        self._table = table

    def pow(self, e: int) -> Any:
        """``base ** e mod modulus`` for ``0 <= e < 2**bits``."""
        if not 0 <= e < 1 << self.bits:
            raise ValueError(f"the exponent must lie in [0, 2**{self.bits})")
        m = self.modulus
        acc: Any = None
        for row, d in zip(self._table, e.to_bytes(self.rows, "little")):
            if d:
                acc = row[d] if acc is None else acc * row[d] % m
        return gmpy2.mpz(1) if acc is None else acc

    def random(self) -> Any:
        """``base ** a`` for a uniform ``bits``-bit ``a`` from the OS's randomness."""
        return self.pow(secrets.randbits(self.bits))
