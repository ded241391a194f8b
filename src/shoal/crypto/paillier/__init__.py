"""Paillier additively homomorphic encryption on gmpy2 (g = n + 1, CRT decryption).

Keys from OS randomness, an offline pool of ``r**n`` for one-multiplication encryption,
fixed-point arrays (negatives included), packing with addition headroom, encrypted vector
operations (add, scalar multiply, vector x plaintext matrix) and a faster decryption of
values known to be short. See docs/paillier.md.
"""

from __future__ import annotations

from shoal.crypto.paillier.bounded import CHECK_BITS, decrypt_bounded, raw_decrypt_bounded
from shoal.crypto.paillier.encoding import decode_ints, encode_ints, from_fixed, to_fixed
from shoal.crypto.paillier.keys import MIN_SECURE_BITS, PrivateKey, PublicKey, generate_keypair
from shoal.crypto.paillier.masking import (
    decrypt_raw,
    ints_from_bytes,
    ints_to_bytes,
    mask,
    mask_packed,
    unmask,
    unmask_packed,
)
from shoal.crypto.paillier.multiexp import multi_exp
from shoal.crypto.paillier.packing import (
    PackedVector,
    Packing,
    decrypt_packed,
    encrypt_packed,
    pack_encrypted,
)
from shoal.crypto.paillier.pool import RandomnessPool
from shoal.crypto.paillier.vector import (
    DEFAULT_FRAC_BITS,
    EncryptedVector,
    ciphertexts_from_bytes,
    ciphertexts_to_bytes,
    decrypt,
    encrypt,
)

__all__ = [
    "CHECK_BITS",
    "DEFAULT_FRAC_BITS",
    "MIN_SECURE_BITS",
    "EncryptedVector",
    "PackedVector",
    "Packing",
    "PrivateKey",
    "PublicKey",
    "RandomnessPool",
    "ciphertexts_from_bytes",
    "ciphertexts_to_bytes",
    "decode_ints",
    "decrypt",
    "decrypt_bounded",
    "decrypt_packed",
    "decrypt_raw",
    "encode_ints",
    "encrypt",
    "encrypt_packed",
    "from_fixed",
    "generate_keypair",
    "ints_from_bytes",
    "ints_to_bytes",
    "mask",
    "mask_packed",
    "multi_exp",
    "pack_encrypted",
    "raw_decrypt_bounded",
    "to_fixed",
    "unmask",
    "unmask_packed",
]
