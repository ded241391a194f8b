"""Gradient hooks: what FedProx and SCAFFOLD add to every local gradient, whatever the model.

FedProx pulls the weights towards the round's global weights (``mu (w - w_global)``);
SCAFFOLD corrects each step by its control variates (``c - c_i``) and, after training,
reports how its own variate moved. Model adapters apply ``FitConfig.hooks`` to each step's
gradient and know nothing of either algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import ConfigError
from shoal.learn.model import GradientHook, Weights
from shoal.learn.names import unprefixed
from shoal.runtime import TaskContext

__all__ = ["DriftCorrection", "NodeHooks", "ProximalTerm", "add_hook_terms", "node_hooks"]

SCAFFOLD_STATE = "shoal.learn.scaffold_c"


def _lookup(values: Mapping[str, Any], name: str, what: str) -> Any:
    try:
        return values[name]
    except KeyError:
        raise ConfigError(
            f"{name!r} is missing from the {what}; the server's and the node's models differ"
        ) from None


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx: the gradient of (mu/2)||w - center||^2."""

    mu: float
    center: Mapping[str, Any]

    def term(self, name: str, param: Any) -> Any:
        return self.mu * (param - _lookup(self.center, name, "FedProx center"))

    def to(self, convert: Callable[[str, np.ndarray], Any]) -> ProximalTerm:
        return ProximalTerm(self.mu, {k: convert(k, v) for k, v in self.center.items()})


@dataclass(frozen=True)
class DriftCorrection:
    """SCAFFOLD: the constant correction c - c_i added to every local gradient."""

    correction: Mapping[str, Any]

    def term(self, name: str, param: Any) -> Any:
        return _lookup(self.correction, name, "SCAFFOLD correction")

    def to(self, convert: Callable[[str, np.ndarray], Any]) -> DriftCorrection:
        return DriftCorrection({k: convert(k, v) for k, v in self.correction.items()})


def add_hook_terms(
    hooks: tuple[GradientHook, ...], grads: dict[str, Any], params: Mapping[str, Any]
) -> dict[str, Any]:
    """``grads`` with every hook's term added (for adapters that hold gradients by name)."""
    for hook in hooks:
        grads = {k: g + hook.term(k, params[k]) for k, g in grads.items()}
    return grads


@dataclass(frozen=True)
class NodeHooks:
    """The hooks one training task runs with, and what they release after it."""

    hooks: tuple[GradientHook, ...]
    server_c: Weights | None = None
    node_c: Weights | None = None

    def finish(
        self, ctx: TaskContext, *, weights: Weights, new: Weights, steps: int, lr: float
    ) -> dict[str, np.ndarray]:
        """SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K lr); release c_i+ - c_i."""
        if self.server_c is None or self.node_c is None:
            return {}
        scale = 1.0 / (max(steps, 1) * lr)
        c, ci = self.server_c, self.node_c
        fresh = {k: ci[k] - c[k] + (weights[k] - new[k]) * scale for k in c}
        ctx.state[SCAFFOLD_STATE] = fresh
        return {f"dc/{k}": fresh[k] - ci[k] for k in c}


_NO_HOOKS = NodeHooks(hooks=())  # FedAvg's: shared by every node (it is frozen)


def node_hooks(ctx: TaskContext, payload: Mapping[str, Any], weights: Weights) -> NodeHooks:
    """The hooks the server's parameters ask for: ``prox_mu`` (FedProx), ``c/*`` (SCAFFOLD)."""
    hooks: list[GradientHook] = []
    mu = float(payload.get("prox_mu", 0.0) or 0.0)
    if mu < 0:
        raise ConfigError(f"prox_mu must be >= 0, got {mu}")
    if mu > 0:
        hooks.append(ProximalTerm(mu, weights))
    server_c = unprefixed("c", payload)
    if not server_c:
        return NodeHooks(hooks=tuple(hooks)) if hooks else _NO_HOOKS
    node_c = ctx.state.get(SCAFFOLD_STATE) or {k: np.zeros_like(v) for k, v in server_c.items()}
    hooks.append(DriftCorrection({k: server_c[k] - node_c[k] for k in server_c}))
    return NodeHooks(hooks=tuple(hooks), server_c=server_c, node_c=node_c)
