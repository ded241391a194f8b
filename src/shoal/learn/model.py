"""The model-adapter contract: named NumPy weights in and out, local fit, evaluate.

Any model (the built-in NumPy softmax regression, scikit-learn estimators, PyTorch
modules) joins a federation through this one Protocol; algorithms never see the library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError

__all__ = ["FitConfig", "FitResult", "LocalDP", "Model", "StatefulOptimizer", "Weights"]

Weights = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """How a node trains locally in one round.

    ``prox_mu`` adds FedProx's (mu/2)||w - prox_center||^2; ``correction`` is SCAFFOLD's
    control-variate difference (c - c_i), added to every local gradient. ``dp`` switches
    local training to DP-SGD (example-level differential privacy).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    max_steps: int | None = None
    prox_mu: float = 0.0
    prox_center: Mapping[str, np.ndarray] | None = field(default=None, repr=False)
    correction: Mapping[str, np.ndarray] | None = field(default=None, repr=False)
    dp: LocalDP | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.prox_mu < 0:
            raise ConfigError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass(frozen=True, kw_only=True)
class LocalDP:
    """DP-SGD at a node: ``steps`` steps, each on a Poisson sample of rate ``sample_rate``,
    every example's gradient clipped to ``clip`` and Gaussian noise of std
    ``noise_multiplier * clip`` added to the sum (Abadi et al. 2016)."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    # Divide the noised sum by this (the federation's expected batch in distributed DP)
    # instead of this node's own expected batch.
    normalizer: float | None = None

    def __post_init__(self) -> None:
        if self.normalizer is not None and not self.normalizer > 0:
            raise ConfigError(f"DP normalizer must be positive, got {self.normalizer}")
        if not np.isfinite(self.clip) or self.clip <= 0:
            raise ConfigError(f"DP clip norm must be positive, got {self.clip}")
        if not np.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise ConfigError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"DP sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ConfigError(f"DP steps must be at least 1, got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class FitResult:
    examples: int
    steps: int
    loss: float


@runtime_checkable
class Model(Protocol):
    """A model adapter. One that honours ``FitConfig.dp`` (DP-SGD) also sets a class
    attribute ``supports_dp = True``; nodes refuse DP training with any other."""

    def get_weights(self) -> Weights: ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...

    def fit(self, data: Any, *, config: FitConfig, rng: np.random.Generator) -> FitResult: ...

    def evaluate(self, data: Any) -> dict[str, float]:
        """At least ``loss`` and, for classifiers, ``accuracy``."""
        ...

    def clone(self) -> Model:
        """A fresh model of the same architecture (weights need not be copied)."""
        ...


@runtime_checkable
class StatefulOptimizer(Protocol):
    """A model whose local optimizer has state (momentum, moments) worth keeping at the node."""

    def optimizer_state(self) -> dict[str, np.ndarray]: ...

    def load_optimizer_state(self, state: Mapping[str, np.ndarray] | None) -> None: ...
