"""The built-in NumPy softmax regression: gradients, training, the adapter contract."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import Dataset, load_digits
from shoal.errors import ConfigError, DataError
from shoal.learn import FitConfig, SoftmaxRegression
from shoal.learn.hooks import DriftCorrection, ProximalTerm
from shoal.learn.softmax import softmax_cross_entropy


def test_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4))
    labels = rng.integers(0, 4, size=5)
    _, grad, _ = softmax_cross_entropy(logits, labels)
    eps = 1e-6
    numeric = np.zeros_like(logits)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            bumped = logits.copy()
            bumped[i, j] += eps
            up = softmax_cross_entropy(bumped, labels)[0]
            bumped[i, j] -= 2 * eps
            down = softmax_cross_entropy(bumped, labels)[0]
            numeric[i, j] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-6)


def test_fit_learns_digits() -> None:
    train, test = load_digits(test_fraction=0.2, seed=0)
    model = SoftmaxRegression(features=64, classes=10)
    before = model.evaluate(test)
    model.fit(
        train, config=FitConfig(epochs=5, lr=0.5, batch_size=16), rng=np.random.default_rng(0)
    )
    after = model.evaluate(test)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9


def test_weights_round_trip_and_clone_independent() -> None:
    model = SoftmaxRegression(features=3, classes=2)
    weights = {"W": np.arange(6.0).reshape(3, 2), "b": np.array([1.0, -1.0])}
    model.set_weights(weights)
    got = model.get_weights()
    np.testing.assert_array_equal(got["W"], weights["W"])
    got["W"][0, 0] = 99.0  # a copy: mutating it must not touch the model
    assert model.get_weights()["W"][0, 0] == 0.0
    clone = model.clone()
    assert np.all(clone.get_weights()["W"] == 0.0)


def test_bad_weights_and_data_are_rejected() -> None:
    model = SoftmaxRegression(features=3, classes=2)
    with pytest.raises(ConfigError, match="shape"):
        model.set_weights({"W": np.zeros((2, 2)), "b": np.zeros(2)})
    with pytest.raises(ConfigError):
        model.set_weights({"W": np.zeros((3, 2))})
    wrong = Dataset(x=np.zeros((4, 5)), y=np.zeros(4, dtype=np.int64), classes=2)
    with pytest.raises(DataError, match="features"):
        model.evaluate(wrong)


def test_prox_term_pulls_towards_the_center() -> None:
    train, _ = load_digits(test_fraction=0.2, seed=0)
    shard = train.subset(np.arange(64))
    free = SoftmaxRegression(features=64, classes=10)
    held = SoftmaxRegression(features=64, classes=10)
    center = free.get_weights()
    free.fit(shard, config=FitConfig(epochs=5, lr=0.5), rng=np.random.default_rng(1))
    held.fit(
        shard,
        config=FitConfig(epochs=5, lr=0.5, hooks=(ProximalTerm(1.0, center),)),
        rng=np.random.default_rng(1),
    )
    distance = lambda m: np.linalg.norm(m.get_weights()["W"] - center["W"])  # noqa: E731
    assert distance(held) < distance(free)


def reference_fit(
    model: SoftmaxRegression, data: Dataset, config: FitConfig, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], float]:
    """The textbook minibatch SGD the fast loop must equal: gradients from
    softmax_cross_entropy in float64, a fresh array at every step, the loss of every batch."""
    W, b = model.W.astype(np.float64), model.b.astype(np.float64)
    x, y = data.x.astype(np.float64), data.y
    losses, steps = [], 0
    for _ in range(config.epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss, g, _ = softmax_cross_entropy(x[idx] @ W + b, y[idx])
            gW, gb = x[idx].T @ g + model.l2 * W, g.sum(axis=0)
            for hook in config.hooks:
                gW, gb = gW + hook.term("W", W), gb + hook.term("b", b)
            W, b = W - config.lr * gW, b - config.lr * gb
            losses.append(loss)
            steps += 1
            if config.max_steps is not None and steps >= config.max_steps:
                return {"W": W, "b": b}, float(np.mean(losses[-2:]))
    return {"W": W, "b": b}, float(np.mean(losses[-2:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["plain", "l2", "prox", "scaffold", "max_steps"])
def test_fast_fit_equals_the_textbook_loop(dtype: type, variant: str) -> None:
    train, _ = load_digits(test_fraction=0.2, seed=0)
    data = Dataset(x=train.x[:32].astype(dtype), y=train.y[:32], classes=10)
    rng = np.random.default_rng(7)
    start = {"W": rng.normal(0, 0.1, (64, 10)), "b": rng.normal(0, 0.1, 10)}
    options: dict = {"epochs": 3, "lr": 0.5, "batch_size": 16, "track_loss": True}
    if variant == "prox":
        options["hooks"] = (ProximalTerm(0.3, {k: v * 0.5 for k, v in start.items()}),)
    if variant == "scaffold":
        options["hooks"] = (DriftCorrection({k: np.full_like(v, 0.01) for k, v in start.items()}),)
    if variant == "max_steps":
        options["max_steps"] = 5
    config = FitConfig(**options)
    model = SoftmaxRegression(features=64, classes=10, l2=0.01 if variant == "l2" else 0.0)
    model.set_weights(start)
    result = model.fit(data, config=config, rng=np.random.default_rng(3))
    twin = SoftmaxRegression(features=64, classes=10, l2=model.l2)
    twin.set_weights(start)
    expected, loss = reference_fit(twin, data, config, np.random.default_rng(3))
    tolerance = 1e-12 if dtype is np.float64 else 1e-5  # float32 data: products round there
    np.testing.assert_allclose(model.W, expected["W"], atol=tolerance)
    np.testing.assert_allclose(model.b, expected["b"], atol=tolerance)
    assert result.loss == pytest.approx(loss, rel=1e-6 if dtype is np.float64 else 1e-4)
    assert result.steps == (5 if variant == "max_steps" else 6)
    assert model.W.dtype == np.float64  # the model's dtype; the data's is never cast


def test_fit_leaves_given_weights_and_data_untouched() -> None:
    train, _ = load_digits(test_fraction=0.2, seed=0)
    data = train.subset(np.arange(32))
    x_before = data.x.copy()
    weights = {"W": np.zeros((64, 10)), "b": np.zeros(10)}
    model = SoftmaxRegression(features=64, classes=10)
    model.set_weights(weights)
    model.fit(data, config=FitConfig(lr=0.5), rng=np.random.default_rng(0))
    assert not np.any(weights["W"]) and not np.any(weights["b"])
    np.testing.assert_array_equal(data.x, x_before)
    frozen = {k: v.copy() for k, v in weights.items()}
    for v in frozen.values():
        v.flags.writeable = False  # a decoded payload's view: kept, never written
    model.set_weights(frozen)
    result = model.fit(data, config=FitConfig(lr=0.5), rng=np.random.default_rng(0))
    assert not np.any(frozen["W"]) and np.isnan(result.loss)  # no loss unless asked


def test_labels_outside_the_model_are_rejected_for_any_data() -> None:
    model = SoftmaxRegression(features=2, classes=2)
    wide = Dataset(x=np.zeros((3, 2)), y=np.array([0, 1, 2]), classes=3)
    with pytest.raises(DataError, match="labels"):
        model.fit(wide, config=FitConfig(), rng=np.random.default_rng(0))

    class Plain:  # duck-typed data, not a Dataset: checked in full at every fit
        x = np.zeros((2, 2))
        y = np.array([0, 5])

    with pytest.raises(DataError, match="labels"):
        model.fit(Plain(), config=FitConfig(), rng=np.random.default_rng(0))
