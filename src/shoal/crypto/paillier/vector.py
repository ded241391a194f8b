"""Encrypted arrays: fixed-point Paillier ciphertexts with add, scalar multiply and matmul.

An :class:`EncryptedVector` carries its public key, flat ciphertexts, shape and the number
of fractional bits of its plaintexts. It crosses the wire as a payload of raw bytes (a uint8
array of fixed-width big-endian ciphertexts), never pickle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np

from shoal.crypto.paillier.encoding import decode_ints, encode_ints, from_fixed, to_fixed
from shoal.crypto.paillier.keys import PrivateKey, PublicKey
from shoal.crypto.paillier.multiexp import multi_exp
from shoal.crypto.paillier.pool import RandomnessPool
from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "DEFAULT_FRAC_BITS",
    "EncryptedVector",
    "ciphertexts_from_bytes",
    "ciphertexts_to_bytes",
    "decrypt",
    "encrypt",
]

DEFAULT_FRAC_BITS = 32


def obfuscators(
    public_key: PublicKey,
    count: int,
    pool: RandomnessPool | None,
    private_key: PrivateKey | None = None,
) -> list[Any]:
    """``count`` never-used ``r**n``: from the pool, else fresh (by CRT for the key holder)."""
    if pool is not None and private_key is not None:
        raise ConfigError("pass a randomness pool or a private key, not both")
    if pool is not None:
        if pool.public_key != public_key:
            raise ConfigError("the randomness pool belongs to another public key")
        return pool.take_many(count)
    if private_key is not None:
        if private_key.public_key != public_key:
            raise ConfigError("the private key does not belong to this public key")
        return [private_key.random_rn() for _ in range(count)]
    return [public_key.random_rn() for _ in range(count)]


def encrypt(
    public_key: PublicKey,
    values: Any,
    *,
    frac_bits: int = DEFAULT_FRAC_BITS,
    pool: RandomnessPool | None = None,
    private_key: PrivateKey | None = None,
) -> EncryptedVector:
    """Encrypt a float or int array at ``frac_bits`` fractional bits (0 for exact ints).

    Each value gets a never-used ``r**n``: from ``pool`` if given; else a fresh one: from
    the key's DJN base if it has one (:meth:`PublicKey.random_rn`), else by the ~4x cheaper
    CRT sampler when the key holder passes its ``private_key`` (the same distribution, see
    :meth:`PrivateKey.random_rn`), else by one full exponentiation.
    """
    arr = np.asarray(values)
    plains = encode_ints(to_fixed(arr, frac_bits), public_key.n)
    rns = obfuscators(public_key, len(plains), pool, private_key)
    n, nsq = public_key.n, public_key.nsquare
    cts = tuple((1 + m * n) * rn % nsq for m, rn in zip(plains, rns))
    return EncryptedVector(
        public_key=public_key, ciphertexts=cts, shape=tuple(arr.shape), frac_bits=frac_bits
    )


def decrypt(private_key: PrivateKey, vector: EncryptedVector) -> np.ndarray:
    """The plaintext array; raises PlaintextOverflow if a value wrapped around n."""
    if vector.public_key != private_key.public_key:
        raise ConfigError("this vector was encrypted under another public key")
    plains = [private_key.raw_decrypt(c) for c in vector.ciphertexts]
    ints = decode_ints(plains, vector.public_key.n)
    return from_fixed(ints, vector.frac_bits, vector.shape)


def ciphertexts_to_bytes(public_key: PublicKey, cts: Sequence[Any]) -> np.ndarray:
    """Fixed-width big-endian bytes as a (k, width) uint8 array, ready for ``wire``."""
    width = public_key.ciphertext_bytes
    raw = b"".join(int(c).to_bytes(width, "big") for c in cts)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(cts), width)


def ciphertexts_from_bytes(public_key: PublicKey, data: Any) -> tuple[Any, ...]:
    """Inverse of :func:`ciphertexts_to_bytes`; every ciphertext is checked to lie in Z_{n^2}^*."""
    arr = np.asarray(data)
    width = public_key.ciphertext_bytes
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != width:
        raise ProtocolError(
            f"ciphertexts travel as a (k, {width}) uint8 array for this key, "
            f"got {arr.dtype} {arr.shape}"
        )
    buf = arr.tobytes()
    return tuple(
        public_key.check_ciphertext(int.from_bytes(buf[i : i + width], "big"))
        for i in range(0, len(buf), width)
    )


@dataclass(frozen=True, kw_only=True)
class EncryptedVector:
    """An array of Paillier ciphertexts under one key, all at ``frac_bits`` fractional bits."""

    public_key: PublicKey
    ciphertexts: tuple[Any, ...]
    shape: tuple[int, ...]
    frac_bits: int

    def __post_init__(self) -> None:
        if int(np.prod(self.shape, dtype=np.int64)) != len(self.ciphertexts):
            raise ConfigError(
                f"shape {self.shape} does not match {len(self.ciphertexts)} ciphertexts"
            )
        if self.frac_bits < 0:
            raise ConfigError(f"frac_bits must be >= 0, got {self.frac_bits}")

    def __len__(self) -> int:
        return len(self.ciphertexts)

    def _like(self, cts: Sequence[Any], *, frac_bits: int | None = None) -> EncryptedVector:
        return EncryptedVector(
            public_key=self.public_key,
            ciphertexts=tuple(cts),
            shape=self.shape,
            frac_bits=self.frac_bits if frac_bits is None else frac_bits,
        )

    def rescale(self, frac_bits: int) -> EncryptedVector:
        """The same values at more fractional bits (exact: a multiplication by a power of 2)."""
        if frac_bits < self.frac_bits:
            raise ConfigError("rescale only adds fractional bits; it cannot drop them exactly")
        if frac_bits == self.frac_bits:
            return self
        k = 1 << (frac_bits - self.frac_bits)
        nsq = self.public_key.nsquare
        return self._like([gmpy2.powmod(c, k, nsq) for c in self.ciphertexts], frac_bits=frac_bits)

    def add(self, other: EncryptedVector) -> EncryptedVector:
        """Elementwise Enc(a) * Enc(b) = Enc(a + b); fractional bits are aligned first."""
        if other.public_key != self.public_key:
            raise ConfigError("cannot add ciphertexts under different public keys")
        if other.shape != self.shape:
            raise ConfigError(f"cannot add shapes {self.shape} and {other.shape}")
        f = max(self.frac_bits, other.frac_bits)
        a, b = self.rescale(f), other.rescale(f)
        nsq = self.public_key.nsquare
        return a._like([x * y % nsq for x, y in zip(a.ciphertexts, b.ciphertexts)])

    def add_plain(self, values: Any) -> EncryptedVector:
        """Enc(a) * (1 + b*n) = Enc(a + b) for a plaintext array ``b`` of the same shape."""
        arr = np.broadcast_to(np.asarray(values), self.shape)
        n, nsq = self.public_key.n, self.public_key.nsquare
        plains = encode_ints(to_fixed(arr, self.frac_bits), n)
        return self._like([c * (1 + m * n) % nsq for c, m in zip(self.ciphertexts, plains)])

    def __add__(self, other: Any) -> EncryptedVector:
        if isinstance(other, EncryptedVector):
            return self.add(other)
        return self.add_plain(other)

    def mul(self, scalars: Any, *, frac_bits: int = 0) -> EncryptedVector:
        """Elementwise Enc(a) ** k = Enc(a * k) for plaintext scalars at ``frac_bits``.

        The result has ``self.frac_bits + frac_bits`` fractional bits. Negative scalars
        exponentiate the inverse ciphertext, so exponents stay as small as the scalars.
        """
        arr = np.broadcast_to(np.asarray(scalars), self.shape)
        ks = to_fixed(arr, frac_bits)
        nsq = self.public_key.nsquare
        out = []
        for c, k in zip(self.ciphertexts, ks):
            out.append(
                gmpy2.powmod(c, k, nsq) if k >= 0 else gmpy2.powmod(gmpy2.invert(c, nsq), -k, nsq)
            )
        return self._like(out, frac_bits=self.frac_bits + frac_bits)

    def sum(self) -> EncryptedVector:
        """Enc(sum of all elements), as a 0-d vector."""
        nsq = self.public_key.nsquare
        acc = gmpy2.mpz(1)
        for c in self.ciphertexts:
            acc = acc * c % nsq
        return EncryptedVector(
            public_key=self.public_key, ciphertexts=(acc,), shape=(), frac_bits=self.frac_bits
        )

    def matmul(self, matrix: Any, *, frac_bits: int = 0) -> EncryptedVector:
        """Enc(x) @ M for a 1-d encrypted x of length k and a plaintext (k, d) matrix M.

        Each output is ``prod_i Enc(x_i) ** M[i, j]``, computed by one multi-exponentiation
        per column; negative entries use the inverse ciphertexts.
        """
        mat = np.asarray(matrix)
        if len(self.shape) != 1 or mat.ndim != 2 or mat.shape[0] != self.shape[0]:
            raise ConfigError(
                f"matmul takes a 1-d vector and a (len, d) matrix; got {self.shape} @ {mat.shape}"
            )
        k, d = mat.shape
        nsq = self.public_key.nsquare
        fixed = np.array(to_fixed(mat, frac_bits), dtype=object).reshape(k, d)
        small = bool(k == 0 or max(abs(int(v)) for v in fixed.reshape(-1)) < (1 << 62))
        inverses: list[Any] | None = None
        if any(int(v) < 0 for v in fixed.reshape(-1)):
            inverses = [gmpy2.invert(c, nsq) for c in self.ciphertexts]
        out = []
        for j in range(d):
            col = fixed[:, j]
            neg = [int(v) < 0 for v in col]
            bases = [
                inv if is_neg else c
                for c, inv, is_neg in zip(self.ciphertexts, inverses or self.ciphertexts, neg)
            ]
            mags: np.ndarray | list[int] = (
                np.abs(col.astype(np.int64)) if small else [abs(int(v)) for v in col]
            )
            out.append(multi_exp(bases, mags, nsq))
        return EncryptedVector(
            public_key=self.public_key,
            ciphertexts=tuple(out),
            shape=(d,),
            frac_bits=self.frac_bits + frac_bits,
        )

    def rerandomize(self, pool: RandomnessPool | None = None) -> EncryptedVector:
        """Fresh-looking ciphertexts of the same values (multiply each by a new r**n).

        Results of ``mul``/``matmul`` are deterministic functions of their inputs (a zero
        scalar gives exactly 1); rerandomize before sending them to anyone who knows those
        inputs.
        """
        nsq = self.public_key.nsquare
        rns = obfuscators(self.public_key, len(self), pool)
        return self._like([c * rn % nsq for c, rn in zip(self.ciphertexts, rns)])

    def to_payload(self) -> dict[str, Any]:
        """Wire form: raw ciphertext bytes plus shape and scale (the key travels separately)."""
        return {
            "ct": ciphertexts_to_bytes(self.public_key, self.ciphertexts),
            "shape": list(self.shape),
            "frac_bits": self.frac_bits,
        }

    @classmethod
    def from_payload(cls, public_key: PublicKey, payload: Mapping[str, Any]) -> EncryptedVector:
        """Parse :meth:`to_payload` output, checking every ciphertext; ProtocolError if bad."""
        try:
            shape = tuple(int(s) for s in payload["shape"])
            frac_bits = int(payload["frac_bits"])
            ct = payload["ct"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"not an encrypted vector payload: {exc}") from None
        if frac_bits < 0 or frac_bits > 4096 or any(s < 0 for s in shape):
            raise ProtocolError("an encrypted vector payload has a bad shape or frac_bits")
        cts = ciphertexts_from_bytes(public_key, ct)
        try:
            return cls(public_key=public_key, ciphertexts=cts, shape=shape, frac_bits=frac_bits)
        except ConfigError as exc:
            raise ProtocolError(str(exc)) from None
