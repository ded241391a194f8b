"""RandomSubset: the same public positions at every node, so a secure sum can mask them.

The positions' math (uniform, fixed by the seed, fresh each aggregate), the unbiased scaled
estimate, error feedback that loses no mass (plain and secure), a secure sum equal to the
plain sum of the same sparsified updates, dropouts, and the adversary on either side."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.aggregate import Clip, Mean, Quantize, RandomRotation, RandomSubset, Sum, TopK
from shoal.aggregate.compress import (
    BLOCK,
    COMPRESS_TASK,
    EF_STATE,
    compress_vector,
    decompress_vector,
    rotate,
    subset_positions,
    subset_size,
    unrotate,
)
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.crypto.secagg import MASKED_INPUT_TASK, SHARE_TASK, UNMASK_TASK
from shoal.crypto.secagg import aggregate as secure_module
from shoal.errors import AggregationError, ConfigError, ProtocolError, TaskError
from shoal.privacy.stages import DistributedNoise
from shoal.runtime import Faults, LocalEngine, NodeApp, TaskSpec
from shoal.wire import decode, encode


def residual(engine: LocalEngine, node: str) -> np.ndarray:
    """The residual a node keeps (tests only: it never leaves the node)."""
    memory = engine.node_state(node)[EF_STATE]
    (key,) = [k for k in memory if "/" not in k]
    return np.asarray(memory[key])


# ------------------------------------------------------------------------------ math


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 3 * BLOCK),
    fraction=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**52 - 1),
)
def test_positions_are_fixed_by_the_seed(length: int, fraction: float, seed: int) -> None:
    positions = subset_positions(seed, length, fraction)
    k = subset_size(length, fraction)
    assert k == min(length, max(1, math.ceil(fraction * length)))
    assert positions.shape == (k,) and positions.dtype == np.int64
    assert (np.diff(positions) > 0).all() and positions[0] >= 0 and positions[-1] < length
    # Every node computes the same positions from the public seed alone.
    np.testing.assert_array_equal(subset_positions(seed, length, fraction), positions)


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(64, 2 * BLOCK),
    fraction=st.floats(0.01, 0.5),
    seeds=st.lists(st.integers(0, 2**52 - 1), min_size=2, max_size=2, unique=True),
)
def test_another_seed_picks_other_positions(length: int, fraction: float, seeds: Any) -> None:
    # Two seeds agree on a subset of k of n >= 64 coordinates with probability 1 / C(n, k).
    a, b = (subset_positions(s, length, fraction) for s in seeds)
    assert not np.array_equal(a, b)


def test_positions_are_uniform() -> None:
    n, fraction, draws = 200, 0.1, 4000
    counts = np.zeros(n)
    for seed in range(draws):
        counts[subset_positions(seed, n, fraction)] += 1
    expected = draws * subset_size(n, fraction) / n  # 400 per coordinate
    # Binomial(4000, 0.1): std 19; 5 std covers all 200 coordinates comfortably.
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected * (1 - fraction))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 1.5 * n  # chi-square with 199 degrees of freedom: mean 199, std 20


@settings(max_examples=5, deadline=None)
@given(
    x=st.integers(0, 99).map(lambda s: np.random.default_rng(s).normal(size=40)),
    steps=st.sampled_from(
        [
            [("subset", 0.25)],
            [("rotate", 0.0), ("subset", 0.25)],
            [("subset", 0.25), ("quantize", 8.0)],
        ]
    ),
)
def test_the_scaled_estimate_is_unbiased(x: np.ndarray, steps: Any) -> None:
    draws = 1000
    coded = [compress_vector(x, steps, seed=s) for s in range(draws)]
    estimates = np.stack(
        [
            decompress_vector(c, steps, seed=s, length=x.size, unbiased=True)
            for s, c in enumerate(coded)
        ]
    )
    # Each estimate is x plus zero-mean noise of variance (n/k - 1) |x|^2 per coordinate
    # at most (spread over n coordinates after a rotation; more with 8-bit rounding).
    n = len(rotate(x, 0)) if steps[0][0] == "rotate" else x.size
    k = subset_size(n, 0.25)
    spread = math.sqrt((n / k - 1) * float(x @ x) * 1.1 / draws)
    assert np.abs(estimates.mean(axis=0) - x).max() < 5 * spread
    # Without the scale (error feedback's), a round's estimate is k/n of x in expectation.
    plain = [decompress_vector(c, steps, seed=s, length=x.size) for s, c in enumerate(coded)]
    np.testing.assert_allclose(np.mean(plain, axis=0) * n / k, estimates.mean(axis=0), atol=1e-9)


def test_only_values_travel() -> None:
    x = np.random.default_rng(1).normal(size=100_000)
    k = subset_size(x.size, 0.1)
    plain = compress_vector(x, [("subset", 0.1)], seed=3)
    assert set(plain) == {"values"} and plain["values"].nbytes == 4 * k  # no positions
    coded = compress_vector(x, [("subset", 0.1), ("quantize", 8)], seed=3)
    assert sum(v.nbytes for v in coded.values()) == k + 4 * math.ceil(k / BLOCK)
    with pytest.raises(AggregationError, match=r"'values' must be an array of shape \(10000,\)"):
        decompress_vector(
            {"values": plain["values"][:-1]}, [("subset", 0.1)], seed=3, length=x.size
        )


# ------------------------------------------------------------------- through a federation


def vector_app(updates: dict[str, list[np.ndarray]], release: str = "clear") -> NodeApp:
    """Each call of 'make' releases the node's next update of the list."""
    app = NodeApp()

    @app.task("make", release={"v": release, "n": "clear"})
    def make(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        count = ctx.state.get("calls", 0)
        ctx.state["calls"] = count + 1
        return {"v": updates[ctx.node_id][count], "n": 1}

    return app


def engine_for(app: NodeApp, nodes: list[str], chain: Any, **options: Any) -> LocalEngine:
    app.install(chain.node_tasks())
    return LocalEngine(app, nodes=nodes, seed=0, **options)


def test_every_node_sends_the_same_positions_and_rounds_differ() -> None:
    nodes = ["a", "b", "c"]
    updates = {v: [np.ones(500)] * 2 for v in nodes}
    chain = RandomSubset(0.1, error_feedback=False) | Sum()  # scaled by 500 / 50
    fed = Federation(engine_for(vector_app(updates), nodes, chain), min_nodes=1)
    kept = []
    for _ in range(2):
        total = fed.all().map("make")["v"].aggregate(chain)
        # Had any node kept other positions, some would add up to 10 or 20, not 30.
        assert set(np.unique(total)) == {0.0, 30.0}
        kept.append(np.flatnonzero(total))
        assert kept[-1].size == subset_size(500, 0.1)
    assert not np.array_equal(*kept)  # a fresh public seed each aggregate


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rounds=st.integers(1, 6),
    fraction=st.floats(0.05, 1.0),
    rotated=st.booleans(),
)
def test_error_feedback_conserves_mass(
    seed: int, rounds: int, fraction: float, rotated: bool
) -> None:
    rng = np.random.default_rng(seed)
    nodes = ["a", "b"]
    updates = {v: [rng.normal(size=300) for _ in range(rounds)] for v in nodes}
    chain = (
        (RandomRotation() | RandomSubset(fraction, error_feedback=True) | Sum())
        if rotated
        else (RandomSubset(fraction, error_feedback=True) | Sum())
    )
    engine = engine_for(vector_app(updates), nodes, chain)
    fed = Federation(engine, min_nodes=1)
    sent = sum(fed.all().map("make")["v"].aggregate(chain) for _ in range(rounds))
    kept = sum(residual(engine, v) for v in nodes)
    total = sum(sum(u) for u in updates.values())
    # What the server got plus what waits at the nodes is every update, to float rounding.
    np.testing.assert_allclose(sent + kept, total, atol=1e-9)


