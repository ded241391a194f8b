"""SecAgg+ parameters: validation before a round starts, and the public neighbour graph.

The graph is a Harary graph H(degree, n) (every node linked to its ``degree`` nearest ring
neighbours) over a random relabelling of the nodes derived from the round id, so the
server cannot place nodes by hand once it has fixed the round id (Bell et al., CCS'20).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from shoal.crypto.prg import expand
from shoal.crypto.quantize import dtype_for_bits
from shoal.errors import ConfigError

__all__ = ["SecAggParams", "failure_probability_bound", "harary_neighbours"]

MIN_NODES = 3
MAX_ROUND_ID_CHARS = 128
MAX_CONTEXT_CHARS = 65_536


def failure_probability_bound(*, nodes: int, degree: int, threshold: int, dropouts: int) -> float:
    """Union bound on P(some node keeps fewer than ``threshold`` live neighbours).

    Assumes ``dropouts`` nodes fail uniformly at random, independently of the graph: then a
    node's count of failed neighbours is hypergeometric (population ``nodes - 1``).
    """
    population, bad = nodes - 1, min(dropouts, nodes - 1)
    allowed = degree - threshold
    total = math.comb(population, degree)
    tail = sum(
        math.comb(bad, j) * math.comb(population - bad, degree - j)
        for j in range(allowed + 1, min(bad, degree) + 1)
    )
    return min(1.0, nodes * tail / total)


def harary_adjacent(p: int, n: int, degree: int) -> list[int]:
    """Ring positions adjacent to position ``p`` in the Harary graph H(degree, n)."""
    half = degree // 2
    adj = {(p + d) % n for d in range(1, half + 1)} | {(p - d) % n for d in range(1, half + 1)}
    if degree % 2:
        adj.add((p + n // 2) % n)
    return sorted(adj)


def harary_neighbours(n: int, degree: int) -> list[list[int]]:
    """Ring positions adjacent to each position in the Harary graph H(degree, n)."""
    return [harary_adjacent(p, n, degree) for p in range(n)]


def _default_round_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """Everything the server and every node must agree on before a SecAgg+ round.

    ``nodes`` fixes each node's index (its Shamir point is index + 1, and the lower index of
    a pair adds their shared mask while the higher subtracts it). Each node shares its secrets
    with its ``degree`` graph neighbours, ``threshold`` of whom rebuild them. Up to
    ``max_dropouts`` nodes may fail across all phases; with ``max_failure_probability`` 0
    that is guaranteed to work for any set of failed nodes (needs
    ``degree - threshold >= max_dropouts``), otherwise it works except with at most that
    probability when failures are random (Bell et al.'s logarithmic degree).
    """

    nodes: tuple[str, ...]
    vector_length: int
    threshold: int
    degree: int
    max_dropouts: int
    bits: int = 32
    round_id: str = field(default_factory=_default_round_id)
    max_failure_probability: float = 0.0
    # What every participant applies to its input before masking (the fields summed, clip,
    # node transforms: ``tasks.input_context``). Part of the parameters, and so of every
    # pair's keys (``pair_context``): a node given other parameters, or a masked-input
    # request that differs from them, cannot make its masks cancel with the others'.
    context: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.nodes, list):
            object.__setattr__(self, "nodes", tuple(self.nodes))
        self._validate()

    def _validate(self) -> None:
        nodes = self.nodes
        if not isinstance(nodes, tuple) or not all(isinstance(v, str) and v for v in nodes):
            raise ConfigError("nodes must be a sequence of non-empty node id strings")
        n = len(nodes)
        if len(set(nodes)) != n:
            raise ConfigError("node ids must be distinct")
        if n < MIN_NODES:
            raise ConfigError(
                f"secure aggregation needs at least {MIN_NODES} nodes, got {n}: with fewer, "
                "the sum reveals each input to the other participant"
            )
        for name in ("vector_length", "threshold", "degree", "max_dropouts", "bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.vector_length < 1:
            raise ConfigError("vector_length must be at least 1")
        dtype_for_bits(self.bits)
        if not isinstance(self.round_id, str) or not 0 < len(self.round_id) <= MAX_ROUND_ID_CHARS:
            raise ConfigError(f"round_id must be a string of 1 to {MAX_ROUND_ID_CHARS} chars")
        if not isinstance(self.context, str) or len(self.context) > MAX_CONTEXT_CHARS:
            raise ConfigError(f"context must be a string of at most {MAX_CONTEXT_CHARS} chars")
        k, t, d = self.degree, self.threshold, self.max_dropouts
        if not 2 <= k <= n - 1:
            raise ConfigError(
                f"degree (neighbours per node) must be in [2, {n - 1}] for {n} nodes, got {k}"
            )
        if (k * n) % 2:
            raise ConfigError(
                f"no {k}-regular graph on {n} nodes exists (degree x nodes must be even); "
                f"use degree {k + 1 if k + 1 < n else k - 1}"
            )
        if t > k:
            raise ConfigError(
                f"threshold {t} exceeds the {k} neighbours holding shares: no secret could "
                "ever be rebuilt"
            )
        if 2 * t <= k:
            raise ConfigError(
                f"threshold {t} must exceed degree/2 = {k / 2}: otherwise a server could "
                "collect both a node's self-mask shares and its mask-key shares from disjoint "
                f"halves of its neighbours and unmask its input; use threshold >= {k // 2 + 1}"
            )
        if d < 0:
            raise ConfigError("max_dropouts must be non-negative")
        if n - d < t:
            raise ConfigError(
                f"with {d} dropouts only {n - d} nodes may survive, fewer than threshold {t}"
            )
        p = self.max_failure_probability
        if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError("max_failure_probability must be in [0, 1)")
        if p == 0.0:
            if k - t < d:
                raise ConfigError(
                    f"a node with {k} neighbours and threshold {t} survives only {k - t} "
                    f"failed neighbours, but max_dropouts is {d}: fewer than {t} share holders "
                    f"could remain; use degree >= {2 * d + 1} (and threshold <= degree - {d}), "
                    "or allow a small max_failure_probability for random dropouts"
                )
        else:
            bound = failure_probability_bound(nodes=n, degree=k, threshold=t, dropouts=d)
            if bound > p:
                raise ConfigError(
                    f"with degree {k} and threshold {t}, {d} random dropouts leave some node "
                    f"without {t} share holders with probability up to {bound:.3g} > {p}; "
                    "raise degree or lower threshold"
                )

    @classmethod
    def create(
        cls,
        nodes: Sequence[str],
        *,
        vector_length: int,
        max_dropouts: int | None = None,
        dropout_fraction: float = 0.1,
        bits: int = 32,
        round_id: str | None = None,
        max_failure_probability: float = 0.0,
        degree: int | None = None,
        context: str = "",
    ) -> SecAggParams:
        """Pick degree and threshold for ``nodes`` that tolerate the stated dropouts.

        The degree is the smallest that works and is at least ~2 log2(n) (the full graph for
        small n), unless ``degree`` fixes it (then it is checked, never changed). With the
        worst-case guarantee the threshold is the largest that still tolerates
        ``max_dropouts`` (most collusion resistance); with a failure probability it is the
        smallest safe one, ``degree // 2 + 1``.
        """
        ids = tuple(nodes)
        n = len(ids)
        if n < MIN_NODES:
            raise ConfigError(f"secure aggregation needs at least {MIN_NODES} nodes, got {n}")
        if max_dropouts is None:
            if not 0.0 <= dropout_fraction < 1.0:
                raise ConfigError("dropout_fraction must be in [0, 1)")
            max_dropouts = math.ceil(round(dropout_fraction * n, 9))
        d = max_dropouts
        floor_degree = min(n - 1, 2 * math.ceil(math.log2(n)))
        extra: dict[str, Any] = {} if round_id is None else {"round_id": round_id}
        extra["context"] = context

        def fits(k: int) -> bool:
            return (k * n) % 2 == 0

        if degree is not None:
            if not isinstance(degree, int) or isinstance(degree, bool):
                raise ConfigError(f"degree must be an integer, got {degree!r}")
            if max_failure_probability == 0.0 and degree <= 2 * d:
                raise ConfigError(
                    f"degree {degree} cannot guarantee tolerating {d} dropouts: a node needs "
                    f"more than twice as many neighbours; use degree >= {2 * d + 1}, or allow "
                    "a small max_failure_probability for random dropouts"
                )
            threshold = degree - d if max_failure_probability == 0.0 else degree // 2 + 1
            return cls(
                nodes=ids,
                vector_length=vector_length,
                threshold=threshold,
                degree=degree,
                max_dropouts=d,
                bits=bits,
                max_failure_probability=max_failure_probability,
                **extra,
            )

        if max_failure_probability == 0.0:
            k = max(2 * d + 1, floor_degree, 2)
            if k > n - 1:
                raise ConfigError(
                    f"{n} nodes cannot guarantee tolerating {d} dropouts (a node needs "
                    f"{2 * d + 1} neighbours); lower max_dropouts or allow a small "
                    "max_failure_probability"
                )
            while not fits(k):
                k += 1
            k = min(k, n - 1)
            return cls(
                nodes=ids,
                vector_length=vector_length,
                threshold=k - d,
                degree=k,
                max_dropouts=d,
                bits=bits,
                **extra,
            )
        for k in range(max(floor_degree, 2), n):
            t = k // 2 + 1
            if not fits(k) or n - d < t:
                continue
            bound = failure_probability_bound(nodes=n, degree=k, threshold=t, dropouts=d)
            if bound <= max_failure_probability:
                return cls(
                    nodes=ids,
                    vector_length=vector_length,
                    threshold=t,
                    degree=k,
                    max_dropouts=d,
                    bits=bits,
                    max_failure_probability=max_failure_probability,
                    **extra,
                )
        raise ConfigError(
            f"no degree below {n} keeps the failure probability under "
            f"{max_failure_probability} with {d} dropouts among {n} nodes"
        )

    # -- derived, public values -------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype[Any]:
        return dtype_for_bits(self.bits)

    @property
    def min_survivors(self) -> int:
        return len(self.nodes) - self.max_dropouts

    @cached_property
    def index(self) -> Mapping[str, int]:
        """Each node's position in ``nodes`` (its Shamir point is index + 1)."""
        return {v: i for i, v in enumerate(self.nodes)}

    @cached_property
    def _ring(self) -> tuple[list[int], list[int]]:
        """(ring position -> node index, node index -> ring position), from the round id."""
        n = len(self.nodes)
        seed = hashlib.sha256(b"shoal/secagg/graph\x00" + self.round_id.encode()).digest()
        node_at = [int(i) for i in np.argsort(expand(seed, n, dtype=np.uint64), kind="stable")]
        pos_of = [0] * n
        for pos, i in enumerate(node_at):
            pos_of[i] = pos
        return node_at, pos_of

    @cached_property
    def graph(self) -> Mapping[str, tuple[str, ...]]:
        """Each node's neighbours, in ``nodes`` order (the server needs all of them)."""
        return {v: self.neighbours(v) for v in self.nodes}

    def neighbours(self, node: str) -> tuple[str, ...]:
        """One node's neighbours, in ``nodes`` order; a node computes only its own (O(k))."""
        i = self.index.get(node)
        if i is None:
            raise ConfigError(f"{node!r} is not a participant of round {self.round_id}")
        node_at, pos_of = self._ring
        adjacent = harary_adjacent(pos_of[i], len(self.nodes), self.degree)
        return tuple(self.nodes[j] for j in sorted(node_at[q] for q in adjacent))

    @cached_property
    def digest(self) -> str:
        """SHA-256 of every parameter: two nodes derive a pair's keys alike only if they
        were given the same parameters (the same participants, sizes and input context)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def pair_context(self, a: str, b: str) -> bytes:
        """Key-derivation context for a pair, identical from both ends (and only when both
        hold the same parameters)."""
        lo, hi = sorted((a, b), key=self.index.__getitem__)
        return json_strings("secagg", self.round_id, self.digest, lo, hi)

    def to_dict(self) -> dict[str, Any]:
        """JSON values only, for the wire."""
        return {
            "nodes": list(self.nodes),
            "vector_length": self.vector_length,
            "threshold": self.threshold,
            "degree": self.degree,
            "max_dropouts": self.max_dropouts,
            "bits": self.bits,
            "round_id": self.round_id,
            "max_failure_probability": float(self.max_failure_probability),
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecAggParams:
        """Parse :meth:`to_dict`; raises ConfigError on anything missing or unsafe."""
        try:
            nodes = data["nodes"]
            if not isinstance(nodes, list):
                raise ConfigError("nodes must be a list of node ids")
            return cls(
                nodes=tuple(nodes),
                vector_length=data["vector_length"],
                threshold=data["threshold"],
                degree=data["degree"],
                max_dropouts=data["max_dropouts"],
                bits=data["bits"],
                round_id=data["round_id"],
                max_failure_probability=data["max_failure_probability"],
                context=data.get("context", ""),
            )
        except KeyError as exc:
            raise ConfigError(f"SecAgg parameters lack field {exc.args[0]!r}") from None


def json_strings(*parts: str) -> bytes:
    """``json.dumps(list(parts)).encode()`` for strings, byte for byte, without the encoder's
    per-call overhead: contexts for key derivation are built for every pair, every round."""
    return ("[" + ", ".join(map(encode_basestring_ascii, parts)) + "]").encode()
