"""SklearnModel: weights in and out, local training, label skew, FedAvg end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression, Perceptron, SGDClassifier
from sklearn.neural_network import MLPClassifier

from shoal.data import Dataset, load_digits, partition
from shoal.errors import ConfigError, DataError, NotEnoughNodes
from shoal.learn import FedAvg, FedProx, FitConfig, Model, simulate
from shoal.learn.hooks import DriftCorrection, ProximalTerm
from shoal.learn.registry import build_model
from shoal.learn.sklearn import SklearnModel

NAMES = ("sklearn_sgd", "sklearn_logistic", "sklearn_mlp")
LR = {"sklearn_sgd": 0.02, "sklearn_logistic": 0.5, "sklearn_mlp": 0.3}


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits(test_fraction=0.2, seed=0)


def build(name: str, **options: object) -> SklearnModel:
    model = build_model(name, features=64, classes=10, **options)
    assert isinstance(model, SklearnModel)
    return model


def random_weights(model: SklearnModel, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape) for k, v in model.get_weights().items()}


@pytest.mark.parametrize("name", NAMES)
def test_weights_exist_before_fit_and_are_deterministic(name: str) -> None:
    a, b = build(name), build(name)
    assert isinstance(a, Model)
    wa, wb = a.get_weights(), b.get_weights()
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert wa[key].dtype == np.float64
        np.testing.assert_array_equal(wa[key], wb[key])
    if name == "sklearn_mlp":
        assert {k: v.shape for k, v in wa.items()} == {
            "coefs.0": (64, 64),
            "coefs.1": (64, 10),
            "intercepts.0": (64,),
            "intercepts.1": (10,),
        }
        assert np.abs(wa["coefs.0"]).max() > 0  # Glorot init, not zeros
        other = build(name, seed=1).get_weights()
        assert not np.array_equal(wa["coefs.0"], other["coefs.0"])
    else:
        assert {k: v.shape for k, v in wa.items()} == {"coef": (10, 64), "intercept": (10,)}


@pytest.mark.parametrize("name", NAMES)
def test_set_get_round_trip(name: str, digits: tuple[Dataset, Dataset]) -> None:
    model = build(name)
    weights = random_weights(model, 1)
    model.set_weights(weights)
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(value, weights[key])
    # The weights drive predictions: another set gives other predictions.
    before = model.evaluate(digits[1])
    model.set_weights(random_weights(model, 2))
    assert model.evaluate(digits[1])["loss"] != before["loss"]


def test_set_weights_copies_and_get_weights_copies() -> None:
    model = build("sklearn_sgd")
    weights = random_weights(model, 0)
    model.set_weights(weights)
    weights["coef"][:] = 0.0
    assert np.abs(model.get_weights()["coef"]).max() > 0
    out = model.get_weights()
    out["coef"][:] = 7.0
    assert not np.any(model.get_weights()["coef"] == 7.0)


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=1e-6, max_value=1e6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_round_trip_property_binary_logistic(scale: float, seed: int) -> None:
    model = SklearnModel(LogisticRegression(), classes=2, features=3)
    rng = np.random.default_rng(seed)
    weights = {"coef": rng.normal(size=(1, 3)) * scale, "intercept": rng.normal(size=1) * scale}
    model.set_weights(weights)
    got = model.get_weights()
    np.testing.assert_array_equal(got["coef"], weights["coef"])
    np.testing.assert_array_equal(got["intercept"], weights["intercept"])


@pytest.mark.parametrize("name", NAMES)
def test_wrong_weights_are_rejected(name: str) -> None:
    model = build(name)
    good = model.get_weights()
    key = next(iter(good))
    with pytest.raises(ConfigError, match="must have shape"):
        model.set_weights({**good, key: np.zeros((3, 3))})
    with pytest.raises(ConfigError, match="must have shape"):
        model.set_weights({k: v for k, v in good.items() if k != key})
    with pytest.raises(ConfigError, match="do not belong"):
        model.set_weights({**good, "extra": np.zeros(1)})
    # A failed set leaves the model as it was.
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(v, good[k])


@pytest.mark.parametrize("name", NAMES)
def test_fit_lowers_loss(name: str, digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    model = build(name)
    before = model.evaluate(train)
    result = model.fit(
        train,
        config=FitConfig(epochs=2, batch_size=32, lr=LR[name], track_loss=True),
        rng=np.random.default_rng(0),
    )
    after = model.evaluate(train)
    assert result.examples == len(train)
    assert result.steps == 2 * -(-len(train) // 32)
    assert after["loss"] < before["loss"] - 0.5
    assert result.loss == pytest.approx(after["loss"])
    metrics = model.evaluate(test)
    assert set(metrics) >= {"loss", "accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] > 0.7
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("name", NAMES)
def test_fit_is_deterministic_in_rng(name: str, digits: tuple[Dataset, Dataset]) -> None:
    train = digits[0].subset(np.arange(300))
    config = FitConfig(epochs=1, batch_size=16, lr=LR[name])
    runs = []
    for seed in (5, 5, 6):
        model = build(name)
        model.fit(train, config=config, rng=np.random.default_rng(seed))
        runs.append(model.get_weights())
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
    assert any(not np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("name", NAMES)
def test_max_steps_bounds_training(name: str, digits: tuple[Dataset, Dataset]) -> None:
    model = build(name)
    config = FitConfig(epochs=5, batch_size=10, lr=LR[name], max_steps=7)
    assert model.fit(digits[0], config=config, rng=np.random.default_rng(0)).steps == 7


def test_sgd_updates_once_per_example_in_rng_order(digits: tuple[Dataset, Dataset]) -> None:
    # max_steps=2 of batch 8 = exactly the first 16 examples of the round's permutation.
    train = digits[0].subset(np.arange(200))
    model = build("sklearn_sgd")
    model.fit(
        train, config=FitConfig(batch_size=8, lr=0.05, max_steps=2), rng=np.random.default_rng(3)
    )
    reference = SGDClassifier(
        loss="log_loss", alpha=1e-4, learning_rate="constant", eta0=0.05, shuffle=False
    )
    order = np.random.default_rng(3).permutation(len(train))[:16]
    reference.partial_fit(
        np.zeros((10, 64)), np.arange(10), classes=np.arange(10)
    )  # allocate, then start from zeros like the adapter
    reference.coef_ = np.zeros((10, 64))
    reference.intercept_ = np.zeros(10)
    reference.partial_fit(train.x[order].astype(np.float64), train.y[order])
    np.testing.assert_allclose(model.get_weights()["coef"], reference.coef_)
    np.testing.assert_allclose(model.get_weights()["intercept"], reference.intercept_)


@pytest.mark.parametrize("name", NAMES)
def test_label_skew_keeps_all_classes(name: str, digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    only_two = train.subset(np.flatnonzero(train.y < 2))
    model = build(name)
    shapes = {k: v.shape for k, v in model.get_weights().items()}
    model.fit(only_two, config=FitConfig(lr=LR[name]), rng=np.random.default_rng(0))
    assert {k: v.shape for k, v in model.get_weights().items()} == shapes
    np.testing.assert_array_equal(model.estimator.classes_, np.arange(10))
    # A second node with the other labels trains the same instance without complaint.
    model.fit(
        train.subset(np.flatnonzero(train.y >= 8)),
        config=FitConfig(lr=LR[name]),
        rng=np.random.default_rng(1),
    )
    metrics = model.evaluate(test)
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_clone_is_independent(name: str, digits: tuple[Dataset, Dataset]) -> None:
    model = build(name)
    initial = model.get_weights()
    twin = model.clone()
    assert isinstance(twin, SklearnModel) and twin is not model
    assert twin.estimator is not model.estimator
    twin.fit(digits[0], config=FitConfig(lr=LR[name]), rng=np.random.default_rng(0))
    twin.set_weights(random_weights(twin, 3))
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(value, initial[key])
    for key, value in model.clone().get_weights().items():
        np.testing.assert_array_equal(value, initial[key])


def test_estimator_passed_in_is_not_modified() -> None:
    estimator = SGDClassifier(loss="log_loss")
    SklearnModel(estimator, classes=10, features=64)
    assert not hasattr(estimator, "coef_")
    assert estimator.get_params()["learning_rate"] == "optimal"
    # eta0=0 is fine: fit sets the round's learning rate.
    zero = SklearnModel(SGDClassifier(loss="log_loss", eta0=0.0), classes=3, features=2)
    data = Dataset(x=np.eye(3)[:, :2], y=np.arange(3), classes=3)
    assert zero.fit(data, config=FitConfig(lr=0.1), rng=np.random.default_rng(0)).steps == 1


def test_mlp_solver_state_does_not_leak_between_fits(digits: tuple[Dataset, Dataset]) -> None:
    # Node B's fit must not depend on whether this worker trained node A before it.
    train = digits[0]
    node_a, node_b = train.subset(np.arange(0, 200)), train.subset(np.arange(200, 400))
    start = build("sklearn_mlp", solver="adam").get_weights()
    config = FitConfig(lr=0.01)
    worker = build("sklearn_mlp", solver="adam")
    worker.fit(node_a, config=config, rng=np.random.default_rng(0))
    worker.set_weights(start)
    worker.fit(node_b, config=config, rng=np.random.default_rng(1))
    fresh = build("sklearn_mlp", solver="adam")
    fresh.fit(node_b, config=config, rng=np.random.default_rng(1))
    for key, value in fresh.get_weights().items():
        np.testing.assert_array_equal(worker.get_weights()[key], value)


@pytest.mark.parametrize("name", ["sklearn_sgd", "sklearn_mlp"])
def test_fedprox_and_scaffold_are_refused_by_sklearn_solvers(
    name: str, digits: tuple[Dataset, Dataset]
) -> None:
    model = build(name)
    weights = model.get_weights()
    prox = FitConfig(hooks=(ProximalTerm(0.1, weights),))
    with pytest.raises(ConfigError, match=r"FedProx.*FedAvg"):
        model.fit(digits[0], config=prox, rng=np.random.default_rng(0))
    scaffold = FitConfig(
        hooks=(DriftCorrection({k: np.zeros_like(v) for k, v in weights.items()}),)
    )
    with pytest.raises(ConfigError, match=r"SCAFFOLD.*FedAvg"):
        model.fit(digits[0], config=scaffold, rng=np.random.default_rng(0))
    # No hook is plain FedAvg and is accepted.
    model.fit(digits[0], config=FitConfig(lr=0.01), rng=np.random.default_rng(0))


def test_fedprox_run_with_sklearn_sgd_fails_with_the_reason(
    digits: tuple[Dataset, Dataset],
) -> None:
    nodes = partition(digits[0], nodes=3, scheme="iid", seed=0)
    with pytest.raises(NotEnoughNodes, match="cannot add a gradient term"):
        simulate(
            model=build("sklearn_sgd"),
            nodes=nodes,
            algorithm=FedProx(rounds=1, nodes_per_round=3, mu=0.1),
            test=digits[1],
        )


def test_logistic_honours_prox_and_correction_exactly(digits: tuple[Dataset, Dataset]) -> None:
    train = digits[0].subset(np.arange(50))
    base = build("sklearn_logistic")
    start = random_weights(base, 0)
    center = random_weights(base, 1)
    one_step = {"batch_size": 50, "lr": 0.1, "max_steps": 1}

    def step(config: FitConfig) -> dict[str, np.ndarray]:
        model = build("sklearn_logistic")
        model.set_weights(start)
        model.fit(train, config=config, rng=np.random.default_rng(0))
        return model.get_weights()

    plain = step(FitConfig(**one_step))
    proxed = step(FitConfig(**one_step, hooks=(ProximalTerm(0.5, center),)))
    correction = random_weights(base, 2)
    corrected = step(FitConfig(**one_step, hooks=(DriftCorrection(correction),)))
    for key in plain:
        np.testing.assert_allclose(
            proxed[key], plain[key] - 0.1 * 0.5 * (start[key] - center[key]), atol=1e-12
        )
        np.testing.assert_allclose(corrected[key], plain[key] - 0.1 * correction[key], atol=1e-12)


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_sgd_reaches_sklearns_own_optimum(classes: int) -> None:
    # Full-batch steps to convergence must land on the minimizer of sklearn's objective
    # (the same C scaling, the binary (1, features) layout and the multinomial one).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    logits = x @ rng.normal(size=(3, classes)) * 2
    y = np.array([rng.choice(classes, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    data = Dataset(x=x, y=y, classes=classes)
    model = SklearnModel(LogisticRegression(C=0.5), classes=classes, features=3)
    model.fit(data, config=FitConfig(epochs=400, batch_size=300, lr=4.0), rng=rng)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=1000).fit(x, y)
    weights = model.get_weights()
    np.testing.assert_allclose(weights["coef"], reference.coef_, atol=1e-4)
    np.testing.assert_allclose(weights["intercept"], reference.intercept_, atol=1e-4)
    np.testing.assert_allclose(
        model.estimator.predict_proba(x), reference.predict_proba(x), atol=1e-4
    )


@pytest.mark.parametrize(
    ("estimator", "message"),
    [
        (Perceptron(), "supports SGDClassifier"),
        (SGDClassifier(average=True), "average"),
        (SGDClassifier(class_weight="balanced"), "balanced"),
        (MLPClassifier(solver="lbfgs"), "solver='sgd'"),
        (MLPClassifier(activation="bogus"), "activation"),
        (LogisticRegression(l1_ratio=1.0, solver="saga"), "L1"),
    ],
)
def test_unsupported_estimators_are_rejected(estimator: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SklearnModel(estimator, classes=3, features=4)


def test_bad_sizes_and_data_are_rejected(digits: tuple[Dataset, Dataset]) -> None:
    with pytest.raises(ConfigError, match="classes >= 2"):
        SklearnModel(SGDClassifier(), classes=1, features=4)
    with pytest.raises(ConfigError, match="features >= 1"):
        SklearnModel(SGDClassifier(), classes=2, features=0)
    model = SklearnModel(SGDClassifier(loss="log_loss"), classes=3, features=64)
    with pytest.raises(DataError, match=r"labels must be integers in \[0, 3\)"):
        model.evaluate(digits[1])
    with pytest.raises(DataError, match="expects 64 features"):
        model.evaluate(Dataset(x=np.zeros((2, 5)), y=np.array([0, 1]), classes=3))


def test_registry_options() -> None:
    model = build("sklearn_mlp", hidden=[32, 16])
    assert [model.get_weights()[f"coefs.{i}"].shape for i in range(3)] == [
        (64, 32),
        (32, 16),
        (16, 10),
    ]
    assert build("sklearn_mlp", hidden=8).get_weights()["coefs.0"].shape == (64, 8)
    with pytest.raises(ConfigError, match="hidden"):
        build("sklearn_mlp", hidden=[])
    with pytest.raises(ConfigError, match="sklearn_sgd"):
        build("sklearn_sgd", wings=2)


def test_hinge_loss_estimator_still_evaluates(digits: tuple[Dataset, Dataset]) -> None:
    model = SklearnModel(SGDClassifier(loss="hinge"), classes=10, features=64)
    model.fit(digits[0], config=FitConfig(lr=0.01), rng=np.random.default_rng(0))
    metrics = model.evaluate(digits[1])
    assert metrics["accuracy"] > 0.8
    assert np.isfinite(metrics["loss"]) and metrics["loss"] >= 0


# Accuracy after 5 FedAvg rounds on 5 label-skewed nodes (seed 0), measured: sklearn_sgd
# 0.92, sklearn_logistic 0.87, sklearn_mlp 0.88; the thresholds leave 0.12+ margin.
@pytest.mark.parametrize(
    ("name", "threshold"),
    [("sklearn_sgd", 0.8), ("sklearn_logistic", 0.75), ("sklearn_mlp", 0.75)],
)
def test_fedavg_end_to_end(name: str, threshold: float, digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    nodes = partition(train, nodes=5, scheme="dirichlet", alpha=0.5, seed=0)
    lr = {"sklearn_sgd": 0.05, "sklearn_logistic": 0.5, "sklearn_mlp": 0.3}[name]
    result = simulate(
        model=build(name),
        nodes=nodes,
        algorithm=FedAvg(rounds=5, nodes_per_round=5, local_epochs=1, lr=lr),
        test=test,
    )
    assert result.metrics["accuracy"] >= threshold
    assert result.history[-1].loss < result.history[0].loss
