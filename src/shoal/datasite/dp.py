"""Automatic DP for datasite requests: the code declares statistics, the datasite answers them.

Under the ``dp`` and ``threshold`` policies the submitted function returns queries built
here (``dp.count(t)``, ``dp.mean(t, "age")``, ...). It runs in the sandbox on the *mock*
tables only, so which queries it asks cannot depend on private values; the datasite then
evaluates the approved plan on the real table itself: rows clamped to the owner's bounds,
at most ``max_contributions`` rows per privacy unit, the scientist's epsilon split evenly over
every noisy statistic, Laplace noise of scale sensitivity / share, the ledger charged first.
The scientist never picks a noise scale. The declaring half imports only NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.errors import ConfigError, DataError

__all__ = [
    "OPS",
    "ColumnMeta",
    "DatasetMeta",
    "Query",
    "count",
    "evaluate_plan",
    "histogram",
    "mean",
    "parse_plan",
    "quantile",
    "sum",
    "variance",
]

OPS = ("count", "sum", "mean", "variance", "histogram", "quantile")
# how many noisy statistics each operation releases (each gets an equal share of epsilon)
_STATISTICS = {"count": 1, "sum": 1, "mean": 2, "variance": 3, "histogram": 1, "quantile": 1}
QUANTILE_BINS = 64


@dataclass(frozen=True, kw_only=True)
class Query:
    """One declared statistic over a column of an asset, optionally on rows matching ``where``."""

    op: str
    asset: str
    column: str | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    bins: int | None = None
    q: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "asset": self.asset,
            "column": self.column,
            "where": dict(self.where),
            "bins": self.bins,
            "q": self.q,
        }


def _asset(table: Any) -> str:
    name = getattr(table, "name", table)
    if not isinstance(name, str):
        raise ConfigError("pass the table (assets['name']) or its name as the first argument")
    return name


def _where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (where or {}).items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"where[{key!r}] must be a string or a number, got {value!r}")
        out[str(key)] = value
    return out


def count(table: Any, *, where: Mapping[str, Any] | None = None) -> Query:
    """The number of rows (matching ``where``)."""
    return Query(op="count", asset=_asset(table), where=_where(where))


def sum(table: Any, column: str, *, where: Mapping[str, Any] | None = None) -> Query:
    """The sum of a bounded column."""
    return Query(op="sum", asset=_asset(table), column=column, where=_where(where))


def mean(table: Any, column: str, *, where: Mapping[str, Any] | None = None) -> Query:
    """The mean of a bounded column."""
    return Query(op="mean", asset=_asset(table), column=column, where=_where(where))


def variance(table: Any, column: str, *, where: Mapping[str, Any] | None = None) -> Query:
    """The (population) variance of a bounded column."""
    return Query(op="variance", asset=_asset(table), column=column, where=_where(where))


def histogram(
    table: Any, column: str, *, bins: int | None = None, where: Mapping[str, Any] | None = None
) -> Query:
    """Counts per category (a text column with declared categories) or per equal-width bin."""
    if bins is not None and (not isinstance(bins, int) or not 1 <= bins <= 1024):
        raise ConfigError(f"bins must be an int in [1, 1024], got {bins!r}")
    return Query(op="histogram", asset=_asset(table), column=column, bins=bins, where=_where(where))


def quantile(
    table: Any, column: str, q: float = 0.5, *, where: Mapping[str, Any] | None = None
) -> Query:
    """The ``q`` quantile of a bounded column (read from a noisy 64-bin histogram)."""
    if not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ConfigError(f"q must be in [0, 1], got {q!r}")
    return Query(op="quantile", asset=_asset(table), column=column, q=float(q), where=_where(where))


# ---------------------------------------------------------------------------------------------
# the datasite's half: metadata, plan checks, evaluation


@dataclass(frozen=True, kw_only=True)
class ColumnMeta:
    """A column's type and what the owner declared public about it."""

    name: str
    kind: str  # "num" or "text"
    bounds: tuple[float, float] | None = None
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class DatasetMeta:
    """A dataset's schema and DP metadata: bounds, privacy unit, contributions per unit."""

    name: str
    columns: tuple[ColumnMeta, ...]
    unit: str | None = None
    max_contributions: int = 1

    def column(self, name: str | None) -> ColumnMeta:
        for c in self.columns:
            if c.name == name:
                return c
        raise ConfigError(
            f"dataset {self.name!r} has no column {name!r}; columns: "
            f"{[c.name for c in self.columns]}"
        )


