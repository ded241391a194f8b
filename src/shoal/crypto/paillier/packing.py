"""Packing several fixed-point values into one Paillier plaintext, with addition headroom.

A signed value v in [-2**(value_bits-1), 2**(value_bits-1)) is stored as ``v + offset`` in a
slot of ``slot_bits = value_bits + ceil(log2(additions + 1))`` bits, so a packed ciphertext
can be the (weighted) sum of up to ``additions + 1`` packed plaintexts before a slot could
carry into its neighbour. The packed vector tracks that total weight and refuses any
operation that would exceed it, so overflow is refused before it can happen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gmpy2
import numpy as np

from shoal.crypto.paillier.encoding import from_fixed, to_fixed
from shoal.crypto.paillier.keys import PrivateKey, PublicKey
from shoal.crypto.paillier.pool import RandomnessPool
from shoal.crypto.paillier.vector import (
    EncryptedVector,
    ciphertexts_from_bytes,
    ciphertexts_to_bytes,
    obfuscators,
)
from shoal.errors import ConfigError, PlaintextOverflow, ProtocolError

__all__ = ["PackedVector", "Packing", "decrypt_packed", "encrypt_packed", "pack_encrypted"]


@dataclass(frozen=True, kw_only=True)
class Packing:
    """Slot layout for one key size: ``slots`` values of ``value_bits`` per plaintext."""

    key_bits: int
    value_bits: int
    additions: int = 0
    frac_bits: int = 0
    slot_bits: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        if self.value_bits < 2 or self.additions < 0 or self.frac_bits < 0:
            raise ConfigError("packing needs value_bits >= 2, additions >= 0, frac_bits >= 0")
        slot_bits = self.value_bits + self.additions.bit_length()
        # Keep the packed plaintext below 2**(key_bits - 1) < n: no wrap around n ever.
        slots = (self.key_bits - 1) // slot_bits
        if slots < 1:
            raise ConfigError(
                f"a {slot_bits}-bit slot does not fit a {self.key_bits}-bit key; "
                "lower value_bits or additions"
            )
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "slots", slots)

    @property
    def capacity(self) -> int:
        """Largest total weight (number of summed packed plaintexts) a slot can hold."""
        return self.additions + 1

    @property
    def offset(self) -> int:
        return 1 << (self.value_bits - 1)

    def pack(self, values: Any) -> list[int]:
        """Fixed-point values -> packed plaintext integers (slot 0 in the low bits)."""
        ints = to_fixed(np.asarray(values), self.frac_bits)
        half = self.offset
        for v in ints:
            if not -half <= v < half:
                raise PlaintextOverflow(
                    f"a value needs more than {self.value_bits} bits at {self.frac_bits} "
                    "fractional bits; raise value_bits or scale the data"
                )
        out = []
        for start in range(0, len(ints), self.slots):
            m = 0
            for j, v in enumerate(ints[start : start + self.slots]):
                m |= (v + half) << (j * self.slot_bits)
            out.append(m)
        return out

    def unpack(self, plaintexts: list[Any], count: int, weight: int) -> list[int]:
        """Packed plaintexts -> ``count`` signed slot values, removing ``weight`` offsets."""
        mask = (1 << self.slot_bits) - 1
        limit = 1 << (self.slots * self.slot_bits)
        out: list[int] = []
        for m in plaintexts:
            m = int(m)
            if m >= limit:
                raise PlaintextOverflow("a packed plaintext exceeds its slots; it overflowed")
            for j in range(self.slots):
                if len(out) == count:
                    break
                out.append(((m >> (j * self.slot_bits)) & mask) - weight * self.offset)
        if len(out) != count:
            raise ProtocolError(f"packed vector holds fewer than {count} values")
        return out


@dataclass(frozen=True, kw_only=True)
class PackedVector:
    """Packed ciphertexts of ``count`` values; ``weight`` is how many plaintexts they sum."""

    public_key: PublicKey
    packing: Packing
    ciphertexts: tuple[Any, ...]
    count: int
    weight: int = 1

    def __post_init__(self) -> None:
        if self.packing.key_bits != self.public_key.bits:
            raise ConfigError("the packing was laid out for another key size")
        need = -(-self.count // self.packing.slots)
        if len(self.ciphertexts) != need:
            raise ConfigError(f"{self.count} values need {need} packed ciphertexts")
        if not 1 <= self.weight <= self.packing.capacity:
            raise PlaintextOverflow(
                f"weight {self.weight} exceeds the packing's headroom of "
                f"{self.packing.capacity} (additions={self.packing.additions})"
            )

    def _check(self, weight: int) -> None:
        if weight > self.packing.capacity:
            raise PlaintextOverflow(
                f"this operation would sum {weight} packed plaintexts but the slots have "
                f"headroom for {self.packing.capacity}; pack with more additions"
            )

    def add(self, other: PackedVector) -> PackedVector:
        """Slotwise Enc(a) + Enc(b); refused if the slots could overflow."""
        if other.public_key != self.public_key or other.packing != self.packing:
            raise ConfigError("packed vectors differ in key or packing")
        if other.count != self.count:
            raise ConfigError(f"cannot add {self.count} and {other.count} packed values")
        weight = self.weight + other.weight
        self._check(weight)
        nsq = self.public_key.nsquare
        cts = tuple(a * b % nsq for a, b in zip(self.ciphertexts, other.ciphertexts))
        return PackedVector(
            public_key=self.public_key,
            packing=self.packing,
            ciphertexts=cts,
            count=self.count,
            weight=weight,
        )

    def mul(self, k: int) -> PackedVector:
        """All slots times a positive integer ``k`` (counts as ``k`` additions of headroom)."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError("a packed vector can only be multiplied by an integer >= 1")
        weight = self.weight * int(k)
        self._check(weight)
        nsq = self.public_key.nsquare
        cts = tuple(gmpy2.powmod(c, int(k), nsq) for c in self.ciphertexts)
        return PackedVector(
            public_key=self.public_key,
            packing=self.packing,
            ciphertexts=cts,
            count=self.count,
            weight=weight,
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "ct": ciphertexts_to_bytes(self.public_key, self.ciphertexts),
            "count": self.count,
            "weight": self.weight,
            "value_bits": self.packing.value_bits,
            "additions": self.packing.additions,
            "frac_bits": self.packing.frac_bits,
        }

    @classmethod
    def from_payload(cls, public_key: PublicKey, payload: Mapping[str, Any]) -> PackedVector:
        try:
            packing = Packing(
                key_bits=public_key.bits,
                value_bits=int(payload["value_bits"]),
                additions=int(payload["additions"]),
                frac_bits=int(payload["frac_bits"]),
            )
            return cls(
                public_key=public_key,
                packing=packing,
                ciphertexts=ciphertexts_from_bytes(public_key, payload["ct"]),
                count=int(payload["count"]),
                weight=int(payload["weight"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (PlaintextOverflow, ProtocolError)):
                raise
            raise ProtocolError(f"not a packed vector payload: {exc}") from None


def encrypt_packed(
    public_key: PublicKey,
    values: Any,
    packing: Packing,
    *,
    pool: RandomnessPool | None = None,
    private_key: PrivateKey | None = None,
) -> PackedVector:
    """Pack a 1-d array into ``ceil(len / slots)`` plaintexts and encrypt each.

    ``pool`` and ``private_key`` choose where each ``r**n`` comes from, as in ``encrypt``.
    """
    if packing.key_bits != public_key.bits:
        raise ConfigError("the packing was laid out for another key size")
    flat = np.asarray(values).reshape(-1)
    plains = packing.pack(flat)
    n, nsq = public_key.n, public_key.nsquare
    rns = obfuscators(public_key, len(plains), pool, private_key)
    cts = tuple((1 + m * n) * rn % nsq for m, rn in zip(plains, rns))
    return PackedVector(
        public_key=public_key, packing=packing, ciphertexts=cts, count=int(flat.size)
    )


def decrypt_packed(private_key: PrivateKey, vector: PackedVector) -> np.ndarray:
    """Decrypt and unpack to float64 (int64 when the packing has no fractional bits)."""
    if vector.public_key != private_key.public_key:
        raise ConfigError("this vector was encrypted under another public key")
    plains = [private_key.raw_decrypt(c) for c in vector.ciphertexts]
    ints = vector.packing.unpack(plains, vector.count, vector.weight)
    return from_fixed(ints, vector.packing.frac_bits, (vector.count,))


def pack_encrypted(vector: EncryptedVector, packing: Packing) -> PackedVector:
    """Pack an encrypted vector's values into ``ceil(len / slots)`` ciphertexts, without the
    key: ``Enc(sum_j (v_j + offset) * 2**(j * slot_bits))`` by Horner's rule, ``slot_bits``
    squarings per value.

    Fewer ciphertexts to mask, rerandomize and decrypt. Encrypted values cannot be checked,
    so the caller vouches for the bound: each value, at the vector's fractional bits, lies in
    ``[-offset, offset)`` (``packing.value_bits`` signed bits); one outside it would carry into
    its neighbour. The offsets keep every slot non-negative, and the packed plaintext stays
    below ``2**(key_bits - 1) < n``, so a value encoded mod n as ``n - |v|`` packs exactly.
    """
    pk = vector.public_key
    if packing.key_bits != pk.bits:
        raise ConfigError("the packing was laid out for another key size")
    if packing.frac_bits != vector.frac_bits:
        raise ConfigError(
            f"the packing holds values at {packing.frac_bits} fractional bits, the vector "
            f"has {vector.frac_bits}"
        )
    nsq = pk.nsquare
    offset = 1 + packing.offset * pk.n  # (1 + n)**offset: a trivial encryption of offset
    shift = gmpy2.mpz(1) << packing.slot_bits
    cts = vector.ciphertexts
    out = []
    for start in range(0, len(cts), packing.slots):
        acc: Any = None
        for c in reversed(cts[start : start + packing.slots]):
            c = c * offset % nsq
            acc = c if acc is None else gmpy2.powmod(acc, shift, nsq) * c % nsq
        out.append(acc)
    return PackedVector(public_key=pk, packing=packing, ciphertexts=tuple(out), count=len(cts))
