from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto.secagg import SecAggParams, failure_probability_bound
from shoal.errors import ConfigError


def node_ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


def make(n: int = 10, **kw: object) -> SecAggParams:
    base: dict[str, object] = dict(
        nodes=tuple(node_ids(n)), vector_length=4, threshold=6, degree=9, max_dropouts=3
    )
    base.update(kw)
    return SecAggParams(**base)  # type: ignore[arg-type]


def test_create_picks_safe_parameters() -> None:
    p = SecAggParams.create(node_ids(100), vector_length=10, dropout_fraction=0.1)
    assert (p.degree, p.threshold, p.max_dropouts) == (21, 11, 10)
    assert 2 * p.threshold > p.degree and p.degree - p.threshold >= p.max_dropouts
    small = SecAggParams.create(node_ids(6), vector_length=10, max_dropouts=1)
    assert small.degree == 5  # the full graph for small n
    assert SecAggParams.create(node_ids(3), vector_length=1, max_dropouts=0).threshold == 2


def test_probabilistic_mode_allows_logarithmic_degree() -> None:
    n, d = 1000, 100
    with pytest.raises(ConfigError):
        SecAggParams.create(node_ids(n)[:300], vector_length=1, max_dropouts=150)
    p = SecAggParams.create(
        node_ids(n), vector_length=1, max_dropouts=d, max_failure_probability=1e-6
    )
    assert p.degree < 2 * d + 1  # far sparser than the worst-case guarantee needs
    assert (
        failure_probability_bound(nodes=n, degree=p.degree, threshold=p.threshold, dropouts=d)
        <= 1e-6
    )


def test_fixed_degree_is_kept_or_refused() -> None:
    p = SecAggParams.create(node_ids(200), vector_length=1, max_dropouts=4, degree=12)
    assert (p.degree, p.threshold) == (12, 8)  # worst case: tolerate exactly 4 dropouts
    q = SecAggParams.create(
        node_ids(200), vector_length=1, max_dropouts=20, degree=30, max_failure_probability=1e-3
    )
    assert (q.degree, q.threshold) == (30, 16)
    with pytest.raises(ConfigError, match="use degree >= 9"):
        SecAggParams.create(node_ids(200), vector_length=1, max_dropouts=4, degree=8)
    with pytest.raises(ConfigError, match="probability up to"):
        SecAggParams.create(
            node_ids(200), vector_length=1, max_dropouts=20, degree=6, max_failure_probability=1e-6
        )
    with pytest.raises(ConfigError, match="degree must be an integer"):
        SecAggParams.create(node_ids(20), vector_length=1, degree=4.0)  # type: ignore[arg-type]


def test_failure_bound_covers_brute_force() -> None:
    p = SecAggParams(
        nodes=tuple(node_ids(16)),
        vector_length=1,
        threshold=4,
        degree=6,
        max_dropouts=3,
        max_failure_probability=0.9,
    )
    bad = total = 0
    for dropped in itertools.combinations(p.nodes, 3):
        total += 1
        gone = set(dropped)
        if any(sum(u not in gone for u in p.neighbours(v)) < p.threshold for v in p.nodes):
            bad += 1
    bound = failure_probability_bound(nodes=16, degree=6, threshold=4, dropouts=3)
    assert 0 < bad / total <= bound


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 10}, "exceeds"),
        ({"threshold": 4, "degree": 8}, "degree/2"),
        ({"degree": 9, "nodes": tuple(node_ids(11))}, "regular"),
        ({"degree": 10}, "degree"),
        ({"degree": 1}, "degree"),
        ({"max_dropouts": 4}, "max_dropouts is 4"),
        ({"max_dropouts": -1}, "non-negative"),
        ({"nodes": ("a", "b")}, "at least 3"),
        ({"nodes": ("a", "a", "b", "c")}, "distinct"),
        ({"nodes": ("a", "", "b")}, "non-empty"),
        ({"vector_length": 0}, "vector_length"),
        ({"bits": 0}, "bits"),
        ({"bits": 65}, "bits"),
        ({"threshold": 6.0}, "integer"),
        ({"round_id": ""}, "round_id"),
        ({"max_failure_probability": 1.0}, "max_failure_probability"),
        ({"max_failure_probability": 1e-12, "max_dropouts": 4}, "probability"),
    ],
)
def test_unworkable_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(**kwargs)


def test_too_few_possible_survivors_refused() -> None:
    with pytest.raises(ConfigError, match="survive"):
        SecAggParams(
            nodes=tuple(node_ids(4)),
            vector_length=1,
            threshold=3,
            degree=3,
            max_dropouts=2,
            max_failure_probability=0.9,
        )


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 40), st.data())
def test_graph_is_regular_symmetric_and_seeded(n: int, data: st.DataObject) -> None:
    degree = data.draw(st.integers(2, n - 1).filter(lambda k: (k * n) % 2 == 0))
    p = SecAggParams(
        nodes=tuple(node_ids(n)),
        vector_length=1,
        threshold=degree // 2 + 1,
        degree=degree,
        max_dropouts=0,
        round_id=data.draw(st.text(min_size=1, max_size=20)),
    )
    for v in p.nodes:
        nb = p.neighbours(v)
        assert len(nb) == degree and v not in nb and len(set(nb)) == degree
        assert all(v in p.neighbours(u) for u in nb)
    again = SecAggParams.from_dict(p.to_dict())
    assert again == p and again.graph == p.graph


def test_graph_relabelling_depends_on_round_id() -> None:
    graphs = {
        tuple(
            sorted(
                make(n=30, degree=4, threshold=3, max_dropouts=1, round_id=f"r{i}").graph["node-00"]
            )
        )
        for i in range(10)
    }
    assert len(graphs) > 5
    full = make(n=10, degree=9, threshold=6, max_dropouts=3)
    assert all(len(full.neighbours(v)) == 9 for v in full.nodes)
    counts = Counter(len(full.neighbours(v)) for v in full.nodes)
    assert counts == {9: 10}


def test_from_dict_errors() -> None:
    d = make().to_dict()
    del d["threshold"]
    with pytest.raises(ConfigError, match="threshold"):
        SecAggParams.from_dict(d)
    d = make().to_dict()
    d["nodes"] = "abc"
    with pytest.raises(ConfigError):
        SecAggParams.from_dict(d)
    with pytest.raises(ConfigError, match="not a participant"):
        make().neighbours("stranger")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(), max_size=5))
def test_json_strings_matches_json_dumps(parts: list[str]) -> None:
    # Key-derivation contexts must not change with the encoder: both ends derive them.
    import json

    from shoal.crypto.secagg.params import json_strings

    assert json_strings(*parts) == json.dumps(parts).encode()
