"""Which parameters a federation trains: shared (aggregated), frozen, or personal to a node.

:class:`PartialModel` wraps a model adapter. Its weights, as the server sees them, are only
the *shared* ones; *frozen* ones (a pretrained backbone) never change and never travel;
*personal* ones (FedPer, Arivazhagan et al. 2019; FedRep, Collins et al. 2021) train at
each node and stay there, in the node's own state, never sent and never aggregated.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from shoal.errors import ConfigError
from shoal.learn.model import FitConfig, FitResult, Model, Weights

__all__ = ["PartialModel"]

Mode = Literal["fedper", "fedrep"]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class PartialModel:
    """A model whose weights split into shared, frozen and personal parts by name.

    A weight matching a ``personal`` pattern is personal; else one matching a ``shared``
    pattern is shared (aggregated by the federation); every other weight is frozen at the
    value the wrapped model was built with (its pretrained value). ``mode="fedper"`` trains
    shared and personal weights together; ``"fedrep"`` first trains the personal ones alone
    for ``personal_epochs`` with the rest fixed, then the shared ones with the personal
    ones fixed (PyTorch models only).
    """

    def __init__(
        self,
        model: Model,
        *,
        shared: Sequence[str] = ("*",),
        personal: Sequence[str] = (),
        mode: Mode = "fedper",
        personal_epochs: int = 1,
    ) -> None:
        if isinstance(shared, str) or isinstance(personal, str):
            raise ConfigError("shared= and personal= are lists of name patterns, not one string")
        if mode not in ("fedper", "fedrep"):
            raise ConfigError(f"mode must be 'fedper' or 'fedrep', got {mode!r}")
        if personal_epochs < 1:
            raise ConfigError(f"personal_epochs must be at least 1, got {personal_epochs}")
        self.model = model
        self.shared_patterns = tuple(shared)
        self.personal_patterns = tuple(personal)
        self.mode: Mode = mode
        self.personal_epochs = int(personal_epochs)
        initial = model.get_weights()
        for pattern in (*self.shared_patterns, *self.personal_patterns):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in initial):
                raise ConfigError(
                    f"pattern {pattern!r} matches no weight of {model!r}; its weights are "
                    f"{sorted(initial)}"
                )
        self.personal_names = tuple(n for n in initial if _matches(n, self.personal_patterns))
        self.shared_names = tuple(
            n for n in initial if n not in self.personal_names and _matches(n, self.shared_patterns)
        )
        self.frozen_names = tuple(
            n for n in initial if n not in self.personal_names and n not in self.shared_names
        )
        if not self.shared_names:
            raise ConfigError("PartialModel: no weight is shared, so there is nothing to federate")
        if mode == "fedrep" and not self.personal_names:
            raise ConfigError(
                "mode='fedrep' alternates personal and shared training: name personal="
            )
        self._frozen = {n: initial[n] for n in self.frozen_names}
        self._initial_personal = {n: initial[n] for n in self.personal_names}
        self._personal = dict(self._initial_personal)
        self._module = getattr(model, "module", None)
        self._partial = self._module is not None  # a TorchModel loads a subset in place
        if self._partial:
            self._trainable(set(self.shared_names) | set(self.personal_names))
        elif mode == "fedrep" or self.frozen_names:
            raise ConfigError(
                f"freezing layers needs a PyTorch model; {model!r} trains all its weights "
                f"(frozen here: {list(self.frozen_names)}; mode={mode!r})"
            )

    def __repr__(self) -> str:
        return (
            f"PartialModel({self.model!r}, shared={len(self.shared_names)}, "
            f"frozen={len(self.frozen_names)}, personal={len(self.personal_names)})"
        )

    def clone(self) -> PartialModel:
        return PartialModel(
            self.model.clone(),
            shared=self.shared_patterns,
            personal=self.personal_patterns,
            mode=self.mode,
            personal_epochs=self.personal_epochs,
        )

    def _trainable(self, names: set[str]) -> None:
        """PyTorch only: gradients for ``names``, none for the rest (the optimizer skips them)."""
        assert self._module is not None
        for name, param in self._module.named_parameters():
            param.requires_grad_(name in names)

    # ------------------------------------------------------------------ weights

    def get_weights(self) -> Weights:
        if self._partial:
            out: Weights = self.model.get_weights(self.shared_names)  # type: ignore[call-arg]
            return out
        full = self.model.get_weights()
        return {n: full[n] for n in self.shared_names}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        unexpected = sorted(set(weights) - set(self.shared_names))
        missing = sorted(set(self.shared_names) - set(weights))
        if unexpected or missing:
            raise ConfigError(
                f"the shared weights do not fit: unexpected {unexpected}, missing {missing}; "
                "server and node must split the model with the same shared=/personal= patterns"
            )
        self._load({**self._personal, **weights})

    def _load(self, weights: Mapping[str, np.ndarray]) -> None:
        if self._partial:
            self.model.set_weights(weights, partial=True)  # type: ignore[call-arg]
        else:
            self.model.set_weights({**self._frozen, **weights})

    def personal_weights(self) -> Weights:
        """This node's personal weights after its last fit (kept in the node's state)."""
        return {k: np.array(v) for k, v in self._personal.items()}

    def load_personal_weights(self, weights: Mapping[str, np.ndarray] | None) -> None:
        """Install a node's own personal weights (None: the initial ones, a new node)."""
        chosen = dict(self._initial_personal if weights is None else weights)
        if set(chosen) != set(self.personal_names):
            raise ConfigError(
                f"personal weights {sorted(chosen)} do not match the model's personal "
                f"layers {sorted(self.personal_names)}"
            )
        self._personal = chosen
        if chosen:
            self._load(chosen)

    def optimizer_state(self) -> Weights:
        """The wrapped model's optimizer state (momentum, Adam moments), if it keeps one."""
        state = getattr(self.model, "optimizer_state", None)
        return dict(state()) if callable(state) else {}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray] | None) -> None:
        load = getattr(self.model, "load_optimizer_state", None)
        if callable(load):
            load(state)

    # ------------------------------------------------------------------ training

    def fit(self, data: Any, *, config: FitConfig, rng: np.random.Generator) -> FitResult:
        if config.hooks and self.personal_names:
            raise ConfigError(
                "personal layers take no FedProx or SCAFFOLD term (those pull towards a global "
                "value the personal layers do not have); use fedavg or a FedOpt algorithm"
            )
        if self.mode == "fedrep":
            if config.dp is not None:
                # The personal phase would train on the data without DP-SGD's clipping and
                # noise, and the shared phase starts from its result: no guarantee covers that.
                raise ConfigError("mode='fedrep' does not combine with DP-SGD; use 'fedper'")
            self._trainable(set(self.personal_names))
            first = replace(config, epochs=self.personal_epochs, max_steps=None, dp=None)
            try:
                self.model.fit(data, config=first, rng=rng)
            finally:
                self._trainable(set(self.shared_names))
            try:
                result = self.model.fit(data, config=config, rng=rng)
            finally:
                self._trainable(set(self.shared_names) | set(self.personal_names))
        else:
            result = self.model.fit(data, config=config, rng=rng)
        if self.personal_names:
            if self._partial:
                self._personal = self.model.get_weights(self.personal_names)  # type: ignore[call-arg]
            else:
                full = self.model.get_weights()
                self._personal = {n: full[n] for n in self.personal_names}
        self._restore_frozen()
        return result

    def _restore_frozen(self) -> None:
        """Frozen buffers (BatchNorm statistics) come back after a fit: they move in training
        mode even when no gradient reaches them."""
        if not self.frozen_names or self._module is None:
            return
        params = {n for n, _ in self._module.named_parameters()}
        buffers = {n: v for n, v in self._frozen.items() if n not in params}
        if buffers:
            self.model.set_weights(buffers, partial=True)  # type: ignore[call-arg]

    def evaluate(self, data: Any) -> dict[str, float]:
        return self.model.evaluate(data)

    @property
    def supports_dp(self) -> bool:
        # DP-SGD clips the gradients of what trains; personal layers under example-level DP
        # would be trained by the noised step too, which is sound, so only the model decides.
        return bool(getattr(self.model, "supports_dp", False))
