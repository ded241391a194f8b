"""Paillier keys: generation from OS randomness, g = n + 1, raw encryption and CRT decryption.

Raw operations work on Python/gmpy2 integers; fixed-point encoding, packing and vectors are
built on them in sibling modules. Keys shorter than 2048 bits are refused unless the caller
says ``insecure=True`` (tests only).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import gmpy2

from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "MIN_SECURE_BITS",
    "PrivateKey",
    "PublicKey",
    "generate_keypair",
]

MIN_SECURE_BITS = 2048
_PRIME_ROUNDS = 50  # Miller-Rabin rounds on top of gmpy2's own BPSW-strength test


def _random_prime(bits: int) -> Any:
    """A random prime of exactly ``bits`` bits with its two top bits set (so p*q has 2*bits)."""
    while True:
        start = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        p = gmpy2.next_prime(gmpy2.mpz(start))
        # next_prime may step past 2**bits from a start just below it; retry rather than clip.
        if p.bit_length() == bits and gmpy2.is_prime(p, _PRIME_ROUNDS):
            return p


@dataclass(frozen=True)
class PublicKey:
    """A Paillier public key ``n`` with ``g = n + 1``; encrypts and adds under ``n**2``."""

    n: Any  # gmpy2.mpz
    nsquare: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = gmpy2.mpz(self.n)
        if n < 15 or n % 2 == 0:
            raise ConfigError("a Paillier modulus is an odd product of two primes; got a bad n")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "nsquare", n * n)

    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def ciphertext_bytes(self) -> int:
        """Fixed width of one ciphertext on the wire (big-endian, zero-padded)."""
        return (int(self.nsquare.bit_length()) + 7) // 8

    def random_rn(self) -> Any:
        """A fresh ``r**n mod n**2`` for uniform ``r`` in Z_n^*: one full-size exponentiation."""
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
        """Big-endian ``n`` (g = n + 1 is implied)."""
        return int(self.n).to_bytes((self.bits + 7) // 8, "big")

    @classmethod
    def from_bytes(cls, data: bytes, *, insecure: bool = False) -> PublicKey:
        """Parse :meth:`to_bytes`; refuses keys under 2048 bits unless ``insecure``."""
        key = cls(n=int.from_bytes(bytes(data), "big"))
        _check_bits(key.bits, insecure=insecure)
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
        hp = gmpy2.invert(_l(gmpy2.powmod(n + 1, p - 1, psq), p), p)
        hq = gmpy2.invert(_l(gmpy2.powmod(n + 1, q - 1, qsq), q), q)
        qinv = gmpy2.invert(q, p)
        # For r^n mod n^2 from the key holder's side: CRT over p^2 and q^2.
        qsq_inv = gmpy2.invert(qsq, psq)
        object.__setattr__(self, "_crt", (psq, qsq, hp, hq, qinv, qsq_inv))

    def raw_decrypt(self, c: Any) -> Any:
        """The plaintext in [0, n) of a checked ciphertext, by CRT over p^2 and q^2."""
        c = self.public_key.check_ciphertext(c)
        psq, qsq, hp, hq, qinv, _ = self._crt
        p, q = self.p, self.q
        mp = _l(gmpy2.powmod(c % psq, p - 1, psq), p) * hp % p
        mq = _l(gmpy2.powmod(c % qsq, q - 1, qsq), q) * hq % q
        return mq + ((mp - mq) * qinv % p) * q

    def random_rn(self) -> Any:
        """A fresh ``r**n mod n**2``, about 4x cheaper than :meth:`PublicKey.random_rn`.

        The n-th residues mod p^2 are the p-th powers ``x**p`` of x in Z_p^* (and likewise
        for q), and ``r**n mod p**2`` for uniform r is ``x**p`` for uniform x, because
        gcd(q, p-1) = 1 (checked at key generation). So the same distribution comes from two
        half-size exponentiations joined by CRT.
        """
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


def _l(x: Any, d: Any) -> Any:
    return (x - 1) // d


def _check_bits(bits: int, *, insecure: bool) -> None:
    if bits < MIN_SECURE_BITS and not insecure:
        raise ConfigError(
            f"a {bits}-bit Paillier key is too short; use at least {MIN_SECURE_BITS} bits "
            "(short keys are for tests only: pass insecure=True / --insecure-test-keys)"
        )


def generate_keypair(bits: int = 2048, *, insecure: bool = False) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair with an exactly ``bits``-bit modulus, from the OS's randomness."""
    _check_bits(bits, insecure=insecure)
    if bits < 64 or bits % 2:
        raise ConfigError(f"key_bits must be an even number of at least 64, got {bits}")
    half = bits // 2
    while True:
        p = _random_prime(half)
        q = _random_prime(half)
        # gcd(p, q-1) = gcd(q, p-1) = 1 makes gcd(n, phi(n)) = 1 (Paillier's condition) and
        # makes the key holder's fast r^n sampler exact; equal-size primes almost always pass.
        if p != q and gmpy2.gcd(p, q - 1) == 1 and gmpy2.gcd(q, p - 1) == 1:
            n = p * q
            if n.bit_length() == bits:
                public = PublicKey(n=n)
                return public, PrivateKey(public_key=public, p=p, q=q)
