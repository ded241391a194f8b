"""Okamoto-Uchiyama additively homomorphic encryption, a second scheme beside Paillier.

n = p**2 * q; ciphertexts live mod n (Paillier's live mod n**2) and plaintexts in Z_p for
the secret p of about bits/3 bits: ``Enc(m) = g**m * h**r mod n`` with ``h = g**n``, one
exponentiation mod p**2 to decrypt. IND-CPA under the p-subgroup assumption (Okamoto and
Uchiyama, EUROCRYPT 1998). See docs/paillier.md, "Okamoto-Uchiyama".
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gmpy2
import numpy as np

from shoal.crypto.paillier.djn import FixedBase
from shoal.crypto.paillier.encoding import decode_ints, from_fixed, to_fixed
from shoal.crypto.paillier.keys import check_key_bits, lfunc, random_prime
from shoal.errors import ConfigError, PlaintextOverflow, ProtocolError

__all__ = ["OUPrivateKey", "OUPublicKey", "decrypt", "encrypt", "generate_ou_keypair"]


@dataclass(frozen=True)
class OUPublicKey:
    """``(n, g, h)`` with ``h = g**n mod n``; ``p_bits`` (public) bounds the plaintexts."""

    n: Any
    g: Any
    h: Any
    _fixed: list[FixedBase] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, g, h = gmpy2.mpz(self.n), gmpy2.mpz(self.g), gmpy2.mpz(self.h)
        if n < 1000 or n % 2 == 0:
            raise ConfigError("an Okamoto-Uchiyama modulus is an odd p**2 * q; got a bad n")
        for name, v in (("g", g), ("h", h)):
            if not 1 < v < n or gmpy2.gcd(v, n) != 1:
                raise ConfigError(f"the key's {name} is not a unit of Z_n other than 1")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "g", g)
        object.__setattr__(self, "h", h)
        object.__setattr__(self, "_fixed", [])

    @property
    def bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def p_bits(self) -> int:
        """Bits of the secret p: the third of n's, rounded down."""
        return self.bits // 3

    @property
    def max_int(self) -> int:
        """The largest magnitude a plaintext may have: 2**(p_bits - 2) < p/3, so sums that
        stay below it decrypt exactly and larger ones are caught as overflow."""
        return 1 << (self.p_bits - 2)

    def h_table(self) -> FixedBase:
        """The fixed-base table of h that makes ``h**r`` cheap (public values only)."""
        if not self._fixed:  # built once (~0.4 s at 2048 bits); a thread race builds it twice
            self._fixed.append(FixedBase(base=self.h, modulus=self.n, bits=self.bits))
        return self._fixed[0]

    def raw_encrypt(self, m: int) -> Any:
        """``g**m * h**r mod n`` for a signed ``|m| <= max_int`` and a fresh uniform r < n."""
        if abs(m) > self.max_int:
            raise PlaintextOverflow(
                f"a value of {abs(m).bit_length()} bits does not fit this key's plaintexts "
                f"(at most {self.p_bits - 2} bits); lower frac_bits or scale the data"
            )
        r = secrets.randbelow(int(self.n) - 1) + 1
        return gmpy2.powmod(self.g, m, self.n) * self.h_table().pow(r) % self.n

    def check_ciphertext(self, c: Any) -> Any:
        c = gmpy2.mpz(c)
        if not 0 < c < self.n or gmpy2.gcd(c, self.n) != 1:
            raise ProtocolError("a ciphertext is not a unit of Z_n for this key")
        return c

    def add(self, a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
        """Elementwise ``Enc(x) * Enc(y) = Enc(x + y)``."""
        if len(a) != len(b):
            raise ConfigError(f"cannot add {len(a)} and {len(b)} ciphertexts")
        return [x * y % self.n for x, y in zip(a, b)]

    def mul(self, cts: Sequence[Any], ks: Sequence[int]) -> list[Any]:
        """Elementwise ``Enc(x) ** k = Enc(k * x)`` for signed integers k."""
        if len(cts) != len(ks):
            raise ConfigError(f"cannot scale {len(cts)} ciphertexts by {len(ks)} scalars")
        return [gmpy2.powmod(c, int(k), self.n) for c, k in zip(cts, ks)]

    def to_bytes(self) -> bytes:
        """n, g and h, big-endian, each as wide as n."""
        w = (self.bits + 7) // 8
        return b"".join(int(v).to_bytes(w, "big") for v in (self.n, self.g, self.h))

    @classmethod
    def from_bytes(cls, data: bytes, *, insecure: bool = False) -> OUPublicKey:
        data = bytes(data)
        if len(data) % 3 or not data or data[0] == 0:
            raise ConfigError("an Okamoto-Uchiyama public key is n, g, h at n's width")
        w = len(data) // 3
        n, g, h = (int.from_bytes(data[i * w : (i + 1) * w], "big") for i in range(3))
        key = cls(n=n, g=g, h=h)
        check_key_bits(key.bits, insecure=insecure, scheme="Okamoto-Uchiyama")
        return key


@dataclass(frozen=True)
class OUPrivateKey:
    """The factors p and q, and ``L(g**(p-1) mod p**2)**-1 mod p`` for decryption."""

    public_key: OUPublicKey
    p: Any
    q: Any
    _consts: tuple[Any, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p, q = gmpy2.mpz(self.p), gmpy2.mpz(self.q)
        if p * p * q != self.public_key.n:
            raise ConfigError("p**2 * q does not equal the public key's n")
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "q", q)
        psq = p * p
        lg = lfunc(gmpy2.powmod(self.public_key.g, p - 1, psq), p)
        if lg % p == 0:
            raise ConfigError("g**(p-1) is 1 mod p**2: g does not generate the p-subgroup")
        object.__setattr__(self, "_consts", (psq, gmpy2.invert(lg, p)))

    def raw_decrypt(self, c: Any) -> Any:
        """The plaintext in [0, p) of a checked ciphertext."""
        c = self.public_key.check_ciphertext(c)
        psq, lg_inv = self._consts
        return lfunc(gmpy2.powmod(c % psq, self.p - 1, psq), self.p) * lg_inv % self.p


def generate_ou_keypair(
    bits: int = 2048, *, insecure: bool = False
) -> tuple[OUPublicKey, OUPrivateKey]:
    """A fresh key with an exactly ``bits``-bit n = p**2 * q, from the OS's randomness."""
    check_key_bits(bits, insecure=insecure, scheme="Okamoto-Uchiyama")
    if bits < 96:
        raise ConfigError(f"key_bits must be at least 96, got {bits}")
    p_bits = bits // 3
    while True:
        p = random_prime(p_bits)
        q = random_prime(bits - 2 * p_bits)
        n = p * p * q
        if p == q or n.bit_length() != bits:
            continue
        while True:
            g = gmpy2.mpz(secrets.randbelow(int(n) - 2) + 2)
            # g must have order divisible by p mod p**2 (else it cannot carry a plaintext)
            if gmpy2.gcd(g, n) == 1 and gmpy2.powmod(g, p - 1, p * p) != 1:
                break
        public = OUPublicKey(n=n, g=g, h=gmpy2.powmod(g, n, n))
        return public, OUPrivateKey(public_key=public, p=p, q=q)


def encrypt(public_key: OUPublicKey, values: Any, *, frac_bits: int = 32) -> list[Any]:
    """A float or int array (flattened) at ``frac_bits`` fractional bits, one ciphertext
    per value, each with fresh randomness."""
    return [public_key.raw_encrypt(v) for v in to_fixed(np.asarray(values), frac_bits)]


def decrypt(private_key: OUPrivateKey, cts: Sequence[Any], *, frac_bits: int = 32) -> np.ndarray:
    """Decrypt to a 1-d array; a value whose sum or product left (-p/3, p/3) raises
    PlaintextOverflow rather than come back wrong."""
    ints = decode_ints([private_key.raw_decrypt(c) for c in cts], private_key.p)
    return from_fixed(ints, frac_bits, (len(ints),))
