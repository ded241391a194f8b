"""Training through compression: bytes per round in the history and the store, downlink
quantization of the broadcast, the virtual clock of a 1 Mbit/s uplink, and job files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Mean, Quantize, RandomRotation, TopK
from shoal.cli.job import parse_job
from shoal.data import load_digits, partition
from shoal.errors import ConfigError, TaskError
from shoal.learn import FedAvg, SoftmaxRegression, simulate
from shoal.learn.tasks import decode_weights, encode_weights
from shoal.runtime import Devices, Store


@pytest.fixture(scope="module")
def digits() -> tuple[list[Any], Any]:
    train, test = load_digits(test_fraction=0.2, seed=0)
    return partition(train, nodes=8, scheme="iid", seed=0), test


def train(digits: Any, **options: Any) -> Any:
    nodes, test = digits
    store = options.pop("store", None)
    algorithm = FedAvg(rounds=4, nodes_per_round=8, lr=0.3, local_epochs=2, **options)
    return simulate(
        model=SoftmaxRegression(features=64, classes=10),
        nodes=nodes,
        algorithm=algorithm,
        test=test,
        store=store,
    )


def test_compressed_updates_train_and_shrink_the_uplink(digits: Any) -> None:
    plain = train(digits)
    up = plain.history[-1].extra["uplink_bytes"]
    assert up > 8 * 650 * 8  # 8 nodes' float64 updates of 650 weights, plus the receipts
    for aggregator, most in (
        (Quantize(8) | Mean(), up / 5),
        (RandomRotation() | Quantize(4) | Mean(), up / 5),  # 650 weights pad to 1024
        (TopK(0.1) | Mean(), up / 5),
    ):
        result = train(digits, aggregator=aggregator)
        assert result.history[-1].extra["uplink_bytes"] < most, aggregator
        assert result.metrics["accuracy"] > plain.metrics["accuracy"] - 0.05, aggregator


def test_bytes_are_recorded_in_the_store(digits: Any, tmp_path: Path) -> None:
    with Store(tmp_path / "store.db") as store:
        result = train(digits, downlink_bits=8, store=store)
        rounds = store.round_metrics(result.run_id)
    assert [r.metrics["uplink_bytes"] for r in rounds] == [
        r.extra["uplink_bytes"] for r in result.history
    ]
    plain = train(digits)
    assert rounds[-1].metrics["downlink_bytes"] < plain.history[-1].extra["downlink_bytes"] / 4


def test_the_virtual_clock_pays_for_uploads(digits: Any) -> None:
    nodes, test = digits
    times = {}
    for name, aggregator in (("plain", None), ("top-10%", TopK(0.1) | Mean())):
        result = simulate(
            model=SoftmaxRegression(features=64, classes=10),
            nodes=nodes,
            algorithm=FedAvg(rounds=2, nodes_per_round=8, lr=0.3, aggregator=aggregator),
            test=test,
            devices=Devices(up_mbps=0.01),  # 10 kbit/s: uploads dominate
        )
        clock = [r.extra["virtual_s"] for r in result.history]
        slowest = sum(8 * r.extra["uplink_bytes_max_node"] / 1e4 for r in result.history)
        assert clock[0] < clock[1] and clock[1] >= slowest
        times[name] = clock[1]
    assert times["top-10%"] < times["plain"] / 2


def test_downlink_codec() -> None:
    rng = np.random.default_rng(0)
    weights = {"a": rng.normal(size=(30, 7)), "b": rng.normal(size=5)}
    for bits, tolerance in ((32, 1e-6), (16, 1e-3), (8, 0.05), (4, 0.6)):
        back = decode_weights(encode_weights(weights, bits))
        for k, v in weights.items():
            assert back[k].shape == v.shape
            assert np.abs(back[k] - v).max() <= tolerance * np.abs(v).max(), (bits, k)
    assert decode_weights(encode_weights(weights, None))["a"] is weights["a"]
    coded = encode_weights(weights, 8)
    for broken in (
        {**coded, "wq/bits": 3},
        {**coded, "wq/layout": [["a", [31, 7]], ["b", [5]]]},
        {**coded, "wq/layout": [["a", [-1]]]},
        {**coded, "wq/scales": np.full(1, np.nan, np.float32)},
        {**coded, "wq/codes": "nope"},
    ):
        with pytest.raises(TaskError, match="do not decode"):
            decode_weights(broken)
    with pytest.raises(ConfigError, match="downlink_bits"):
        FedAvg(downlink_bits=12)


BASE = {
    "data": {"dataset": "iris", "partition": {"nodes": 6}},
    "algorithm": {"name": "fedavg", "rounds": 1, "nodes_per_round": 6},
}


@pytest.mark.parametrize(
    ("aggregate", "privacy", "message"),
    [
        ({"topk": 0.01, "secure": True, "clip": 1.0}, None, "topk cannot combine with secure"),
        ({"quantize_bits": 3}, None, "quantize_bits must be 1, 2, 4, 8 or 16"),
        ({"topk": 1.5}, None, r"topk must be a fraction in \(0, 1\]"),
        ({"topk": 0.1, "norm_bound": 5.0}, None, "norm_bound needs each update's exact norm"),
        ({"rotate": True}, {"noise_multiplier": 1.0, "level": "node"}, "mode = 'local'"),
        ({"rotate": "yes"}, None, "rotate must be bool"),
    ],
)
def test_bad_compression_jobs(aggregate: Any, privacy: Any, message: str) -> None:
    raw: dict[str, Any] = {**BASE, "aggregate": aggregate}
    if privacy is not None:
        raw["privacy"] = privacy
    with pytest.raises(ConfigError, match=message):
        parse_job(raw)


def test_compression_jobs_build_their_chains() -> None:
    plain = parse_job({**BASE, "aggregate": {"clip": 2.0, "topk": 0.05, "quantize_bits": 8}})
    assert [type(s).__name__ for s in plain.build_aggregator().stages] == [
        "Clip",
        "TopK",
        "Quantize",
        "Mean",
    ]
    secure = parse_job(
        {**BASE, "aggregate": {"secure": True, "clip": 1.0, "rotate": True, "quantize_bits": 8}}
    )
    assert [type(s).__name__ for s in secure.build_aggregator().stages] == [
        "Clip",
        "RandomRotation",
        "Quantize",
        "SecureSum",
        "Mean",
    ]
    job = parse_job({**BASE, "algorithm": {**BASE["algorithm"], "downlink_bits": 8}})
    assert job.build_algorithm().downlink_bits == 8


def test_local_dp_updates_compress_as_post_processing(digits: Any) -> None:
    from shoal.learn import ExampleDP

    result = train(
        digits,
        aggregator=TopK(0.1) | Mean(),
        privacy=ExampleDP(noise_multiplier=1.0, steps_per_round=3),
    )
    assert result.history[-1].epsilon is not None and result.history[-1].epsilon > 0
    assert (
        result.history[-1].extra["uplink_bytes"]
        < train(digits).history[-1].extra["uplink_bytes"] / 4
    )


def test_shoal_run_json_reports_bytes_per_round(tmp_path: Path) -> None:
    from shoal.cli.main import main

    def run(name: str, extra: str) -> list[dict[str, Any]]:
        job = tmp_path / f"{name}.toml"
        job.write_text(
            '[data]\ndataset = "digits"\npartition = { nodes = 4 }\n'
            '[algorithm]\nname = "fedavg"\nrounds = 2\nnodes_per_round = 4\n' + extra,
            encoding="utf-8",
        )
        out = tmp_path / f"{name}.json"
        store = str(tmp_path / "s.db")
        assert main(["run", str(job), "--store", store, "--quiet", "--json", str(out)]) == 0
        history: list[dict[str, Any]] = json.loads(out.read_text())["history"]
        assert len(history) == 2
        return history

    plain = run("plain", "")
    small = run("small", "downlink_bits = 8\n[aggregate]\nquantize_bits = 8\n")
    for p, c in zip(plain, small, strict=True):
        assert 0 < c["uplink_bytes"] < p["uplink_bytes"] / 2
        assert 0 < c["downlink_bytes"] < p["downlink_bytes"] / 2
        assert c["uplink_bytes_max_node"] <= c["uplink_bytes"]
