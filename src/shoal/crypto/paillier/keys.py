"""Paillier keys: generation from OS randomness, g = n + 1, raw encryption and CRT decryption.

Raw operations work on Python/gmpy2 integers; fixed-point encoding, packing and vectors are
built on them in sibling modules. Keys shorter than 2048 bits are refused unless the caller
says ``insecure=True`` (tests only). A generated public key carries a DJN base ``h_s`` for
fast fresh obfuscators (:mod:`shoal.crypto.paillier.djn`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import gmpy2

from shoal.crypto.paillier.djn import FixedBase, check_base, exponent_bits
from shoal.crypto.paillier.encoding import decode_ints
from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "MIN_SECURE_BITS",
    "PrivateKey",
    "PublicKey",
    "generate_keypair",
]

MIN_SECURE_BITS = 2048
_PRIME_ROUNDS = 50  # Miller-Rabin rounds on top of gmpy2's own BPSW-strength test


def random_prime(bits: int) -> Any:
    """A random prime of exactly ``bits`` bits with its two top bits set (so p*q has 2*bits),
    and p = 3 mod 4 (so -1 is a non-square mod p, as the DJN base needs)."""
    while True:
        start = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        p = gmpy2.next_prime(gmpy2.mpz(start))
        # next_prime may step past 2**bits from a start just below it; retry rather than clip.
        if p.bit_length() == bits and p % 4 == 3 and gmpy2.is_prime(p, _PRIME_ROUNDS):
            return p


@dataclass(frozen=True)
class PublicKey:
    """A Paillier public key ``n`` with ``g = n + 1``; encrypts and adds under ``n**2``.

    ``hs`` is the key holder's optional DJN base ``(-x**2)**n mod n**2``: with it, a fresh
    ``r**n`` is ``hs**a`` for a uniform ``ceil(bits/2)``-bit ``a``, from a fixed-base table
    (built on first use); without it, ``r**n`` for a uniform r. Both decrypt alike, so keys
    with the same n are equal whatever their base.
    """

    n: Any  # gmpy2.mpz
    hs: Any = field(default=None, repr=False, compare=False)
    nsquare: Any = field(init=False, repr=False, compare=False)
    _fixed: list[FixedBase] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = gmpy2.mpz(self.n)
        if n < 15 or n % 2 == 0:
            raise ConfigError("a Paillier modulus is an odd product of two primes; got a bad n")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "nsquare", n * n)
        if self.hs is not None:
            try:
                object.__setattr__(self, "hs", check_base(self.hs, n, n * n))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        object.__setattr__(self, "_fixed", [])  # the DJN table, once built

    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def ciphertext_bytes(self) -> int:
        """Fixed width of one ciphertext on the wire (big-endian, zero-padded)."""
        return (int(self.nsquare.bit_length()) + 7) // 8

    def djn_table(self) -> FixedBase | None:
        """The fixed-base table of ``hs`` (None without a DJN base); built once, ~0.2 s."""
        if self.hs is None:
            return None
        if not self._fixed:  # two threads may both build it; either table is the same
            self._fixed.append(
                FixedBase(base=self.hs, modulus=self.nsquare, bits=exponent_bits(self.bits))
            )
        return self._fixed[0]

    def random_rn(self) -> Any:
        """A fresh obfuscator: ``hs**a`` from the DJN table when the key has a base (about
        ``bits/16`` multiplications), else ``r**n mod n**2`` for uniform ``r`` in Z_n^* (one
        full-size exponentiation)."""
        table = self.djn_table()
        if table is not None:
            return table.random()
        while True:
            r = gmpy2.mpz(secrets.randbelow(int(self.n) - 1) + 1)
            if gmpy2.gcd(r, self.n) == 1:
                return gmpy2.powmod(r, self.n, self.nsquare)

    def raw_encrypt(self, m: int, rn: Any | None = None) -> Any:
        """``(1 + m*n) * r**n mod n**2`` for a plaintext ``m`` in [0, n).

        ``rn`` is a precomputed ``r**n`` that must never be used for another ciphertext
        (see :class:`~shoal.crypto.paillier.pool.RandomnessPool`); None draws a fresh one.
        """
        if rn is None:
            rn = self.random_rn()
        return (1 + (gmpy2.mpz(m) % self.n) * self.n) * rn % self.nsquare

    def check_ciphertext(self, c: Any) -> Any:
        """Refuse anything that is not a unit of Z_{n^2}: zero, out of range, sharing a factor."""
        c = gmpy2.mpz(c)
        if not 0 < c < self.nsquare:
            raise ProtocolError(
                "a ciphertext lies outside Z_{n^2}; it was corrupted or made under another key"
            )
        if gmpy2.gcd(c, self.n) != 1:
            raise ProtocolError("a ciphertext shares a factor with n; refusing it")
        return c

    def to_bytes(self) -> bytes:
        """Big-endian ``n`` (g = n + 1 is implied); with a DJN base, a zero byte, the length
        of n in two bytes, n, then ``hs`` at the ciphertext width. (A bare n never starts
        with a zero byte.)"""
        width = (self.bits + 7) // 8
        raw_n = int(self.n).to_bytes(width, "big")
        if self.hs is None:
            return raw_n
        raw_hs = int(self.hs).to_bytes(self.ciphertext_bytes, "big")
        return b"\x00" + width.to_bytes(2, "big") + raw_n + raw_hs

    @classmethod
    def from_bytes(cls, data: bytes, *, insecure: bool = False) -> PublicKey:
        """Parse :meth:`to_bytes`; refuses keys under 2048 bits unless ``insecure``."""
        data = bytes(data)
        hs = None
        if data[:1] == b"\x00":
            width = int.from_bytes(data[1:3], "big")
            raw_n, raw_hs = data[3 : 3 + width], data[3 + width :]
            if width < 2 or len(raw_n) != width or raw_n[0] == 0 or not raw_hs:
                raise ConfigError("a public key with a DJN base has a bad layout")
            data, hs = raw_n, int.from_bytes(raw_hs, "big")
        key = cls(n=int.from_bytes(data, "big"), hs=hs)
        if hs is not None and len(raw_hs) != key.ciphertext_bytes:
            raise ConfigError("a public key's DJN base is not ciphertext-sized")
        check_key_bits(key.bits, insecure=insecure)
        return key


@dataclass(frozen=True)
class PrivateKey:
    """The factors of ``n`` and the constants for CRT decryption (as in Paillier, sec. 7)."""

    public_key: PublicKey
    p: Any
    q: Any
    _crt: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p, q = gmpy2.mpz(self.p), gmpy2.mpz(self.q)
        if p * q != self.public_key.n:
            raise ConfigError("p * q does not equal the public key's n")
        if p == q:
            raise ConfigError("p and q must differ")
        # Keep p as the larger factor so the CRT recombination below is one formula.
        if p < q:
            p, q = q, p
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "q", q)
        psq, qsq = p * p, q * q
        n = self.public_key.n
        hp = gmpy2.invert(lfunc(gmpy2.powmod(n + 1, p - 1, psq), p), p)
        hq = gmpy2.invert(lfunc(gmpy2.powmod(n + 1, q - 1, qsq), q), q)
        qinv = gmpy2.invert(q, p)
        # For r^n mod n^2 from the key holder's side: CRT over p^2 and q^2.
        qsq_inv = gmpy2.invert(qsq, psq)
        object.__setattr__(self, "_crt", (psq, qsq, hp, hq, qinv, qsq_inv))

    def checked_ciphertext(self, c: Any) -> Any:
        """``c`` as an mpz if it is a unit of Z_{n^2}; two cheap remainders by the factors
        stand in for the public check's gcd, which says what is wrong otherwise."""
        c = gmpy2.mpz(c)
        if 0 < c < self.public_key.nsquare and c % self.p and c % self.q:
            return c
        return self.public_key.check_ciphertext(c)  # raises, naming the fault

    def _half(self, c: Any) -> Any:
        """The plaintext mod p alone: one exponentiation mod p^2 (half of a decryption)."""
        psq, hp = self._crt[0], self._crt[2]
        return lfunc(gmpy2.powmod(c, self.p - 1, psq), self.p) * hp % self.p

    def _join(self, mp: Any, c: Any) -> Any:
        """Finish a decryption whose half mod p is ``mp``: the half mod q, then the CRT."""
        _, qsq, _, hq, qinv, _ = self._crt
        q = self.q
        mq = lfunc(gmpy2.powmod(c, q - 1, qsq), q) * hq % q
        return mq + ((mp - mq) * qinv % self.p) * q

    def raw_decrypt(self, c: Any) -> Any:
        """The plaintext in [0, n) of a checked ciphertext, by CRT over p^2 and q^2."""
        c = self.checked_ciphertext(c)
        return self._join(self._half(c), c)

    def raw_decrypt_signed(self, c: Any, bound_bits: int) -> int:
        """The signed plaintext m of a ciphertext the caller says holds ``|m| < 2**bound_bits``,
        at half the cost of :meth:`raw_decrypt` when that holds (see docs/paillier.md).

        The half mod p, ``m_p = m mod p``, is m itself if it is below ``2**bound_bits`` and
        ``m_p - p`` if it is within ``2**bound_bits`` of p; otherwise the bound was wrong and
        the half mod q completes the full CRT, read as :func:`decode_ints` reads it (the
        middle third of Z_n is a ``PlaintextOverflow``). So the answer is the full
        decryption's unless m is within the bound of a multiple of p but not of n, which a
        plaintext not chosen knowing p is with probability about ``2**(bound_bits + 1) / p``
        (and choosing one on purpose factors n while ``bound_bits <= bits / 4``). Larger
        bounds always take the full CRT.
        """
        if bound_bits < 0:
            raise ConfigError(f"bound_bits must be >= 0, got {bound_bits}")
        c = self.checked_ciphertext(c)
        mp = self._half(c)
        if bound_bits <= self.public_key.bits // 4:
            bound = 1 << bound_bits
            if mp < bound:
                return int(mp)
            if self.p - mp < bound:
                return int(mp - self.p)
        return decode_ints([self._join(mp, c)], self.public_key.n)[0]

    def djn_base(self) -> Any:
        """A fresh DJN base ``(-x**2)**n mod n**2`` for uniform secret x in Z_n^*; with
        p = q = 3 mod 4, -x**2 has Jacobi symbol 1 and is no square (DJN's choice)."""
        n = self.public_key.n
        while True:
            x = gmpy2.mpz(secrets.randbelow(int(n) - 2) + 2)
            if gmpy2.gcd(x, n) == 1:
                return gmpy2.powmod(n - x * x % n, n, self.public_key.nsquare)

    def random_rn(self) -> Any:
        """A fresh obfuscator: from the public key's DJN table if it has a base (several
        times cheaper again), else a uniform ``r**n mod n**2`` about 4x cheaper than
        :meth:`PublicKey.random_rn` as follows.

        The n-th residues mod p^2 are the p-th powers ``x**p`` of x in Z_p^* (and likewise
        for q), and ``r**n mod p**2`` for uniform r is ``x**p`` for uniform x, because
        gcd(q, p-1) = 1 (checked at key generation). So the same distribution comes from two
        half-size exponentiations joined by CRT.
        """
        if self.public_key.hs is not None:
            return self.public_key.random_rn()
        psq, qsq, _, _, _, qsq_inv = self._crt
        x = gmpy2.mpz(secrets.randbelow(int(self.p) - 1) + 1)
        y = gmpy2.mpz(secrets.randbelow(int(self.q) - 1) + 1)
        ap = gmpy2.powmod(x, self.p, psq)
        aq = gmpy2.powmod(y, self.q, qsq)
        return aq + ((ap - aq) * qsq_inv % psq) * qsq

    def to_bytes(self) -> bytes:
        """``p`` as big-endian bytes; ``q`` follows from the public key. Keep it secret."""
        return int(self.p).to_bytes((int(self.p.bit_length()) + 7) // 8, "big")

    @classmethod
    def from_bytes(cls, public_key: PublicKey, data: bytes) -> PrivateKey:
        p = gmpy2.mpz(int.from_bytes(bytes(data), "big"))
        if p < 3 or public_key.n % p != 0:
            raise ConfigError("these bytes are not a factor of the public key's n")
        return cls(public_key=public_key, p=p, q=public_key.n // p)


def lfunc(x: Any, d: Any) -> Any:
    """Paillier's and Okamoto-Uchiyama's L: ``(x - 1) / d`` for x = 1 mod d."""
    return (x - 1) // d


def check_key_bits(bits: int, *, insecure: bool, scheme: str = "Paillier") -> None:
    """Refuse keys under 2048 bits unless ``insecure`` (tests only)."""
    if bits < MIN_SECURE_BITS and not insecure:
        raise ConfigError(
            f"a {bits}-bit {scheme} key is too short; use at least {MIN_SECURE_BITS} bits "
            "(short keys are for tests only: pass insecure=True / --insecure-test-keys)"
        )


def generate_keypair(
    bits: int = 2048, *, insecure: bool = False, djn: bool = True
) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair with an exactly ``bits``-bit modulus, from the OS's randomness.

    ``djn`` (default) gives the public key a DJN base, so fresh obfuscators are short
    fixed-base powers (see docs/paillier.md for the assumption); ``djn=False`` keeps
    uniform ``r**n`` only.
    """
    check_key_bits(bits, insecure=insecure)
    if bits < 64 or bits % 2:
        raise ConfigError(f"key_bits must be an even number of at least 64, got {bits}")
    half = bits // 2
    while True:
        p = random_prime(half)
        q = random_prime(half)
        # gcd(p, q-1) = gcd(q, p-1) = 1 makes gcd(n, phi(n)) = 1 (Paillier's condition) and
        # makes the key holder's fast r^n sampler exact; equal-size primes almost always pass.
        # gcd(p-1, q-1) = 2 makes the Jacobi-1 subgroup of Z_n^* cyclic (DJN's modulus).
        if (
            p != q
            and gmpy2.gcd(p, q - 1) == 1
            and gmpy2.gcd(q, p - 1) == 1
            and gmpy2.gcd(p - 1, q - 1) == 2
        ):
            n = p * q
            if n.bit_length() == bits:
                public = PublicKey(n=n)
                private = PrivateKey(public_key=public, p=p, q=q)
                if not djn:
                    return public, private
                public = PublicKey(n=n, hs=private.djn_base())
                return public, PrivateKey(public_key=public, p=p, q=q)
