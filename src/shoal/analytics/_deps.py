"""Guarded imports of the analytics extra: sqlglot parses queries, DuckDB runs them at a party."""

from __future__ import annotations

from types import ModuleType

from shoal.errors import ConfigError

__all__ = ["duckdb", "sqlglot"]

_HINT = "install the analytics extra: pip install 'shoal[analytics]'"


def sqlglot() -> ModuleType:
    try:
        import sqlglot as module
    except ImportError:
        raise ConfigError(f"federated queries need sqlglot to parse SQL; {_HINT}") from None
    return module


def duckdb() -> ModuleType:
    try:
        import duckdb as module
    except ImportError:
        raise ConfigError(
            f"this party's data (DuckDB, CSV or Parquet) needs duckdb; {_HINT}"
        ) from None
    return module