def test_error_feedback_delivers_over_rounds() -> None:
    target = np.random.default_rng(0).normal(size=400)
    results = {}
    for feedback in (True, False):
        chain = RandomSubset(0.1, error_feedback=feedback) | Sum()
        fed = Federation(engine_for(vector_app({"a": [target] * 160}), ["a"], chain), min_nodes=1)
        total = sum(fed.all().map("make")["v"].aggregate(chain) for _ in range(160))
        results[feedback] = np.linalg.norm(total / 160 - target) / np.linalg.norm(target)
    # With feedback every coordinate arrives, late: what is missing is the residual, about
    # sqrt(E[age^2]) = sqrt(190) rounds of the update (0.09 of 160). Without, the scaled
    # estimate is unbiased but noisy: sqrt((10 - 1) / 160) = 0.24 off after 160 rounds.
    assert results[True] < 0.15 and 0.15 < results[False] < 0.4, results


def test_chains_are_checked() -> None:
    with pytest.raises(ConfigError, match="fraction"):
        RandomSubset(0.0)
    with pytest.raises(ConfigError, match="fraction"):
        RandomSubset(True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="error_feedback"):
        RandomSubset(0.5, error_feedback="no")  # type: ignore[arg-type]
    updates = {"a": [np.ones(10)]}
    for chain, message in (
        (RandomSubset(0.5) | RandomRotation() | Mean(), "order RandomRotation, TopK or"),
        (TopK(0.5) | RandomSubset(0.5) | Mean(), "use one of them"),
    ):
        fed = Federation(engine_for(vector_app(updates), ["a"], chain), min_nodes=1)
        with pytest.raises(ConfigError, match=message):
            fed.all().map("make")["v"].aggregate(chain)


