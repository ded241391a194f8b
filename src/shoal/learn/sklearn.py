"""scikit-learn estimators as federated models: SGDClassifier, LogisticRegression, MLPClassifier.

:class:`SklearnModel` exposes an estimator's learned arrays as named weights and trains it
locally for the rounds of an algorithm. Registers ``sklearn_sgd``, ``sklearn_logistic`` and
``sklearn_mlp`` with the model registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import clone as sk_clone
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import hinge_loss
from sklearn.neural_network import MLPClassifier

from shoal.errors import ConfigError, DataError
from shoal.learn.hooks import add_hook_terms
from shoal.learn.model import FitConfig, FitResult, Model, Weights
from shoal.learn.registry import register_model
from shoal.learn.softmax import softmax_cross_entropy

__all__ = ["SklearnModel"]

_FEDAVG_FAMILY = "FedAvg, FedAvgM, FedAdam, FedYogi or FedAdagrad"


class SklearnModel:
    """A scikit-learn classifier behind the :class:`~shoal.learn.model.Model` contract.

    Supported estimators and how each trains in :meth:`fit`:

    * ``SGDClassifier``: ``partial_fit`` with ``learning_rate="constant"`` and
      ``eta0=config.lr``. Its solver updates once per example, so ``batch_size`` only sets
      how many examples count as one step for ``max_steps``. Weights ``coef``, ``intercept``.
    * ``LogisticRegression``: its solvers fit to convergence on one data set and have no
      learning rate, so the same objective (log loss + ``||coef||^2 / (2 C n)``, ``n`` the
      node's examples) is minimized here by minibatch SGD. Being our own gradient step, it
      also honours FedProx and SCAFFOLD. Weights ``coef``, ``intercept``.
    * ``MLPClassifier`` (solver ``"sgd"`` or ``"adam"``): ``partial_fit`` steps through
      each epoch's minibatches with ``learning_rate_init=config.lr``; the solver's state
      (momentum, Adam moments) starts afresh every fit, since this adapter is shared by the
      nodes a worker runs. Weights ``coefs.<i>``, ``intercepts.<i>``.

    ``fit`` shuffles with the round's ``rng``; the loss it reports is the log loss (hinge
    loss for margin classifiers) on the node's data after training. ``FedProx`` and
    ``SCAFFOLD`` are refused with a ConfigError for the two models sklearn trains itself.

    Every class ``0..classes-1`` is known from construction on, so a node whose data lack
    some labels (label skew) still trains and reports weights of the full shape. Initial
    weights are deterministic for a given ``seed``: zeros for linear models, Glorot-uniform
    for the MLP.
    """

    def __init__(self, estimator: Any, *, classes: int, features: int, seed: int = 0) -> None:
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ConfigError(f"SklearnModel needs classes >= 2, got {classes!r}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ConfigError(f"SklearnModel needs features >= 1, got {features!r}")
        self.classes = classes
        self.features = features
        self.seed = int(seed)
        self.kind = _kind(estimator)
        self._template = sk_clone(estimator)
        self.estimator = sk_clone(estimator)
        try:
            self._prepare()
        except ConfigError:
            raise
        except ValueError as exc:  # sklearn's InvalidParameterError for bad settings
            raise ConfigError(f"{type(estimator).__name__}: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"SklearnModel({type(self.estimator).__name__}, classes={self.classes}, "
            f"features={self.features})"
        )

    # ----------------------------------------------------------------- setup

    def _prepare(self) -> None:
        est = self.estimator
        labels = np.arange(self.classes)
        if self.kind == "sgd":
            _refuse(est, average=False, early_stopping=False)
            if est.class_weight == "balanced":
                raise ConfigError(
                    "SGDClassifier(class_weight='balanced') cannot train incrementally; "
                    "pass explicit class weights or None"
                )
            # Shuffling is ours (from the round's rng); a fixed random_state keeps sklearn
            # away from NumPy's global generator.
            est.set_params(
                shuffle=False,
                learning_rate="constant",
                eta0=est.eta0 or 0.01,  # fit sets config.lr; "constant" rejects 0 until then
                random_state=self.seed,
            )
            # A first partial_fit on one zero row per class fixes classes_ and allocates
            # sklearn's internal state; the weights are then reset to zeros.
            est.partial_fit(np.zeros((self.classes, self.features)), labels, classes=labels)
            est.coef_ = np.zeros_like(est.coef_, dtype=np.float64, order="C")
            est.intercept_ = np.zeros_like(est.intercept_, dtype=np.float64)
        elif self.kind == "logistic":
            l1_ratio = est.get_params().get("l1_ratio") or 0.0
            penalty = est.get_params().get("penalty", "l2")
            if penalty in ("l1", "elasticnet") or l1_ratio > 0:
                raise ConfigError(
                    "LogisticRegression trains here by SGD on the smooth L2 objective; "
                    "an L1 or elastic-net penalty is not supported (use l1_ratio=0)"
                )
            if est.class_weight is not None:
                raise ConfigError("LogisticRegression(class_weight=...) is not supported here")
            rows = 1 if self.classes == 2 else self.classes
            est.classes_ = labels
            est.n_features_in_ = self.features
            est.coef_ = np.zeros((rows, self.features))
            est.intercept_ = np.zeros(rows)
            est.n_iter_ = np.zeros(1, dtype=np.int32)
        else:
            _refuse(est, early_stopping=False)
            if est.solver not in ("sgd", "adam"):
                raise ConfigError(
                    f"MLPClassifier(solver={est.solver!r}) has no incremental training; "
                    "use solver='sgd' or solver='adam'"
                )
            est.set_params(
                learning_rate="constant",
                shuffle=False,
                random_state=self.seed,
                batch_size=self.classes,
            )
            est.partial_fit(np.zeros((self.classes, self.features)), labels, classes=labels)
            self._glorot()
        self._reset_solver()

    def _glorot(self) -> None:
        est = self.estimator
        rng = np.random.default_rng(self.seed)
        factor = 2.0 if est.activation == "logistic" else 6.0
        coefs, intercepts = [], []
        for coef in est.coefs_:
            bound = np.sqrt(factor / (coef.shape[0] + coef.shape[1]))
            coefs.append(rng.uniform(-bound, bound, coef.shape))
            intercepts.append(rng.uniform(-bound, bound, coef.shape[1]))
        est.coefs_, est.intercepts_ = coefs, intercepts

    def _reset_solver(self) -> None:
        # The MLP's solver keeps momentum/moments and no-improvement counters between
        # partial_fit calls; they belong to whichever node trained last, so drop them.
        est = self.estimator
        if self.kind == "mlp":
            if hasattr(est, "_optimizer"):
                del est._optimizer
            est.loss_curve_ = []
            est.best_loss_ = np.inf
            est._no_improvement_count = 0

    # --------------------------------------------------------------- weights

    def clone(self) -> SklearnModel:
        return SklearnModel(
            self._template, classes=self.classes, features=self.features, seed=self.seed
        )

    def get_weights(self) -> Weights:
        est = self.estimator
        if self.kind == "mlp":
            out = {f"coefs.{i}": np.array(c, dtype=np.float64) for i, c in enumerate(est.coefs_)}
            out.update(
                {
                    f"intercepts.{i}": np.array(b, dtype=np.float64)
                    for i, b in enumerate(est.intercepts_)
                }
            )
            return out
        return {
            "coef": np.array(est.coef_, dtype=np.float64),
            "intercept": np.array(est.intercept_, dtype=np.float64),
        }

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        est = self.estimator
        if self.kind == "mlp":
            out = {f"coefs.{i}": np.shape(c) for i, c in enumerate(est.coefs_)}
            out.update({f"intercepts.{i}": np.shape(b) for i, b in enumerate(est.intercepts_)})
            return out
        return {"coef": np.shape(est.coef_), "intercept": np.shape(est.intercept_)}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        expected = self._shapes()  # not get_weights(): that copies every array each round
        unknown = sorted(set(weights) - set(expected))
        if unknown:
            raise ConfigError(
                f"weights {unknown} do not belong to {self!r}; it has {sorted(expected)}"
            )
        for name, shape in expected.items():
            value = weights.get(name)
            if value is None or np.shape(value) != shape:
                raise ConfigError(
                    f"weights[{name!r}] must have shape {shape}, got "
                    f"{'nothing' if value is None else np.shape(value)}; was it built for "
                    "another architecture?"
                )
        # Fresh C-contiguous float64 copies: sklearn's SGD updates coef_ in place through
        # views, and the caller's arrays must not change under it.
        arrays = {name: np.array(weights[name], dtype=np.float64, order="C") for name in expected}
        est = self.estimator
        if self.kind == "mlp":
            est.coefs_ = [arrays[f"coefs.{i}"] for i in range(len(est.coefs_))]
            est.intercepts_ = [arrays[f"intercepts.{i}"] for i in range(len(est.intercepts_))]
            self._reset_solver()
        else:
            est.coef_ = arrays["coef"]
            est.intercept_ = arrays["intercept"]

    # ------------------------------------------------------------ training

    def _xy(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(data.x, dtype=np.float64).reshape(len(data.x), -1)
        y = np.asarray(data.y)
        if x.shape[1] != self.features:
            raise DataError(f"model expects {self.features} features, the data has {x.shape[1]}")
        if len(y) == 0:
            raise DataError("the data set is empty; a node needs at least one example")
        if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= self.classes:
            raise DataError(f"labels must be integers in [0, {self.classes}), got {y.dtype} labels")
        return np.ascontiguousarray(x), y.astype(np.int64)

    def _check_config(self, config: FitConfig) -> None:
        if self.kind == "logistic":
            return
        name = type(self.estimator).__name__
        if config.hooks:
            raise ConfigError(
                f"{name} trains with scikit-learn's own solver, which cannot add a gradient "
                f"term (FedProx's proximal pull, SCAFFOLD's correction); use {_FEDAVG_FAMILY}, "
                "or a model that computes its own gradients (softmax_regression, "
                "sklearn_logistic, a TorchModel)"
            )

    def fit(self, data: Any, *, config: FitConfig, rng: np.random.Generator) -> FitResult:
        self._check_config(config)
        x, y = self._xy(data)
        n = len(y)
        est = self.estimator
        # set_params validates every parameter (tens of microseconds): only when lr changes.
        if self.kind == "sgd" and est.eta0 != config.lr:
            est.set_params(eta0=config.lr)
        elif self.kind == "mlp":
            if est.learning_rate_init != config.lr:
                est.set_params(learning_rate_init=config.lr)
            self._reset_solver()
        steps = 0
        for _ in range(config.epochs):
            order = rng.permutation(n)
            batches = [order[s : s + config.batch_size] for s in range(0, n, config.batch_size)]
            if config.max_steps is not None:
                batches = batches[: config.max_steps - steps]
            if self.kind == "logistic":
                for idx in batches:
                    self._logistic_step(x[idx], y[idx], n=n, config=config)
            else:
                # One partial_fit per epoch on the data in our batch order: sklearn walks
                # it in consecutive slices of batch_size (its shuffle is off), the same
                # minibatches as one call per batch without the per-call validation cost.
                idx = np.concatenate(batches)
                if self.kind == "mlp":
                    est.set_params(batch_size=min(config.batch_size, len(idx)))
                est.partial_fit(x[idx], y[idx])
            steps += len(batches)
            if config.max_steps is not None and steps >= config.max_steps:
                break
        self._reset_solver()
        # The loss is a full pass over the node's data: only when someone reads it.
        loss = self._metrics(x, y)[0] if config.track_loss else float("nan")
        return FitResult(examples=n, steps=steps, loss=loss)

    def _logistic_step(self, x: np.ndarray, y: np.ndarray, *, n: int, config: FitConfig) -> None:
        est = self.estimator
        coef, intercept = est.coef_, est.intercept_
        if self.classes == 2:
            p = 1.0 / (1.0 + np.exp(-(x @ coef[0] + intercept[0])))
            g = (p - y) / len(y)
            grad_coef = (g @ x)[None, :]
            grad_intercept = np.array([g.sum()])
        else:
            _, g_logits, _ = softmax_cross_entropy(x @ coef.T + intercept, y)
            grad_coef = g_logits.T @ x
            grad_intercept = g_logits.sum(axis=0)
        # est.penalty, not est.get_params(): that introspects the constructor at every step.
        penalty = getattr(est, "penalty", "l2")
        if penalty not in (None, "none") and np.isfinite(est.C):
            grad_coef = grad_coef + coef / (est.C * n)
        grads = {"coef": grad_coef, "intercept": grad_intercept}
        current = {"coef": coef, "intercept": intercept}
        grads = add_hook_terms(config.hooks, grads, current)  # FedProx, SCAFFOLD
        if not est.fit_intercept:
            grads["intercept"] = np.zeros_like(intercept)
        est.coef_ = coef - config.lr * grads["coef"]
        est.intercept_ = intercept - config.lr * grads["intercept"]

    # ----------------------------------------------------------- evaluation

    def _metrics(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        est = self.estimator
        labels = np.arange(self.classes)
        if hasattr(est, "predict_proba"):
            probs = np.asarray(est.predict_proba(x))
            loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
            predicted = probs.argmax(axis=1)
        else:  # margin losses (hinge, perceptron) have no probabilities
            scores = np.asarray(est.decision_function(x))
            loss = float(hinge_loss(y, scores, labels=labels))
            predicted = (scores > 0).astype(np.int64) if scores.ndim == 1 else scores.argmax(1)
        return loss, float((predicted == y).mean())

    def evaluate(self, data: Any) -> dict[str, float]:
        x, y = self._xy(data)
        loss, accuracy = self._metrics(x, y)
        return {"loss": loss, "accuracy": accuracy}


def _kind(estimator: Any) -> str:
    if isinstance(estimator, SGDClassifier):
        return "sgd"
    if isinstance(estimator, LogisticRegression):
        return "logistic"
    if isinstance(estimator, MLPClassifier):
        return "mlp"
    raise ConfigError(
        f"SklearnModel supports SGDClassifier, LogisticRegression and MLPClassifier, got "
        f"{type(estimator).__name__}; wrap other models in your own Model adapter"
    )


def _refuse(estimator: Any, **required: Any) -> None:
    for key, value in required.items():
        if bool(estimator.get_params()[key]) != value:
            raise ConfigError(
                f"{type(estimator).__name__}({key}={estimator.get_params()[key]!r}) keeps "
                f"state a federation cannot carry between nodes; set {key}={value!r}"
            )


# ------------------------------------------------------------------- registry


def _sgd(*, features: int, classes: int, alpha: float = 1e-4, seed: int = 0) -> Model:
    estimator = SGDClassifier(loss="log_loss", alpha=alpha, learning_rate="constant", eta0=0.01)
    return SklearnModel(estimator, classes=classes, features=features, seed=seed)


def _logistic(*, features: int, classes: int, C: float = 1.0, seed: int = 0) -> Model:
    return SklearnModel(LogisticRegression(C=C), classes=classes, features=features, seed=seed)


def _mlp(
    *,
    features: int,
    classes: int,
    hidden: int | Sequence[int] = (64,),
    activation: str = "relu",
    alpha: float = 1e-4,
    solver: str = "sgd",
    momentum: float = 0.0,
    seed: int = 0,
) -> Model:
    sizes = (hidden,) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"sklearn_mlp: hidden must list positive layer sizes, got {hidden!r}")
    estimator = MLPClassifier(
        hidden_layer_sizes=sizes,
        activation=activation,
        alpha=alpha,
        solver=solver,
        momentum=momentum,
        nesterovs_momentum=momentum > 0,
        learning_rate="constant",
    )
    return SklearnModel(estimator, classes=classes, features=features, seed=seed)


register_model("sklearn_sgd", _sgd)
register_model("sklearn_logistic", _logistic)
register_model("sklearn_mlp", _mlp)
