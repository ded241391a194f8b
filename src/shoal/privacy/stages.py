"""DP aggregation stages: noise the aggregate, or have nodes add shares of the noise.

Central DP-FedAvg reads ``Clip(C) | Sum() | GaussianNoise(z * C) | MeanOver(q * N)``;
distributed DP, where the server never sees an un-noised sum, reads
``Clip(C) | DistributedNoise(z * C, nodes=k) | SecureSum() | MeanOver(q * N)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from shoal.aggregate import NodeTransform, Reduced, ServerTransform
from shoal.errors import ConfigError
from shoal.privacy.mechanisms import distributed_noise_std, make_rng

__all__ = ["DistributedNoise", "GaussianNoise", "MeanOver", "add_node_noise"]


@dataclass(frozen=True)
class GaussianNoise(ServerTransform):
    """Add N(0, std^2) to every coordinate of the aggregate (drawn from OS entropy)."""

    private: ClassVar[bool] = True

    std: float
    seed: int | None = field(default=None, repr=False)  # tests only: DP noise must not be known

    def __post_init__(self) -> None:
        if not np.isfinite(self.std) or self.std < 0:
            raise ConfigError(f"GaussianNoise needs a finite std >= 0, got {self.std}")

    def apply(self, reduced: Reduced) -> Reduced:
        rng = make_rng(self.seed)
        noise = rng.normal(0.0, self.std, size=reduced.vector.shape)
        return replace(reduced, vector=reduced.vector + noise)


@dataclass(frozen=True)
class MeanOver(ServerTransform):
    """Divide the sum by a fixed, data-independent count (the expected number of nodes).

    DP-FedAvg divides by the expected count, not the actual one: the actual number of
    participants would itself depend on the data of who took part.
    """

    count: float

    def __post_init__(self) -> None:
        if not self.count > 0:
            raise ConfigError(f"MeanOver needs a positive count, got {self.count}")

    def apply(self, reduced: Reduced) -> Reduced:
        return replace(reduced, vector=reduced.vector / self.count, averaged=True)


@dataclass(frozen=True)
class DistributedNoise(NodeTransform):
    """Each of ``nodes`` nodes adds N(0, total_std^2 / nodes): the sum carries total_std.

    If fewer than ``nodes`` survive, the sum carries less noise; ``min_survivors`` makes
    every node add enough for that many survivors to reach ``total_std`` (conservative).
    Only meaningful inside a secure sum: in the clear, each noisy update is visible.
    """

    private: ClassVar[bool] = True

    total_std: float
    nodes: int
    min_survivors: int | None = None

    @property
    def per_node_std(self) -> float:
        return distributed_noise_std(
            total_std=self.total_std, nodes=self.nodes, min_survivors=self.min_survivors
        )

    def apply_rows(self, rows: np.ndarray) -> np.ndarray:
        return add_node_noise(rows, self.per_node_std)

    def spec(self) -> dict[str, Any]:
        # Inside a secure sum each node derives its share from the participant list it
        # validated itself, so a wrong ``nodes`` here cannot thin the noise. With
        # min_survivors the (larger) per-node std is stated as it is.
        if self.min_survivors is None:
            return {"noise_total_std": self.total_std}
        return {"noise_std": self.per_node_std}


def add_node_noise(value: np.ndarray, std: float) -> np.ndarray:
    """``value`` plus N(0, std^2) per entry, drawn from OS entropy: what a node adds itself
    (its share of distributed noise, inside a secure sum), never from a server-sent seed."""
    noised: np.ndarray = value + make_rng(None).normal(0.0, std, size=np.shape(value))
    return noised
