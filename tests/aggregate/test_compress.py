"""Compression for slow links: the codecs' math, error feedback kept at the node, release
policies, secure sums, hostile replies, and the bytes that actually travel."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.aggregate import Clip, Mean, Quantize, RandomRotation, Sum, TopK, compresses
from shoal.aggregate.compress import (
    BLOCK,
    COMPRESS_TASK,
    compress_vector,
    decompress_vector,
    pack_codes,
    rotate,
    unpack_codes,
    unrotate,
)
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.errors import ConfigError, NotEnoughNodes
from shoal.runtime import LocalEngine, NodeApp, TaskSpec

vectors = st.integers(1, 3 * BLOCK + 5).flatmap(
    lambda n: st.builds(lambda seed: np.random.default_rng(seed).normal(size=n), st.integers(0, 99))
)


@settings(max_examples=30, deadline=None)
@given(x=vectors, seed=st.integers(0, 2**52))
def test_rotation_is_orthonormal_and_inverted(x: np.ndarray, seed: int) -> None:
    y = rotate(x, seed)
    assert y.size % min(BLOCK, 1 << (x.size - 1).bit_length()) == 0 and y.size >= x.size
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-9)
    np.testing.assert_allclose(unrotate(y, seed, x.size), x, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8, 16]), data=st.data())
def test_codes_pack_and_unpack(bits: int, data: Any) -> None:
    n = data.draw(st.integers(0, 70))
    codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)))
    packed = pack_codes(codes.astype(np.int64), bits)
    assert packed.nbytes == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)


@settings(max_examples=25, deadline=None)
@given(x=vectors, bits=st.sampled_from([2, 4, 8, 16]))
def test_quantization_is_within_one_step_per_coordinate(x: np.ndarray, bits: int) -> None:
    steps = [("quantize", float(bits))]
    y = decompress_vector(compress_vector(x, steps, seed=0), steps, seed=0, length=x.size)
    scale = np.repeat([np.abs(x[i : i + BLOCK]).max() for i in range(0, x.size, BLOCK)], BLOCK)[
        : x.size
    ]
    step = 2 * scale / (2**bits - 1)
    assert (np.abs(y - x) <= step * (1 + 1e-6) + 1e-7 * scale).all()


@settings(max_examples=25, deadline=None)
@given(x=vectors, fraction=st.floats(0.001, 1.0))
def test_topk_keeps_the_largest_coordinates(x: np.ndarray, fraction: float) -> None:
    steps = [("topk", fraction)]
    coded = compress_vector(x, steps, seed=0)
    k = max(1, math.ceil(fraction * x.size))
    assert coded["index"].shape == (k,) and coded["values"].dtype == np.float32
    y = decompress_vector(coded, steps, seed=0, length=x.size)
    kept = y != 0
    assert np.abs(x[~kept]).max(initial=0) <= np.abs(x[kept]).min() + 1e-6
    np.testing.assert_allclose(y[kept], x[kept], rtol=1e-6)


def test_bytes_on_the_wire() -> None:
    x = np.random.default_rng(1).normal(size=100_000)
    sizes = {
        name: sum(v.nbytes for v in compress_vector(x, steps, seed=3).values())
        for name, steps in {
            "q8": [("quantize", 8)],
            "q4": [("quantize", 4)],
            "top1%": [("topk", 0.01)],
            "rot+q8": [("rotate", 0), ("quantize", 8)],
        }.items()
    }
    blocks = math.ceil(x.size / BLOCK)
    assert sizes["q8"] == x.size + 4 * blocks
    assert sizes["q4"] == x.size // 2 + 4 * blocks
    assert sizes["top1%"] == 1000 * 8  # uint32 index + float32 value
    padded = blocks * BLOCK
    assert sizes["rot+q8"] == padded + 4 * blocks


# ----------------------------------------------------------------- through a federation


def vector_app(vectors: dict[str, np.ndarray], release: str = "clear") -> NodeApp:
    app = NodeApp()

    @app.task("make", release={"v": release, "n": "clear"})
    def make(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return {"v": vectors[ctx.node_id], "n": 1}

    return app


def federation(app: NodeApp, nodes: list[str], aggregator: Any) -> Federation:
    app.install(aggregator.node_tasks())
    engine = LocalEngine(app, nodes=nodes, seed=0)
    return Federation(engine, min_nodes=1, seed=0)


def test_error_feedback_sends_what_topk_left_behind() -> None:
    rng = np.random.default_rng(0)
    target = rng.normal(size=400)
    results = {}
    for feedback in (True, False):
        aggregator = TopK(0.1, error_feedback=feedback) | Sum()
        fed = federation(vector_app({"a": target}), ["a"], aggregator)
        total = np.zeros_like(target)
        rounds = 60
        for _ in range(rounds):
            out = fed.all().map("make")
            total += out["v"].aggregate(aggregator)
        results[feedback] = np.linalg.norm(total / rounds - target) / np.linalg.norm(target)
    # The residual carried at the node: the average of what was sent approaches the update.
    assert results[True] < 0.1, results
    assert results[False] > 0.5  # without it, 90% of the coordinates are never sent


def test_compressed_mean_is_close_and_weighted() -> None:
    rng = np.random.default_rng(2)
    vectors = {f"n{i}": rng.normal(size=3000) for i in range(4)}
    exact = np.mean(list(vectors.values()), axis=0)
    aggregator = RandomRotation() | Quantize(8) | Mean()
    fed = federation(vector_app(vectors), list(vectors), aggregator)
    out = fed.all().map("make")
    got = out["v"].aggregate(aggregator, weights=out["n"])
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02
    # The map did not bring the raw vectors back; the compressed fetch moved 1 byte each.
    assert fed.traffic.up < 4 * (3000 + BLOCK) + 4 * 3000


def test_a_secure_update_is_not_released_compressed() -> None:
    vectors = {f"n{i}": np.ones(50) for i in range(5)}
    aggregator = TopK(0.1) | Mean()
    fed = federation(vector_app(vectors, release="secure"), list(vectors), aggregator)
    out = fed.all().map("make")
    with pytest.raises(NotEnoughNodes, match="rejected"):
        out["v"].aggregate(aggregator)
    # Under the secure sum, rotation and an 8-bit grid do run, and the sum is right.
    secure = Clip(10.0) | RandomRotation() | Quantize(8) | SecureSum() | Mean()
    fed = federation(vector_app(vectors, release="secure"), list(vectors), secure)
    out = fed.all().map("make")
    got = out["v"].aggregate(secure)
    np.testing.assert_allclose(got, np.ones(50), atol=0.05)


def test_secure_sum_takes_no_topk_and_8_bit_grids_travel_small() -> None:
    vectors = {f"n{i}": np.full(2000, 0.01) for i in range(5)}
    with pytest.raises(ConfigError, match="TopK cannot run inside a secure sum"):
        chain = Clip(1.0) | TopK(0.1) | SecureSum() | Mean()
        fed = federation(vector_app(vectors, release="secure"), list(vectors), chain)
        fed.all().map("make")["v"].aggregate(chain)
    uploads = {}
    for name, chain in {
        "32-bit": Clip(1.0) | SecureSum() | Mean(),
        "8-bit grid": Clip(1.0) | Quantize(8) | SecureSum(value_range=0.05) | Mean(),
    }.items():
        fed = federation(vector_app(vectors, release="secure"), list(vectors), chain)
        out = fed.all().map("make")
        before = fed.traffic.up
        got = out["v"].aggregate(chain)
        uploads[name] = fed.traffic.up - before
        np.testing.assert_allclose(got, 0.01, atol=0.002)
    # 8 bits for each of 5 nodes needs an 11-bit modulus: uint16 on the wire, not uint32.
    assert uploads["8-bit grid"] < 0.6 * uploads["32-bit"]


def test_hostile_compressed_replies_are_excluded() -> None:
    vectors = {f"n{i}": np.arange(100.0) for i in range(3)}
    app = vector_app(vectors)
    aggregator = TopK(0.1) | Mean()
    honest = aggregator.node_tasks()[COMPRESS_TASK].fn
    bad_replies = {
        "n1": {"index": np.array([5000] * 10, np.uint32), "values": np.ones(10, np.float32)},
        "n2": {"index": np.arange(10, dtype=np.uint32), "values": np.full(10, np.nan, np.float32)},
    }

    def hostile(ctx: Any, payload: dict[str, Any]) -> Any:
        if ctx.node_id in bad_replies:
            return bad_replies[ctx.node_id]
        return honest(ctx, payload)

    app.install({COMPRESS_TASK: TaskSpec(hostile, {"*": "clear"})})
    fed = Federation(LocalEngine(app, nodes=list(vectors), seed=0), min_nodes=1)
    out = fed.all().map("make")
    got = out["v"].aggregate(aggregator)
    assert set(out.exclusions) == {"n1", "n2"}
    assert "increasing positions below 100" in out.exclusions["n1"]
    assert "NaN" in out.exclusions["n2"]
    np.testing.assert_allclose(got[90:], np.arange(90.0, 100.0), rtol=1e-6)


def test_chains_are_checked() -> None:
    assert compresses(TopK(0.1) | Mean()) and not compresses(Clip(1.0) | Mean())
    with pytest.raises(ConfigError, match="bits in"):
        Quantize(3)
    with pytest.raises(ConfigError, match="fraction"):
        TopK(0.0)
    vectors = {"a": np.ones(10)}
    for chain, message in (
        (Quantize(8) | TopK(0.5) | Mean(), "order RandomRotation, TopK or RandomSubset, Quantize"),
        (TopK(0.5) | Clip(1.0) | Mean(), "Clip must come before"),
    ):
        fed = federation(vector_app(vectors), ["a"], chain)
        with pytest.raises(ConfigError, match=message):
            fed.all().map("make")["v"].aggregate(chain)


def test_a_hostile_coordinator_gets_refusals() -> None:
    from shoal.runtime import FailureKind

    vectors = {"n0": np.ones(20)}
    app = NodeApp()

    @app.task("make", release={"v": "clear", "secret": "never"})
    def make(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return {"v": vectors[ctx.node_id], "secret": np.arange(20.0)}

    aggregator = TopK(0.5) | Mean()
    fed = federation(app, ["n0"], aggregator)
    out = fed.all().map("make")
    base = {"handle": out.handle, "seed": 1, "error_feedback": True}
    cases = [
        ({"fields": ["secret"], "steps": [["topk", 0.5]]}, FailureKind.REJECTED),
        ({"fields": ["v"], "steps": [["quantize", 8], ["topk", 0.5]]}, FailureKind.ERROR),
        ({"fields": ["v"], "steps": [["topk", 5.0]]}, FailureKind.ERROR),
        ({"fields": ["v"], "steps": [["exec", 1]]}, FailureKind.ERROR),
        ({"fields": ["v"], "steps": []}, FailureKind.ERROR),
    ]
    for request, kind in cases:
        replies, failures = fed.request(["n0"], COMPRESS_TASK, common={**base, **request})
        assert not replies and failures["n0"].kind is kind, request
    # The honest request works once; a second compression of the same update is refused.
    honest = {**base, "fields": ["v"], "steps": [["topk", 0.5]]}
    replies, _ = fed.request(["n0"], COMPRESS_TASK, common=honest)
    assert replies["n0"]["index"].shape == (10,)
    _, failures = fed.request(["n0"], COMPRESS_TASK, common=honest)
    assert "already compressed" in failures["n0"].detail
