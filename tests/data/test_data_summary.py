"""PartitionSummary numbers, JSON, text and rich rendering; split_holdout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from shoal.data import Dataset, PartitionSummary, partition, split_holdout, summary
from shoal.errors import DataError


def node(labels: list[int], classes: int = 4, name: str = "n") -> Dataset:
    return Dataset(x=np.zeros((len(labels), 2)), y=np.array(labels), classes=classes, name=name)


def test_summary_numbers_and_json() -> None:
    parts = [node([0, 0, 1], name="a"), node([3], name="b"), node([0, 1, 2, 3, 3], name="c")]
    s = summary(parts)
    assert isinstance(s, PartitionSummary)
    assert s.nodes == 3 and s.total == 9
    assert (s.min_size, s.median_size, s.max_size) == (1, 3.0, 5)
    assert s.label_counts is not None
    assert s.label_counts.tolist() == [[2, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 2]]
    lpn = s.labels_per_node
    assert lpn is not None and lpn.tolist() == [2, 1, 4]
    ent = s.label_entropy
    assert ent is not None and ent[1] == 0.0
    d = json.loads(json.dumps(s.to_dict()))
    assert d["sizes"] == [3, 1, 5] and d["names"] == ["a", "b", "c"]
    assert d["size"] == {"min": 1, "median": 3.0, "max": 5, "mean": 3.0}
    assert d["labels_per_node"] == {"min": 1, "median": 2.0, "max": 4}


def test_format_is_compact_and_elides_long_partitions() -> None:
    ds = Dataset(x=np.zeros((400, 1)), y=np.arange(400) % 5, classes=5, name="d")
    s = summary(partition(ds, nodes=40, scheme="shards", shards_per_node=1, seed=0))
    text = s.format(max_rows=6)
    lines = text.splitlines()
    assert lines[0].startswith("40 nodes · 400 samples · size min")
    assert "labels per node min 1 / median 1 / max 1" in lines[0]
    assert lines[1].split()[:3] == ["node", "size", "labels"]
    assert "... 34 more nodes ..." in text
    assert len(lines) == 2 + 6 + 1
    assert "d/node-0" in text and "d/node-39" in text
    assert str(s) == s.format()


def test_rich_rendering_and_many_classes() -> None:
    ds = Dataset(x=np.zeros((200, 1)), y=np.arange(200) % 50, classes=50, name="chars")
    s = summary(partition(ds, nodes=3, seed=0))
    assert "top labels" in s.format()
    console = Console(record=True, width=120)
    console.print(s)
    out = console.export_text()
    assert "3 nodes" in out and "chars/node-2" in out


def test_summary_of_mapping_regression_and_errors() -> None:
    s = summary({"alice": node([0, 1]), "bob": node([2])})
    assert s.names == ("alice", "bob")
    reg = Dataset(x=np.zeros((3, 1)), y=np.array([0.1, 0.2, 0.3]), classes=None)
    r = summary([reg, reg])
    assert r.label_counts is None and "labels" not in r.to_dict().get("label_counts", "")
    assert "6 samples" in r.format()
    with pytest.raises(DataError):
        summary([])
    with pytest.raises(DataError, match="mix"):
        summary([reg, node([0])])


def test_split_holdout_stratifies_and_is_deterministic() -> None:
    ds = Dataset(x=np.arange(100.0).reshape(100, 1), y=np.arange(100) % 4, classes=4, name="n")
    train, hold = split_holdout(ds, fraction=0.2, seed=3)
    assert len(train) == 80 and len(hold) == 20 and hold.name == "n/holdout"
    assert hold.class_counts().tolist() == [5, 5, 5, 5]
    assert set(train.x[:, 0]).isdisjoint(hold.x[:, 0])
    again, _ = split_holdout(ds, fraction=0.2, seed=3)
    np.testing.assert_array_equal(train.x, again.x)


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=2, max_size=60),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 10_000),
)
def test_split_holdout_partitions_any_node(labels: list[int], fraction: float, seed: int) -> None:
    n = len(labels)
    ds = Dataset(x=np.arange(n, dtype=float).reshape(n, 1), y=np.array(labels), classes=4)
    train, hold = split_holdout(ds, fraction=fraction, seed=seed)
    assert len(train) >= 1 and len(hold) >= 1
    together = np.sort(np.concatenate([train.x[:, 0], hold.x[:, 0]]))
    np.testing.assert_array_equal(together, np.arange(n))


def test_split_holdout_errors() -> None:
    with pytest.raises(DataError, match="at least 2"):
        split_holdout(node([0]), fraction=0.5)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_holdout(node([0, 1]), fraction=1.0)
