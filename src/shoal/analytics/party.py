"""What one party computes for a query: its bounded rows, their groups, their statistics.

Rows per privacy unit are capped at ``max_contributions`` (a random subset kept, chosen in
SQL), values are clamped to the declared bounds, and each row is placed in a group of the
public domain (declared categories or keys released by key selection). Nothing here adds
noise or talks to anyone: tasks.py does that.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.analytics.config import AnalyticsConfig
from shoal.analytics.dialect import Plan
from shoal.analytics.source import Database, as_float
from shoal.analytics.stats import MAX_STATS_CELLS, Block, Stats, local_stats
from shoal.errors import DataError, QueryError

__all__ = [
    "Domain",
    "bounded_rows",
    "bounded_sql",
    "key_bytes",
    "key_counts",
    "key_from_bytes",
    "key_of",
    "norm",
    "party_stats",
]


def norm(value: Any) -> Any:
    """A key value as JSON: integral numbers as int, dates as ISO text, NULL as None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float, decimal.Decimal)):
        f = float(value)
        if math.isnan(f):
            return None
        return int(f) if f.is_integer() and abs(f) < 2**53 else f
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    return str(value)


def key_of(values: Sequence[Any]) -> str:
    """The canonical text of a group key tuple."""
    return json.dumps([norm(v) for v in values], separators=(",", ":"), ensure_ascii=False)


def key_bytes(values: Sequence[Any]) -> bytes:
    """What key selection spells out byte by byte: a lone text key as its UTF-8 bytes (each
    prefix-tree level costs budget, so no quoting), anything else as NUL + its JSON."""
    if len(values) == 1 and isinstance(values[0], str) and not values[0].startswith("\x00"):
        return values[0].encode("utf-8")
    return b"\x00" + key_of(values).encode("utf-8")


def key_from_bytes(raw: bytes) -> tuple[Any, ...]:
    """Inverse of ``key_bytes``; bytes that decode to nothing valid raise ValueError."""
    if raw.startswith(b"\x00"):
        value = json.loads(raw[1:].decode("utf-8"))
        if not isinstance(value, list):
            raise ValueError("not a key tuple")
        return tuple(value)
    return (raw.decode("utf-8"),)


class Domain:
    """The public groups of a query: the product of declared categories, or released keys."""

    def __init__(
        self, plan: Plan, config: AnalyticsConfig, keys: Sequence[str] | None = None
    ) -> None:
        self.plan = plan
        if keys is None:
            missing = [k for k in plan.key_names if k not in config.categories]
            if missing:
                raise QueryError(
                    f"GROUP BY {missing} has no declared categories: its keys must be "
                    "selected first (query() does so)"
                )
            lists = [config.categories[k] for k in plan.key_names]
            size = math.prod(len(values) for values in lists)
            if size > MAX_STATS_CELLS:  # each group needs at least one number
                raise QueryError(
                    f"GROUP BY {list(plan.key_names)} has {size:,} groups (the product of their "
                    f"declared categories), over {MAX_STATS_CELLS:,}; group by fewer columns"
                )
            self.tuples: list[tuple[Any, ...]] = [()]
            for values in lists:
                self.tuples = [(*t, v) for t in self.tuples for v in values]
        else:
            self.tuples = [tuple(json.loads(k)) for k in keys]
        self.index = {key_of(t): i for i, t in enumerate(self.tuples)}

    def __len__(self) -> int:
        return len(self.tuples)

    def groups_of(self, key_columns: Sequence[Sequence[Any]], rows: int) -> np.ndarray:
        """Each row's group index; ``len(self)`` for a key outside the domain."""
        outside = len(self.tuples)
        if not key_columns:
            return np.zeros(rows, dtype=np.int64)
        cols = [_py(c) for c in key_columns]
        cache: dict[tuple[Any, ...], int] = {}
        out = np.empty(rows, dtype=np.int64)
        for i, t in enumerate(zip(*cols)):
            g = cache.get(t)
            if g is None:
                g = cache[t] = self.index.get(key_of(t), outside)
            out[i] = g
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, decimal.Decimal, np.number)) and not isinstance(
        value, (bool, np.bool_)
    )


def _py(column: Any) -> list[Any]:
    if isinstance(column, np.ndarray):
        return [None if isinstance(v, float) and math.isnan(v) else v for v in column.tolist()]
    return list(column)


def bounded_sql(db: Database, plan: Plan, config: AnalyticsConfig) -> str:
    """The SELECT of the party's rows for ``plan`` with at most ``max_contributions`` rows
    per privacy unit."""
    sql = plan.party_sql(config, db.dialect)
    if config.privacy_unit is not None:
        # A random subset of each unit's rows (the draw is materialized first: DuckDB
        # refuses a volatile window order).
        sql = (
            "SELECT * FROM (SELECT r__.*, ROW_NUMBER() OVER (PARTITION BY u ORDER BY o__) "
            f"AS rn__ FROM (SELECT q__.*, random() AS o__ FROM ({sql}) AS q__) AS r__) AS b__ "
            f"WHERE rn__ <= {int(config.max_contributions)}"
        )
    return sql


def bounded_rows(db: Database, plan: Plan, config: AnalyticsConfig) -> dict[str, Any]:
    """The party's rows for ``plan`` after the contribution bound: columns by name."""
    names, cols = db.query(bounded_sql(db, plan, config))
    out: dict[str, Any] = dict(zip([n.lower() for n in names], cols))
    rows = len(cols[0]) if cols else 0
    if rows > config.max_rows:
        raise DataError(
            f"this party has {rows} rows for the query, more than the job's max_rows "
            f"({config.max_rows}); raise [analytics] max_rows"
        )
    out["__rows"] = rows
    return out


def party_stats(
    db: Database,
    plan: Plan,
    config: AnalyticsConfig,
    blocks: Sequence[Block],
    domain: Domain,
) -> Stats:
    """This party's statistics for every group of ``domain`` (plus the outside group)."""
    rows = bounded_rows(db, plan, config)
    n = int(rows["__rows"])
    groups = domain.groups_of([rows[f"k{i}"] for i in range(len(plan.keys))], n)
    values = [as_float(rows[f"c{i}"], c) for i, c in enumerate(plan.columns)]
    return local_stats(plan, config, blocks, groups=groups, n_groups=len(domain), values=values)


def key_counts(db: Database, plan: Plan, config: AnalyticsConfig) -> Counter[bytes]:
    """Key selection: the party's bounded rows per group key, as the bytes the prefix tree
    spells out (sketch.py). A privacy unit holds at most ``max_contributions`` of the rows."""
    rows = bounded_rows(db, plan, config)
    n = int(rows["__rows"])
    key_cols = [_py(rows[f"k{i}"]) for i in range(len(plan.keys))]
    for name, col in zip(plan.key_names, key_cols):
        if name not in config.categories and any(_is_number(v) for v in col):
            raise QueryError(
                f"GROUP BY {name}: key selection (heavy hitters) finds text keys, and "
                f"{name!r} holds numbers; declare its categories, or use HISTOGRAM({name}) "
                "or quantiles with declared bounds"
            )
    tuples = Counter(zip(*key_cols)) if key_cols else Counter({(): n} if n else {})
    out: Counter[bytes] = Counter()
    for t, count in tuples.items():
        out[key_bytes(t)] += count
    return out
