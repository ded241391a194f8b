"""ECDH private set intersection on Ristretto255 (libsodium through ``rbcl``).

Each party hashes its ids with a per-session salt to group elements, blinds them with a
secret scalar and shuffles them; the others add their own blinding in turn. Ids held by
everyone end up as the same fully blinded point, and nothing else matches. Every party
orders the intersection by those points, so all parties get the same row order without
anyone revealing an id. See docs/vertical.md for what each party and the coordinator learn.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import ConfigError, DataError, ProtocolError

__all__ = ["POINT_BYTES", "PsiParty", "PsiResult", "new_salt", "run_psi"]

POINT_BYTES = 32
_DOMAIN = b"shoal.psi.v1"


def _rbcl() -> Any:
    import rbcl  # a core dependency; imported lazily so `shoal --help` stays fast

    return rbcl


def new_salt() -> bytes:
    """A fresh per-session salt (32 bytes from the OS)."""
    return os.urandom(32)


def _points_array(points: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(points), dtype=np.uint8).reshape(len(points), POINT_BYTES)


def _check_points(points: Any, what: str) -> list[bytes]:
    arr = np.asarray(points)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != POINT_BYTES:
        raise ProtocolError(f"{what}: expected a (k, {POINT_BYTES}) uint8 array of points")
    rb = _rbcl()
    raw = arr.tobytes()
    out = [raw[i : i + POINT_BYTES] for i in range(0, len(raw), POINT_BYTES)]
    for p in out:
        if not rb.crypto_core_ristretto255_is_valid_point(p):
            raise ProtocolError(f"{what}: a value is not a valid Ristretto255 point")
    return out


@dataclass(frozen=True, kw_only=True)
class PsiResult:
    """Rows of this party's ids in the intersection, in the order every party shares."""

    rows: np.ndarray  # indices into this party's ids
    size: int


class PsiParty:
    """One party's side of the protocol: its ids, its secret scalar, its secret shuffle."""

    def __init__(self, *, ids: Sequence[Any], salt: bytes) -> None:
        if len(salt) < 16:
            raise ConfigError("the PSI salt must be at least 16 bytes")
        keys = [str(i) for i in ids]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise DataError(f"duplicate id {dup!r}: ids must be unique to align records")
        rb = _rbcl()
        self._n = len(keys)
        # The secret blinding scalar, from libsodium's OS-seeded generator.
        self._key = rb.crypto_core_ristretto255_scalar_random()
        self._salt = bytes(salt)
        # A secret shuffle hides which blinded point belongs to which of our rows.
        self._order = _secret_permutation(self._n)
        self._hashed = [_hash_to_group(self._salt, keys[i]) for i in self._order.tolist()]

    def blind_own(self) -> np.ndarray:
        """Our ids as once-blinded points, in our secret order (safe to hand to the others)."""
        return self.blind(self._hashed)

    def blind(self, points: Any) -> np.ndarray:
        """Add our blinding to another party's points (checked), keeping their order."""
        rb = _rbcl()
        pts = points if isinstance(points, list) else _check_points(points, "peer points")
        return _points_array([rb.crypto_scalarmult_ristretto255(self._key, p) for p in pts])

    def intersect(self, own_full: Any, others_full: Sequence[Any]) -> PsiResult:
        """The intersection, from our points and every other party's, all fully blinded."""
        mine = _check_points(own_full, "own fully blinded points")
        if len(mine) != self._n:
            raise ProtocolError(f"got {len(mine)} fully blinded points back for {self._n} ids")
        common = set(mine)
        for other in others_full:
            common &= set(_check_points(other, "peer fully blinded points"))
        pos = {p: i for i, p in enumerate(mine)}
        shared = sorted(common)  # one order for every party: by the shared point's bytes
        rows = np.array([int(self._order[pos[p]]) for p in shared], dtype=np.int64)
        return PsiResult(rows=rows, size=len(shared))


def _hash_to_group(salt: bytes, key: str) -> bytes:
    digest = hashlib.sha512(_DOMAIN + len(salt).to_bytes(2, "big") + salt + key.encode()).digest()
    out: bytes = _rbcl().crypto_core_ristretto255_from_hash(digest)
    return out


def _secret_permutation(n: int) -> np.ndarray:
    # Fisher-Yates with the OS's randomness: the order must be unpredictable to the others.
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)


def run_psi(parties: Sequence[PsiParty]) -> list[PsiResult]:
    """All parties in one process (simulation and tests): each set passes through all keys."""
    if len(parties) < 2:
        raise ConfigError("PSI needs at least two parties")
    full = []
    for i, owner in enumerate(parties):
        pts = owner.blind_own()
        for j, other in enumerate(parties):
            if j != i:
                pts = other.blind(pts)
        full.append(pts)
    return [
        party.intersect(full[i], [f for j, f in enumerate(full) if j != i])
        for i, party in enumerate(parties)
    ]
