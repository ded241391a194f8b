"""Hetero (vertically split) linear models: the math every party and the reference share.

Logistic regression uses Hardy et al.'s (2017) second-order Taylor loss around 0,
``log 2 - y*u/2 + u**2/8`` with y in {-1, +1}, whose gradient ``(u/4 - y/2) * x`` is linear in
the score u and so computable under additive encryption. Linear regression uses
``(u - y)**2 / 2``. The residual is ``a*u + c(y)``; the guest owns c(y) and the intercept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.errors import ConfigError

__all__ = [
    "MODELS",
    "LinearModelSpec",
    "auc",
    "batches",
    "evaluate",
    "held_out_rows",
    "prepare",
    "train_centralized",
]


@dataclass(frozen=True, kw_only=True)
class LinearModelSpec:
    """One hetero model: residual ``slope * u + offset(y)``, and how scores become outputs."""

    name: str
    slope: float
    classification: bool

    def offset(self, y: np.ndarray) -> np.ndarray:
        """The label's part of the residual (computed by the guest, the label holder)."""
        if self.classification:
            return -0.5 * to_pm1(y)
        return -np.asarray(y, dtype=np.float64)

    def loss(self, u: np.ndarray, y: np.ndarray) -> float:
        if self.classification:
            s = to_pm1(y)
            return float(np.mean(np.log(2.0) - 0.5 * s * u + u * u / 8.0))
        return float(np.mean((u - y) ** 2) / 2.0)


MODELS = {
    "hetero_logistic_regression": LinearModelSpec(
        name="hetero_logistic_regression", slope=0.25, classification=True
    ),
    "hetero_linear_regression": LinearModelSpec(
        name="hetero_linear_regression", slope=1.0, classification=False
    ),
}


def to_pm1(y: np.ndarray) -> np.ndarray:
    """Labels {0, 1} (or {-1, 1}) as {-1.0, +1.0}."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y > 0, 1.0, -1.0)


def batches(rows: int, batch_size: int, *, epoch: int, seed: int) -> list[np.ndarray]:
    """The epoch's mini-batches: positions in the aligned row order, shuffled by a shared seed.

    Every party derives the same batches from (seed, epoch) alone; positions are not ids, so
    the schedule reveals nothing but the intersection size.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    return [order[i : i + batch_size] for i in range(0, rows, batch_size)]


def held_out_rows(rows: int, *, seed: int, test_fraction: float) -> np.ndarray:
    """Which aligned positions are held out: the same at every party, from the shared seed."""
    mask = np.zeros(rows, dtype=bool)
    order = np.random.default_rng([seed, 7]).permutation(rows)
    mask[order[: round(test_fraction * rows)]] = True
    return mask


def prepare(
    x: np.ndarray, held_out: np.ndarray, *, intercept: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Standardize a party's aligned columns on its training rows; the guest adds the
    intercept column. Returns (train, test) rows."""
    mean = x[~held_out].mean(axis=0)
    std = x[~held_out].std(axis=0)
    std[std == 0] = 1.0
    z = (x - mean) / std
    if intercept:
        z = np.hstack([z, np.ones((len(z), 1))])
    return z[~held_out], z[held_out]


def train_centralized(
    spec: LinearModelSpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    l2: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """The same model trained on the joined columns with the same batches (the reference).

    ``x`` must already carry the intercept column the guest adds; returns the weights.
    """
    w = np.zeros(x.shape[1])
    for epoch in range(epochs):
        for idx in batches(len(y), batch_size, epoch=epoch, seed=seed):
            xb = x[idx]
            d = spec.slope * (xb @ w) + spec.offset(y[idx])
            w = w - lr * (xb.T @ d / len(idx) + l2 * w)
    return w


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count one half)."""
    y = np.asarray(y) > 0
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = np.asarray(scores)[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def evaluate(spec: LinearModelSpec, scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """auc and accuracy (classification) or rmse (regression) of raw scores."""
    if spec.classification:
        return {
            "auc": auc(scores, y),
            "accuracy": float(np.mean((scores > 0) == (np.asarray(y) > 0))),
            "loss": spec.loss(scores, y),
        }
    return {"rmse": float(np.sqrt(np.mean((scores - y) ** 2))), "loss": spec.loss(scores, y)}
