from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import Quantizer
from shoal.crypto.secagg import (
    PHASES,
    AdvertiseRequest,
    SecAggNode,
    SecAggParams,
    UnmaskRequest,
    run_secagg_in_memory,
)
from shoal.errors import AggregationError, ConfigError, NotEnoughNodes, ProtocolError


def node_ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


def inputs_for(params: SecAggParams, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        v: rng.integers(0, 1 << params.bits, params.vector_length, dtype=np.uint64).astype(
            params.dtype
        )
        for v in params.nodes
    }


def expected_sum(params: SecAggParams, inputs: dict[str, np.ndarray], survivors: Any) -> np.ndarray:
    total = 0
    for v in survivors:
        total = total + inputs[v].astype(object)  # exact integers, reduced at the end
    if isinstance(total, int):
        return np.zeros(params.vector_length, dtype=params.dtype)
    return np.array([int(t) % (1 << params.bits) for t in total], dtype=params.dtype)


def survivors_of(params: SecAggParams, drop_at: dict[str, set[str]]) -> list[str]:
    early = set().union(*(drop_at.get(p, set()) for p in PHASES[:3]))
    return [v for v in params.nodes if v not in early]


@pytest.mark.parametrize(
    ("n", "bits", "max_dropouts"),
    [(3, 32, 0), (5, 8, 1), (8, 20, 2), (12, 32, 1), (9, 64, 2), (25, 32, 2)],
)
def test_exact_sum_without_dropouts(n: int, bits: int, max_dropouts: int) -> None:
    params = SecAggParams.create(
        node_ids(n), vector_length=257, max_dropouts=max_dropouts, bits=bits
    )
    inputs = inputs_for(params, seed=n)
    total = run_secagg_in_memory(inputs, params)
    assert total.dtype == params.dtype
    assert np.array_equal(total, expected_sum(params, inputs, params.nodes))


@pytest.mark.parametrize("phase", PHASES)
def test_dropouts_up_to_tolerance_in_each_phase(phase: str) -> None:
    params = SecAggParams.create(node_ids(11), vector_length=100, max_dropouts=3)
    inputs = inputs_for(params, seed=1)
    drop = {phase: {"node-00", "node-04", "node-09"}}
    total = run_secagg_in_memory(inputs, params, drop)
    assert np.array_equal(total, expected_sum(params, inputs, survivors_of(params, drop)))


def test_sparse_graph_with_dropouts_in_every_phase() -> None:
    params = SecAggParams.create(node_ids(30), vector_length=50, max_dropouts=4)
    assert params.degree < 29  # really sparse
    inputs = inputs_for(params, seed=2)
    drop = {p: {node_ids(30)[3 + 7 * i]} for i, p in enumerate(PHASES)}
    total = run_secagg_in_memory(inputs, params, drop)
    assert np.array_equal(total, expected_sum(params, inputs, survivors_of(params, drop)))


