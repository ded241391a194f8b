"""Datasets and automatic DP as pure functions: loading, generated mocks, contribution
bounds, exact answers, suppression and the noise each statistic gets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.datasite import dp
from shoal.datasite.assets import generate_mock, infer_schema, load_table, meta_from_record
from shoal.datasite.table import Table, decode_table, encode_table
from shoal.errors import ConfigError

ROWS = [(1, 34, "F", 2500.5), (1, 34, "F", 100.0), (2, 61, "M", 7000.0), (3, 19, "F", None)]


def write_csv(path: Path) -> None:
    lines = ["id,age,sex,income"]
    lines += [",".join("" if v is None else str(v) for v in row) for row in ROWS]
    path.write_text("\n".join(lines) + "\n")


def test_csv_sqlite_and_parquet_read_alike(tmp_path: Path) -> None:
    write_csv(tmp_path / "p.csv")
    conn = sqlite3.connect(tmp_path / "p.db")
    conn.execute("CREATE TABLE visits (id INTEGER, age INTEGER, sex TEXT, income REAL)")
    conn.executemany("INSERT INTO visits VALUES (?, ?, ?, ?)", ROWS)
    conn.commit()
    conn.close()
    duckdb = pytest.importorskip("duckdb")
    duckdb.connect().execute(
        f"COPY (SELECT * FROM read_csv_auto('{tmp_path / 'p.csv'}')) TO "
        f"'{tmp_path / 'p.parquet'}' (FORMAT parquet)"
    )
    tables = [
        load_table(tmp_path / "p.csv", name="p"),
        load_table(tmp_path / "p.db", name="p", table="visits"),
        load_table(tmp_path / "p.parquet", name="p"),
    ]
    for t in tables:
        assert t.columns == ["id", "age", "sex", "income"]
        assert t["age"].tolist() == [34, 34, 61, 19]
        assert t["sex"].tolist() == ["F", "F", "M", "F"]
        np.testing.assert_array_equal(t["income"], [2500.5, 100.0, 7000.0, np.nan])
    with pytest.raises(ConfigError, match="--table"):
        load_table(tmp_path / "p.db", name="p")


def test_a_table_survives_the_wire() -> None:
    t = Table(name="x", columns={"a": np.arange(3.0), "s": np.array(["é", "", "b"])})
    back = decode_table(encode_table(t))
    assert back.name == "x" and back.columns == ["a", "s"]
    assert back["s"].tolist() == ["é", "", "b"]


text = st.text(alphabet="abcdefgh", min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(
    ages=st.lists(st.integers(0, 120), min_size=1, max_size=30),
    names=st.lists(text, min_size=1, max_size=30),
    other_ages=st.lists(st.integers(0, 120), min_size=1, max_size=30),
)
def test_a_generated_mock_depends_on_the_schema_alone(
    ages: list[int], names: list[str], other_ages: list[int]
) -> None:
    def table(values: list[int]) -> Table:
        n = len(values)
        return Table(
            name="p",
            columns={
                "age": np.array(values),
                "sex": np.array([["F", "M"][v % 2] for v in values]),
                "name": np.array([names[i % len(names)] for i in range(n)]),
                "score": np.array(values, dtype=float) / 7,
            },
        )

    kwargs = {"bounds": {"age": (0, 120)}, "categories": {"sex": ["F", "M"]}}
    mocks = [
        generate_mock(infer_schema(table(v), **kwargs), name="p", rows=50, unit=None)
        for v in (ages, other_ages)
    ]
    # two different private tables with the same schema give the same mock
    for column in mocks[0]:
        np.testing.assert_array_equal(mocks[0][column], mocks[1][column])
    mock = mocks[0]
    assert set(mock["sex"].tolist()) <= {"F", "M"}
    assert not set(mock["name"].tolist()) & set(names)  # no private text value
    assert mock["age"].min() >= 0 and mock["age"].max() <= 120


def test_the_schema_does_not_say_how_long_the_longest_text_is() -> None:
    """Before, a text column's dtype ("<U37") told anyone who could list datasets, guests
    too, the length of the longest private value in it."""

    def schema(longest: str) -> list[dict[str, object]]:
        names = np.array(["ann", "bo", longest])
        return infer_schema(Table(name="p", columns={"name": names, "age": np.arange(3)}))

    assert schema("christopher-alexander") == schema("cy")
    assert generate_mock(schema("cy"), name="p", rows=5, unit=None)["name"].dtype.kind == "U"


@settings(max_examples=40, deadline=None)
@given(units=st.lists(st.integers(0, 6), min_size=1, max_size=60), k=st.integers(1, 4))
def test_contributions_are_bounded_per_unit(units: list[int], k: int) -> None:
    table = {"id": np.array(units), "x": np.arange(len(units), dtype=float)}
    meta = dp.DatasetMeta(
        name="t", columns=(dp.ColumnMeta(name="id", kind="num"),), unit="id", max_contributions=k
    )
    kept = dp.bound_contributions(table, meta, np.random.default_rng(0))
    assert len(set(kept.tolist())) == len(kept)
    ids, counts = np.unique(np.array(units)[kept], return_counts=True)
    assert counts.max() <= k
    for unit in set(units):  # nobody is dropped below k rows
        assert min(units.count(unit), k) == int(counts[ids == unit][0])


META = meta_from_record(
    "p",
    [
        {"name": "id", "kind": "num"},
        {"name": "age", "kind": "num", "bounds": [0, 100]},
        {"name": "sex", "kind": "text", "categories": ["F", "M"]},
    ],
    {"unit": None, "max_contributions": 1},
)
TABLE = {
    "id": np.arange(8),
    "age": np.array([10, 20, 30, 40, 50, 60, 70, 200.0]),
    "sex": np.array(list("FFFFFMMM")),
}
PLAN = [
    ("n", dp.count("p")),
    ("f", dp.count("p", where={"sex": "F"})),
    ("mean", dp.mean("p", "age")),
    ("var", dp.variance("p", "age")),
    ("sum", dp.sum("p", "age")),
    ("sex", dp.histogram("p", "sex")),
    ("median", dp.quantile("p", "age", 0.5)),
]


def test_exact_answers_clamp_to_the_bounds() -> None:
    got = dp.evaluate_plan(PLAN, {"p": TABLE}, {"p": META}, policy="exact").payload
    clamped = np.clip(TABLE["age"], 0, 100)
    assert got["n"] == 8 and got["f"] == 5
    assert got["mean"] == pytest.approx(clamped.mean())
    assert got["var"] == pytest.approx(clamped.var())
    assert got["sum"] == pytest.approx(clamped.sum())
    assert got["sex"].tolist() == [5, 3] and got["sex.categories"] == ["F", "M"]
    # within one of the 64 bins of the order statistic (the lower median)
    lower = np.quantile(clamped, 0.5, method="inverted_cdf")
    assert abs(got["median"] - lower) <= 100 / dp.QUANTILE_BINS


def test_threshold_suppresses_small_counts_only() -> None:
    plan = [("f", dp.count("p", where={"sex": "F"})), ("sex", dp.histogram("p", "sex"))]
    got = dp.evaluate_plan(plan, {"p": TABLE}, {"p": META}, policy="threshold", threshold=4)
    assert got.payload["f"] == 5
    assert got.payload["sex"][0] == 5 and np.isnan(got.payload["sex"][1])
    assert got.suppressed == 1
    with pytest.raises(ConfigError, match="counts only"):
        dp.check_plan([("m", dp.mean("p", "age"))], {"p": META}, policy="threshold")


def test_the_noise_scale_is_derived_from_bounds_and_the_split() -> None:
    # seven queries, 10 noisy statistics (a mean is 2, a variance 3): each gets epsilon / 10
    assert dp.statistics_in(PLAN) == 10
    rng = np.random.default_rng(1)
    draws = [
        dp.evaluate_plan(PLAN, {"p": TABLE}, {"p": META}, policy="dp", epsilon=1.0, rng=rng)
        for _ in range(600)
    ]
    assert draws[0].epsilon_each == pytest.approx(0.1)
    # a count's sensitivity is 1, a sum's max(|lo|, |hi|) = 100: Laplace std is sqrt(2) b
    counts = np.array([d.payload["n"] for d in draws])
    sums = np.array([d.payload["sum"] for d in draws])
    assert np.std(counts) == pytest.approx(np.sqrt(2) * 1 / 0.1, rel=0.15)
    assert np.std(sums) == pytest.approx(np.sqrt(2) * 100 / 0.1, rel=0.15)
    assert abs(np.mean(counts) - 8) < 5 * np.sqrt(2) * 10 / np.sqrt(len(counts))  # unbiased


def test_plans_on_undeclared_columns_are_refused() -> None:
    with pytest.raises(ConfigError, match="no declared bounds"):
        dp.check_plan([("m", dp.mean("p", "id"))], {"p": META}, policy="dp")
    with pytest.raises(ConfigError, match="no column"):
        dp.check_plan([("m", dp.count("p", where={"nope": 1}))], {"p": META}, policy="dp")
    with pytest.raises(ConfigError, match="not part of the request"):
        dp.check_plan([("m", dp.count("other"))], {"p": META}, policy="dp")
    for bad in ([], [{"op": "exec"}], [{"op": "count", "name": "a"}] * 2, "plan"):
        with pytest.raises(ConfigError):
            dp.parse_plan(bad)
