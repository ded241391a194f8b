"""Exact answers (no [privacy]) equal DuckDB's on the pooled rows; quantiles within a bin."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.analytics import query
from shoal.analytics.simulate import federation

from .conftest import Federated, make_rows

# (federated SQL, the same question in DuckDB on the pooled rows)
QUERIES = [
    ("SELECT COUNT(*) AS n FROM visits", None),
    ("SELECT COUNT(cost) AS n FROM visits", None),
    ("SELECT SUM(cost) AS s FROM visits WHERE age >= 40", None),
    ("SELECT ward, AVG(age) AS a, COUNT(*) AS n FROM visits GROUP BY ward ORDER BY ward", None),
    (
        "SELECT ward, VAR_SAMP(stay_days) AS v, STDDEV_POP(age) AS s, VAR_POP(cost) AS vp "
        "FROM visits GROUP BY ward ORDER BY ward",
        None,
    ),
    (
        "SELECT ward, SUM(cost) / COUNT(*) AS per FROM visits WHERE ward <> 'B' "
        "GROUP BY ward HAVING COUNT(*) > 60 ORDER BY per DESC",
        None,
    ),
    ("SELECT STDDEV(cost) AS s, AVG(cost) AS a FROM visits WHERE stay_days < 3", None),
]


def _close(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, int) and isinstance(b, int):
        return a == b  # counts are exact
    # Float sums in a different order (and variances' cancellation) differ in the last digits.
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)  # type: ignore[arg-type]


def assert_same(rows: tuple, expected: list[tuple]) -> None:
    assert len(rows) == len(expected), (rows, expected)
    for got, want in zip(rows, expected):
        assert len(got) == len(want)
        assert all(_close(g, w) for g, w in zip(got, want)), (got, want)


@pytest.mark.parametrize(("sql", "duck"), QUERIES)
def test_exact_equals_duckdb_on_pooled_rows(three: Federated, sql: str, duck: str | None) -> None:
    config = three.config()
    result = query(federation(config), sql, config=config)
    assert result.mode == "exact" and result.errors is None and result.epsilon == 0.0
    assert set(result.parties) == {"party0", "party1", "party2"}
    assert_same(result.rows, three.duck(duck or sql))


def test_parquet_and_csv_parties_loaded_into_duckdb(tmp_path: Path) -> None:
    """Parquet and CSV parties (each loaded into an in-memory DuckDB) answer exactly,
    NULLs in a Parquet column included."""
    rng = np.random.default_rng(5)
    parts = [make_rows(rng, n, offset=10_000 * i) for i, n in enumerate((90, 120, 60))]
    fs = Federated(tmp_path, parts, ["parquet", "parquet", "csv"])
    assert Path(fs.parties[0].path).read_bytes()[:4] == b"PAR1"
    config = fs.config()
    for sql, duck in QUERIES[:5]:
        result = query(federation(config), sql, config=config)
        assert set(result.parties) == {"party0", "party1", "party2"}
        assert_same(result.rows, fs.duck(duck or sql))


def test_quantiles_within_one_bin(three: Federated) -> None:
    config = three.config(bins=500)
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        sql = (
            f"SELECT ward, QUANTILE_CONT(stay_days, {q}) AS x FROM visits "
            "GROUP BY ward ORDER BY ward"
        )
        got = query(federation(config), sql, config=config).rows
        want = three.duck(sql)
        width = 100 / 500
        assert [g[0] for g in got] == [w[0] for w in want]
        for g, w in zip(got, want):
            assert abs(g[1] - w[1]) <= width, (q, g, w)


def test_histogram_matches_binned_counts(three: Federated) -> None:
    config = three.config()
    got = query(federation(config), "SELECT HISTOGRAM(age, 12) AS h FROM visits", config=config)
    want = three.duck(
        "SELECT LEAST(CAST(FLOOR(age / 10) AS INT), 11) AS b, COUNT(*) FROM visits "
        "GROUP BY b ORDER BY b"
    )
    counts = [0] * 12
    for b, n in want:
        counts[b] = n
    assert got.rows[0][0] == counts


def test_join_inside_each_party(joined: Federated) -> None:
    config = joined.config()
    sql = (
        "SELECT p.sex, COUNT(*) AS n, AVG(v.age) AS a FROM visits v JOIN patients p "
        "ON v.patient_id = p.patient_id WHERE v.stay_days > 1 GROUP BY p.sex ORDER BY p.sex"
    )
    config = joined.config(categories={"sex": ["F", "M"]})
    result = query(federation(config), sql, config=config)
    assert_same(result.rows, joined.duck(sql))
    # With a privacy unit that both tables hold (capped far above any patient's visits, so
    # the answer is still exact), through ON and USING, on DuckDB and SQLite parties.
    config = joined.config(
        categories={"sex": ["F", "M"]}, privacy_unit="patient_id", max_contributions=1000
    )
    result = query(federation(config), sql, config=config)
    assert result.failures == {}
    assert_same(result.rows, joined.duck(sql))
    using = (
        "SELECT sex, COUNT(*) AS n FROM visits JOIN patients USING (patient_id) "
        "GROUP BY sex ORDER BY sex"
    )
    assert_same(query(federation(config), using, config=config).rows, joined.duck(using))


def test_group_by_undeclared_keys_finds_every_group(three: Federated) -> None:
    config = three.config(categories={})
    sql = "SELECT ward, COUNT(*) AS n, SUM(age) AS s FROM visits GROUP BY ward ORDER BY ward"
    result = query(federation(config), sql, config=config)
    assert_same(result.rows, three.duck(sql))
    # A numeric key column needs declared categories; the text one next to it is selected.
    config = three.config(categories={"age": list(range(8))})
    sql = (
        "SELECT ward, age, COUNT(*) AS n FROM visits WHERE age < 8 GROUP BY ward, age "
        "ORDER BY n DESC, ward, age"
    )
    result = query(federation(config), sql, config=config)
    assert sorted(result.rows) == sorted(three.duck(sql))


def test_clamping_and_nulls_are_disclosed(three: Federated) -> None:
    config = three.config(bounds={"age": [0, 50], "cost": [0, 20000]})
    result = query(
        federation(config), "SELECT AVG(age) AS a, SUM(cost) AS c FROM visits", config=config
    )
    want = three.duck("SELECT AVG(LEAST(age, 50)), SUM(cost) FROM visits")
    assert_same(result.rows, want)
    cols = result.disclosed["columns"]
    assert (
        cols["age"]["values_clamped"]
        == three.duck("SELECT COUNT(*) FROM visits WHERE age > 50")[0][0]
    )
    assert (
        cols["cost"]["null_rows_ignored"]
        == three.duck("SELECT COUNT(*) FROM visits WHERE cost IS NULL")[0][0]
    )
    assert cols["age"]["bounds"] == [0.0, 50.0]


def test_contributions_are_capped_per_privacy_unit(three: Federated) -> None:
    config = three.config(privacy_unit="patient_id", max_contributions=1)
    result = query(federation(config), "SELECT COUNT(*) AS n FROM visits", config=config)
    assert result.rows[0][0] == three.duck("SELECT COUNT(DISTINCT patient_id) FROM visits")[0][0]


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=3, max_size=4),
    seed=st.integers(0, 2**16),
    low=st.sampled_from([10.0, 30.0, 50.0]),
)
def test_property_exact_answers_match_pooled(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], seed: int, low: float
) -> None:
    rng = np.random.default_rng(seed)
    root = Path(tmp_path_factory.mktemp("prop"))
    parts = [make_rows(rng, n, offset=1000 * i) for i, n in enumerate(sizes)]
    # Empty CSV files have no column types (DuckDB reads them as text): database files only.
    fedset = Federated(root, parts, ["duckdb", "sqlite", "duckdb", "sqlite"][: len(sizes)])
    config = fedset.config()
    sql = (
        f"SELECT ward, COUNT(*) AS n, SUM(cost) AS s, AVG(age) AS a, VAR_SAMP(stay_days) AS v "
        f"FROM visits WHERE age >= {low} GROUP BY ward ORDER BY ward"
    )
    result = query(federation(config), sql, config=config)
    assert_same(result.rows, fedset.duck(sql))
