"""Helpers for driving SecAgg+ rounds step by step in tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from shoal.crypto.secagg import (
    MaskedInputReply,
    SecAggNode,
    SecAggParams,
    SecAggServer,
    ShareKeysReply,
    UnmaskReply,
    UnmaskRequest,
)


@dataclass
class Round:
    """A SecAgg+ round driven phase by phase, with the transcript kept for inspection."""

    params: SecAggParams
    inputs: dict[str, np.ndarray]
    server: SecAggServer = field(init=False)
    nodes: dict[str, SecAggNode] = field(init=False)
    share_requests: dict[str, Any] = field(default_factory=dict)
    share_replies: dict[str, ShareKeysReply] = field(default_factory=dict)
    masked_requests: dict[str, Any] = field(default_factory=dict)
    masked_replies: dict[str, MaskedInputReply] = field(default_factory=dict)
    unmask_requests: dict[str, UnmaskRequest] = field(default_factory=dict)
    unmask_replies: dict[str, UnmaskReply] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = SecAggServer(params=self.params)
        self.nodes = {v: SecAggNode(node_id=v) for v in self.params.nodes}

    def advertise(self, drop: Iterable[str] = ()) -> None:
        request = self.server.advertise_request()
        replies = {v: n.advertise(request) for v, n in self.nodes.items() if v not in set(drop)}
        self.share_requests = self.server.collect_keys(replies)

    def share(self, drop: Iterable[str] = ()) -> None:
        gone = set(drop)
        self.share_replies = {
            v: self.nodes[v].share_keys(r) for v, r in self.share_requests.items() if v not in gone
        }
        self.masked_requests = self.server.collect_shares(self.share_replies)

    def mask(self, drop: Iterable[str] = ()) -> None:
        gone = set(drop)
        self.masked_replies = {
            v: self.nodes[v].masked_input(r, self.inputs[v])
            for v, r in self.masked_requests.items()
            if v not in gone
        }
        self.unmask_requests = self.server.collect_masked(self.masked_replies)

    def unmask(self, drop: Iterable[str] = ()) -> np.ndarray:
        gone = set(drop)
        self.unmask_replies = {
            v: self.nodes[v].unmask(r) for v, r in self.unmask_requests.items() if v not in gone
        }
        return self.server.finish(self.unmask_replies)

    def expected(self) -> np.ndarray:
        total = np.zeros(self.params.vector_length, dtype=np.uint64)
        for v in self.server.survivors:
            total += self.inputs[v].astype(np.uint64)
        return (total % (1 << self.params.bits)).astype(self.params.dtype)


def random_inputs(params: SecAggParams, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    high = 1 << params.bits
    return {
        v: rng.integers(0, high, params.vector_length, dtype=np.uint64).astype(params.dtype)
        for v in params.nodes
    }


def node_ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


@pytest.fixture
def make_round() -> Callable[..., Round]:
    def make(
        n: int = 8,
        *,
        vector_length: int = 64,
        max_dropouts: int = 1,
        bits: int = 32,
        seed: int = 0,
        **kwargs: Any,
    ) -> Round:
        params = SecAggParams.create(
            node_ids(n), vector_length=vector_length, max_dropouts=max_dropouts, bits=bits, **kwargs
        )
        return Round(params=params, inputs=random_inputs(params, seed))

    return make
