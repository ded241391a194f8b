"""A party's own database: DuckDB or SQLite files, or CSV/Parquet loaded into DuckDB.

Connections are read-only, and DuckDB's access to other files is switched off before any
query runs, so the analyst's SQL (already restricted by the dialect) cannot reach beyond the
party's tables. Results come back as columns: keys as Python values, values as float64.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from shoal.analytics import _deps
from shoal.errors import ConfigError, DataError

__all__ = ["Database"]

_DUCKDB = (".duckdb", ".ddb")
_SQLITE = (".sqlite", ".sqlite3", ".db")
_FILES = (".csv", ".tsv", ".parquet", ".pq")


def _sqlite_authorizer(action: int, *_args: Any) -> int:
    # Reading tables and calling scalar functions only: no ATTACH, PRAGMA or writes.
    allowed = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
    return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY


class Database:
    """One party's data, opened lazily; ``table`` names a CSV/Parquet file's table."""

    def __init__(self, path: str | Path, *, table: str) -> None:
        self.path = Path(path)
        self.table = table
        suffix = self.path.suffix.lower()
        if suffix in _DUCKDB + _FILES:
            self.dialect = "duckdb"
        elif suffix in _SQLITE:
            self.dialect = "sqlite"
        else:
            raise ConfigError(
                f"{self.path}: unknown data format {suffix!r}; a party's data is a DuckDB "
                f"({', '.join(_DUCKDB)}), SQLite ({', '.join(_SQLITE)}), CSV or Parquet file"
            )
        self._con: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r}, table={self.table!r})"

    def _connect(self) -> Any:
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file")
        suffix = self.path.suffix.lower()
        if self.dialect == "sqlite":
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            con.set_authorizer(_sqlite_authorizer)
            return con
        duckdb = _deps.duckdb()
        if suffix in _DUCKDB:
            return duckdb.connect(
                str(self.path), read_only=True, config={"enable_external_access": False}
            )
        con = duckdb.connect(":memory:")
        reader = "read_parquet" if suffix in (".parquet", ".pq") else "read_csv_auto"
        name = '"' + self.table.replace('"', '""') + '"'
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {reader}(?)", [str(self.path)])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """Run ``sql`` (a dialect-checked SELECT): column names and column-wise values."""
        with self._lock:
            if self._con is None:
                self._con = self._connect()
            try:
                if self.dialect == "sqlite":
                    cur = self._con.execute(sql)
                    names = [d[0] for d in cur.description]
                    rows = cur.fetchall()
                    cols = [list(c) for c in zip(*rows)] if rows else [[] for _ in names]
                    return names, cols
                cur = self._con.execute(sql)
                names = [d[0] for d in cur.description]
                arrays = cur.fetchnumpy()
                return names, [_column_values(arrays[n]) for n in names]
            except (sqlite3.Error, RuntimeError, ValueError) as exc:
                raise DataError(f"{self.path}: the query failed here: {exc}") from None
            except Exception as exc:
                if type(exc).__module__.startswith("duckdb") or type(exc).__name__.endswith(
                    "Exception"
                ):
                    raise DataError(f"{self.path}: the query failed here: {exc}") from None
                raise


def _column_values(arr: Any) -> Any:
    """A fetched DuckDB column: masked (NULL) entries become None, numbers stay arrays."""
    if isinstance(arr, np.ma.MaskedArray):
        if arr.dtype.kind in "iufb":
            return np.ma.filled(arr.astype(np.float64), np.nan)
        return [None if m else v for v, m in zip(arr.data.tolist(), np.ma.getmaskarray(arr))]
    if isinstance(arr, np.ndarray) and arr.dtype.kind in "iufb":
        return arr
    return list(arr.tolist()) if isinstance(arr, np.ndarray) else list(arr)


def as_float(values: Any, column: str) -> np.ndarray:
    """A value column as float64 with NaN for NULL; text is a DataError naming the column."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iufb":
        return values.astype(np.float64, copy=False)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
        else:
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                raise DataError(
                    f"column {column} holds {type(v).__name__} values ({v!r}); aggregates "
                    "other than COUNT need numbers"
                ) from None
    return out
