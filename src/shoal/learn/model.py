"""The model-adapter contract: named NumPy weights in and out, local fit, evaluate.

Any model (the built-in NumPy softmax regression, scikit-learn estimators, PyTorch
modules) joins a federation through this one Protocol; algorithms never see the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError
from shoal.privacy.guard import LocalDP

__all__ = [
    "FitConfig",
    "FitResult",
    "GradientHook",
    "LocalDP",
    "Model",
    "StatefulOptimizer",
    "Weights",
]

Weights = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """How a node trains locally in one round.

    ``hooks`` add their terms to every local gradient (FedProx's proximal pull, SCAFFOLD's
    drift correction: see ``shoal.learn.hooks``). ``dp`` switches local training to DP-SGD
    (example-level differential privacy, ``shoal.privacy``). ``track_loss`` asks for the
    training loss in the result (``FitResult.loss``, else NaN): it costs work at every batch,
    so nobody pays for it unless someone reads it.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    max_steps: int | None = None
    hooks: tuple[GradientHook, ...] = field(default=(), repr=False)
    dp: LocalDP | None = None
    track_loss: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """What a fit did; ``loss`` is NaN when the config did not ask to track it."""

    examples: int
    steps: int
    loss: float


class GradientHook(Protocol):
    """A term an algorithm adds to every local gradient, whatever the model (FedProx, SCAFFOLD).

    ``term(name, param)`` is what to add to the gradient of parameter ``name`` at its current
    value ``param``; ``to(convert)`` is the same hook with its arrays converted once per fit
    (to a framework's tensors: ``convert(name, array)``), so a step does no conversion.
    """

    def term(self, name: str, param: Any) -> Any: ...

    def to(self, convert: Callable[[str, np.ndarray], Any]) -> GradientHook: ...


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
