"""Shamir secret sharing over the prime field GF(2**127 - 1).

Byte strings are cut into 15-byte chunks, each shared with its own random polynomial, so
secrets of any length work. Any ``threshold`` shares rebuild the secret; fewer are
consistent with every possible secret and so reveal nothing about it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "CHUNK_BYTES",
    "ELEMENT_BYTES",
    "PRIME",
    "Share",
    "combine",
    "interpolate_at_zero",
    "lagrange_weights",
    "num_chunks",
    "split",
    "split_int",
]

PRIME = 2**127 - 1
CHUNK_BYTES = 15  # 120-bit chunks are always below PRIME, so every chunk is a field element
ELEMENT_BYTES = 16


@dataclass(frozen=True)
class Share:
    """One holder's share: the evaluation point ``x`` and one field element per chunk."""

    x: int
    ys: tuple[int, ...]

    def to_bytes(self) -> bytes:
        """The ``ys`` as big-endian 16-byte words (``x`` travels separately, by context)."""
        return b"".join(y.to_bytes(ELEMENT_BYTES, "big") for y in self.ys)

    @classmethod
    def from_bytes(cls, x: int, data: bytes) -> Share:
        """Parse :meth:`to_bytes` output; raises ProtocolError on malformed input."""
        if len(data) == 0 or len(data) % ELEMENT_BYTES:
            raise ProtocolError(
                f"a share is a non-empty multiple of {ELEMENT_BYTES} bytes, got {len(data)}"
            )
        _check_x(x, PRIME, error=ProtocolError)
        ys = tuple(
            int.from_bytes(data[i : i + ELEMENT_BYTES], "big")
            for i in range(0, len(data), ELEMENT_BYTES)
        )
        if max(ys) >= PRIME:
            raise ProtocolError("a share holds a value outside the field; it was corrupted")
        return cls(x=x, ys=ys)


def _check_x(x: int, prime: int, *, error: type[Exception] = ConfigError) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < prime:
        raise error(f"share points must be integers in [1, {prime - 1}], got {x!r}")


def _check_points(xs: Sequence[int], threshold: int, prime: int) -> None:
    if not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"threshold must be a positive integer, got {threshold!r}")
    if len(xs) < threshold:
        raise ConfigError(
            f"cannot make {len(xs)} shares with threshold {threshold}: the secret could never "
            "be rebuilt; give at least `threshold` points"
        )
    for x in xs:
        _check_x(x, prime)
    if len(set(xs)) != len(xs):
        raise ConfigError("share points must be distinct")


def split_int(secret: int, *, threshold: int, xs: Sequence[int], prime: int = PRIME) -> list[int]:
    """Evaluate a random degree ``threshold - 1`` polynomial with ``f(0) = secret`` at ``xs``."""
    if not 0 <= secret < prime:
        raise ConfigError(f"the secret must lie in [0, {prime - 1}]")
    _check_points(xs, threshold, prime)
    return _evaluate([*random_below(prime, threshold - 1), secret], xs, prime)


def random_below(bound: int, count: int) -> list[int]:
    """``count`` uniform integers in [0, bound) from the OS's CSPRNG (what `secrets` uses),
    drawn in one call: the random coefficients are what hide a secret."""
    bits = bound.bit_length()
    size = (bits + 7) // 8
    mask = (1 << bits) - 1
    out: list[int] = []
    while len(out) < count:
        need = count - len(out)
        pool = os.urandom(size * need)
        for i in range(0, size * need, size):
            value = int.from_bytes(pool[i : i + size], "big") & mask
            if value < bound:  # rejection keeps it uniform (for 2**127 - 1: p = 2**-127)
                out.append(value)
    return out


def _evaluate(coeffs: Sequence[int], xs: Sequence[int], prime: int) -> list[int]:
    """The polynomial with ``coeffs`` (highest degree first) at each of ``xs``, mod prime."""
    out = []
    for x in xs:
        # Horner without reducing each step: the integer stays a few hundred bits for
        # realistic points and degrees, and one reduction at the end is much cheaper.
        acc = 0
        for c in coeffs:
            acc = acc * x + c
        out.append(acc % prime)
    return out


