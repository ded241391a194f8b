"""Cryptographic building blocks: Shamir sharing, a fast PRG, key agreement, quantization,
and secure aggregation (SecAgg+, in :mod:`shoal.crypto.secagg`)."""

from __future__ import annotations

from shoal.crypto.keys import KeyPair, agree, decrypt, derive_key, encrypt
from shoal.crypto.prg import add_mask, expand, keystream
from shoal.crypto.quantize import Quantizer
from shoal.crypto.secagg import SecureSum, secure_sum_tasks
from shoal.crypto.shamir import Share, combine, split

__all__ = [
    "KeyPair",
    "Quantizer",
    "SecureSum",
    "Share",
    "add_mask",
    "agree",
    "combine",
    "decrypt",
    "derive_key",
    "encrypt",
    "expand",
    "keystream",
    "secure_sum_tasks",
    "split",
]
