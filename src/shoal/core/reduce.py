"""The two aggregates every federation has without extra packages: plain sum and mean."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shoal.core.values import NodeValues

__all__ = ["finish", "plain_mean", "plain_sum"]


def finish(values: NodeValues, vector: np.ndarray, layout: Any) -> Any:
    """Shape an aggregated vector like the values: one array, or a dict for several fields."""
    from shoal.core.values import unflatten

    named = unflatten(vector, layout)
    return next(iter(named.values())) if len(named) == 1 else named


def plain_sum(values: NodeValues) -> Any:
    gathered = values.gather()
    return finish(values, gathered.rows.sum(axis=0), gathered.layout)


def plain_mean(values: NodeValues, *, weights: NodeValues | None = None) -> Any:
    gathered = values.gather(weights=weights)
    if gathered.weights is None:
        # Not np.average: it divides by zero when the values are empty arrays.
        vector = gathered.rows.mean(axis=0)
    else:
        vector = np.average(gathered.rows, axis=0, weights=gathered.weights)
    return finish(values, vector, gathered.layout)