def test_a_node_sending_another_length_is_excluded() -> None:
    nodes = ["n0", "n1", "n2"]
    updates = {v: [np.arange(100.0)] for v in nodes}
    chain = RandomSubset(0.1, error_feedback=True) | Sum()
    app = vector_app(updates)
    honest = chain.node_tasks()[COMPRESS_TASK].fn

    def hostile(ctx: Any, payload: dict[str, Any]) -> Any:
        reply = honest(ctx, payload)
        if ctx.node_id == "n1":
            reply["values"] = np.ones(11, np.float32)  # one more than the subset's 10
        return reply

    app.install({COMPRESS_TASK: TaskSpec(hostile, {"*": "clear"})})
    out = Federation(LocalEngine(app, nodes=nodes, seed=0), min_nodes=1).all().map("make")
    total = out["v"].aggregate(chain)
    assert set(out.exclusions) == {"n1"}
    assert "'values' must be an array of shape (10,)" in out.exclusions["n1"]
    kept = np.flatnonzero(total)
    np.testing.assert_allclose(total[kept], 2 * np.arange(100.0)[kept], rtol=1e-6)


# ----------------------------------------------------------------------- secure sums


@pytest.fixture
def fixed_seeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rotation and subset seeds SecureSum draws, fixed so the test can redo its math."""
    seeds = [12345, 67890]

    class Fixed:
        calls = 0

        @classmethod
        def randbits(cls, bits: int) -> int:
            cls.calls += 1
            return seeds[(cls.calls - 1) % 2]

    monkeypatch.setattr(secure_module, "secrets", Fixed)
    return seeds


def secure_inputs(n: int, d: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {f"n{i}": [rng.uniform(-1, 1, size=d)] for i in range(n)}


def test_secure_sum_equals_the_plain_sum_of_the_same_sparsified_updates(
    fixed_seeds: list[int],
) -> None:
    updates = secure_inputs(6, 3000, seed=1)
    clip, value_range = 10.0, 1.5
    chain = (
        Clip(clip)
        | RandomRotation()
        | RandomSubset(0.1, error_feedback=True)
        | Quantize(8)
        | SecureSum(value_range=value_range)
    )
    uploads = {}
    for name, pre in {"dense": Clip(clip) | RandomRotation(), "subset": chain}.items():
        whole = pre | Quantize(8) | SecureSum(value_range=value_range) if name == "dense" else pre
        engine = engine_for(vector_app(updates, release="secure"), list(updates), whole)
        out = Federation(engine).all().map("make")
        before = out.federation.traffic.up
        reduced = whole.reduce(out["v"])
        uploads[name] = out.federation.traffic.up - before
    rotation, subset = fixed_seeds
    full = len(rotate(np.zeros(3000), 0))  # 4,096 after padding
    positions = subset_positions(subset, full, 0.1)
    plain = np.zeros(full)
    for (x,) in updates.values():
        scale = min(1.0, clip / np.linalg.norm(x))
        plain[positions] += rotate(x * scale, rotation)[positions]
    expected = unrotate(plain, rotation, 3000)
    # Stochastic rounding onto the 8-bit grid: each node's entry within one grid step.
    step = 2 * value_range / (2**8 - 1)
    assert np.linalg.norm(reduced.vector - expected) <= 6 * step * math.sqrt(positions.size)
    assert np.linalg.norm(reduced.vector - expected) < 0.05 * np.linalg.norm(expected)
    # Each node masks 410 entries of uint16 (an 11-bit modulus for 6 nodes), not 4,096;
    # the keys and shares of the other phases are the same in both.
    saved = uploads["dense"] - uploads["subset"]
    assert 0.95 * 6 * 2 * (full - positions.size) <= saved <= 6 * 2 * (full - positions.size)


def test_secure_error_feedback_conserves_mass_within_the_grid(fixed_seeds: list[int]) -> None:
    rng = np.random.default_rng(3)
    nodes = [f"n{i}" for i in range(4)]
    rounds = 3
    updates = {v: [rng.uniform(-1, 1, size=200) for _ in range(rounds)] for v in nodes}
    value_range = 0.5  # smaller than some coordinates: the cut-off part waits at the node
    chain = (
        Clip(100.0)
        | RandomSubset(0.25, error_feedback=True)
        | Quantize(16)
        | SecureSum(value_range=value_range)
    )
    engine = engine_for(vector_app(updates, release="secure"), nodes, chain)
    fed = Federation(engine)
    sent = sum(chain.reduce(fed.all().map("make")["v"]).vector for _ in range(rounds))
    kept = sum(residual(engine, v) for v in nodes)
    total = sum(sum(u) for u in updates.values())
    step = 2 * value_range / (2**16 - 1)
    np.testing.assert_allclose(sent + kept, total, atol=rounds * len(nodes) * step)
    assert np.abs(kept).max() > 0.5  # the range did cut: those parts were kept, not lost


@pytest.mark.parametrize("phase", [SHARE_TASK, MASKED_INPUT_TASK, UNMASK_TASK])
def test_dropouts_under_secagg_plus_still_reconstruct(phase: str, fixed_seeds: list[int]) -> None:
    updates = secure_inputs(20, 500, seed=4)
    chain = Clip(50.0) | RandomSubset(0.2, error_feedback=True) | SecureSum(dropout_fraction=0.15)
    faults = Faults(always_drop=frozenset({"n3", "n11"}), tasks=frozenset({phase}))
    engine = engine_for(vector_app(updates, release="secure"), list(updates), chain, faults=faults)
    out = Federation(engine).all().map("make")
    reduced = chain.reduce(out["v"])
    expected_nodes = set(updates) if phase == UNMASK_TASK else set(updates) - {"n3", "n11"}
    assert set(reduced.node_ids) == expected_nodes
    positions = subset_positions(fixed_seeds[1], 500, 0.2)
    expected = np.zeros(500)
    expected[positions] = sum(updates[v][0][positions] for v in expected_nodes)
    np.testing.assert_allclose(reduced.vector, expected, atol=20 * 2 * 50 / 2**27)


def test_a_node_masking_another_length_is_left_out(fixed_seeds: list[int]) -> None:
    updates = secure_inputs(8, 400, seed=5)
    chain = (
        Clip(100.0)
        | RandomSubset(0.1, error_feedback=True)
        | Quantize(8)
        | SecureSum(value_range=1.0)
    )
    app = vector_app(updates, release="secure")
    tasks = chain.node_tasks()
    honest = tasks[MASKED_INPUT_TASK].fn

    def hostile(ctx: Any, payload: dict[str, Any]) -> Any:
        reply = honest(ctx, payload)
        if ctx.node_id == "n2":
            reply["masked"] = np.concatenate([reply["masked"], reply["masked"][:5]])
        return reply

    app.install({**tasks, MASKED_INPUT_TASK: TaskSpec(hostile, {"*": "clear"})})
    out = Federation(LocalEngine(app, nodes=list(updates), seed=0)).all().map("make")
    reduced = chain.reduce(out["v"])
    assert "n2" not in reduced.node_ids and "shape (45,)" in reduced.excluded["n2"]
    positions = subset_positions(fixed_seeds[1], 400, 0.1)
    expected = np.zeros(400)
    expected[positions] = sum(updates[v][0][positions] for v in reduced.node_ids)
    np.testing.assert_allclose(reduced.vector, expected, atol=7 * 2 / 255)


class Tamper(LocalEngine):
    """A coordinator that rewrites the masked-input request of chosen nodes."""

    def __init__(self, *args: Any, change: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.change = change
        self.failures: dict[str, str] = {}

    def dispatch(self, tasks: Any, *, deadline_s: float) -> Any:
        changed = []
        for task in tasks:
            if task.name == MASKED_INPUT_TASK and self.change(task.node_id) is not None:
                payload = dict(decode(task.payload))
                payload["transforms"] = self.change(task.node_id)
                task = dataclasses.replace(task, payload=encode(payload))
            changed.append(task)
        result = super().dispatch(changed, deadline_s=deadline_s)
        self.failures.update({v: f.detail for v, f in result.failures.items()})
        return result


def test_a_coordinator_cannot_give_one_node_another_subset(fixed_seeds: list[int]) -> None:
    updates = secure_inputs(6, 300, seed=6)
    chain = Clip(10.0) | RandomSubset(0.1, error_feedback=True) | SecureSum()
    narrow = [{"clip_l2": 10.0}, {"subset": {"fraction": 0.01, "seed": 7, "error_feedback": True}}]
    app = vector_app(updates, release="secure")
    app.install(chain.node_tasks())
    engine = Tamper(
        app, nodes=list(updates), seed=0, change=lambda v: narrow if v == "n0" else None
    )
    out = Federation(engine).all().map("make")
    reduced = chain.reduce(out["v"])
    # The request differs from the parameters every participant agreed on: n0 refuses.
    assert "n0" not in reduced.node_ids and "differently" in engine.failures["n0"]
    assert EF_STATE not in engine.node_state("n0")  # refused before it read its update


def test_a_coordinator_asking_another_length_gets_a_refusal(
    monkeypatch: pytest.MonkeyPatch, fixed_seeds: list[int]
) -> None:
    updates = secure_inputs(5, 300, seed=7)
    chain = Clip(10.0) | RandomSubset(0.1, error_feedback=True) | SecureSum()
    app = vector_app(updates, release="secure")
    app.install(chain.node_tasks())
    engine = Tamper(app, nodes=list(updates), seed=0, change=lambda v: None)
    out = Federation(engine).all().map("make")
    # The coordinator sizes the masked vector for 31 entries where the subset keeps 30.
    monkeypatch.setattr(secure_module, "subset_size", lambda n, f: 31)
    with pytest.raises(ProtocolError):
        chain.reduce(out["v"])
    assert set(engine.failures) == set(updates)
    assert all(
        "has 30 entries, but the round's parameters ask for 31" in d
        for d in engine.failures.values()
    )


def test_secure_chains_and_hostile_transforms_are_checked() -> None:
    updates = secure_inputs(3, 50)
    for chain, message in (
        (Clip(1.0) | RandomSubset(0.5) | RandomRotation() | SecureSum(), "before RandomSubset"),
        (
            Clip(1.0)
            | DistributedNoise(total_std=1.0, nodes=3)
            | RandomSubset(0.5, error_feedback=True)
            | SecureSum(),
            "error_feedback=False",
        ),
    ):
        engine = engine_for(vector_app(updates, release="secure"), list(updates), chain)
        with pytest.raises(ConfigError, match=message):
            chain.reduce(Federation(engine).all().map("make")["v"])
    # Without error feedback (the default) the subset is post-processing of the clipped,
    # noised update.
    chain = (
        Clip(10.0)
        | DistributedNoise(total_std=0.01, nodes=3)
        | RandomSubset(0.5)
        | SecureSum(value_range=10.0, dropout_fraction=0.0)
    )
    engine = engine_for(vector_app(updates, release="secure"), list(updates), chain)
    got = chain.reduce(Federation(engine).all().map("make")["v"]).vector
    kept = got != 0
    assert kept.sum() == 25
    np.testing.assert_allclose(got[kept], 2 * sum(u[0] for u in updates.values())[kept], atol=0.1)
    good = {"fraction": 0.5, "seed": 3, "error_feedback": True}
    for spec, message in (
        ({**good, "fraction": 2.0}, r"fraction must lie in \(0, 1\]"),
        ({**good, "seed": -1}, "seed must be an integer in"),
        ({**good, "seed": 1.5}, "seed must be an integer in"),
        ({**good, "error_feedback": 1}, "true or false"),
        ({"fraction": 0.5}, "a subset transform is"),
        (0.5, "a subset transform is"),
    ):
        with pytest.raises(TaskError, match=message):
            secure_module._node_transforms([{"subset": spec}], 3)
    with pytest.raises(TaskError, match="before RandomSubset"):
        secure_module._node_transforms([{"subset": good}, {"rotate": 1.0}], 3)


# ------------------------------------------------------------------------------ job files

JOB = {
    "data": {"dataset": "iris", "partition": {"nodes": 6}},
    "algorithm": {"name": "fedavg", "rounds": 1, "nodes_per_round": 6},
}


@pytest.mark.parametrize(
    ("aggregate", "message"),
    [
        ({"random_subset": 1.5}, r"random_subset must be a fraction in \(0, 1\]"),
        ({"random_subset": 0.0}, r"random_subset must be a fraction in \(0, 1\]"),
        ({"random_subset": "10%"}, "random_subset must be int or float"),
        ({"random_subset": True}, "random_subset must be int or float"),
        ({"random_subset": 0.1, "topk": 0.1}, "set one"),
        ({"random_subset_error_feedback": False}, "needs random_subset = FRACTION"),
        ({"random_subset": 0.1, "random_subset_error_feedback": 1}, "must be bool"),
        ({"random_subset": 0.1, "norm_bound": 5.0}, "norm_bound needs each update's exact norm"),
    ],
)
def test_bad_random_subset_jobs(aggregate: Any, message: str) -> None:
    from shoal.cli.job import parse_job

    with pytest.raises(ConfigError, match=message):
        parse_job({**JOB, "aggregate": aggregate})


def test_random_subset_jobs_build_their_chains() -> None:
    from shoal.cli.job import parse_job

    secure = parse_job(
        {
            **JOB,
            "aggregate": {
                "secure": True,
                "clip": 1.0,
                "rotate": True,
                "random_subset": 0.1,
                "quantize_bits": 8,
            },
        }
    ).build_aggregator()
    names = [type(s).__name__ for s in secure.stages]
    assert names == ["Clip", "RandomRotation", "RandomSubset", "Quantize", "SecureSum", "Mean"]
    assert secure.stages[2] == RandomSubset(0.1, error_feedback=False)  # unbiased by default
    plain = parse_job(
        {**JOB, "aggregate": {"random_subset": 0.25, "random_subset_error_feedback": True}}
    ).build_aggregator()
    assert plain.stages[0] == RandomSubset(0.25, error_feedback=True)


def test_fedavg_trains_through_a_secure_random_subset() -> None:
    from shoal.data import load_digits, partition
    from shoal.learn import FedAvg, SoftmaxRegression, simulate

    train, test = load_digits(test_fraction=0.2, seed=0)
    nodes = partition(train, nodes=8, scheme="iid", seed=0)
    results = {}
    for name, subset in (("dense", ()), ("subset", (RandomSubset(0.25, error_feedback=True),))):
        chain = Clip(5.0) | RandomRotation()
        for stage in (*subset, Quantize(8)):
            chain = chain | stage
        chain = chain | SecureSum(value_range=0.5) | Mean()
        results[name] = simulate(
            model=SoftmaxRegression(features=64, classes=10),
            nodes=nodes,
            algorithm=FedAvg(rounds=6, nodes_per_round=8, lr=0.3, local_epochs=2, aggregator=chain),
            test=test,
            seed=0,
        )
    dense, sparse = (results[n].history[-1].extra["uplink_bytes"] for n in ("dense", "subset"))
    # 650 weights pad to 1,024 rotated coordinates; the subset masks 256 of them (uint16).
    assert dense - sparse >= 0.95 * 8 * 2 * (1024 - 256)
    assert results["subset"].metrics["accuracy"] > 0.8, results["subset"].metrics
