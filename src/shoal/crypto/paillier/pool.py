"""An offline pool of precomputed ``r**n mod n**2``: online encryption is one multiplication.

Each factor is handed out once and dropped, so every ciphertext still gets its own uniform
``r`` and encryption stays semantically secure; reusing one would reveal the difference of
the two plaintexts (``c1 / c2 = (1+n)**(m1-m2)``). An empty pool refills itself on demand
rather than ever reusing a factor.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from shoal.crypto.paillier.keys import PrivateKey, PublicKey
from shoal.errors import ConfigError

__all__ = ["RandomnessPool"]


class RandomnessPool:
    """Precomputed obfuscators for one public key, each used exactly once.

    Fill it while idle (:meth:`refill`); :meth:`take` pops one factor, computing a fresh one
    when the pool is empty. A key with a DJN base makes each factor a short fixed-base
    power (~10x cheaper); without one, the private key at hand (the key holder encrypting
    its own data) gives the ~4x cheaper CRT sampler.
    """

    def __init__(
        self, *, public_key: PublicKey, size: int = 0, private_key: PrivateKey | None = None
    ) -> None:
        if size < 0:
            raise ConfigError(f"pool size must be >= 0, got {size}")
        if private_key is not None and private_key.public_key != public_key:
            raise ConfigError("the private key does not belong to the pool's public key")
        self.public_key = public_key
        self._private = private_key
        self._factors: deque[Any] = deque()
        self.generated = 0
        self.taken = 0
        if size:
            self.refill(size)

    def __len__(self) -> int:
        return len(self._factors)

    def _fresh(self) -> Any:
        self.generated += 1
        if self._private is not None:
            return self._private.random_rn()
        return self.public_key.random_rn()

    def refill(self, count: int) -> None:
        """Add ``count`` fresh factors (the offline, expensive part)."""
        for _ in range(count):
            self._factors.append(self._fresh())

    def take(self) -> Any:
        """One never-used factor; popped, so no factor can serve two ciphertexts."""
        self.taken += 1
        if self._factors:
            return self._factors.popleft()
        return self._fresh()

    def take_many(self, count: int) -> list[Any]:
        return [self.take() for _ in range(count)]