def parse_plan(value: Any) -> list[tuple[str, Query]]:
    """The (name, query) pairs of a plan as the sandbox wrote it; refuses anything else."""
    if not isinstance(value, list) or not value:
        raise ConfigError("the code declared no DP queries; return dp.count(...) and friends")
    if len(value) > 64:
        raise ConfigError(f"a plan may hold at most 64 queries, got {len(value)}")
    out: list[tuple[str, Query]] = []
    for item in value:
        if not isinstance(item, dict) or item.get("op") not in OPS:
            raise ConfigError(f"not a DP query: {item!r:.200}")
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ConfigError(f"a query name must be a short string, got {name!r}")
        where = item.get("where") or {}
        if not isinstance(where, dict):
            raise ConfigError("where must map column names to values")
        bins, q = item.get("bins"), item.get("q")
        if bins is not None and (not isinstance(bins, int) or not 1 <= bins <= 1024):
            raise ConfigError(f"bins must be an int in [1, 1024], got {bins!r}")
        if q is not None and (not isinstance(q, (int, float)) or not 0 <= q <= 1):
            raise ConfigError(f"q must be in [0, 1], got {q!r}")
        column = item.get("column")
        if column is not None and not isinstance(column, str):
            raise ConfigError(f"column must be a name, got {column!r}")
        out.append(
            (
                name,
                Query(
                    op=item["op"],
                    asset=str(item.get("asset")),
                    column=column,
                    where=_where(where),
                    bins=bins,
                    q=None if q is None else float(q),
                ),
            )
        )
    if len({n for n, _ in out}) != len(out):
        raise ConfigError("query names must be unique")
    return out


def statistics_in(plan: Sequence[tuple[str, Query]]) -> int:
    """How many noisy statistics a plan releases (epsilon is split evenly over them)."""
    return int(np.sum([_STATISTICS[q.op] for _, q in plan]))


def check_plan(
    plan: Sequence[tuple[str, Query]], metas: Mapping[str, DatasetMeta], *, policy: str
) -> None:
    """Refuse a query the declared metadata cannot bound (or a threshold query not a count)."""
    for name, query in plan:
        if query.asset not in metas:
            raise ConfigError(f"query {name!r}: asset {query.asset!r} is not part of the request")
        meta = metas[query.asset]
        for key in query.where:
            meta.column(key)
        if policy == "threshold" and query.op not in ("count", "histogram"):
            raise ConfigError(
                f"query {name!r}: the threshold policy releases counts only (count, histogram), "
                f"not {query.op}; use the dp policy"
            )
        if query.op == "count":
            continue
        col = meta.column(query.column)
        if query.op == "histogram" and col.kind == "text":
            if not col.categories:
                raise ConfigError(
                    f"query {name!r}: column {col.name!r} has no declared categories; the owner "
                    "must declare them before it can be counted per category"
                )
            continue
        if col.kind != "num" or col.bounds is None:
            raise ConfigError(
                f"query {name!r}: column {col.name!r} has no declared bounds; the owner must "
                "declare them (datasets add --bounds) before DP statistics can use it"
            )


def _rows(table: Mapping[str, np.ndarray], query: Query, meta: DatasetMeta) -> np.ndarray:
    n = len(next(iter(table.values()))) if table else 0
    mask = np.ones(n, dtype=bool)
    for key, value in query.where.items():
        column = table[key]
        if column.dtype.kind in "biuf":
            try:
                mask &= column == float(value)
            except (TypeError, ValueError):
                mask &= False
        else:
            mask &= column.astype(str) == str(value)
    return mask


