"""The dialect: what parses, and every refusal names the construct and says what to do."""

from __future__ import annotations

import pytest

pytest.importorskip("sqlglot")

from shoal.analytics import AnalyticsConfig, parse
from shoal.errors import QueryError

CONFIG = AnalyticsConfig(
    table="visits",
    bounds={"age": [0, 120], "cost": [0, 1000]},
    categories={"ward": ["A", "B"]},
    join_tables=("patients",),
)


def test_parses_every_aggregate_kind() -> None:
    plan = parse(
        "SELECT ward, COUNT(*), COUNT(cost), SUM(cost), AVG(age), VARIANCE(age), VAR_POP(age),"
        " STDDEV(age), STDDEV_POP(age), VAR(age), MEDIAN(age), QUANTILE_CONT(age, 0.25),"
        " APPROX_QUANTILE(age, 0.75), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY cost),"
        " HISTOGRAM(age, 12), SUM(cost) / COUNT(*) AS per_row"
        " FROM visits v JOIN patients p ON v.patient_id = p.patient_id"
        " WHERE age BETWEEN 18 AND 65 AND p.sex = 'F' GROUP BY ward"
        " HAVING COUNT(*) > 10 ORDER BY per_row DESC LIMIT 5",
        CONFIG,
    )
    kinds = [a.kind for a in plan.aggregates]
    assert kinds == [
        "count_rows",
        "count",
        "sum",
        "avg",
        "var_samp",
        "var_pop",
        "stddev_samp",
        "stddev_pop",
        "quantile",
        "quantile",
        "quantile",
        "quantile",
        "histogram",
    ]
    assert [a.q for a in plan.aggregates if a.kind == "quantile"] == [0.5, 0.25, 0.75, 0.9]
    assert plan.aggregates[-1].bins == 12
    assert plan.keys == ("ward",)
    assert plan.order == (("per_row", True),)
    assert plan.limit == 5
    assert plan.outputs[-1].name == "per_row"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM visits", "row-level output is refused"),
        ("SELECT age FROM visits", "without an aggregate: row-level output is refused"),
        ("SELECT ward, age FROM visits GROUP BY ward", "without an aggregate"),
        ("SELECT COUNT(DISTINCT age) FROM visits", "DISTINCT"),
        ("SELECT SUM(stay_days) FROM visits", "declare them in [analytics] bounds"),
        ("SELECT AVG(stay_days) FROM visits", "needs bounds for column 'stay_days'"),
        ("SELECT COUNT(*) FROM secrets", "table 'secrets' is not declared"),
        ("SELECT COUNT(*) FROM patients", "reads the job's table 'visits'"),
        ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "table functions are refused"),
        ("SELECT COUNT(*) FROM (SELECT * FROM visits) t", "subqueries and table functions"),
        ("SELECT COUNT(*) FROM visits WHERE age IN (SELECT 1)", "subqueries are not"),
        ("SELECT COUNT(*) FROM visits WHERE getenv('HOME') = 'x'", "function GETENV()"),
        ("SELECT COUNT(*) OVER () FROM visits", "window functions"),
        ("SELECT COUNT(*) FROM visits UNION SELECT COUNT(*) FROM visits", "UNION"),
        ("DELETE FROM visits", "DELETE"),
        ("WITH t AS (SELECT 1) SELECT COUNT(*) FROM visits", "WITH"),
        ("SELECT SUM(age * 2) FROM visits", "takes a column"),
        ("SELECT MAX(age) FROM visits", "function MAX()"),
        ("SELECT QUANTILE_CONT(age, 1.5) FROM visits", "quantile must lie in [0, 1]"),
        ("SELECT COUNT(*) FROM visits GROUP BY age + 1", "group by columns only"),
        ("SELECT COUNT(*) FROM visits HAVING age > 3", "outside an aggregate"),
        ("SELECT COUNT(*) FROM visits ORDER BY age", "order by an output column"),
        ("SELEC COUNT(*) FROM visits", "not valid SQL"),
        ("", "the query is empty"),
        ("SELECT COUNT(*) FROM visits; SELECT 1", "one SELECT"),
    ],
)
def test_refusals_name_the_construct(sql: str, expected: str) -> None:
    with pytest.raises(QueryError, match=None) as info:
        parse(sql, CONFIG)
    assert expected in str(info.value)


