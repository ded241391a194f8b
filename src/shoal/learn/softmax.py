"""A NumPy softmax (multinomial logistic) regression: the built-in model, no extras needed."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from shoal.data import Dataset
from shoal.errors import ConfigError, DataError
from shoal.learn.model import FitConfig, FitResult, Weights

__all__ = ["SoftmaxRegression", "softmax_cross_entropy"]

_max = np.maximum.reduce
_sum = np.add.reduce
_dot = np.dot  # on small matrices, a few microseconds less than the matmul ufunc
# Values (rows x columns) of one chunk of gathered batches: a few MB, however big the node.
_CHUNK_VALUES = 1 << 18


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy, its gradient w.r.t. the logits, and the predicted probabilities."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(-np.log(np.maximum(probs[rows, labels], 1e-12)).mean())
    grad = probs.copy()
    grad[rows, labels] -= 1.0
    grad /= len(labels)
    return loss, grad, probs


class SoftmaxRegression:
    """Linear classifier ``softmax(x @ W + b)`` trained by minibatch SGD."""

    supports_dp = True  # fit honours FitConfig.dp with exact per-example clipping

    def __init__(self, *, features: int, classes: int, l2: float = 0.0) -> None:
        if features < 1 or classes < 2:
            raise ConfigError("SoftmaxRegression needs features >= 1 and classes >= 2")
        if l2 < 0:
            raise ConfigError("l2 must be >= 0")
        self.features = features
        self.classes = classes
        self.l2 = l2
        self.W = np.zeros((features, classes))
        self.b = np.zeros(classes)

    def __repr__(self) -> str:
        return f"SoftmaxRegression(features={self.features}, classes={self.classes})"

    def clone(self) -> SoftmaxRegression:
        return SoftmaxRegression(features=self.features, classes=self.classes, l2=self.l2)

    def get_weights(self) -> Weights:
        return {"W": self.W.copy(), "b": self.b.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        for name, current in (("W", self.W), ("b", self.b)):
            value = weights.get(name)
            if (
                value is None
                or (value.shape if type(value) is np.ndarray else np.shape(value)) != current.shape
            ):
                raise ConfigError(
                    f"weights[{name!r}] must have shape {current.shape}, got "
                    f"{None if value is None else np.shape(value)}"
                )
        # fit never writes to self.W or self.b (it trains on copies), so a read-only array
        # (a decoded payload's view) can be kept as it is; a writable one the caller might
        # change later is copied.
        self.W = _owned(weights["W"])
        self.b = _owned(weights["b"])

    def _xy(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """The data's features (2-D, in their own dtype) and labels, checked against the model.

        A Dataset checked itself when it was built, so only its shape and class count are
        compared here: a node's data is validated once, not at every fit.
        """
        if isinstance(data, Dataset):
            x = data.x if data.x.ndim == 2 else data.x.reshape(len(data.x), -1)
            if x.shape[1] != self.features:
                raise DataError(
                    f"model expects {self.features} features, the data has {x.shape[1]}"
                )
            if data.classes is not None and data.classes <= self.classes:
                return x, data.y
            return x, self._check_labels(data.y)
        x = np.asarray(data.x)
        if x.dtype.kind not in "biuf":
            raise DataError(f"features must be numbers, got dtype {x.dtype}")
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.features:
            raise DataError(f"model expects {self.features} features, the data has {x.shape[1]}")
        return x, self._check_labels(np.asarray(data.y))

    def _check_labels(self, y: np.ndarray) -> np.ndarray:
        if len(y) and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= self.classes):
            raise DataError(
                f"labels must be integers in [0, {self.classes}), got {y.dtype} "
                f"{y.min() if len(y) else ''}..{y.max() if len(y) else ''}"
            )
        return y

    def fit(self, data: Any, *, config: FitConfig, rng: np.random.Generator) -> FitResult:
        x, y = self._xy(data)
        n = len(y)
        if n == 0:
            raise DataError("cannot train on an empty data set")
        if config.dp is not None:
            return self._fit_dp(x, y, config, rng)
        lr, batch, limit = config.lr, config.batch_size, config.max_steps
        decay, hooks, track_loss = lr * self.l2, config.hooks, config.track_loss
        # W and b train as one (features + 1, classes) matrix against the data with a column
        # of ones: one product gives the logits with their bias, one the step of both.
        dtype = self.W.dtype if x.dtype == self.W.dtype else np.result_type(x.dtype, self.W.dtype)
        Wb = np.empty((self.features + 1, self.classes), dtype=dtype)
        Wb[:-1] = self.W
        Wb[-1] = self.b
        W, b = Wb[:-1], Wb[-1]  # views: updating Wb updates them
        # Batches are gathered a chunk at a time (a small node's whole epoch: one gather of
        # the rows, one of their one-hot labels); per batch are left the two products, the
        # softmax in place and the update, all on contiguous slices.
        chunk = max(1, _CHUNK_VALUES // (batch * (self.features + 1))) * batch
        xa: np.ndarray | None = None
        if n <= chunk:
            # A small node's data with its ones column is built once per fit, not per epoch,
            # written in place (np.ones and a concatenation cost twice as much per fit).
            xa = np.empty((n, self.features + 1), dtype=dtype)
            xa[:, :-1] = x
            xa[:, -1] = 1
        else:
            ones = np.ones((chunk, 1), dtype=dtype)
        eye = _one_hot(self.classes, dtype)
        picked: list[np.ndarray] = []
        steps = 0
        for _ in range(config.epochs):
            order = rng.permutation(n)
            for first in range(0, n, chunk):
                rows = order[first : first + chunk]
                k = len(rows)
                if xa is not None:
                    xs = xa.take(rows, axis=0)
                else:
                    xs = np.concatenate((x.take(rows, axis=0), ones[:k]), axis=1, dtype=dtype)
                ys = eye.take(y.take(rows), axis=0)
                for start in range(0, k, batch):
                    end = start + batch
                    xb = xs[start:end]
                    p = _dot(xb, Wb)
                    # The ufuncs' own reductions: ndarray.max/.sum add a Python call each.
                    p -= _max(p, axis=1, keepdims=True)
                    np.exp(p, out=p)
                    p /= _sum(p, axis=1, keepdims=True)
                    yb = ys[start:end]
                    if track_loss:
                        picked.append(_sum(p * yb, axis=1))
                    p -= yb
                    p *= lr / len(xb)
                    step = _dot(xb.T, p)  # lr times the mean gradient, W's and b's
                    if decay or hooks:
                        if decay:
                            step[:-1] += decay * W
                        for hook in hooks:  # FedProx, SCAFFOLD: see shoal.learn.hooks
                            step[:-1] += lr * hook.term("W", W)
                            step[-1] += lr * hook.term("b", b)
                    Wb -= step
                    steps += 1
                    if steps == limit:
                        break
                if steps == limit:
                    break
            if steps == limit:
                break
        self.W, self.b = W, b
        loss = float("nan")
        if picked:  # the mean loss over the last epoch's worth of batches
            recent = np.concatenate(picked[-max(1, -(-n // batch)) :])
            loss = float(-np.log(np.maximum(recent, 1e-12)).mean())
        return FitResult(examples=n, steps=steps, loss=loss)

    def _fit_dp(
        self, x: np.ndarray, y: np.ndarray, config: FitConfig, rng: np.random.Generator
    ) -> FitResult:
        """DP-SGD with exact per-example clipping: for a linear softmax model the gradient of
        example i is the outer product of [x_i, 1] and (p_i - y_i), so its norm is the product
        of their norms and no per-example gradient is ever materialized."""
        dp = config.dp
        assert dp is not None
        # Norms in float64 whatever the data's dtype: the clip bound is a privacy guarantee.
        x = np.asarray(x, dtype=np.float64)
        W, b = self.W, self.b
        n = len(y)
        std = dp.noise_multiplier * dp.clip
        expected_batch = dp.normalizer or dp.sample_rate * n
        x_norms = np.sqrt((x * x).sum(axis=1) + 1.0)
        losses: list[float] = []
        for _ in range(dp.steps):
            chosen = np.flatnonzero(rng.random(n) < dp.sample_rate)
            grad_W = np.zeros_like(W)
            grad_b = np.zeros_like(b)
            if len(chosen):
                loss, grad_logits, _ = softmax_cross_entropy(x[chosen] @ W + b, y[chosen])
                per_example = grad_logits * len(chosen)  # undo the mean: one row per example
                norms = np.linalg.norm(per_example, axis=1) * x_norms[chosen]
                scale = np.minimum(1.0, dp.clip / np.maximum(norms, 1e-12))
                clipped = per_example * scale[:, None]
                grad_W = x[chosen].T @ clipped
                grad_b = clipped.sum(axis=0)
                losses.append(loss)
            grad_W = (grad_W + rng.normal(0.0, std, size=W.shape)) / expected_batch
            grad_b = (grad_b + rng.normal(0.0, std, size=b.shape)) / expected_batch
            W = W - config.lr * (grad_W + self.l2 * W)
            b = b - config.lr * grad_b
        self.W, self.b = W, b
        return FitResult(
            examples=n, steps=dp.steps, loss=float(np.mean(losses)) if losses else float("nan")
        )

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = np.asarray(x, dtype=np.float64).reshape(len(x), -1) @ self.W + self.b
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probs: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
        return probs

    def evaluate(self, data: Any) -> dict[str, float]:
        x, y = self._xy(data)
        if len(y) == 0:
            raise DataError("cannot evaluate on an empty data set")
        loss, _, probs = softmax_cross_entropy(x @ self.W + self.b, y)
        return {"loss": loss, "accuracy": float((probs.argmax(axis=1) == y).mean())}


@functools.lru_cache(maxsize=16)
def _one_hot(classes: int, dtype: np.dtype[Any]) -> np.ndarray:
    """The identity matrix whose rows are the labels' one-hot codes (shared, read-only)."""
    eye = np.eye(classes, dtype=dtype)
    eye.flags.writeable = False
    return eye


def _owned(value: np.ndarray) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array is value and array.flags.writeable:
        return array.copy()
    return array