def bound_contributions(
    table: Mapping[str, np.ndarray], meta: DatasetMeta, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the rows kept: at most ``max_contributions`` per privacy unit, chosen at
    random (all rows when each row is its own unit)."""
    n = len(next(iter(table.values()))) if table else 0
    if meta.unit is None:
        return np.arange(n)
    units = table[meta.unit]
    order = rng.permutation(n)
    _, first = np.unique(units[order], return_inverse=True)
    rank = np.zeros(n, dtype=np.int64)
    # rank of each row within its unit, in the random order
    sorter = np.argsort(first, kind="stable")
    groups = first[sorter]
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    counts = np.diff(np.r_[starts, n])
    rank[sorter] = np.arange(n) - np.repeat(starts, counts)
    return np.sort(order[rank < meta.max_contributions])


def _exact(
    query: Query, table: Mapping[str, np.ndarray], meta: DatasetMeta
) -> tuple[list[np.ndarray], list[float], Any]:
    """The exact statistics a query needs, their L1 sensitivities per unit, and how to read them."""
    k = float(meta.max_contributions)
    mask = _rows(table, query, meta)
    if query.op == "count":
        return [np.array([mask.sum()], dtype=float)], [k], None
    col = meta.column(query.column)
    values = table[col.name][mask]
    if query.op == "histogram" and col.kind == "text":
        cats = list(col.categories or ())
        index = {c: i for i, c in enumerate(cats)}
        counts = np.zeros(len(cats))
        for v in values.astype(str):
            j = index.get(v)
            if j is not None:
                counts[j] += 1
        return [counts], [k], {"categories": cats}
    assert col.bounds is not None
    lo, hi = col.bounds
    x = np.clip(values.astype(float), lo, hi)
    x = x[~np.isnan(x)]
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    if query.op == "sum":
        return [np.array([x.sum()])], [k * max(abs(lo), abs(hi))], None
    if query.op == "mean":
        return [np.array([len(x)], float), np.array([(x - mid).sum()])], [k, k * half], (mid,)
    if query.op == "variance":
        c = x - mid
        return (
            [np.array([len(x)], float), np.array([c.sum()]), np.array([(c * c).sum()])],
            [k, k * half, k * half * half],
            (mid,),
        )
    bins = query.bins or QUANTILE_BINS
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(x, bins=edges)
    return [counts.astype(float)], [k], {"edges": edges}


def _read(query: Query, stats: list[np.ndarray], aux: Any, meta: DatasetMeta) -> dict[str, Any]:
    if query.op in ("count", "sum"):
        return {"value": float(stats[0][0])}
    col = meta.column(query.column)
    if query.op == "mean":
        (mid,) = aux
        lo, hi = col.bounds or (0.0, 0.0)
        n = max(float(stats[0][0]), 1.0)
        return {"value": float(np.clip(mid + stats[1][0] / n, lo, hi))}
    if query.op == "variance":
        (mid,) = aux
        lo, hi = col.bounds or (0.0, 0.0)
        n = max(float(stats[0][0]), 1.0)
        m1 = stats[1][0] / n
        var = stats[2][0] / n - m1 * m1
        return {"value": float(np.clip(var, 0.0, ((hi - lo) / 2.0) ** 2))}
    if query.op == "histogram":
        out: dict[str, Any] = {"value": stats[0]}
        out.update({k: (v if isinstance(v, list) else np.asarray(v)) for k, v in aux.items()})
        return out
    # quantile: walk the (noisy) histogram's clamped cumulative counts
    counts = np.maximum(stats[0], 0.0)
    edges = aux["edges"]
    total = counts.sum()
    if total <= 0:
        return {"value": float((edges[0] + edges[-1]) / 2)}
    target = float(query.q if query.q is not None else 0.5) * total
    cum = np.cumsum(counts)
    j = int(np.searchsorted(cum, target))
    j = min(j, len(counts) - 1)
    before = cum[j - 1] if j > 0 else 0.0
    frac = 0.0 if counts[j] <= 0 else (target - before) / counts[j]
    return {"value": float(edges[j] + frac * (edges[j + 1] - edges[j]))}


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """What :func:`evaluate_plan` released and what it cost."""

    payload: dict[str, Any]
    statistics: int
    epsilon_each: float | None
    suppressed: int = 0


def evaluate_plan(
    plan: Sequence[tuple[str, Query]],
    tables: Mapping[str, Mapping[str, np.ndarray]],
    metas: Mapping[str, DatasetMeta],
    *,
    policy: str,
    epsilon: float | None = None,
    threshold: int | None = None,
    rng: np.random.Generator | None = None,
) -> Evaluation:
    """Answer a checked plan: ``policy="dp"`` with Laplace noise (epsilon split evenly),
    ``"threshold"`` exactly with every count below ``threshold`` suppressed (NaN),
    ``"exact"`` (mock data only) without either."""
    from shoal.privacy import make_rng

    check_plan(plan, metas, policy="threshold" if policy == "threshold" else "dp")
    rng = make_rng(None) if rng is None else rng
    m = statistics_in(plan)
    each: float | None = None
    if policy == "dp":
        if epsilon is None or not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"epsilon must be a positive number, got {epsilon!r}")
        each = float(epsilon) / m
    kept: dict[str, Mapping[str, np.ndarray]] = {}
    for name, table in tables.items():
        if policy == "dp":
            rows = bound_contributions(table, metas[name], rng)
            kept[name] = {c: v[rows] for c, v in table.items()}
        else:
            kept[name] = table
    payload: dict[str, Any] = {}
    suppressed = 0
    for name, query in plan:
        meta = metas[query.asset]
        stats, sens, aux = _exact(query, kept[query.asset], meta)
        if policy == "dp":
            assert each is not None
            stats = [s + rng.laplace(0.0, c / each, size=s.shape) for s, c in zip(stats, sens)]
        elif policy == "threshold":
            assert threshold is not None
            low = stats[0] < threshold
            suppressed += int(low.sum())
            stats = [np.where(low, np.nan, stats[0])]
        out = _read(query, stats, aux, meta)
        payload[name] = out.pop("value")
        for key, value in out.items():
            payload[f"{name}.{key}"] = value
    if policy == "threshold":
        payload["suppressed_cells"] = suppressed
    return Evaluation(payload=payload, statistics=m, epsilon_each=each, suppressed=suppressed)


def plan_from_result(result: Any) -> list[dict[str, Any]]:
    """Turn what a function returned (a Query, a list, or names to Queries) into a plan."""
    if isinstance(result, Query):
        items: list[tuple[str, Any]] = [("result", result)]
    elif isinstance(result, Mapping):
        items = [(str(k), v) for k, v in result.items()]
    elif isinstance(result, (list, tuple)):
        items = [(f"q{i}", v) for i, v in enumerate(result)]
    else:
        raise DataError(
            f"under a dp or threshold policy the function must return dp queries (dp.count, "
            f"dp.mean, ...), alone, in a list or in a dict; got {type(result).__name__}"
        )
    plan = []
    for name, query in items:
        if not isinstance(query, Query):
            raise DataError(f"{name!r} is a {type(query).__name__}, not a dp query")
        plan.append({"name": name, **query.to_dict()})
    return plan