def test_party_sql_reads_only_what_the_query_needs() -> None:
    plan = parse("SELECT ward, AVG(age) FROM visits WHERE cost > 3 GROUP BY ward", CONFIG)
    sql = plan.party_sql(CONFIG, "sqlite")
    assert "ward AS k0" in sql and "age AS c0" in sql and "WHERE cost > 3" in sql
    assert "cost AS" not in sql


def test_the_privacy_unit_is_read_from_the_jobs_table_in_a_join() -> None:
    config = AnalyticsConfig(table="visits", privacy_unit="patient_id", join_tables=("patients",))
    # Both tables hold patient_id: a bare name would be ambiguous at the party.
    for sql, unit in (
        ("SELECT COUNT(*) FROM visits v JOIN patients p ON v.patient_id = p.patient_id", "v"),
        ("SELECT COUNT(*) FROM patients JOIN visits USING (patient_id)", "visits"),
    ):
        assert f"{unit}.patient_id AS u" in parse(sql, config).party_sql(config, "duckdb")


def test_plans_are_shared_per_query_and_declarations_and_never_changed_by_use() -> None:
    sql = "SELECT ward, AVG(age) AS a FROM visits v GROUP BY ward"
    plan = parse(sql, CONFIG)
    assert parse(sql, CONFIG) is plan  # every party of a simulation parses the same query
    narrower = AnalyticsConfig(
        table="visits", bounds={"age": [0, 50]}, categories={"ward": ["A", "B"]}
    )
    assert parse(sql, narrower) is not plan
    unit = AnalyticsConfig(table="visits", bounds={"age": [0, 120]}, privacy_unit="pid")
    texts = {plan.party_sql(CONFIG, d) for d in ("duckdb", "duckdb")}
    assert len(texts) == 1 and "AS u" not in texts.pop()
    assert "v.pid AS u" in plan.party_sql(unit, "sqlite")
    assert "AS u" not in plan.party_sql(CONFIG, "sqlite")
    assert plan.source.sql() == parse(sql, CONFIG).source.sql()  # the shared tree unchanged
    with pytest.raises(QueryError):  # a refusal is never cached as a plan
        parse("SELECT age FROM visits", CONFIG)
    with pytest.raises(QueryError):
        parse("SELECT age FROM visits", CONFIG)


