"""Job files: strict parsing with messages that name the key, and the built objects."""

from __future__ import annotations

import pytest

from shoal.aggregate import Chain, Clip, Krum
from shoal.cli.job import load_job, parse_job, simulate_job
from shoal.errors import ConfigError
from shoal.learn import FedProx

BASE = {
    "data": {"dataset": "iris", "partition": {"scheme": "iid", "nodes": 4}},
    "algorithm": {"name": "fedavg", "rounds": 2, "nodes_per_round": 4, "lr": 0.3},
}


def job(**tables):
    raw = {key: dict(value) for key, value in BASE.items()}
    for key, value in tables.items():
        raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (job(extra={}), "unknown table"),
        (job(data={"dataset": "mnist"}), "digits"),
        (job(data={"partition": {"nodes": 3}}), "exactly one of dataset"),
        (job(data={"dataset": "iris", "partition": {"scheme": "zipf"}}), "dirichlet"),
        (job(data={"dataset": "iris", "partition": {"nodez": 3}}), "nodez"),
        (job(data={"dataset": "iris", "test_fraction": 2}), "test_fraction"),
        (job(model={"name": "resnet"}), "softmax_regression"),
        (job(algorithm={"name": "fedsgd"}), "fedavg"),
        (job(algorithm={"name": "fedavg", "mu": 0.1}), "mu"),
        (job(algorithm={"name": "fedavg", "rounds": "ten"}), "rounds must be an integer"),
        (job(algorithm={"name": "fedavg", "rounds": 0}), "rounds"),
        (job(aggregate={"rule": "average"}), "trimmed_mean"),
        (job(aggregate={"secure": "yes"}), "secure must be bool"),
        (job(engine={"workers": 1.5}), "workers must be int"),
        (job(faults={"drop": 2.0}), "drop"),
    ],
)
def test_invalid_jobs_name_the_key(raw, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(raw)


def test_aggregate_and_algorithm_are_built() -> None:
    spec = parse_job(
        job(
            data={"dataset": "iris", "partition": {"scheme": "iid", "nodes": 6}},
            algorithm={"name": "fedprox", "mu": 0.5, "rounds": 2, "nodes_per_round": 5},
            aggregate={"rule": "krum", "f": 1, "clip": 2.0},
        )
    )
    algorithm = spec.build_algorithm()
    assert isinstance(algorithm, FedProx) and algorithm.mu == 0.5
    chain = algorithm.aggregator
    assert isinstance(chain, Chain)
    assert chain.stages == (Clip(2.0), Krum(f=1))


def test_toml_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\ndataset = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(bad)


def test_csv_job_runs_and_node_slices_match_the_simulation(tmp_path) -> None:
    lines = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(60)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "job.toml").write_text(
        """
[data]
path = "data.csv"
partition = { scheme = "iid", nodes = 3 }
[algorithm]
name = "fedavg"
rounds = 2
nodes_per_round = 3
"""
    )
    spec = load_job(tmp_path / "job.toml")
    parts = spec.partitions()
    assert len(parts) == 3
    assert (spec.node_data(1, 3).x == parts[1].x).all()
    with pytest.raises(ConfigError, match="3 nodes"):
        spec.node_data(0, 4)
    result = simulate_job(spec)
    assert len(result.history) == 2
