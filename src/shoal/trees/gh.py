"""How SecureBoost packs gradients into Paillier plaintexts, and bins into one ciphertext.

A row's fixed-point ``(g, h)`` is the plaintext ``g * 2**W + h mod n``, with ``W`` wide
enough for any sum of hessians, so sums of rows are sums of plaintexts: ``G * 2**W + H``
(G may be negative; plaintexts are read as signed). Several such sums then share one
ciphertext, ``S`` bits apart (Horner: ``C = C**(2**S) * c``), so the guest decrypts once
per ``slots`` candidate splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gmpy2

from shoal.errors import ConfigError, ProtocolError

__all__ = ["GHCodec"]


@dataclass(frozen=True, kw_only=True)
class GHCodec:
    """Layout for ``rows`` rows of ``frac_bits`` fixed-point gradients under a key of
    ``key_bits`` (|g| <= ``grad_bound``, 0 <= h <= ``grad_bound``)."""

    frac_bits: int
    rows: int
    key_bits: int
    grad_bound: int = 1
    h_bits: int = field(init=False)
    slot_bits: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.frac_bits < 0 or self.grad_bound < 1:
            raise ConfigError("GHCodec needs rows >= 1, frac_bits >= 0, grad_bound >= 1")
        magnitude = self.frac_bits + self.grad_bound.bit_length() + self.rows.bit_length()
        h_bits = magnitude + 1  # any sum of hessians fits below 2**W
        slot_bits = h_bits + magnitude + 2  # signed G * 2**W + H, with a sign bit to spare
        slots = (self.key_bits - 2) // slot_bits
        if slots < 1:
            raise ConfigError(f"a {self.key_bits}-bit key cannot hold a {slot_bits}-bit slot")
        object.__setattr__(self, "h_bits", h_bits)
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "slots", slots)

    @property
    def limit(self) -> int:
        """Per-row |g| and h in fixed point must stay at or below this."""
        return self.grad_bound << self.frac_bits

    def row_plaintext(self, g: int, h: int, n: Any) -> Any:
        return gmpy2.mpz((g << self.h_bits) + h) % n

    def pack(self, cts: Sequence[Any], nsquare: Any) -> list[Any]:
        """Ciphertexts of sums, ``slots`` per output ciphertext (the first in the low bits)."""
        shift = gmpy2.mpz(1) << self.slot_bits
        out = []
        for start in range(0, len(cts), self.slots):
            group = cts[start : start + self.slots]
            acc = group[-1]
            for c in reversed(group[:-1]):
                acc = gmpy2.powmod(acc, shift, nsquare) * c % nsquare
            out.append(acc)
        return out

    def unpack(self, plaintexts: Sequence[Any], count: int, n: Any) -> list[tuple[int, int]]:
        """``count`` (G, H) pairs from decrypted packed plaintexts."""
        half, slot = n // 2, 1 << self.slot_bits
        h_mask = (1 << self.h_bits) - 1
        out: list[tuple[int, int]] = []
        for m in plaintexts:
            x = int(m) - int(n) if m > half else int(m)
            for _ in range(min(self.slots, count - len(out))):
                v = ((x + slot // 2) % slot) - slot // 2
                x = (x - v) >> self.slot_bits
                h = v & h_mask
                out.append(((v - h) >> self.h_bits, h))
            if x != 0:
                raise ProtocolError("a packed plaintext holds more than its slots")
        if len(out) != count:
            raise ProtocolError(f"expected {count} packed sums, got {len(out)}")
        return out
