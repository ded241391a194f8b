"""Losses: first and second derivatives of the loss at the current margins, as XGBoost
computes them (in float32), the starting margin, and margins to predictions."""

from __future__ import annotations

import numpy as np

from shoal.errors import DataError
from shoal.trees.params import GBDTParams

__all__ = ["base_margin", "check_labels", "gradients", "predict_from_margin"]

_EPS = np.float32(1e-16)  # XGBoost's floor on the hessian


def check_labels(y: np.ndarray, params: GBDTParams) -> np.ndarray:
    """Labels as float32, checked for the objective (NaN, range, class ids)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.dtype.kind not in "biuf":
        raise DataError(f"labels must be numbers, got dtype {y.dtype}")
    labels = y.astype(np.float32)
    if not np.isfinite(labels).all():
        raise DataError("labels hold NaN or infinity; drop or fix those rows before training")
    if params.objective == "binary:logistic" and ((labels < 0) | (labels > 1)).any():
        raise DataError("binary:logistic needs labels in [0, 1]")
    if params.objective == "multi:softprob" and (
        (labels != np.round(labels)).any()
        or (labels < 0).any()
        or (labels >= params.num_class).any()
    ):
        raise DataError(f"multi-class labels must be integers in [0, {params.num_class})")
    return labels


def base_margin(params: GBDTParams) -> float:
    """The margin every row starts from (XGBoost's base_score, logit for logistic)."""
    if params.objective == "binary:logistic":
        score = 0.5 if params.base_score is None else params.base_score
        return float(np.log(score / (1.0 - score)))
    if params.objective == "reg:squarederror":
        return 0.0 if params.base_score is None else float(params.base_score)
    return 0.0 if params.base_score is None else float(params.base_score)


def gradients(
    margin: np.ndarray, y: np.ndarray, params: GBDTParams
) -> tuple[np.ndarray, np.ndarray]:
    """(g, h) of shape (n, outputs), float32, for margins of shape (n, outputs)."""
    margin = np.asarray(margin, dtype=np.float32)
    if params.objective == "binary:logistic":
        p = np.float32(1.0) / (np.float32(1.0) + np.exp(-margin[:, 0]))
        g = p - y
        h = np.maximum(p * (np.float32(1.0) - p), _EPS)
        return g[:, None], h[:, None]
    if params.objective == "reg:squarederror":
        g = margin[:, 0] - y
        return g[:, None], np.ones_like(g)[:, None]
    shifted = np.exp(margin - margin.max(axis=1, keepdims=True))
    p = shifted / shifted.sum(axis=1, keepdims=True)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
    g = p - onehot
    h = np.maximum(np.float32(2.0) * p * (np.float32(1.0) - p), _EPS)
    return g.astype(np.float32), h.astype(np.float32)


def predict_from_margin(margin: np.ndarray, params: GBDTParams) -> np.ndarray:
    """Probabilities (logistic: P(y=1), shape (n,); softmax: (n, classes)) or values."""
    margin = np.asarray(margin, dtype=np.float64)
    if params.objective == "binary:logistic":
        out: np.ndarray = 1.0 / (1.0 + np.exp(-margin[:, 0]))
        return out
    if params.objective == "reg:squarederror":
        return margin[:, 0].copy()
    shifted = np.exp(margin - margin.max(axis=1, keepdims=True))
    probs: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return probs
