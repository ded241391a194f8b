"""The model-adapter contract: named NumPy weights in and out, local fit, evaluate.

Any model (the built-in NumPy softmax regression, scikit-learn estimators, PyTorch
modules) joins a federation through this one Protocol; algorithms never see the library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError

__all__ = ["FitConfig", "FitResult", "Model", "StatefulOptimizer", "Weights"]

Weights = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """How a node trains locally in one round.

    ``prox_mu`` adds FedProx's (mu/2)||w - prox_center||^2; ``correction`` is SCAFFOLD's
    control-variate difference (c - c_i), added to every local gradient.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    max_steps: int | None = None
    prox_mu: float = 0.0
    prox_center: Mapping[str, np.ndarray] | None = field(default=None, repr=False)
    correction: Mapping[str, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not np.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.prox_mu < 0:
            raise ConfigError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass(frozen=True, kw_only=True)
class FitResult:
    examples: int
    steps: int
    loss: float


@runtime_checkable
class Model(Protocol):
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
