"""Simulated attackers corrupt only their own nodes' updates, and robust rules resist them."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.aggregate import Median
from shoal.attacks import (
    GaussianNoiseAttack,
    LabelFlip,
    Scaling,
    SignFlip,
    attacked_app,
    build_attack,
    choose_malicious,
)
from shoal.cli.job import parse_job, simulate_job
from shoal.core import Federation
from shoal.data import load_digits, partition
from shoal.errors import ConfigError
from shoal.learn import TRAIN, FedAvg, SoftmaxRegression, learning_app, simulate
from shoal.learn.tasks import prefixed
from shoal.runtime import LocalEngine


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits(test_fraction=0.2, seed=0)
    return train, test, partition(train, nodes=10, scheme="iid", seed=0)


def deltas(app, parts):
    model = SoftmaxRegression(features=64, classes=10)
    fed = Federation(LocalEngine(app, data=parts))
    out = fed.all().map(TRAIN, **prefixed("w", model.get_weights()), lr=0.3, seed=5)
    return out["d/W"].reveal()


@pytest.mark.parametrize(
    ("attack", "check"),
    [
        (SignFlip(scale=2.0), lambda bad, good: np.allclose(bad, -2.0 * good)),
        (Scaling(factor=10.0), lambda bad, good: np.allclose(bad, 10.0 * good)),
        (GaussianNoiseAttack(sigma=3.0), lambda bad, good: 2.0 < bad.std() < 4.0),
        (LabelFlip(), lambda bad, good: not np.allclose(bad, good)),
    ],
)
def test_only_malicious_nodes_are_corrupted(digits, attack, check) -> None:
    _, _, parts = digits
    model = SoftmaxRegression(features=64, classes=10)
    honest = deltas(learning_app(model), parts)
    attacked = deltas(attacked_app(model, attack, {"n2", "n5"}), parts)
    for node, value in attacked.items():
        if node in ("n2", "n5"):
            assert check(value, honest[node]), node
        else:
            np.testing.assert_array_equal(value, honest[node])


def test_choose_malicious_is_seeded_and_sized() -> None:
    ids = [f"n{i}" for i in range(20)]
    chosen = choose_malicious(ids, 0.2, seed=3)
    assert len(chosen) == 4 and chosen == choose_malicious(ids, 0.2, seed=3)
    assert choose_malicious(ids, 0.0, seed=3) == frozenset()
    with pytest.raises(ConfigError):
        choose_malicious(ids, 1.5, seed=0)
    with pytest.raises(ConfigError, match="sign_flip"):
        build_attack("backdoor")


def test_median_resists_amplified_sign_flips(digits) -> None:
    _, test, parts = digits
    model = SoftmaxRegression(features=64, classes=10)
    bad = choose_malicious([f"n{i}" for i in range(10)], 0.2, seed=1)
    app = attacked_app(model, SignFlip(scale=4.0), bad)
    common = {"rounds": 8, "nodes_per_round": 10, "local_epochs": 2, "lr": 0.3}
    mean = simulate(model=model, nodes=parts, algorithm=FedAvg(**common), test=test, app=app)
    median = simulate(
        model=model,
        nodes=parts,
        algorithm=FedAvg(aggregator=Median(), **common),
        test=test,
        app=attacked_app(model, SignFlip(scale=4.0), bad),
    )
    assert median.metrics["accuracy"] > 0.85
    assert median.metrics["accuracy"] > mean.metrics["accuracy"] + 0.2


def test_attack_table_in_a_job() -> None:
    raw = {
        "data": {"dataset": "iris", "partition": {"scheme": "iid", "nodes": 5}},
        "algorithm": {"name": "fedavg", "rounds": 2, "nodes_per_round": 5},
        "attack": {"name": "sign_flip", "fraction": 0.2, "scale": 3.0},
    }
    result = simulate_job(parse_job(raw))
    assert len(result.history) == 2
    with pytest.raises(ConfigError, match="fraction"):
        parse_job({**raw, "attack": {"name": "sign_flip", "fraction": 2}})
    with pytest.raises(ConfigError, match="scale"):
        parse_job({**raw, "attack": {"name": "sign_flip", "scael": 2}})


def test_norm_bound_excludes_boosted_updates_and_records_why(tmp_path) -> None:
    from shoal.cli.job import parse_job, simulate_job
    from shoal.runtime import Store

    raw = {
        "data": {"dataset": "digits", "partition": {"scheme": "iid", "nodes": 10}},
        "algorithm": {"name": "fedavg", "rounds": 3, "nodes_per_round": 10, "lr": 0.3},
        "aggregate": {"norm_bound": 5.0},
        "attack": {"name": "scaling", "fraction": 0.2, "factor": 100.0},
    }
    with Store(tmp_path / "s.db") as store:
        result = simulate_job(parse_job(raw), store=store)
        assert all(r.participants == 8 and r.failed == 2 for r in result.history)
        assert result.metrics["accuracy"] > 0.8
        statuses = store.participation(result.run_id, 1)
    excluded = [p for p in statuses if p.status == "excluded"]
    assert len(excluded) == 2
    assert all("exceeds the bound 5" in p.detail for p in excluded)