def lagrange_weights(xs: Sequence[int], *, prime: int = PRIME) -> list[int]:
    """Weights ``w_i`` with ``f(0) = sum_i w_i f(x_i)`` for any polynomial of degree < len(xs)."""
    xs = [x % prime for x in xs]
    if len(set(xs)) != len(xs):
        raise ProtocolError("shares with repeated points cannot be combined")
    if 0 in xs:
        raise ProtocolError("a share point is 0 modulo the prime; it cannot be combined")
    # Points are small in practice (a node's index + 1): multiplying exactly and reducing
    # once is cheaper than reducing after every factor. Wide points reduce every factor.
    exact = len(xs) * max(xs).bit_length() <= 4096
    everything = 1
    for x in xs:
        everything = everything * x if exact else everything * x % prime
    everything %= prime
    # w_i = prod_{j != i} x_j / (x_j - x_i) = (prod_j x_j) / (x_i * prod_{j != i} (x_j - x_i))
    dens = []
    for xi in xs:
        den = xi
        for xj in xs:
            if xj != xi:
                den = den * (xj - xi) if exact else den * (xj - xi) % prime
        dens.append(den % prime)
    # One modular inverse for all denominators (prefix products), not one each.
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % prime)
    inverse = pow(prefix[-1], -1, prime)
    weights = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        weights[i] = everything * inverse * prefix[i] % prime
        inverse = inverse * dens[i] % prime
    return weights


def interpolate_at_zero(points: Sequence[tuple[int, int]], *, prime: int = PRIME) -> int:
    """The value at 0 of the polynomial of degree < len(points) through ``points``."""
    if not points:
        raise ProtocolError("no shares to combine")
    weights = lagrange_weights([x for x, _ in points], prime=prime)
    return sum(w * y for w, (_, y) in zip(weights, points)) % prime


def num_chunks(length: int) -> int:
    """How many field elements a secret of ``length`` bytes is split into."""
    return -(-length // CHUNK_BYTES)


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Share ``secret`` among the holders at points ``xs``; any ``threshold`` rebuild it."""
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ConfigError("the secret must be a non-empty byte string")
    _check_points(xs, threshold, PRIME)
    chunks = [
        int.from_bytes(secret[i : i + CHUNK_BYTES], "big")
        for i in range(0, len(secret), CHUNK_BYTES)
    ]
    noise = random_below(PRIME, (threshold - 1) * len(chunks))
    columns = [
        _evaluate([*noise[k * (threshold - 1) : (k + 1) * (threshold - 1)], chunk], xs, PRIME)
        for k, chunk in enumerate(chunks)
    ]
    return [Share(x=x, ys=tuple(col[k] for col in columns)) for k, x in enumerate(xs)]


def combine(shares: Sequence[Share], *, threshold: int, length: int) -> bytes:
    """Rebuild a ``length``-byte secret from (the first) ``threshold`` of ``shares``.

    Raises ProtocolError when there are too few shares, or when they are malformed or
    inconsistent in a way that shows (a chunk that decodes out of range).
    """
    if not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"threshold must be a positive integer, got {threshold!r}")
    if length < 1:
        raise ConfigError("length must be at least 1 byte")
    if len(shares) < threshold:
        raise ProtocolError(
            f"{len(shares)} share(s) cannot rebuild a secret of threshold {threshold}"
        )
    used = list(shares[:threshold])
    chunks = num_chunks(length)
    if any(len(s.ys) != chunks for s in used):
        raise ProtocolError(f"a {length}-byte secret has {chunks} chunk(s) per share")
    weights = lagrange_weights([s.x for s in used])
    out = bytearray()
    for k in range(chunks):
        size = min(CHUNK_BYTES, length - k * CHUNK_BYTES)
        value = sum(w * s.ys[k] for w, s in zip(weights, used)) % PRIME
        if value >> (8 * size):
            raise ProtocolError("the shares are inconsistent: they do not rebuild a valid secret")
        out += value.to_bytes(size, "big")
    return bytes(out)
