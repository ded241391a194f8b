"""Parties for analytics tests: the same schema in DuckDB, SQLite and CSV files, and DuckDB
holding every party's rows pooled (the reference answer)."""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("duckdb")
pytest.importorskip("sqlglot")

import duckdb

from shoal.analytics import AnalyticsConfig, Party

COLUMNS = ("patient_id", "ward", "age", "stay_days", "cost")
SCHEMA = "patient_id INTEGER, ward VARCHAR, age DOUBLE, stay_days DOUBLE, cost DOUBLE"
PATIENTS = "patient_id INTEGER, sex VARCHAR"


def make_rows(rng: np.random.Generator, n: int, offset: int, nulls: bool = True) -> list[tuple]:
    rows = []
    for _ in range(n):
        age = float(rng.integers(0, 100))
        stay = round(float(rng.exponential(6.0)), 3)
        cost = None if nulls and rng.random() < 0.05 else round(float(rng.gamma(2.0, 500.0)), 2)
        ward = str(rng.choice(["A", "B", "C", "D"]))
        rows.append((offset + int(rng.integers(0, max(n // 2, 1))), ward, age, stay, cost))
    return rows


def insert(con: Any, rows: Sequence[tuple]) -> None:
    """Rows into DuckDB's visits table through a CSV file (executemany is slow)."""
    if not rows:
        return
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".csv", newline="", delete=False) as f:
        w = csv.writer(f)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
    types = {
        "patient_id": "INTEGER",
        "ward": "VARCHAR",
        "age": "DOUBLE",
        "stay_days": "DOUBLE",
        "cost": "DOUBLE",
    }
    con.execute(
        "INSERT INTO visits SELECT * FROM read_csv(?, header = false, columns = ?)",
        [f.name, types],
    )
    Path(f.name).unlink()


def write_party(path: Path, rows: Sequence[tuple], patients: Sequence[tuple] | None) -> None:
    suffix = path.suffix
    if suffix == ".duckdb":
        con = duckdb.connect(str(path))
        con.execute(f"CREATE TABLE visits ({SCHEMA})")
        insert(con, rows)
        if patients is not None:
            con.execute(f"CREATE TABLE patients ({PATIENTS})")
            con.executemany("INSERT INTO patients VALUES (?, ?)", list(patients))
        con.close()
    elif suffix == ".sqlite":
        con = sqlite3.connect(path)
        con.execute(
            "CREATE TABLE visits (patient_id INTEGER, ward TEXT, age REAL, stay_days REAL, "
            "cost REAL)"
        )
        con.executemany("INSERT INTO visits VALUES (?, ?, ?, ?, ?)", list(rows))
        if patients is not None:
            con.execute("CREATE TABLE patients (patient_id INTEGER, sex TEXT)")
            con.executemany("INSERT INTO patients VALUES (?, ?)", list(patients))
        con.commit()
        con.close()
    elif suffix == ".parquet":  # typed columns, written by DuckDB itself
        con = duckdb.connect()
        con.execute(f"CREATE TABLE visits ({SCHEMA})")
        insert(con, rows)
        con.execute("COPY visits TO ? (FORMAT parquet)", [str(path)])
        con.close()
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow(["" if v is None else v for v in r])


class Federated:
    """Parties on disk plus their pooled rows in DuckDB."""

    def __init__(
        self,
        root: Path,
        parts: Sequence[Sequence[tuple]],
        kinds: Sequence[str],
        patients: bool = False,
    ) -> None:
        self.parties = []
        self.pool = duckdb.connect()
        self.pool.execute(f"CREATE TABLE visits ({SCHEMA})")
        self.pool.execute(f"CREATE TABLE patients ({PATIENTS})")
        for i, (rows, kind) in enumerate(zip(parts, kinds)):
            path = root / f"party{i}.{kind}"
            people = None
            if patients:
                ids = sorted({r[0] for r in rows})
                people = [(p, "F" if p % 2 else "M") for p in ids]
                self.pool.executemany("INSERT INTO patients VALUES (?, ?)", people)
            write_party(path, rows, people)
            insert(self.pool, rows)
            self.parties.append(Party(name=f"party{i}", path=str(path)))

    def config(self, **kw: Any) -> AnalyticsConfig:
        base: dict[str, Any] = {
            "table": "visits",
            "bounds": {"age": [0, 120], "stay_days": [0, 100], "cost": [0, 20000]},
            "categories": {"ward": ["A", "B", "C", "D"]},
            "join_tables": ("patients",),
            "parties": tuple(self.parties),
            "max_contributions": 1000,
        }
        base.update(kw)
        return AnalyticsConfig(**base)

    def duck(self, sql: str) -> list[tuple]:
        return self.pool.execute(sql).fetchall()


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Federated:
    tmp_path = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(7)
    parts = [make_rows(rng, n, offset=100_000 * i) for i, n in enumerate((300, 200, 250))]
    return Federated(tmp_path, parts, ["duckdb", "sqlite", "csv"])


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory) -> Federated:
    tmp_path = tmp_path_factory.mktemp("joined")
    rng = np.random.default_rng(8)
    parts = [make_rows(rng, n, offset=100_000 * i) for i, n in enumerate((200, 150, 100))]
    return Federated(tmp_path, parts, ["duckdb", "sqlite", "duckdb"], patients=True)
