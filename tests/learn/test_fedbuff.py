"""FedBuff: staleness weighting at the node, buffered server steps on the virtual clock,
secure and DP buffers, the node's refusals, and job files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.aggregate import Clip, Mean
from shoal.cli.job import parse_job
from shoal.core import Federation, NodeGroup
from shoal.crypto import SecureSum
from shoal.crypto.secagg import UNMASK_TASK
from shoal.data import load_digits, partition
from shoal.errors import ConfigError
from shoal.learn import (
    TRAIN,
    ExampleDP,
    FedBuff,
    LocalData,
    NodeDP,
    SoftmaxRegression,
    Trainer,
    learning_app,
    staleness_weight,
)
from shoal.learn.tasks import STALENESS_FLOOR, UPLOAD
from shoal.privacy.accounting import PrivacyLedger
from shoal.runtime import Devices, FailureKind, Faults, LocalEngine, TraceAvailability

WEIGHTS = {"w/W": np.zeros((64, 10)), "w/b": np.zeros(10)}


@pytest.fixture(scope="module")
def nodes() -> list[Any]:
    train, _ = load_digits(test_fraction=0.2, seed=0)
    return partition(train, nodes=12, scheme="iid", seed=0)


def engine_for(algorithm: FedBuff, nodes: list[Any], **options: Any) -> LocalEngine:
    model = SoftmaxRegression(features=64, classes=10)
    app = learning_app(model, plan=algorithm.plan)
    app.install(algorithm.node_tasks())
    return LocalEngine(app, data=nodes, **options)


def train(algorithm: FedBuff, nodes: list[Any], **options: Any) -> Any:
    engine = engine_for(algorithm, nodes, **options)
    federation = Federation(engine, seed=0)
    model = SoftmaxRegression(features=64, classes=10)
    try:
        result = Trainer(federation=federation, algorithm=algorithm, model=model, seed=0).run()
    finally:
        engine.close()
    return result, engine


# -- the staleness weight -------------------------------------------------------------------


@given(t=st.integers(0, 10_000), a=st.floats(0, 1))
def test_staleness_weight_is_the_polynomial_rule_above_the_floor(t: int, a: float) -> None:
    w = staleness_weight(t, a)
    assert STALENESS_FLOOR <= w <= 1.0
    assert w == max((1 + t) ** -a, STALENESS_FLOOR)
    assert staleness_weight(t + 1, a) <= w  # staler never weighs more
    assert staleness_weight(0, a) == 1.0


def test_staleness_weight_values() -> None:
    assert staleness_weight(3) == 0.5  # 1/sqrt(4): the paper's default rule
    assert staleness_weight(2, 1.0) == pytest.approx(1 / 3)
    assert staleness_weight(8, 1.0) == STALENESS_FLOOR  # 1/9 is below the floor
    assert staleness_weight(10_000, 1.0) == STALENESS_FLOOR
    with pytest.raises(ConfigError, match="staleness"):
        staleness_weight(-1)


# -- the node's side ------------------------------------------------------------------------


def test_the_node_weights_its_own_update_and_releases_it_once(nodes: list[Any]) -> None:
    app = learning_app(SoftmaxRegression(features=64, classes=10))
    federation = Federation(LocalEngine(app, data=nodes[:3]), seed=0)
    group = federation.all()
    plain = group.map(TRAIN, group.broadcast(**WEIGHTS, seed=7, max_steps=2))["d/W"].reveal()
    spec = {"version": 2, "max_staleness": 5, "exponent": 0.5}
    receipts = group.map(TRAIN, group.broadcast(**WEIGHTS, seed=7, max_steps=2, buffered=spec))
    assert set(receipts.field_names) == {"n", "steps"}  # the delta is not in the kept result
    uploaded = group.map(UPLOAD, version=5)["d/W"].reveal()  # 3 versions stale: weight 1/2
    for node in plain:
        np.testing.assert_allclose(uploaded[node], 0.5 * plain[node])
    again = group.map(UPLOAD, version=5, min_nodes=0)
    assert {f.kind for f in again.failures.values()} == {FailureKind.ERROR}
    assert "no pending update" in next(iter(again.failures.values())).detail


@pytest.mark.parametrize(
    ("spec", "version", "problem"),
    [
        ({"version": 4, "max_staleness": 2, "exponent": 0.5}, 3, "int >= 4"),
        ({"version": 4, "max_staleness": 2, "exponent": 0.5}, 7, "3 versions stale"),
        ({"version": 4, "max_staleness": 2, "exponent": 0.5}, "5", "int >= 4"),
        ({"version": 4, "max_staleness": 2, "exponent": 3.0}, 4, "exponent"),
        ({"version": 4, "max_staleness": 10**6, "exponent": 0.5}, 4, "max_staleness"),
        ({"version": -1, "max_staleness": 2, "exponent": 0.5}, 4, "version"),
        ("now", 4, "'buffered' must be"),
    ],
)
def test_the_node_refuses_hostile_staleness(
    nodes: list[Any], spec: Any, version: Any, problem: str
) -> None:
    app = learning_app(SoftmaxRegression(features=64, classes=10))
    federation = Federation(LocalEngine(app, data=nodes[:2]), seed=0)
    group = federation.all()
    trained = group.map(TRAIN, group.broadcast(**WEIGHTS, max_steps=1, buffered=spec), min_nodes=0)
    out = trained if trained.failures else group.map(UPLOAD, version=version, min_nodes=0)
    assert len(out.failures) == 2
    assert all(problem in f.detail for f in out.failures.values()), out.failures


def test_a_hostile_version_cannot_weight_a_node_below_the_floor(nodes: list[Any]) -> None:
    app = learning_app(SoftmaxRegression(features=64, classes=10))
    federation = Federation(LocalEngine(app, data=nodes[:1]), seed=0)
    group = federation.all()
    plain = group.map(TRAIN, group.broadcast(**WEIGHTS, seed=1, max_steps=2))["d/b"].reveal()
    spec = {"version": 0, "max_staleness": 10_000, "exponent": 1.0}
    group.map(TRAIN, group.broadcast(**WEIGHTS, seed=1, max_steps=2, buffered=spec))
    low = group.map(UPLOAD, version=10_000)["d/b"].reveal()
    np.testing.assert_allclose(low["n0"], STALENESS_FLOOR * plain["n0"])


# -- the server's side ----------------------------------------------------------------------


def test_fedbuff_steps_every_k_arrivals_on_the_virtual_clock(nodes: list[Any]) -> None:
    algorithm = FedBuff(rounds=4, nodes_per_round=3, concurrency=6, max_steps=2, lr=0.3)
    devices = Devices.sample(12, stragglers=0.5, slowdown=10, compute_s={TRAIN: 1.0}, seed=2)
    result, engine = train(algorithm, nodes, devices=devices)
    assert [r.participants for r in result.history] == [3, 3, 3, 3]
    state_time = result.state.meta["virtual_s"]
    assert state_time == pytest.approx(engine.clock.now)
    # 3 arrivals from 6 nodes of speed 1 or 0.1: never more than 10 s per step, and at
    # least 1 s (the nominal compute) before the first.
    assert 1.0 <= state_time <= 4 * 10.0 + 1e-6
    assert not np.allclose(result.weights["W"], 0)


def test_stale_updates_are_left_out(nodes: list[Any]) -> None:
    # Half the nodes are 10x slower: with max_staleness 0, a slow update that arrives after
    # a server step is stale and never enters a buffer.
    algorithm = FedBuff(rounds=6, nodes_per_round=2, concurrency=8, max_staleness=0, max_steps=1)
    devices = Devices(speed=np.array([1.0, 0.1] * 6, dtype=np.float32), compute_s={TRAIN: 1.0})
    result, _ = train(algorithm, nodes, devices=devices)
    stale = [r for h in result.history for r in h.failures.values() if r.startswith("stale")]
    assert stale and all("max_staleness 0" in r for r in stale)
    assert all(h.participants == 2 for h in result.history)


def test_fedbuff_waits_for_nodes_to_come_online(nodes: list[Any]) -> None:
    ids = [f"n{i}" for i in range(12)]
    trace = TraceAvailability.parse([f"{i},500,100000" for i in ids], node_ids=ids)
    algorithm = FedBuff(rounds=1, nodes_per_round=2, max_steps=1, idle_s=100.0)
    result, _ = train(algorithm, nodes, availability=trace)
    assert result.history[0].participants == 2
    assert result.state.meta["virtual_s"] >= 500.0


def test_fedbuff_with_a_secure_sum_matches_the_clear_clipped_mean(nodes: list[Any]) -> None:
    results = []
    for aggregator in (Clip(1.0) | Mean(), Clip(1.0) | SecureSum() | Mean()):
        algorithm = FedBuff(rounds=2, nodes_per_round=4, max_steps=2, aggregator=aggregator)
        devices = Devices.sample(12, stragglers=0.3, compute_s={TRAIN: 1.0}, seed=1)
        results.append(train(algorithm, nodes, devices=devices)[0])
    clear, secure = results
    assert [h.participants for h in secure.history] == [4, 4]
    for key in clear.weights:
        np.testing.assert_allclose(secure.weights[key], clear.weights[key], atol=1e-6)


@pytest.mark.parametrize("secure", [False, True])
def test_dp_fedbuff_is_accounted_per_contribution(nodes: list[Any], secure: bool) -> None:
    plan = NodeDP(noise_multiplier=1.2, clip=1.0, secure=secure)
    algorithm = FedBuff(rounds=3, nodes_per_round=4, concurrency=5, max_steps=1, privacy=plan)
    result, _ = train(algorithm, nodes)
    participation = result.state.meta["dp_participation"]
    assert sum(participation.values()) == sum(h.participants for h in result.history)
    most = max(participation.values())
    ledger = PrivacyLedger(accountant="rdp")
    ledger.record(sample_rate=1.0, noise_multiplier=1.2, steps=most)
    assert result.metrics["epsilon"] == pytest.approx(ledger.epsilon(1e-5))


def test_dp_fedbuff_counts_a_node_that_dropped_out_at_unmasking(nodes: list[Any]) -> None:
    """Its masked update is in the buffer's secure sum, so it spent privacy: its
    participation is counted (epsilon follows the node that took part most)."""
    plan = NodeDP(noise_multiplier=1.2, clip=1.0, secure=True)
    algorithm = FedBuff(rounds=1, nodes_per_round=12, concurrency=12, max_steps=1, privacy=plan)
    faults = Faults(drop=1.0, tasks=frozenset({UNMASK_TASK}), nodes=frozenset({"n3"}))
    result, _ = train(algorithm, nodes, faults=faults)
    assert result.history[0].participants == 12
    assert result.state.meta["dp_participation"] == {f"n{i}": 1 for i in range(12)}


def test_fedbuff_refuses_plans_it_cannot_account() -> None:
    with pytest.raises(ConfigError, match="node-level DP"):
        FedBuff(privacy=ExampleDP(noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="adaptive clipping"):
        FedBuff(privacy=NodeDP(noise_multiplier=1.0, target_quantile=0.5))
    with pytest.raises(ConfigError, match="concurrency"):
        FedBuff(concurrency=0)
    with pytest.raises(ConfigError, match="max_staleness"):
        FedBuff(max_staleness=-1)


def test_buffer_upload_is_refused_for_a_node_outside_the_buffer(nodes: list[Any]) -> None:
    # A node that never trained buffered has nothing to upload: the coordinator cannot
    # make it release anything through this task.
    app = learning_app(SoftmaxRegression(features=64, classes=10))
    federation = Federation(LocalEngine(app, data=nodes[:2]), seed=0)
    out = NodeGroup(federation, ["n0", "n1"]).map(UPLOAD, version=0, min_nodes=0)
    assert len(out) == 0 and len(out.failures) == 2


# -- job files ------------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "partition": {"scheme": "iid", "nodes": 8}},
    "algorithm": {"name": "fedbuff", "rounds": 2, "nodes_per_round": 2, "concurrency": 4},
}


def test_a_fedbuff_job_builds_and_runs() -> None:
    raw = {
        **BASE,
        "algorithm": {**BASE["algorithm"], "max_staleness": 3, "staleness_exponent": 1.0},
        "aggregate": {"secure": True, "clip": 5.0},
        "privacy": {"level": "node", "epsilon": 8.0},
    }
    spec = parse_job(raw)
    algorithm = spec.build_algorithm()
    assert isinstance(algorithm, FedBuff)
    assert (algorithm.concurrency, algorithm.max_staleness) == (4, 3)
    assert isinstance(algorithm.plan, NodeDP) and algorithm.plan.secure


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"concurrency": 1.5}, r"concurrency must be an integer"),
        ({"concurrency": 0}, r"concurrency must be in"),
        ({"max_staleness": -1}, r"max_staleness must be in"),
        ({"staleness_exponent": 2}, r"staleness_exponent must be in"),
        ({"staleness_exponent": "half"}, r"staleness_exponent must be"),
        ({"buffer": 3}, r"unknown key\(s\) \['buffer'\]"),
    ],
)
def test_fedbuff_keys_are_type_checked(algorithm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job({**BASE, "algorithm": {**BASE["algorithm"], **algorithm}})


def test_fedbuff_jobs_refuse_example_level_dp() -> None:
    raw = {**BASE, "privacy": {"level": "example", "epsilon": 3.0}}
    with pytest.raises(ConfigError, match="fedbuff' takes \\[privacy\\] level = 'node'"):
        parse_job(raw)


def test_local_data_works_with_buffered_training(nodes: list[Any]) -> None:
    local = [LocalData(train=p, test=p) for p in nodes]
    algorithm = FedBuff(rounds=1, nodes_per_round=3, max_steps=1)
    result, _ = train(algorithm, local)
    assert result.history[0].participants == 3


def test_a_hostile_coordinator_cannot_read_an_upload_in_the_clear(nodes: list[Any]) -> None:
    # Under a secure plan an uploaded delta leaves only into a secure sum, as train's would.
    algorithm = FedBuff(aggregator=Clip(1.0) | SecureSum() | Mean())
    app = learning_app(SoftmaxRegression(features=64, classes=10), plan=algorithm.plan)
    federation = Federation(LocalEngine(app, data=nodes[:2]), seed=0)
    group = federation.all()
    spec = {"version": 0, "max_staleness": 2, "exponent": 0.5}
    group.map(TRAIN, group.broadcast(**WEIGHTS, max_steps=1, buffered=spec))
    sent = group.map(UPLOAD, version=0, send=["d/W"], min_nodes=0)
    assert len(sent) == 0 and {f.kind for f in sent.failures.values()} == {FailureKind.REJECTED}
    group.map(TRAIN, group.broadcast(**WEIGHTS, max_steps=1, buffered=spec))
    held = group.map(UPLOAD, version=0)
    assert held["d/W"].reveal() == {}  # each node refused the clear fetch
    refusals = [e for e in federation.audit_log if e.action == "node.rejected"]
    assert len(refusals) >= 4 and all("secure" in e.detail["reason"] for e in refusals)


def test_fedbuff_with_compressed_links_matches_the_plain_run(nodes: list[Any]) -> None:
    from shoal.aggregate import Quantize

    results = []
    for options in ({}, {"downlink_bits": 16, "aggregator": Quantize(16) | Mean()}):
        algorithm = FedBuff(rounds=2, nodes_per_round=3, max_steps=2, **options)  # type: ignore[arg-type]
        # Nominal compute: arrivals (and so buffers) do not depend on this machine's timing.
        devices = Devices(compute_s={TRAIN: 1.0, UPLOAD: 0.0})
        results.append(train(algorithm, nodes, devices=devices)[0])
    plain, compressed = results
    for key in plain.weights:  # 16-bit grids: the same training, up to quantization
        np.testing.assert_allclose(compressed.weights[key], plain.weights[key], atol=2e-3)
        assert not np.array_equal(compressed.weights[key], plain.weights[key])