UNIT = AnalyticsConfig(
    table="visits",
    privacy_unit="patient_id",
    bounds={"age": [0, 120]},
    categories={"ward": ["A", "B"]},
    join_tables=("patients",),
)
HOSTILE = [
    # Statements that read, write or load files, or change the connection: one SELECT only.
    ("COPY visits TO '/tmp/x.csv'", "COPY statements are not in the dialect"),
    ("COPY (SELECT COUNT(*) FROM visits) TO '/tmp/x.csv'", "COPY statements"),
    ("ATTACH '/tmp/x.duckdb' AS x", "ATTACH statements"),
    ("INSTALL httpfs", "INSTALL statements"),
    ("LOAD httpfs", "statements are not in the dialect"),
    ("PRAGMA database_list", "PRAGMA statements"),
    ("SET enable_external_access = true", "SET statements"),
    ("CALL pragma_version()", "statements are not in the dialect"),
    ("SELECT COUNT(*) FROM visits; COPY visits TO '/tmp/x.csv'", "one SELECT"),
    # Functions and table functions that read files, anywhere in the query.
    ("SELECT COUNT(*) FROM read_parquet('/etc/x.parquet')", "table functions are refused"),
    ("SELECT COUNT(*) FROM visits, read_csv('/etc/passwd')", "table functions are refused"),
    ("SELECT COUNT(*) FROM visits v JOIN read_csv('/etc/passwd') r ON 1 = 1", "table functions"),
    ("SELECT COUNT(*) FROM 'x.parquet'", "table 'x.parquet' is not declared"),
    ("SELECT COUNT(*) FROM visits WHERE read_text('/etc/passwd') = 'x'", "READ_TEXT()"),
    ("SELECT COUNT(*) FROM visits WHERE length(read_blob('/etc/passwd')) > 1", "READ_BLOB()"),
    ("SELECT COUNT(*) FROM visits WHERE current_setting('threads') = '1'", "CURRENT_SETTING()"),
    ("SELECT SUM(age) FILTER (WHERE read_text('x') = 'y') FROM visits", "Filter"),
    ("SELECT COUNT(*) FROM visits WHERE repeat(ward, 1000000000) = 'x'", "REPEAT()"),
    # Recursive CTEs (and any CTE), subqueries, sampling, renamed columns.
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
        "SELECT COUNT(*) FROM visits",
        "WITH (common table expressions)",
    ),
    ("SELECT COUNT(*) FROM visits USING SAMPLE 10", "USING SAMPLE is not in"),
    ("SELECT COUNT(*) FROM visits TABLESAMPLE (10 PERCENT)", "TABLESAMPLE"),
    ("SELECT COUNT(*) FROM visits AS v(ward, patient_id)", "column aliases on a table"),
    # Size and depth: refused before sqlglot spends seconds or its stack on them.
    (
        "SELECT COUNT(*) FROM visits WHERE age IN (" + ",".join(map(str, range(10_000))) + ")",
        "over the dialect's 20000",
    ),
    ("SELECT COUNT(*) FROM visits WHERE " + "(" * 2000 + "age > 1" + ")" * 2000, "too deeply"),
    ("SELECT " + "(" * 300 + "COUNT(*)" + ")" * 300 + " FROM visits", "too deeply"),
    (
        "SELECT COUNT(*) FROM visits WHERE "
        + "CASE WHEN age > 1 THEN " * 400
        + "1"
        + " END" * 400
        + " = 1",
        "too deeply",
    ),
    ("SELECT COUNT(*) FROM visits WHERE " + "NOT " * 3000 + "age > 1", "too deeply"),
    # Joins that would put another unit's values in a unit's rows.
    (
        "SELECT COUNT(*) FROM visits v JOIN patients p ON p.patient_id = 42 WHERE p.sex = 'F'",
        "tie the join by the unit: ON <earlier>.patient_id = p.patient_id",
    ),
    ("SELECT SUM(w.age) FROM visits v JOIN visits w ON w.patient_id = 42", "same privacy unit"),
    ("SELECT COUNT(*) FROM visits v, patients p WHERE p.sex = 'F'", "same privacy unit"),
    (
        "SELECT COUNT(*) FROM visits v JOIN patients p ON v.patient_id = p.patient_id OR 1 = 1",
        "same privacy unit",
    ),
    ("SELECT COUNT(*) FROM visits v JOIN patients p ON v.age = p.patient_id", "same privacy"),
    (
        "SELECT COUNT(*) FROM visits v RIGHT JOIN patients p ON v.patient_id = p.patient_id",
        "RIGHT join keeps rows without a row of the job's table",
    ),
    ("SELECT COUNT(*) FROM patients p LEFT JOIN visits USING (patient_id)", "LEFT join keeps"),
]


@pytest.mark.parametrize(("sql", "expected"), HOSTILE)
def test_hostile_sql_is_refused_with_a_message_naming_it(sql: str, expected: str) -> None:
    with pytest.raises(QueryError) as info:
        parse(sql, UNIT)
    assert expected in str(info.value)


def test_joins_tied_by_the_unit_are_accepted() -> None:
    for sql in (
        "SELECT COUNT(*) FROM visits v JOIN patients p ON v.patient_id = p.patient_id",
        "SELECT COUNT(*) FROM visits v JOIN patients p ON p.sex = 'F' AND p.patient_id = "
        "v.patient_id",
        "SELECT COUNT(*) FROM visits v LEFT JOIN patients p USING (patient_id)",
        "SELECT COUNT(*) FROM patients JOIN visits USING (patient_id)",
        "SELECT COUNT(*) FROM visits v JOIN visits w ON v.patient_id = w.patient_id "
        "JOIN patients p ON w.patient_id = p.patient_id",
    ):
        parse(sql, UNIT)
    # Without a privacy unit, every row is a unit: a join may only be answered exactly.
    from shoal.analytics.dialect import check_joins_under_dp

    sql = "SELECT COUNT(*) FROM visits v JOIN patients p ON v.patient_id = p.patient_id"
    with pytest.raises(QueryError, match="needs a privacy unit"):
        check_joins_under_dp(parse(sql, CONFIG), CONFIG)
    check_joins_under_dp(parse(sql, UNIT), UNIT)


def test_the_longest_query_allowed_still_parses() -> None:
    from shoal.analytics.dialect import MAX_SQL_CHARS

    head = "SELECT COUNT(*) FROM visits WHERE ward IN ("
    items, n = [], 0
    while len(head) + n + 60 < MAX_SQL_CHARS:
        items.append(f"'w{len(items)}'")
        n += len(items[-1]) + 1
    sql = head + ",".join(items) + ")"
    assert len(sql) <= MAX_SQL_CHARS
    assert parse(sql, UNIT).keys == ()
