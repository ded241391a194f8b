"""Masked decryption: a party has the key holder decrypt ``Enc(x + r)`` and removes ``r``.

The mask r is uniform in Z_n, added to the plaintext mod n, so the key holder's view of
``x + r mod n`` is uniform and independent of x (perfect hiding, not statistical). Raw
plaintexts travel as fixed-width big-endian bytes, never as floats, so unmasking is exact.
"""

from __future__ import annotations

import secrets
from typing import Any

import gmpy2
import numpy as np

from shoal.crypto.paillier.encoding import decode_ints, from_fixed
from shoal.crypto.paillier.keys import PrivateKey, PublicKey
from shoal.crypto.paillier.packing import Packing, pack_encrypted
from shoal.crypto.paillier.pool import RandomnessPool
from shoal.crypto.paillier.vector import EncryptedVector
from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "decrypt_raw",
    "ints_from_bytes",
    "ints_to_bytes",
    "mask",
    "mask_packed",
    "unmask",
    "unmask_packed",
]


def mask(
    vector: EncryptedVector, *, pool: RandomnessPool | None = None
) -> tuple[EncryptedVector, list[int]]:
    """``Enc(x + r mod n)`` with fresh uniform masks r (kept secret by the caller).

    The result is also rerandomized, so the key holder cannot link it to any ciphertext it
    saw before.
    """
    pk = vector.public_key
    n, nsq = int(pk.n), pk.nsquare
    masks = [secrets.randbelow(n) for _ in range(len(vector))]
    rns = pool.take_many(len(vector)) if pool is not None else None
    cts = []
    for i, (c, r) in enumerate(zip(vector.ciphertexts, masks)):
        rn = rns[i] if rns is not None else pk.random_rn()
        cts.append(c * (1 + gmpy2.mpz(r) * pk.n) % nsq * rn % nsq)
    out = EncryptedVector(
        public_key=pk, ciphertexts=tuple(cts), shape=vector.shape, frac_bits=vector.frac_bits
    )
    return out, masks


def mask_packed(
    vector: EncryptedVector, packing: Packing, *, pool: RandomnessPool | None = None
) -> tuple[EncryptedVector, list[int]]:
    """:func:`mask` of the vector packed ``packing.slots`` values per ciphertext (see
    :func:`~shoal.crypto.paillier.packing.pack_encrypted` for the bound on the values): one
    mask, one fresh ``r**n`` and one decryption per packed ciphertext instead of per value.
    Each masked plaintext is still uniform in Z_n."""
    packed = pack_encrypted(vector, packing)
    flat = EncryptedVector(
        public_key=vector.public_key,
        ciphertexts=packed.ciphertexts,
        shape=(len(packed.ciphertexts),),
        frac_bits=0,
    )
    return mask(flat, pool=pool)


def unmask_packed(
    public_key: PublicKey,
    plains: list[int],
    masks: list[int],
    *,
    packing: Packing,
    count: int,
    shape: Any,
) -> np.ndarray:
    """The ``count`` values of :func:`mask_packed` from the key holder's masked plaintexts."""
    if len(plains) != len(masks):
        raise ProtocolError(f"got {len(plains)} masked values back for {len(masks)} masks")
    n = int(public_key.n)
    ints = packing.unpack([(m - r) % n for m, r in zip(plains, masks)], count, 1)
    return from_fixed(ints, packing.frac_bits, tuple(shape))


def decrypt_raw(private_key: PrivateKey, vector: EncryptedVector) -> list[int]:
    """Raw plaintexts in [0, n) (what a key holder returns for masked vectors)."""
    if vector.public_key != private_key.public_key:
        raise ConfigError("this vector was encrypted under another public key")
    return [int(private_key.raw_decrypt(c)) for c in vector.ciphertexts]


def unmask(
    public_key: PublicKey, plains: list[int], masks: list[int], *, frac_bits: int, shape: Any
) -> np.ndarray:
    """``x`` from ``x + r mod n``: exact, then decoded as signed fixed point."""
    if len(plains) != len(masks):
        raise ProtocolError(f"got {len(plains)} masked values back for {len(masks)} masks")
    n = int(public_key.n)
    ints = decode_ints([(m - r) % n for m, r in zip(plains, masks)], n)
    return from_fixed(ints, frac_bits, tuple(shape))


def ints_to_bytes(public_key: PublicKey, ints: list[int]) -> np.ndarray:
    """Plaintexts in [0, n) as a (k, bytes of n) uint8 array."""
    width = (public_key.bits + 7) // 8
    raw = b"".join(int(v).to_bytes(width, "big") for v in ints)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(ints), width)


def ints_from_bytes(public_key: PublicKey, data: Any) -> list[int]:
    arr = np.asarray(data)
    width = (public_key.bits + 7) // 8
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != width:
        raise ProtocolError(f"plaintexts travel as a (k, {width}) uint8 array for this key")
    raw = arr.tobytes()
    out = [int.from_bytes(raw[i : i + width], "big") for i in range(0, len(raw), width)]
    if any(v >= int(public_key.n) for v in out):
        raise ProtocolError("a returned plaintext is not below n")
    return out