@settings(max_examples=15, deadline=None)
@given(st.integers(4, 14), st.data())
def test_any_dropout_pattern_within_tolerance_gives_exact_sum(n: int, data: st.DataObject) -> None:
    ids = node_ids(n)
    d = data.draw(st.integers(0, (n - 2) // 2 if n > 4 else 1))
    try:
        params = SecAggParams.create(ids, vector_length=16, max_dropouts=d)
    except ConfigError:
        return  # this many dropouts cannot be guaranteed for n nodes
    inputs = inputs_for(params, seed=n)
    dropped = data.draw(st.lists(st.sampled_from(ids), max_size=d, unique=True))
    drop: dict[str, set[str]] = {}
    for v in dropped:
        drop.setdefault(data.draw(st.sampled_from(PHASES)), set()).add(v)
    total = run_secagg_in_memory(inputs, params, drop)
    assert np.array_equal(total, expected_sum(params, inputs, survivors_of(params, drop)))


@pytest.mark.parametrize("phase", PHASES)
def test_beyond_tolerance_is_an_error_not_a_result(phase: str) -> None:
    params = SecAggParams.create(node_ids(8), vector_length=10, max_dropouts=2)
    inputs = inputs_for(params)
    with pytest.raises(NotEnoughNodes, match="tolerates 2 dropouts"):
        run_secagg_in_memory(inputs, params, {phase: {"node-01", "node-02", "node-03"}})


def test_dropouts_spread_over_phases_count_together() -> None:
    params = SecAggParams.create(node_ids(8), vector_length=10, max_dropouts=2)
    drop = {"advertise": {"node-01"}, "masked_input": {"node-02"}, "unmask": {"node-03"}}
    with pytest.raises(ProtocolError):
        run_secagg_in_memory(inputs_for(params), params, drop)


def test_probabilistic_mode_fails_loudly_when_a_neighbourhood_empties() -> None:
    ids = node_ids(40)
    params = SecAggParams.create(ids, vector_length=8, max_dropouts=8, max_failure_probability=0.5)
    k, t = params.degree, params.threshold
    assert params.max_dropouts > k - t
    victim = ids[0]
    drop = {"masked_input": set(params.neighbours(victim)[: k - t + 1])}
    with pytest.raises(NotEnoughNodes, match="below threshold"):
        run_secagg_in_memory(inputs_for(params), params, drop)
    # a random pattern of the same size usually succeeds, exactly
    spread = {"masked_input": {ids[5], ids[17]}}
    total = run_secagg_in_memory(inputs_for(params), params, spread)
    assert np.array_equal(
        total, expected_sum(params, inputs_for(params), survivors_of(params, spread))
    )


def test_float_vectors_through_quantization() -> None:
    ids = node_ids(10)
    params = SecAggParams.create(ids, vector_length=300, max_dropouts=2)
    q = Quantizer(clip=2.0, max_inputs=len(ids), bits=params.bits)
    rng = np.random.default_rng(3)
    real = {v: rng.normal(0, 1, 300) for v in ids}
    drop = {"masked_input": {"node-05"}}
    total = run_secagg_in_memory({v: q.quantize(x, rng=rng) for v, x in real.items()}, params, drop)
    survivors = survivors_of(params, drop)
    estimate = q.dequantize_sum(total, count=len(survivors))
    exact = sum(np.clip(real[v], -2.0, 2.0) for v in survivors)
    assert np.max(np.abs(estimate - exact)) <= len(survivors) * q.step


def test_plain_messages_without_the_wire_form() -> None:
    params = SecAggParams.create(node_ids(5), vector_length=7, max_dropouts=1)
    inputs = inputs_for(params)
    total = run_secagg_in_memory(inputs, params, through_dicts=False)
    assert np.array_equal(total, expected_sum(params, inputs, params.nodes))


def test_input_validation() -> None:
    params = SecAggParams.create(node_ids(4), vector_length=5, max_dropouts=1, bits=16)
    good = inputs_for(params)
    for bad in (
        np.zeros(5, dtype=np.float32),
        np.zeros(6, dtype=np.uint32),
        np.full(5, 1 << 16, dtype=np.uint32),
        np.full(5, -1, dtype=np.int64),
        np.zeros((5, 1), dtype=np.uint32),
    ):
        with pytest.raises(AggregationError):
            run_secagg_in_memory({**good, "node-00": bad}, params)
    with pytest.raises(ConfigError, match="every node"):
        run_secagg_in_memory({"node-00": good["node-00"]}, params)
    with pytest.raises(ConfigError, match="unknown SecAgg phase"):
        run_secagg_in_memory(good, params, {"nope": {"node-00"}})


def test_phases_run_once_and_in_order(make_round: Any) -> None:
    r = make_round(5, vector_length=4)
    fresh = SecAggNode(node_id="node-00")
    early = UnmaskRequest(round_id=r.params.round_id, survivors=r.params.nodes, dropped=())
    with pytest.raises(ProtocolError, match="phase"):
        fresh.unmask(early)
    r.advertise()
    with pytest.raises(ProtocolError, match="phase"):
        r.nodes["node-00"].advertise(AdvertiseRequest(params=r.params))  # no fresh keys twice
    r.share()
    r.mask()
    # a second masked input would reveal the difference of the two inputs
    with pytest.raises(ProtocolError, match="phase"):
        r.nodes["node-00"].masked_input(r.masked_requests["node-00"], r.inputs["node-00"])
    with pytest.raises(ProtocolError, match="phase"):
        r.server.collect_keys({})
    total = r.unmask()
    assert np.array_equal(total, r.expected())
    with pytest.raises(ProtocolError, match="phase"):
        r.server.finish({})


def test_unmask_can_be_repeated_identically(make_round: Any) -> None:
    r = make_round(6, vector_length=4)
    r.advertise()
    r.share()
    r.mask()
    req = r.unmask_requests["node-02"]
    first = r.nodes["node-02"].unmask(req)
    assert r.nodes["node-02"].unmask(req) == first
