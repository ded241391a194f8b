"""DataSpec: node data as a JSON description that any process builds the same way."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import DataSpec, partition
from shoal.errors import DataError


def test_node_i_is_partition_i_and_the_spec_survives_json() -> None:
    spec = DataSpec(dataset="digits", partition={"scheme": "dirichlet", "nodes": 7}, seed=4)
    again = DataSpec.from_json(spec.to_json())
    assert again == spec
    train, _ = spec.load()
    parts = partition(train, nodes=7, scheme="dirichlet", seed=4)
    for i in (0, 3, 6):
        np.testing.assert_array_equal(again.node(i).x, parts[i].x)
        np.testing.assert_array_equal(again.node(i).y, parts[i].y)


def test_a_csv_path_is_built_from_the_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "d.csv"
    rows = "\n".join(f"{i},{i % 3},{i % 2}" for i in range(40))
    path.write_text("a,b,label\n" + rows + "\n")
    spec = DataSpec(path=str(path), partition={"nodes": 4}, seed=1)
    assert sum(len(spec.node(i)) for i in range(4)) == len(spec.load()[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of dataset"),
        ({"dataset": "digits", "path": "x.csv"}, "exactly one of dataset"),
        ({"dataset": "mnist"}, "unknown data set 'mnist'"),
        ({"dataset": "digits", "partition": {"nodes": 0}}, "positive integer"),
        ({"dataset": "digits", "partition": {"scheme": "by_key"}}, "not known"),
        ({"dataset": "digits", "partition": {"colour": 1}}, "unknown partition key"),
        ({"dataset": "digits", "test_fraction": 1.5}, "between 0 and 1"),
    ],
)
def test_bad_descriptions_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        DataSpec(**kwargs)  # type: ignore[arg-type]


def test_a_missing_file_fails_when_built_not_when_described() -> None:
    spec = DataSpec(path="/no/such/file.csv", partition={"nodes": 2})
    with pytest.raises(DataError, match="does not exist"):
        spec.node(0)
    with pytest.raises(DataError, match="node index"):
        DataSpec(dataset="iris", partition={"nodes": 2}).node(2)
    for text in ("[1]", "{", '{"dataset": "iris", "colour": 1}'):
        with pytest.raises(DataError):
            DataSpec.from_json(text)
