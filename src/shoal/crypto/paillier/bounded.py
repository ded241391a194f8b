"""Decrypting values known to be short: packed under encryption, checked, else one by one.

When the key holder knows every encoded value of a vector lies below ``2**bound_bits`` in
magnitude, it need not pay a full decryption per ciphertext. It packs the ciphertexts
itself (:func:`~shoal.crypto.paillier.packing.pack_encrypted`, public operations only),
decrypts one ciphertext per ``slots`` values, and checks the unpacked values against one
more decryption: ``prod c_i ** w_i`` for secret uniform 64-bit weights must decrypt to
``sum w_i v_i``. If a value broke the bound (it would carry into its neighbour's slot) the
check fails except with probability 2**-64, and every ciphertext is then decrypted on its
own by :meth:`~shoal.crypto.paillier.keys.PrivateKey.raw_decrypt_signed`, which is never
wrong either. So a wrong bound costs time, not correctness. See docs/paillier.md.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.crypto.paillier.encoding import from_fixed
from shoal.crypto.paillier.keys import PrivateKey
from shoal.crypto.paillier.multiexp import multi_exp
from shoal.crypto.paillier.packing import Packing, pack_encrypted
from shoal.crypto.paillier.vector import EncryptedVector
from shoal.errors import ConfigError, PlaintextOverflow

__all__ = ["CHECK_BITS", "decrypt_bounded", "raw_decrypt_bounded"]

CHECK_BITS = 64  # bits of each secret check weight: a wrong unpacking passes w.p. 2**-64
# Packing pays slot_bits squarings mod n**2 per value; past ~128-bit slots that costs more
# than the half decryption it replaces, and below 8 values the check does not pay off.
_MAX_SLOT_BITS = 128
_MIN_BATCH = 8


def raw_decrypt_bounded(
    private_key: PrivateKey, ciphertexts: Sequence[Any], bound_bits: int
) -> list[int]:
    """The signed plaintexts of ciphertexts the caller says hold ``|m| < 2**bound_bits``;
    exactly those of a full decryption (a broken bound only makes it slower)."""
    if bound_bits < 0:
        raise ConfigError(f"bound_bits must be >= 0, got {bound_bits}")
    cts = [private_key.checked_ciphertext(c) for c in ciphertexts]
    pk = private_key.public_key
    slot_bits = bound_bits + 1  # v + 2**bound_bits in [0, 2**(bound_bits + 1))
    if len(cts) < _MIN_BATCH or slot_bits > min(_MAX_SLOT_BITS, (pk.bits - 1) // 2):
        return [private_key.raw_decrypt_signed(c, bound_bits) for c in cts]
    packing = Packing(key_bits=pk.bits, value_bits=slot_bits)
    vector = EncryptedVector(public_key=pk, ciphertexts=tuple(cts), shape=(len(cts),), frac_bits=0)
    packed = pack_encrypted(vector, packing)
    weights = [secrets.randbits(CHECK_BITS) for _ in cts]
    check = multi_exp(cts, np.array(weights, dtype=np.uint64), pk.nsquare)
    try:
        plains = [private_key.raw_decrypt(c) for c in packed.ciphertexts]
        values = packing.unpack(plains, len(cts), 1)
        # |sum w_i v_i| < len * 2**(CHECK_BITS + bound_bits): a short plaintext again
        bits = bound_bits + CHECK_BITS + len(cts).bit_length()
        if private_key.raw_decrypt_signed(check, bits) == sum(
            w * v for w, v in zip(weights, values)
        ):
            return values
    except PlaintextOverflow:
        pass  # some value broke the bound badly enough to overflow a packed plaintext
    return [private_key.raw_decrypt_signed(c, bound_bits) for c in cts]


def decrypt_bounded(
    private_key: PrivateKey, vector: EncryptedVector, *, bound_bits: int
) -> np.ndarray:
    """:func:`~shoal.crypto.paillier.vector.decrypt` for a vector whose encoded values
    ``round(x * 2**frac_bits)`` the caller knows lie strictly within ``2**bound_bits`` in
    magnitude (from the encoding or the data, never a guess: a wrong bound costs time)."""
    if vector.public_key != private_key.public_key:
        raise ConfigError("this vector was encrypted under another public key")
    ints = raw_decrypt_bounded(private_key, vector.ciphertexts, bound_bits)
    return from_fixed(ints, vector.frac_bits, vector.shape)
