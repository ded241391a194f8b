"""ECDH private set intersection on Ristretto255 (libsodium through ``rbcl``).

Each party hashes its ids with a per-session salt to group elements, blinds them with a
secret scalar and shuffles them; the others add their own blinding in turn. Ids held by
everyone end up as the same fully blinded point, and nothing else matches. Every party
orders the intersection by those points, so all parties get the same row order without
anyone revealing an id. See docs/vertical.md for what each party and the coordinator learn.

Cost is two scalar multiplications and one hash-to-group per id and party. libsodium is
called through ctypes, which releases the GIL, so a party spreads its group operations over
``workers`` threads (all cores by default); points stay in one ``(k, 32)`` byte array.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


# Below this many points a thread pool costs more than it saves.
_MIN_PARALLEL = 2048


def _as_array(points: Any, what: str) -> np.ndarray:
    if isinstance(points, list):
        if not all(isinstance(p, bytes) and len(p) == POINT_BYTES for p in points):
            raise ProtocolError(f"{what}: expected {POINT_BYTES}-byte points")
        return np.frombuffer(b"".join(points), dtype=np.uint8).reshape(len(points), POINT_BYTES)
    arr = np.asarray(points)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != POINT_BYTES:
        raise ProtocolError(f"{what}: expected a (k, {POINT_BYTES}) uint8 array of points")
    return arr


def _split(raw: bytes, n: int, parts: int) -> list[list[bytes]]:
    """``raw`` (n points back to back) as ``parts`` runs of consecutive points."""
    bounds = np.linspace(0, n, parts + 1).astype(np.int64).tolist()
    return [
        [raw[i * POINT_BYTES : (i + 1) * POINT_BYTES] for i in range(lo, hi)]
        for lo, hi in itertools.pairwise(bounds)
    ]


def _map_chunks(fn: Callable[[list[Any]], bytes], chunks: list[list[Any]]) -> bytes:
    # ctypes drops the GIL around each libsodium call, so the threads use every core.
    if len(chunks) == 1:
        return fn(chunks[0])
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        return b"".join(pool.map(fn, chunks))


def _parts(n: int, workers: int) -> int:
    return 1 if n < _MIN_PARALLEL else max(1, min(workers, n // (_MIN_PARALLEL // 2)))


def _to_points(raw: bytes, n: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, POINT_BYTES)


@dataclass(frozen=True, kw_only=True)
class PsiResult:
    """Rows of this party's ids in the intersection, in the order every party shares."""

    rows: np.ndarray  # indices into this party's ids
    size: int


class PsiParty:
    """One party's side of the protocol: its ids, its secret scalar, its secret shuffle."""

    def __init__(self, *, ids: Sequence[Any], salt: bytes, workers: int | None = None) -> None:
        if len(salt) < 16:
            raise ConfigError("the PSI salt must be at least 16 bytes")
        if workers is not None and workers < 1:
            raise ConfigError(f"PSI workers must be at least 1, got {workers}")
        self._workers = workers or os.cpu_count() or 1
        keys = [str(i) for i in ids]
        if len(set(keys)) != len(keys):
            dup = _first_duplicate(keys)
            raise DataError(f"duplicate id {dup!r}: ids must be unique to align records")
        rb = _rbcl()
        self._n = len(keys)
        # The secret blinding scalar, from libsodium's OS-seeded generator.
        self._key = rb.crypto_core_ristretto255_scalar_random()
        self._salt = bytes(salt)
        # A secret shuffle hides which blinded point belongs to which of our rows.
        self._order = _secret_permutation(self._n)
        shuffled = [keys[i].encode() for i in self._order.tolist()]
        base = _salted(self._salt)

        def hash_chunk(chunk: list[bytes]) -> bytes:
            from_hash = rb.crypto_core_ristretto255_from_hash
            out = []
            for key in chunk:
                h = base.copy()
                h.update(key)
                out.append(from_hash(h.digest()))
            return b"".join(out)

        step = -(-self._n // _parts(self._n, self._workers)) if self._n else 1
        chunks = [shuffled[i : i + step] for i in range(0, self._n, step)] or [[]]
        self._hashed = _to_points(_map_chunks(hash_chunk, chunks), self._n)

    def blind_own(self) -> np.ndarray:
        """Our ids as once-blinded points, in our secret order (safe to hand to the others)."""
        return self.blind(self._hashed)

    def blind(self, points: Any) -> np.ndarray:
        """Add our blinding to another party's points (checked), keeping their order.

        libsodium refuses a value that is not the canonical encoding of a Ristretto255
        point (and a product that would be the identity), so decoding is the check.
        """
        arr = _as_array(points, "peer points")
        n = len(arr)
        key = self._key
        mul = _rbcl().crypto_scalarmult_ristretto255

        def blind_chunk(chunk: list[bytes]) -> bytes:
            try:
                return b"".join([mul(key, p) for p in chunk])
            except RuntimeError:
                raise ProtocolError(
                    "peer points: a value is not a valid Ristretto255 point (or is the identity)"
                ) from None

        return _to_points(
            _map_chunks(blind_chunk, _split(arr.tobytes(), n, _parts(n, self._workers))), n
        )

    def intersect(self, own_full: Any, others_full: Sequence[Any]) -> PsiResult:
        """The intersection, from our points and every other party's, all fully blinded."""
        # Only equality of the bytes matters here: a value that is not a point matches nothing.
        own = _as_array(own_full, "own fully blinded points")
        if len(own) != self._n:
            raise ProtocolError(f"got {len(own)} fully blinded points back for {self._n} ids")
        mine = _split(own.tobytes(), self._n, 1)[0]
        common = set(mine)
        for other in others_full:
            arr = _as_array(other, "peer fully blinded points")
            common &= set(_split(arr.tobytes(), len(arr), 1)[0])
        pos = {p: i for i, p in enumerate(mine)}
        shared = sorted(common)  # one order for every party: by the shared point's bytes
        rows = np.array([int(self._order[pos[p]]) for p in shared], dtype=np.int64)
        return PsiResult(rows=rows, size=len(shared))


def _first_duplicate(keys: list[str]) -> str:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    raise AssertionError("no duplicate")  # callers check len(set(keys)) first


def _salted(salt: bytes) -> Any:
    # the domain and salt prefix hashed once; each id continues from a copy of this state
    return hashlib.sha512(_DOMAIN + len(salt).to_bytes(2, "big") + salt)


def _hash_to_group(salt: bytes, key: str) -> bytes:
    h = _salted(salt)
    h.update(key.encode())
    out: bytes = _rbcl().crypto_core_ristretto255_from_hash(h.digest())
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
