"""Count-Min sketches of key prefixes, for federated heavy hitters (GROUP BY on unknown keys).

A key is its bytes (party.key_bytes) followed by an end-of-key symbol; level l of the
prefix tree holds the tokens of length l + 1 symbols: ``key[:l+1]`` while the key goes on,
``key + END`` where it stops. Each party sketches every level in one Count-Min table of
``depth`` rows x ``width`` columns, with hash functions drawn from a per-query seed every
party and the coordinator share (the hashes are public: the privacy comes from the noise,
not from them). Sketches are linear: the sum of the parties' tables is the table of their
pooled rows, so SecAgg+ can sum them. The coordinator walks the tree on the summed (noised)
table: each surviving prefix asks for its 257 children, and those whose estimate passes the
threshold survive; completed keys are the candidates. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["END", "SYMBOLS", "SketchShape", "decode", "estimate", "sketch", "token_prints"]

END = 256  # the end-of-key symbol, after the 256 byte values
SYMBOLS = END + 1
PRIME = (1 << 31) - 1  # fingerprints and bucket hashes live in Z_P; products fit in int64


@dataclass(frozen=True, kw_only=True)
class SketchShape:
    """The public layout of a query's sketches: ``levels`` tables of depth x width, and the
    seed their hash functions come from (drawn per query by the coordinator)."""

    levels: int
    depth: int
    width: int
    seed: int

    @property
    def size(self) -> int:
        return self.levels * self.depth * self.width

    def hashes(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(r, a, c): a token's fingerprint is the polynomial of its symbols at r mod P, its
        bucket in row j of level l is ((a[l, j] * print + c[l, j]) mod P) mod width."""
        rng = np.random.default_rng(self.seed)
        r = int(rng.integers(1 << 20, PRIME))
        a = rng.integers(1, PRIME, size=(self.levels, self.depth), dtype=np.int64)
        c = rng.integers(0, PRIME, size=(self.levels, self.depth), dtype=np.int64)
        return r, a, c


def token_prints(raw: bytes, r: int, levels: int) -> list[int]:
    """The fingerprint of ``raw``'s token at each level it reaches (at most ``levels``): its
    first l + 1 bytes, or the whole key and END at the level where it stops. A key longer than
    ``levels - 1`` bytes never stops, and has no token on the last level."""
    out: list[int] = []
    f = 0
    for level in range(levels):
        if level < len(raw):
            if level == levels - 1:
                break  # too long to complete: nothing the tree could release
            f = (f * r + raw[level] + 1) % PRIME
            out.append(f)
        else:
            out.append((f * r + END + 1) % PRIME)
            break
    return out


def _buckets(prints: np.ndarray, a: np.ndarray, c: np.ndarray, width: int) -> np.ndarray:
    """Buckets of ``prints`` (any shape) in each of the depth rows: shape (depth, *prints)."""
    p = prints.astype(np.int64)[None, ...]
    aa = a.reshape((-1,) + (1,) * prints.ndim)
    cc = c.reshape((-1,) + (1,) * prints.ndim)
    out: np.ndarray = ((aa * p + cc) % PRIME) % width
    return out


def sketch(
    keys: Mapping[bytes, float] | Iterable[tuple[bytes, float]], shape: SketchShape
) -> np.ndarray:
    """The Count-Min table (levels, depth, width) of keys with multiplicities: each row adds
    its multiplicity to one cell per depth row on every level its key reaches."""
    items = keys.items() if isinstance(keys, Mapping) else keys
    r, a, c = shape.hashes()
    table = np.zeros((shape.levels, shape.depth, shape.width), dtype=np.float64)
    rows = np.arange(shape.depth)
    for raw, weight in items:
        prints = token_prints(raw, r, shape.levels)
        for level, f in enumerate(prints):
            cols = ((a[level] * f + c[level]) % PRIME) % shape.width
            table[level, rows, cols] += weight
    return table


def estimate(table: np.ndarray, shape: SketchShape, level: int, prints: np.ndarray) -> np.ndarray:
    """Count-Min estimates of the tokens ``prints`` on ``level``: the least of their cells
    (without noise, never below the true count: other tokens only add to a cell)."""
    _, a, c = shape.hashes()
    cols = _buckets(np.asarray(prints), a[level], c[level], shape.width)
    cells = table[level][np.arange(shape.depth).reshape((-1,) + (1,) * (cols.ndim - 1)), cols]
    out: np.ndarray = cells.min(axis=0)
    return out


def threshold(noise_scale: float, depth: int, candidates: int) -> float:
    """The estimate a candidate must reach. With Laplace(b) noise in every cell, a token
    that no row holds (and no other token collides with) passes when all ``depth`` of its
    noisy cells do: P = (exp(-t/b) / 2)^depth; t is set so that about one of the level's
    ``candidates`` passes in ten levels by noise alone. Exact tables: any count (0.5)."""
    if noise_scale <= 0:
        return 0.5
    t = noise_scale * (math.log(10.0 * max(candidates, 1)) / depth - math.log(2.0))
    return max(t, 0.5)


def decode(
    table: np.ndarray,
    shape: SketchShape,
    *,
    noise_scale: float,
    max_keys: int,
) -> tuple[list[tuple[float, bytes]], bool]:
    """Walk the prefix tree on a summed table: ``([(estimate, key bytes)], overflowed)``.

    Each level extends the surviving prefixes by every byte and END and keeps the children
    whose estimate passes ``threshold``; at most ``max_keys`` prefixes survive a level (the
    highest estimates; ``overflowed`` says some were cut), and completed keys are returned,
    highest estimate first, at most ``max_keys`` of them."""
    r, _, _ = shape.hashes()
    survivors: list[bytes] = [b""]
    prints = np.zeros(1, dtype=np.int64)
    found: list[tuple[float, bytes]] = []
    overflowed = False
    symbols = np.arange(SYMBOLS, dtype=np.int64)
    for level in range(shape.levels):
        if not survivors:
            break
        children = (prints[:, None] * r + symbols[None, :] + 1) % PRIME
        est = estimate(table, shape, level, children)
        t = threshold(noise_scale, shape.depth, children.size)
        passed = est >= t
        for i in np.nonzero(passed[:, END])[0]:
            found.append((float(est[i, END]), survivors[int(i)]))
        if level == shape.levels - 1:
            break
        rows, syms = np.nonzero(passed[:, :END])
        order = np.argsort(-est[rows, syms], kind="stable")
        if order.size > max_keys:
            overflowed = True
            order = order[:max_keys]
        rows, syms = rows[order], syms[order]
        survivors = [survivors[int(i)] + bytes([int(s)]) for i, s in zip(rows, syms)]
        prints = children[rows, syms]
    found.sort(key=lambda t: -t[0])
    if len(found) > max_keys:
        overflowed = True
        found = found[:max_keys]
    return found, overflowed
