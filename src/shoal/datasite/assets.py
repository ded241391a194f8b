"""Datasets: read a CSV, Parquet or SQLite table, infer its schema, make its mock asset.

A generated mock holds no value of the private table: only the column names and types, the
categories and bounds the owner declared (uniform draws inside them), and synthetic unit ids.
Columns without declared bounds get standard-normal draws, text without categories gets
placeholders. An owner may supply their own mock file instead.
"""

from __future__ import annotations

import csv
import math
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shoal.datasite.dp import ColumnMeta, DatasetMeta
from shoal.datasite.table import Table
from shoal.errors import ConfigError, DataError

__all__ = ["FORMATS", "generate_mock", "infer_schema", "load_table", "meta_from_record"]

FORMATS = ("csv", "parquet", "sqlite")
MAX_CELLS = 50_000_000


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".db", ".sqlite", ".sqlite3"):
        return "sqlite"
    raise ConfigError(
        f"cannot tell the format of {path.name!r}; pass --format (csv, parquet, sqlite)"
    )


def _column(values: Sequence[Any]) -> np.ndarray:
    """A numeric array when every non-empty value is a number, else text."""
    cleaned = [None if v is None or (isinstance(v, str) and not v.strip()) else v for v in values]
    numbers: list[float] = []
    integral = True
    for v in cleaned:
        if v is None:
            numbers.append(math.nan)
            integral = False
            continue
        if isinstance(v, bool):
            numbers.append(float(v))
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            return np.array(["" if x is None else str(x) for x in cleaned], dtype=str)
        integral = integral and f.is_integer() and not isinstance(v, float)
        numbers.append(f)
    if integral and all(abs(x) < 2**53 for x in numbers):
        return np.array(numbers, dtype=np.int64)
    return np.array(numbers, dtype=np.float64)


def load_table(
    path: str | Path, *, name: str, fmt: str | None = None, table: str | None = None
) -> Table:
    """Read a whole table into named columns."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {str(p)!r} does not exist")
    kind = _format_of(p, fmt)
    header: list[str]
    rows: Sequence[Sequence[Any]]
    if kind == "csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{p.name}: the CSV file is empty") from None
            rows = [r for r in reader if r]
        for i, r in enumerate(rows):
            if len(r) != len(header):
                raise DataError(f"{p.name}: row {i + 2} has {len(r)} fields, not {len(header)}")
    elif kind == "sqlite":
        if not table:
            raise ConfigError("a SQLite dataset needs --table NAME")
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            cursor = conn.execute(f'SELECT * FROM "{table.replace(chr(34), "")}"')
            header = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        except sqlite3.Error as exc:
            raise DataError(f"{p.name}: cannot read table {table!r}: {exc}") from None
        finally:
            conn.close()
    else:
        try:
            import pyarrow.parquet as pq

            data = pq.read_table(p).to_pydict()
        except ImportError:
            try:
                import duckdb
            except ImportError:
                raise ConfigError(
                    "Parquet datasets need pyarrow or duckdb: pip install 'shoal[analytics]'"
                ) from None
            rel = duckdb.connect().execute("SELECT * FROM read_parquet(?)", [str(p)])
            header = [d[0] for d in rel.description]
            rows = rel.fetchall()
        else:
            header = list(data)
            rows = list(zip(*data.values())) if data else []
    if len(set(header)) != len(header):
        raise DataError(f"{p.name}: column names repeat: {header}")
    if len(rows) * max(len(header), 1) > MAX_CELLS:
        raise DataError(f"{p.name}: more than {MAX_CELLS} cells; split the dataset")
    columns = {h: _column([r[i] for r in rows]) for i, h in enumerate(header)}
    return Table(name=name, columns=columns)


def infer_schema(
    table: Table,
    *,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Column names and types, with the bounds and categories the owner declared (only)."""
    bounds = dict(bounds or {})
    categories = dict(categories or {})
    for key in [*bounds, *categories]:
        if key not in table:
            raise ConfigError(f"no column {key!r} in {table.name!r}; columns: {table.columns}")
    schema = []
    for name in table.columns:
        column = table[name]
        kind = "num" if column.dtype.kind in "biuf" else "text"
        # a text column's numpy type carries its longest value's length ("<U37"): a fact
        # about the private data, so only its kind is kept
        dtype = column.dtype.str if kind == "num" else "<U"
        entry: dict[str, Any] = {"name": name, "kind": kind, "dtype": dtype}
        if name in bounds:
            if kind != "num":
                raise ConfigError(f"column {name!r} is text; bounds apply to numbers")
            lo, hi = (float(b) for b in bounds[name])
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"bounds of {name!r} must be finite with low < high")
            entry["bounds"] = [lo, hi]
        if name in categories:
            entry["categories"] = [str(c) for c in categories[name]]
        schema.append(entry)
    return schema


def generate_mock(
    schema: Sequence[Mapping[str, Any]], *, name: str, rows: int, unit: str | None, seed: int = 0
) -> Table:
    """A table of the same shape drawn from the declared schema alone."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for entry in schema:
        col = str(entry["name"])
        integral = np.dtype(entry.get("dtype", "<f8")).kind in "biu"
        if col == unit:
            ids = np.arange(rows) // 2  # two rows per synthetic unit
            columns[col] = ids if entry["kind"] == "num" else np.array([f"unit-{i}" for i in ids])
        elif entry["kind"] == "num":
            if "bounds" in entry:
                lo, hi = entry["bounds"]
                draws = rng.uniform(lo, hi, rows)
            else:
                draws = rng.standard_normal(rows)
            columns[col] = np.round(draws).astype(np.int64) if integral else draws
        elif entry.get("categories"):
            columns[col] = rng.choice(np.array(entry["categories"], dtype=str), rows)
        else:
            columns[col] = np.array([f"{col}-{i % 5}" for i in range(rows)], dtype=str)
    return Table(name=name, columns=columns)


def meta_from_record(
    name: str, schema: Sequence[Mapping[str, Any]], dp: Mapping[str, Any]
) -> DatasetMeta:
    """The DP view of a stored dataset."""
    return DatasetMeta(
        name=name,
        columns=tuple(
            ColumnMeta(
                name=str(c["name"]),
                kind=str(c["kind"]),
                bounds=(float(c["bounds"][0]), float(c["bounds"][1])) if "bounds" in c else None,
                categories=tuple(c["categories"]) if "categories" in c else None,
            )
            for c in schema
        ),
        unit=dp.get("unit"),
        max_contributions=int(dp.get("max_contributions", 1)),
    )
