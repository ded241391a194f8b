"""Attack models and the NodeApp that plays them at chosen nodes."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np

from shoal.data import Dataset
from shoal.errors import ConfigError
from shoal.learn.model import Model
from shoal.learn.tasks import TRAIN, LocalData, learning_tasks
from shoal.runtime import NodeApp, TaskContext, TaskSpec

__all__ = [
    "ATTACKS",
    "Attack",
    "GaussianNoiseAttack",
    "LabelFlip",
    "Scaling",
    "SignFlip",
    "attacked_app",
    "build_attack",
    "choose_malicious",
]


@dataclass(frozen=True, kw_only=True)
class Attack:
    """An attacker's behaviour: corrupt the update it sends, or the data it trains on."""

    name: ClassVar[str] = "none"

    def corrupt_update(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return delta

    def corrupt_data(self, data: Any) -> Any:
        return data


@dataclass(frozen=True, kw_only=True)
class SignFlip(Attack):
    """Send the negated (and optionally amplified) honest update."""

    name: ClassVar[str] = "sign_flip"
    scale: float = 1.0

    def corrupt_update(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return -self.scale * delta


@dataclass(frozen=True, kw_only=True)
class Scaling(Attack):
    """Amplify the honest update (model replacement / boosting)."""

    name: ClassVar[str] = "scaling"
    factor: float = 10.0

    def corrupt_update(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.factor * delta


@dataclass(frozen=True, kw_only=True)
class GaussianNoiseAttack(Attack):
    """Send Gaussian noise of standard deviation ``sigma`` instead of an update."""

    name: ClassVar[str] = "gaussian_noise"
    sigma: float = 1.0

    def corrupt_update(self, delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, self.sigma, size=delta.shape)


@dataclass(frozen=True, kw_only=True)
class LabelFlip(Attack):
    """Train honestly on flipped labels: class c becomes classes - 1 - c."""

    name: ClassVar[str] = "label_flip"

    def corrupt_data(self, data: Any) -> Any:
        if isinstance(data, LocalData):
            return replace(data, train=self.corrupt_data(data.train))
        if not isinstance(data, Dataset) or data.classes is None:
            raise ConfigError("label_flip needs classification data (a Dataset with classes)")
        return replace(data, y=(data.classes - 1 - data.y).astype(data.y.dtype))


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (SignFlip, Scaling, GaussianNoiseAttack, LabelFlip)
}


def build_attack(name: str, **options: Any) -> Attack:
    cls = ATTACKS.get(name)
    if cls is None:
        raise ConfigError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for attack {name!r}; allowed: {sorted(allowed) or 'none'}"
        )
    return cls(**options)


def choose_malicious(node_ids: list[str], fraction: float, *, seed: int) -> frozenset[str]:
    """A seeded choice of round(fraction * n) attacker nodes."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"the malicious fraction must be in [0, 1), got {fraction}")
    count = round(fraction * len(node_ids))
    order = np.random.default_rng(seed).permutation(len(node_ids))
    return frozenset(node_ids[i] for i in order[:count])


def attacked_app(model: Model, attack: Attack, malicious: Collection[str]) -> NodeApp:
    """A NodeApp whose train task is honest except at ``malicious`` nodes."""
    tasks = learning_tasks(model)
    honest_train = tasks[TRAIN]
    bad = frozenset(malicious)

    def train(ctx: TaskContext, payload: dict[str, Any]) -> Mapping[str, Any] | None:
        if ctx.node_id not in bad:
            return honest_train(ctx, payload)
        poisoned = TaskContext(
            node_id=ctx.node_id,
            data=attack.corrupt_data(ctx.data),
            state=ctx.state,
            task_id=ctx.task_id,
        )
        out = dict(honest_train(poisoned, payload) or {})
        for key, value in out.items():
            if key.startswith("d/"):
                out[key] = attack.corrupt_update(np.asarray(value), ctx.rng)
        return out

    tasks[TRAIN] = TaskSpec(train, tasks[TRAIN].release)  # the honest task's policy
    app = NodeApp()
    app.install(tasks)
    return app
