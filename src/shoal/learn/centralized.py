"""The centralized baseline: the same model trained on the pooled data, for comparison."""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.learn.model import FitConfig, Model

__all__ = ["train_centralized"]


def train_centralized(
    model: Model,
    train: Any,
    test: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a fresh copy of ``model`` on all of ``train`` and evaluate it on ``test``."""
    central = model.clone()
    central.set_weights(model.get_weights())
    config = FitConfig(epochs=epochs, lr=lr, batch_size=batch_size)
    central.fit(train, config=config, rng=np.random.default_rng(seed))
    return central.evaluate(test)
