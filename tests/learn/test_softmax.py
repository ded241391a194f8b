"""The built-in NumPy softmax regression: gradients, training, the adapter contract."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import Dataset, load_digits
from shoal.errors import ConfigError, DataError
from shoal.learn import FitConfig, SoftmaxRegression
from shoal.learn.hooks import ProximalTerm
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
