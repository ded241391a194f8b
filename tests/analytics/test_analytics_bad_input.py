"""Bad input: each gets a clear error, and a failing party does not sink the query."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shoal.analytics import AnalyticsConfig, Party, Privacy, query
from shoal.analytics.simulate import federation
from shoal.cli.main import main
from shoal.errors import ConfigError, NotEnoughNodes, QueryError

from .conftest import Federated, make_rows, write_party


def test_unbounded_column_in_sum_asks_for_bounds(three: Federated) -> None:
    config = three.config(bounds={})
    with pytest.raises(QueryError, match=r"declare them in \[analytics\] bounds"):
        query(federation(config), "SELECT SUM(cost) FROM visits", config=config)


def test_party_missing_a_column_fails_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    fs = Federated(tmp_path, [make_rows(rng, 40, 1000 * i) for i in range(4)], ["duckdb"] * 4)
    import duckdb

    odd = tmp_path / "odd.duckdb"
    con = duckdb.connect(str(odd))
    con.execute("CREATE TABLE visits (patient_id INTEGER, ward VARCHAR)")
    con.close()
    parties = (*fs.parties[:3], Party(name="odd", path=str(odd)))
    config = fs.config(parties=parties)
    result = query(federation(config), "SELECT AVG(age) AS a FROM visits", config=config)
    assert "odd" in result.failures and "age" in result.failures["odd"]
    want = fs.duck("SELECT AVG(age) FROM visits WHERE patient_id < 3000")[0][0]
    assert result.rows[0][0] == pytest.approx(want, rel=1e-9)
    with pytest.raises(NotEnoughNodes, match="age"):
        query(federation(config, min_nodes=4), "SELECT AVG(age) FROM visits", config=config)


def test_too_few_parties_names_each_one_that_did_not_answer(tmp_path: Path) -> None:
    import duckdb

    rng = np.random.default_rng(2)
    fs = Federated(tmp_path, [make_rows(rng, 30, 1000 * i) for i in range(2)], ["duckdb"] * 2)
    parties = list(fs.parties)
    for name, schema in (("lacks_age", "ward VARCHAR"), ("lacks_ward", "age DOUBLE")):
        path = tmp_path / f"{name}.duckdb"
        con = duckdb.connect(str(path))
        con.execute(f"CREATE TABLE visits ({schema})")
        con.close()
        parties.append(Party(name=name, path=str(path)))
    config = fs.config(parties=tuple(parties))
    sql = "SELECT ward, AVG(age) AS a FROM visits GROUP BY ward"
    for privacy in (None, Privacy(epsilon=1.0)):  # checked before the noise is split
        with pytest.raises(NotEnoughNodes) as info:
            query(federation(config), sql, config=config, privacy=privacy)
        message = str(info.value)
        assert "only 2 of 4 parties" in message and "min_nodes (3" in message
        assert "lacks_age:" in message and '"age" not found' in message
        assert "lacks_ward:" in message and '"ward" not found' in message


def test_a_party_failing_after_the_noise_was_split_is_topped_up_centrally(
    tmp_path: Path,
) -> None:
    import duckdb

    rng = np.random.default_rng(4)
    fs = Federated(tmp_path, [make_rows(rng, 40, 1000 * i) for i in range(3)], ["duckdb"] * 3)
    # Its columns bind (the check passes), but its ages are text: the statistics task fails.
    odd = tmp_path / "odd.duckdb"
    con = duckdb.connect(str(odd))
    con.execute("CREATE TABLE visits (patient_id INTEGER, ward VARCHAR, age VARCHAR)")
    con.execute("INSERT INTO visits VALUES (1, 'A', 'old'), (2, 'B', 'young')")
    con.close()
    config = fs.config(parties=(*fs.parties, Party(name="odd", path=str(odd))))
    result = query(
        federation(config),
        "SELECT AVG(age) AS a FROM visits",
        config=config,
        privacy=Privacy(epsilon=1.0),
    )
    assert "holds str values" in result.failures["odd"]
    assert len(result.parties) == 3
    assert any("1 of 4 parties dropped out" in n for n in result.notes)


def test_nulls_are_ignored_as_sql_does(three: Federated) -> None:
    config = three.config()
    result = query(
        federation(config),
        "SELECT COUNT(cost) AS c, COUNT(*) AS n, AVG(cost) AS a FROM visits",
        config=config,
    )
    assert result.rows[0][0] == three.duck("SELECT COUNT(cost) FROM visits")[0][0]
    assert result.rows[0][2] == pytest.approx(three.duck("SELECT AVG(cost) FROM visits")[0][0])


def test_empty_selection_gives_sql_nulls(three: Federated) -> None:
    config = three.config()
    result = query(
        federation(config),
        "SELECT COUNT(*) AS n, AVG(age) AS a, SUM(cost) AS s FROM visits WHERE age > 500",
        config=config,
    )
    assert result.rows == ((0, None, None),)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"bounds\.age needs finite low < high"):
        AnalyticsConfig(table="t", bounds={"age": [5, 1]})
    with pytest.raises(ConfigError, match="unknown key"):
        AnalyticsConfig.from_dict({"table": "t", "bonds": {}})
    with pytest.raises(ConfigError, match="max_contributions"):
        AnalyticsConfig(table="t", max_contributions=0)
    with pytest.raises(ConfigError, match="at least three parties"):
        federation(AnalyticsConfig(table="t", parties=(Party(name="a", path="a.csv"),)))


def test_unknown_file_format_is_refused(tmp_path: Path) -> None:
    from shoal.analytics import Database

    with pytest.raises(ConfigError, match="unknown data format"):
        Database(tmp_path / "x.xlsx", table="t")


def test_csv_party_cannot_read_other_files(tmp_path: Path) -> None:
    from shoal.analytics import Database
    from shoal.errors import DataError

    path = tmp_path / "p.csv"
    write_party(path, make_rows(np.random.default_rng(0), 5, 0), None)
    db = Database(path, table="visits")
    assert db.query("SELECT COUNT(*) AS n FROM visits")[1][0][0] == 5
    with pytest.raises(DataError):  # the dialect refuses this first; the party refuses too
        db.query(f"SELECT * FROM read_csv('{path}')")


def test_cli_query_writes_json(
    three: Federated, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parties = ", ".join(f'{{ name = "{p.name}", path = "{p.path}" }}' for p in three.parties)
    job = tmp_path / "analytics.toml"
    job.write_text(
        '[analytics]\ntable = "visits"\nprivacy_unit = "patient_id"\nmax_contributions = 1000\n'
        f"parties = [ {parties} ]\nbounds = {{ age = [0, 120] }}\n"
        'categories = { ward = ["A", "B", "C", "D"] }\n'
        "[privacy]\nepsilon = 1.0\n"
    )
    out = tmp_path / "out.json"
    sql = "SELECT ward, COUNT(*) AS n, AVG(age) AS a FROM visits GROUP BY ward"
    assert main(["query", "--job", str(job), "--sql", sql, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["columns"] == ["ward", "n", "a"] and data["epsilon"] == 1.0
    assert len(data["rows"]) == 4 and len(data["error"]) == 4
    age = data["disclosed"]["columns"]["age"]
    assert age["values_clamped_error"] > 0 and age["null_rows_ignored_error"] > 0
    printed = capsys.readouterr().out
    assert "distributed DP" in printed
    # The noisy clamped count is printed with its error bar, as the JSON holds it.
    clamped = f"{age['values_clamped']:.6g} ± {age['values_clamped_error']:.3g}"
    assert f"column age: {clamped} value(s) clamped to [0, 120]" in printed
    assert main(["query", "--job", str(job), "--sql", sql, "--exact", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "exact" and "error" not in data
    assert data["disclosed"]["columns"]["age"]["values_clamped"] == 0  # ages are in [0, 100)
    assert "column age: 0 value(s) clamped to [0, 120], 0 NULL(s) ignored" in (
        capsys.readouterr().out
    )
    assert main(["query", "--job", str(job), "--sql", "SELECT age FROM visits"]) == 2
    assert "row-level output is refused" in capsys.readouterr().err
    # One query refused does not cost the next its answer.
    argv = ["query", "--job", str(job), "--exact", "--json", str(out)]
    assert main([*argv, "--sql", "SELECT age FROM visits", "--sql", sql]) == 2
    refused, answered = json.loads(out.read_text())
    assert refused["sql"] == "SELECT age FROM visits" and "QueryError" in refused["failed"]
    assert answered["sql"] == sql and len(answered["rows"]) == 4
    assert "query 1 (SELECT age FROM visits) failed" in capsys.readouterr().err


def test_cli_skellam_job_and_node_db_arguments(
    three: Federated, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parties = ", ".join(f'{{ name = "{p.name}", path = "{p.path}" }}' for p in three.parties)
    job = tmp_path / "analytics.toml"
    job.write_text(
        '[analytics]\ntable = "visits"\nmax_contributions = 1\n'
        f"parties = [ {parties} ]\nbounds = {{ age = [0, 120] }}\n"
        '[privacy]\nepsilon = 1.0\nnoise = "skellam"\n'
    )
    sql = "SELECT COUNT(*) AS n FROM visits"
    assert main(["query", "--job", str(job), "--sql", sql]) == 2
    assert "delta" in capsys.readouterr().err  # Skellam is (epsilon, delta)-DP
    job.write_text(job.read_text() + "delta = 1e-6\n")
    out = tmp_path / "out.json"
    # --epsilon overrides the job's epsilon and keeps its noise and delta
    argv = ["query", "--job", str(job), "--sql", sql, "--epsilon", "2", "--json", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["epsilon"] == 2.0 and data["mode"] == "distributed" and data["error"][0][0] > 0
    assert any("Skellam" in note and "delta 1e-06" in note for note in data["notes"])
    capsys.readouterr()
    node = ["node", "--coordinator", "127.0.0.1:1", "--key", "k.key", "--insecure"]
    assert main([*node, "--db", three.parties[0].path, "--job", str(job)]) == 2
    assert "drop --job" in capsys.readouterr().err
    assert main(node) == 2
    assert "--db FILE" in capsys.readouterr().err


def test_hostile_requests_sent_straight_to_the_parties_fail_there_alone(
    three: Federated,
) -> None:
    """A modified coordinator skips its own checks and sends the parties SQL and
    declarations of its choosing: each party re-parses and refuses them with the reason,
    allocates nothing for an oversized request, and answers the next honest query."""
    from shoal.analytics import STATS_TASK

    config = three.config(privacy_unit="patient_id")
    fed = federation(config)
    wide = {f"k{i}": [str(j) for j in range(100)] for i in range(4)}  # 10^8 groups
    bins = {**config.to_json(), "bins": 10**9}
    hostile = [
        ("COPY visits TO '/tmp/shoal-hostile.csv'", config.to_json(), "COPY statements"),
        ("SELECT COUNT(*) FROM visits WHERE " + "(" * 2000 + "1 = 1" + ")" * 2000, None, "deeply"),
        ("SELECT COUNT(*) FROM visits WHERE age IN (" + "1," * 20_000 + "1)", None, "characters"),
        (
            "SELECT COUNT(*) FROM visits v JOIN visits w ON w.patient_id = 42",
            {**config.to_json(), "join_tables": []},
            "same privacy unit",
        ),
        (
            "SELECT k0, k1, k2, k3, COUNT(*) FROM visits GROUP BY k0, k1, k2, k3",
            {**config.to_json(), "categories": wide},
            "100,000,000 groups",
        ),
        ("SELECT MEDIAN(age) FROM visits", bins, "over 4,194,304"),
    ]
    for sql, declared, expected in hostile:
        values = fed.all().map(
            STATS_TASK,
            min_nodes=0,
            sql=sql,
            config=declared or config.to_json(),
            keys=None,
            privacy=None,
        )
        assert not values.node_ids
        assert len(values.failures) == 3
        assert all(expected in f.detail for f in values.failures.values()), values.failures
    assert not Path("/tmp/shoal-hostile.csv").exists()
    result = query(fed, "SELECT COUNT(*) AS n FROM visits", config=config)
    assert result.rows[0][0] == three.duck("SELECT COUNT(*) FROM visits")[0][0]
