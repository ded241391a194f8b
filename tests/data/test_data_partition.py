"""Partitioners: exact disjoint cover, determinism, non-empty nodes, skew, lazy == eager."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.data import (
    Dataset,
    LazyPartition,
    by_key_indices,
    dirichlet_indices,
    iid_indices,
    load_digits,
    partition,
    quantity_skew_indices,
    shard_indices,
    summary,
)
from shoal.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None)


def toy(labels: list[int] | np.ndarray, classes: int | None = None) -> Dataset:
    y = np.asarray(labels, dtype=np.int64)
    # Row i's first feature is i, so a node's features tell which samples it got.
    x = np.column_stack([np.arange(len(y)), y]).astype(np.float64)
    return Dataset(x=x, y=y, classes=classes or int(y.max()) + 1, name="toy")


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.intp)
    assert len(joined) == n, "some sample is missing or repeated"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


labels_st = st.lists(st.integers(0, 5), min_size=1, max_size=300)
schemes_st = st.sampled_from(["iid", "dirichlet", "shards", "quantity", "by_key"])


@SETTINGS
@given(
    labels=labels_st,
    nodes=st.integers(1, 25),
    scheme=schemes_st,
    seed=st.integers(0, 2**32),
    alpha=st.sampled_from([0.05, 0.5, 5.0]),
    k=st.integers(1, 3),
)
def test_partition_is_exact_cover_deterministic_and_non_empty(
    labels: list[int], nodes: int, scheme: str, seed: int, alpha: float, k: int
) -> None:
    ds = toy(labels)
    keys = np.asarray(labels) if scheme == "by_key" else None
    if scheme == "by_key" and nodes > len(set(labels)):
        nodes = len(set(labels))  # more nodes than keys is an error tested on its own below

    def run() -> LazyPartition:
        return partition(
            ds,
            nodes=nodes,
            scheme=scheme,
            seed=seed,
            alpha=alpha,
            shards_per_node=k,
            keys=keys,
            max_retries=5,
            lazy=True,
        )

    try:
        part = run()
    except DataError as exc:
        assert "node" in str(exc) or "shards" in str(exc)
        return
    assert len(part) == nodes
    parts = [part.indices(i) for i in range(nodes)]
    assert_exact_cover(parts, len(ds))
    assert all(len(p) >= 1 for p in parts)
    again = run()
    for i in range(nodes):
        np.testing.assert_array_equal(again.indices(i), parts[i])
        node = part[i]
        np.testing.assert_array_equal(node.x[:, 0], parts[i])
        np.testing.assert_array_equal(node.y, ds.y[parts[i]])


@SETTINGS
@given(labels=labels_st, nodes=st.integers(1, 12), seed=st.integers(0, 1000))
def test_index_functions_cover_exactly(labels: list[int], nodes: int, seed: int) -> None:
    n = len(labels)
    assert_exact_cover(iid_indices(n, nodes=nodes, seed=seed), n)
    sizes = [len(p) for p in iid_indices(n, nodes=nodes, seed=seed)]
    assert max(sizes) - min(sizes) <= 1
    assert_exact_cover(dirichlet_indices(labels, nodes=nodes, alpha=0.3, seed=seed, min_size=0), n)
    assert_exact_cover(by_key_indices(labels, seed=seed), n)
    if n >= nodes:
        parts = quantity_skew_indices(n, nodes=nodes, seed=seed, distribution="lognormal")
        assert_exact_cover(parts, n)
        assert min(len(p) for p in parts) >= 1
    try:
        parts = shard_indices(labels, nodes=nodes, shards_per_node=2, seed=seed)
    except DataError:
        assert nodes * 2 > n or nodes * 2 < len(set(labels))
    else:
        assert_exact_cover(parts, n)


@SETTINGS
@given(
    labels=st.lists(st.integers(0, 9), min_size=20, max_size=400),
    nodes=st.integers(1, 10),
    k=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_shards_give_at_most_k_labels_per_node(
    labels: list[int], nodes: int, k: int, seed: int
) -> None:
    y = np.asarray(labels)
    try:
        parts = shard_indices(y, nodes=nodes, shards_per_node=k, seed=seed)
    except DataError as exc:
        assert "shards" in str(exc)
        assert nodes * k > len(y) or nodes * k < len(set(labels))
        return
    assert_exact_cover(parts, len(y))
    for p in parts:
        assert len(p) >= 1
        assert len(np.unique(y[p])) <= k


def mean_entropy(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    ent = []
    for p in parts:
        c = np.bincount(labels[p], minlength=classes) / len(p)
        c = c[c > 0]
        ent.append(float(-(c * np.log2(c)).sum()))
    return float(np.mean(ent))


def test_dirichlet_small_alpha_really_skews() -> None:
    y = np.repeat(np.arange(10), 200)
    skewed = dirichlet_indices(y, nodes=20, alpha=0.1, seed=0)
    near_iid = dirichlet_indices(y, nodes=20, alpha=100.0, seed=0)
    low, high = mean_entropy(y, skewed, 10), mean_entropy(y, near_iid, 10)
    assert high > 3.1  # log2(10) = 3.32 for uniform labels
    assert low < 2.0
    assert low < high - 1.0


def test_dirichlet_gives_up_with_a_helpful_error() -> None:
    y = np.repeat(np.arange(2), 10)
    with pytest.raises(DataError, match=r"larger alpha.*fewer nodes"):
        dirichlet_indices(y, nodes=15, alpha=0.01, seed=0, max_retries=3)
    with pytest.raises(DataError, match="fewer nodes"):
        dirichlet_indices(y, nodes=30, seed=0)


def test_quantity_skew_varies_sizes_not_labels() -> None:
    y = np.repeat(np.arange(4), 500)
    parts = quantity_skew_indices(len(y), nodes=10, alpha=0.3, seed=1, min_size=5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5
    assert sizes.max() > 4 * np.median(sizes)
    big = parts[int(np.argmax(sizes))]
    share = np.bincount(y[big], minlength=4) / len(big)
    assert np.abs(share - 0.25).max() < 0.1
    with pytest.raises(DataError, match=r"dirichlet.*lognormal"):
        quantity_skew_indices(100, nodes=2, distribution="pareto")  # type: ignore[arg-type]


def test_by_key_natural_and_grouped() -> None:
    writers = np.array(["w3", "w1", "w3", "w2", "w1", "w1"])
    parts = by_key_indices(writers)
    assert [p.tolist() for p in parts] == [[1, 4, 5], [3], [0, 2]]
    grouped = by_key_indices(writers, nodes=2, seed=0)
    assert len(grouped) == 2
    assert_exact_cover(grouped, 6)
    for p in grouped:  # a writer is never split across nodes
        for w in set(writers[p]):
            assert set(np.flatnonzero(writers == w)) <= set(p.tolist())
    ds = toy([0, 1, 0, 1, 0, 1])
    named = partition(ds, scheme="by_key", keys=writers)
    assert [d.name for d in named] == ["toy/w1", "toy/w2", "toy/w3"]
    with pytest.raises(DataError, match="only 3 distinct keys"):
        partition(ds, scheme="by_key", keys=writers, nodes=4)
    with pytest.raises(DataError, match="one key"):
        partition(ds, scheme="by_key", keys=writers[:3])
    with pytest.raises(DataError, match="needs keys="):
        partition(ds, scheme="by_key")


def test_lazy_partition_equals_eager() -> None:
    train, _ = load_digits(seed=0)
    for scheme in ("iid", "dirichlet", "shards", "quantity"):
        eager = partition(train, nodes=15, scheme=scheme, seed=4)
        lazy = partition(train, nodes=15, scheme=scheme, seed=4, lazy=True)
        assert isinstance(lazy, LazyPartition)
        assert len(lazy) == len(eager) == 15
        for a, b in zip(eager, lazy):
            assert a.name == b.name
            np.testing.assert_array_equal(a.x, b.x)
            np.testing.assert_array_equal(a.y, b.y)
        assert [len(d) for d in eager] == lazy.sizes.tolist()
        np.testing.assert_array_equal(lazy[-1].y, eager[-1].y)
        assert [d.name for d in lazy[2:4]] == [eager[2].name, eager[3].name]
        assert summary(lazy).to_dict() == summary(eager).to_dict()


def test_lazy_partition_is_compact_and_validated() -> None:
    ds = toy(np.arange(50_000) % 7)
    part = partition(ds, nodes=10_000, scheme="iid", seed=0, lazy=True)
    assert len(part) == 10_000
    assert part.order.dtype == np.int32 and part.order.size == 50_000
    assert part.offsets.size == 10_001
    with pytest.raises(ValueError):
        part.order[0] = 1  # read-only view of the stored permutation
    with pytest.raises(IndexError):
        part[10_000]
    node = part[9_999]
    np.testing.assert_array_equal(node.x[:, 0], part.indices(9_999))
    with pytest.raises(DataError, match="offsets"):
        LazyPartition(dataset=ds, order=[0, 1], offsets=[0, 3])
    with pytest.raises(DataError, match="outside"):
        LazyPartition(dataset=ds, order=[0, 50_000], offsets=[0, 2])
    small = LazyPartition.from_indices(ds, [[3, 1], [2]], names=["a", "b"])
    assert [d.name for d in small] == ["a", "b"]
    assert small[0].y.tolist() == [3, 1]


def test_partition_errors_name_the_fix() -> None:
    ds = toy([0, 1, 2, 0, 1])
    with pytest.raises(DataError, match=r"fewer nodes \(at most 5\)"):
        partition(ds, nodes=6)
    with pytest.raises(DataError, match="iid, dirichlet, shards, quantity, by_key"):
        partition(ds, nodes=2, scheme="powerlaw")
    with pytest.raises(DataError, match="needs nodes="):
        partition(ds, scheme="iid")
    with pytest.raises(DataError, match="alpha"):
        partition(ds, nodes=2, scheme="dirichlet", alpha=0)
    with pytest.raises(DataError, match="only used by scheme='by_key'"):
        partition(ds, nodes=2, keys=[0, 0, 1, 1, 2])
    with pytest.raises(DataError, match="seed"):
        partition(ds, nodes=2, seed=1.5)  # type: ignore[call-overload]
    with pytest.raises(DataError, match="raise shards_per_node or nodes"):
        partition(ds, nodes=1, scheme="shards", shards_per_node=2)
    reg = Dataset(x=np.zeros((6, 1)), y=np.arange(6.0), classes=None)
    with pytest.raises(DataError, match="regression"):
        partition(reg, nodes=2, scheme="dirichlet")
    assert len(partition(reg, nodes=3, scheme="quantity")) == 3
    with pytest.raises(DataError, match="Dataset"):
        partition(np.zeros((3, 2)), nodes=2)  # type: ignore[call-overload]


def test_seed_changes_the_partition() -> None:
    ds = toy(np.arange(200) % 4)
    a = partition(ds, nodes=4, scheme="dirichlet", seed=0, lazy=True)
    b = partition(ds, nodes=4, scheme="dirichlet", seed=1, lazy=True)
    assert not np.array_equal(a.order, b.order) or not np.array_equal(a.offsets, b.offsets)
