"""The coordinator side: ``query(fed, sql, config=...)`` answers a query across parties.

Each party computes its statistics (tasks.py); SecAgg+ sums them, so the coordinator sees
only the sum; DP noise is either already inside it (distributed) or added here (central).
The answer carries error bars (the standard error the DP noise causes, by simulating the
released noise) and discloses the bounds, clamping, NULLs and failed parties.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.analytics.config import AnalyticsConfig, Privacy
from shoal.analytics.dialect import Plan, check_joins_under_dp, evaluate, parse
from shoal.analytics.party import Domain, key_from_bytes, key_of
from shoal.analytics.stats import (
    Block,
    answer,
    blocks_for,
    check_size,
    laplace_scales,
    scales,
    unflatten,
)
from shoal.analytics.tasks import (
    CHECK_TASK,
    KEYS_TASK,
    STATS_TASK,
    SkellamLayout,
    join_exact,
    secure_range,
    skellam_layout,
)
from shoal.errors import NotEnoughNodes, QueryError

__all__ = ["QueryResult", "heavy_hitters", "query"]

DRAWS = 200  # noise draws simulated for the error bars
MIN_PARTIES = 3


@dataclass(frozen=True, kw_only=True)
class QueryResult:
    """Rows of the answer, with an error (std) per cell under DP and what was disclosed."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    errors: tuple[tuple[float | None, ...], ...] | None
    epsilon: float  # spent by this query at every party that answered (0 when exact)
    mode: str  # exact | distributed | central
    parties: tuple[str, ...]
    failures: Mapping[str, str] = field(default_factory=dict)
    disclosed: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "columns": list(self.columns),
            "rows": [list(r) for r in self.rows],
            "mode": self.mode,
            "epsilon": self.epsilon,
            "parties": list(self.parties),
            "failures": dict(self.failures),
            "disclosed": dict(self.disclosed),
            "notes": list(self.notes),
        }
        if self.errors is not None:
            out["error"] = [list(e) for e in self.errors]
        return out

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r)) for r in self.rows]


class _Summer:
    """Runs one statistics task at the parties and brings back its (noised) secure sum."""

    def __init__(self, fed: Any, privacy: Privacy | None, min_nodes: int | None) -> None:
        self.fed = fed
        self.privacy = privacy
        self.min_nodes = min_nodes
        self.group = fed.all()
        self.shares = len(self.group)  # parties the noise of the current sum is split over
        self.failures: dict[str, str] = {}
        self.parties: tuple[str, ...] = ()
        self.notes: list[str] = []

    def run(
        self,
        task: str,
        payload: dict[str, Any],
        laplace: np.ndarray | None,
        skellam: SkellamLayout | None = None,
    ) -> np.ndarray:
        """The summed vector, un-noised (exact) or with Laplace(``laplace``) noise in total;
        with ``skellam``, the summed integers, carrying Skellam(mu) noise in total."""
        from shoal.aggregate import Chain
        from shoal.crypto import SecureSum

        priv = self.privacy
        payload = dict(payload)
        epsilon = payload.pop("epsilon", None)
        group = self.group
        if priv is not None and priv.mode == "distributed":
            # The noise is split over the parties that will be in the sum, and each adds its
            # share before the coordinator learns who failed: so first ask every party
            # whether it can answer (its tables and columns, its owner's rules and budget),
            # charging and reading nothing, and split the noise over those that can. A party
            # whose owner requires DP refuses a sum with fewer members than shares.
            check = {**payload, "task": task, "privacy": self._privacy(epsilon, 0, skellam)}
            group = self.fed.group(self._map(group, CHECK_TASK, check).node_ids)
        self.shares = len(group)
        payload["privacy"] = self._privacy(epsilon, self.shares, skellam)
        values = self._map(group, task, payload)
        # Small federations tolerate no dropout inside the secure sum (SecAgg+ needs
        # 2D + 1 neighbours to survive D); from 5 parties on, a tenth may drop out.
        dropouts = 0.1 if len(values.node_ids) >= 5 else 0.0
        if skellam is not None:
            value_range = skellam.secure_range()
        else:
            value_range = secure_range(laplace if priv is not None else None)
        secure = SecureSum(value_range=value_range, bits=64, dropout_fraction=dropouts)
        reduced = Chain.of(secure).reduce(values)
        for node, reason in (values.exclusions or {}).items():
            self.failures.setdefault(node, reason)
        self.parties = tuple(reduced.node_ids)
        total = np.asarray(reduced.vector, dtype=np.float64)
        if priv is None:
            return join_exact(total)
        if skellam is not None:
            return self._skellam_total(np.round(join_exact(total) * skellam.bound), skellam)
        if laplace is None:
            return total
        rng = np.random.default_rng()  # OS entropy: the noise must stay unknown
        if priv.mode == "central":
            return total + rng.laplace(0.0, laplace)
        shares, survivors = self.shares, len(reduced.node_ids)
        if survivors < shares:
            # Fewer noise shares than planned reached the sum: top the noise up to the full
            # Laplace here (that part is central noise), and say so.
            missing = (shares - survivors) / shares
            total = total + rng.gamma(missing, laplace) - rng.gamma(missing, laplace)
            note = (
                f"{shares - survivors} of {shares} parties dropped out after the noise was "
                "split; the coordinator added their share of the noise (central)"
            )
            if note not in self.notes:
                self.notes.append(note)
        return total

    def _privacy(
        self, epsilon: Any, shares: int, skellam: SkellamLayout | None
    ) -> dict[str, Any] | None:
        priv = self.privacy
        if priv is None:
            return None
        out: dict[str, Any] = {"epsilon": epsilon, "mode": priv.mode, "shares": max(shares, 1)}
        if skellam is not None:
            out |= {"noise": "skellam", "delta": priv.delta}
        return out

    def _map(self, group: Any, task: str, payload: dict[str, Any]) -> Any:
        """Run ``task`` at ``group``; every party that fails is recorded with its reason, and
        too few answering is an error that names each of them."""
        values = group.map(task, min_nodes=0, **payload)
        for node, failure in values.failures.items():
            self.failures[node] = f"{failure.kind.value}: {failure.detail}"
        answered = len(values.node_ids)
        needed = max(self.min_nodes or self.fed.min_nodes, MIN_PARTIES)
        if answered < needed:
            reasons = "; ".join(
                f"{node}: {reason.strip().splitlines()[0][:300]}"
                for node, reason in self.failures.items()
            )
            raise NotEnoughNodes(
                f"only {answered} of {len(self.group)} parties can answer this query, fewer "
                f"than min_nodes ({needed}; a secure sum needs at least {MIN_PARTIES}, since "
                "with two each could subtract its own value from the sum)"
                + (f". Parties that did not answer: {reasons}" if reasons else "")
            )
        return values

    def _skellam_total(self, ints: np.ndarray, layout: SkellamLayout) -> np.ndarray:
        from shoal.privacy import skellam_noise

        shares, survivors = self.shares, len(self.parties)
        if survivors < shares:  # as for Laplace: top the missing shares up here, and say so
            rng = np.random.default_rng()  # OS entropy
            ints = ints + skellam_noise(
                rng, mu=layout.mu * (shares - survivors) / shares, size=ints.size
            )
            note = (
                f"{shares - survivors} of {shares} parties dropped out after the noise was "
                "split; the coordinator added their share of the noise (central)"
            )
            if note not in self.notes:
                self.notes.append(note)
        return ints


def query(
    fed: Any,
    sql: str,
    *,
    config: AnalyticsConfig,
    privacy: Privacy | None = None,
    min_nodes: int | None = None,
) -> QueryResult:
    """Answer ``sql`` over the federation's parties: exact through the secure sum alone
    (``privacy=None``), or epsilon-DP with noise added by the parties or the coordinator.

    Raises QueryError for a query outside the dialect, NotEnoughNodes if fewer than
    ``min_nodes`` parties answer (the failed ones are named, with reasons).
    """
    plan = parse(sql, config)
    if privacy is not None:
        check_joins_under_dp(plan, config)
    summer = _Summer(fed, privacy, min_nodes)
    dp = privacy is not None
    epsilon = privacy.epsilon if privacy is not None else 0.0
    notes: list[str] = []
    keys: list[str] | None = None
    selection_eps = 0.0
    undeclared = [k for k in plan.key_names if k not in config.categories]
    numeric = [k for k in undeclared if k in config.bounds]
    if numeric:
        raise QueryError(
            f"GROUP BY {numeric}: key selection (heavy hitters) finds text keys, and these "
            "columns have numeric bounds; declare their categories, or use HISTOGRAM(...) "
            "or quantiles"
        )
    if undeclared:
        if privacy is not None:
            selection_eps = privacy.epsilon * privacy.key_selection_share
        keys, spent = select_keys(summer, plan, config, selection_eps)
        notes.append(
            f"GROUP BY {undeclared}: {len(keys)} key(s) released by key selection"
            + (f" (epsilon {spent:.4g} of {selection_eps:.4g} used)" if dp else "")
        )
        selection_eps = spent
        if dp and not keys:
            notes.append(_nothing_released(config, selection_eps))
    domain = Domain(plan, config, keys)
    mode = "exact" if privacy is None else privacy.mode
    if len(domain) == 0:  # key selection released no key: nothing left to ask or to spend
        return QueryResult(
            columns=tuple(o.name for o in plan.outputs),
            rows=(),
            errors=() if dp else None,
            epsilon=selection_eps,
            mode=mode,
            parties=summer.parties,
            failures=dict(summer.failures),
            notes=tuple(notes + summer.notes),
        )
    blocks = blocks_for(plan, config, dp=dp)
    n_groups = len(domain) + (0 if dp else 1)
    check_size(blocks, n_groups)
    bound = scales(blocks, plan, config)
    scale_vec = np.concatenate([np.full(b.cells(n_groups), bound[b.name]) for b in blocks])
    eps_stats = epsilon - selection_eps
    lap_vec = None
    lap: dict[str, float] = {}
    layout = None
    if privacy is not None and privacy.noise == "skellam":
        layout = skellam_layout(
            blocks, plan, config, n_groups=n_groups, epsilon=eps_stats, delta=privacy.delta
        )
        notes.append(
            f"discrete Skellam noise added by the parties (epsilon {eps_stats:.4g}, delta "
            f"{privacy.delta:g} for the statistics; key selection, if any, is Laplace)"
        )
    elif dp:
        lap = laplace_scales(blocks, config, eps_stats)
        lap_vec = np.concatenate(
            [np.full(b.cells(n_groups), lap[b.name] / bound[b.name]) for b in blocks]
        )
    payload = {
        "sql": sql,
        "config": config.to_json(),
        "keys": keys,
        "epsilon": eps_stats,
    }
    if layout is not None:
        total = summer.run(STATS_TASK, payload, None, layout) / layout.step
    else:
        total = summer.run(STATS_TASK, payload, lap_vec) * scale_vec
    stats = unflatten(total, blocks, n_groups)
    if not dp:  # counts are integers; the fixed-point sum is only within 1e-6 of them
        for b in blocks:
            if b.kind in ("rows", "n", "nulls", "clamped", "hist"):
                stats[b.name] = np.round(stats[b.name])
    draws = None
    if layout is not None:
        from shoal.privacy import skellam_noise

        rng = np.random.default_rng()
        noise = skellam_noise(rng, mu=layout.mu, size=DRAWS * total.size)
        draws = unflatten(total + noise.reshape(DRAWS, total.size) / layout.step, blocks, n_groups)
    elif dp:
        rng = np.random.default_rng()
        lap_abs = np.concatenate([np.full(b.cells(n_groups), lap[b.name]) for b in blocks])
        draws = unflatten(
            total + rng.laplace(0.0, lap_abs, size=(DRAWS, total.size)), blocks, n_groups
        )
    result = _assemble(plan, config, domain, blocks, stats, draws, dp=dp)
    columns, rows, errors, disclosed = result
    return QueryResult(
        columns=columns,
        rows=rows,
        errors=errors,
        epsilon=epsilon if dp else 0.0,
        mode=mode,
        parties=summer.parties,
        failures=dict(summer.failures),
        disclosed=disclosed,
        notes=tuple(notes + summer.notes),
    )


def heavy_hitters(
    fed: Any,
    column: str,
    *,
    k: int,
    config: AnalyticsConfig,
    privacy: Privacy | None = None,
    where: str | None = None,
    min_nodes: int | None = None,
) -> QueryResult:
    """The ``k`` most frequent values of ``column`` across the parties (rows per value,
    ``n``), most frequent first: ``SELECT column, COUNT(*) AS n ... GROUP BY column ORDER BY
    n DESC LIMIT k``, answered by key selection on secure-summed sketches. Under DP fewer
    than k rows come back when fewer keys pass the release threshold (``notes`` say why)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QueryError(f"heavy hitters need k >= 1 (how many values to return), got {k!r}")
    if not isinstance(column, str) or not column.isidentifier():
        raise QueryError(f"heavy hitters need a column name, got {column!r}")
    filt = f" WHERE {where}" if where else ""
    sql = (
        f"SELECT {column}, COUNT(*) AS n FROM {config.table}{filt} GROUP BY {column} "
        f"ORDER BY n DESC LIMIT {k}"
    )
    return query(fed, sql, config=config, privacy=privacy, min_nodes=min_nodes)


def _nothing_released(config: AnalyticsConfig, epsilon: float) -> str:
    """Why DP key selection released nothing: the least count a key needed to be seen."""
    from shoal.analytics.sketch import SYMBOLS, threshold
    from shoal.analytics.tasks import sketch_noise_scale

    scale = sketch_noise_scale(config, epsilon)
    least = threshold(scale, config.sketch_depth, SYMBOLS)
    return (
        f"no key was released: at epsilon {epsilon:.4g} for key selection, the Laplace noise "
        f"in each sketch cell has scale {scale:.4g}, and a key needs an estimated count of "
        f"about {least:.4g} rows or more on every level; raise epsilon (or "
        "key_selection_share), or lower max_key_bytes or max_contributions"
    )


def select_keys(
    summer: _Summer, plan: Plan, config: AnalyticsConfig, epsilon: float
) -> tuple[list[str], float]:
    """Key selection (federated heavy hitters): find the group keys present across parties
    through secure-summed Count-Min sketches of their prefixes (sketch.py).

    One round: every party sketches its bounded rows' key prefixes on all ``max_key_bytes +
    1`` levels with hashes from a fresh per-query seed, under DP adds its share of Laplace
    noise (each level spends epsilon / levels), and SecAgg+ sums the tables. The coordinator
    then walks the prefix tree on the noised sum: candidates are the released prefixes
    extended by each byte or the end of the key (a public domain, so the walk is
    post-processing), kept when their Count-Min estimate passes a threshold set from the
    noise. Returns the keys (as key_of text), highest estimate first, and the epsilon spent.
    """
    from shoal.analytics.sketch import decode
    from shoal.analytics.tasks import sketch_noise_scale, sketch_shape

    dp = summer.privacy is not None
    seed = int.from_bytes(os.urandom(8), "little") >> 1  # public, fresh: no key is favoured
    shape = sketch_shape(config, seed)
    scale = sketch_noise_scale(config, epsilon) if dp else 0.0
    lap = np.full(shape.size, scale / config.max_rows) if dp else None
    payload = {"sql": plan.sql, "config": config.to_json(), "seed": seed, "epsilon": epsilon}
    total = summer.run(KEYS_TASK, payload, lap) * config.max_rows
    table = total.reshape(shape.levels, shape.depth, shape.width)
    found, overflowed = decode(table, shape, noise_scale=scale, max_keys=config.max_groups)
    if overflowed and not dp:
        raise QueryError(
            f"GROUP BY {list(plan.key_names)} has more than max_groups ({config.max_groups}) "
            "candidate keys; raise [analytics] max_groups (or sketch_width, if most of them "
            "are collisions) or declare the column's categories"
        )
    keys: list[str] = []
    for _, raw in found:
        try:
            values = key_from_bytes(raw)
        except (ValueError, UnicodeDecodeError):
            continue  # noise or a collision can complete a prefix that is no valid key
        if len(values) == len(plan.keys):
            key = key_of(values)
            if key not in keys:
                keys.append(key)
    return sorted(keys), epsilon if dp else 0.0


def _assemble(
    plan: Plan,
    config: AnalyticsConfig,
    domain: Domain,
    blocks: Sequence[Block],
    stats: Mapping[str, np.ndarray],
    draws: Mapping[str, np.ndarray] | None,
    *,
    dp: bool,
) -> tuple[
    tuple[str, ...],
    tuple[tuple[Any, ...], ...],
    tuple[tuple[float | None, ...], ...] | None,
    dict[str, Any],
]:
    n = len(domain)
    values = [answer(a, plan, config, dict(stats), dp=dp) for a in plan.aggregates]
    spreads = (
        [answer(a, plan, config, dict(draws), dp=True) for a in plan.aggregates]
        if draws is not None
        else None
    )
    rows_block = stats.get("rows")
    out_rows: list[tuple[Any, ...]] = []
    out_err: list[tuple[float | None, ...]] = []
    for g in range(n):
        if not dp and plan.keys and rows_block is not None and rows_block[g, 0] <= 0.5:
            continue  # SQL shows no empty groups (DP answers show every public group)
        env: dict[str, Any] = {}
        for i, a in enumerate(plan.aggregates):
            env[f"__a{i}"] = _cell(values[i][g], a.kind, dp)
        for j, name in enumerate(plan.key_names):
            env[name] = domain.tuples[g][j]
        if plan.having is not None and evaluate(plan.having, env) is not True:
            continue
        row: list[Any] = []
        err: list[float | None] = []
        for o in plan.outputs:
            if o.key is not None:
                row.append(domain.tuples[g][o.key])
                err.append(None)
                continue
            value = evaluate(o.expr, env)
            row.append(value)
            if spreads is not None:
                sample = _evaluate_draws(
                    o.expr, {f"__a{i}": s[:, g] for i, s in enumerate(spreads)}
                )
                err.append(_spread(sample))
        out_rows.append(tuple(row))
        out_err.append(tuple(err))
    order = list(range(len(out_rows)))
    names = [o.name for o in plan.outputs]
    for name, desc in reversed(plan.order):
        j = names.index(name)
        order.sort(key=lambda r: _sort_key(out_rows[r][j]), reverse=desc)
    if plan.limit is not None:
        order = order[: plan.limit]
    disclosed = _disclosed(plan, config, blocks, stats, n, draws=draws)
    return (
        tuple(names),
        tuple(out_rows[r] for r in order),
        tuple(out_err[r] for r in order) if dp else None,
        disclosed,
    )


def _cell(value: Any, kind: str, dp: bool) -> Any:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim:  # a histogram: its bin counts
        return [float(v) if dp else round(float(v)) for v in arr]
    v = float(arr)
    if math.isnan(v):
        return None
    if not dp and kind in ("count_rows", "count"):
        return round(v)
    return v


def _evaluate_draws(node: Any, env: Mapping[str, np.ndarray]) -> np.ndarray:
    """An output expression over simulated noise draws (arithmetic only, elementwise)."""
    from shoal.analytics import _deps

    exp = _deps.sqlglot().exp
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(node, exp.Column):
            return np.asarray(env[node.name], dtype=np.float64)
        if isinstance(node, exp.Literal):
            return np.asarray(float(node.this))
        if isinstance(node, exp.Paren):
            return _evaluate_draws(node.this, env)
        if isinstance(node, exp.Neg):
            return -_evaluate_draws(node.this, env)
        a, b = _evaluate_draws(node.this, env), _evaluate_draws(node.expression, env)
        ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
        op = ops.get(type(node).__name__)
        if op is None:
            raise QueryError(f"cannot evaluate {node.sql()}")
        return np.asarray(op(a, b))


def _spread(sample: np.ndarray) -> float | None:
    """Standard deviation across noise draws (per bin, averaged, for a histogram)."""
    arr = np.asarray(sample, dtype=np.float64)
    if arr.ndim > 1:
        arr = arr.reshape(arr.shape[0], -1)
        stds = np.nanstd(arr, axis=0) if np.isfinite(arr).any() else np.array([np.nan])
        s = float(np.nanmean(stds))
    else:
        finite = arr[np.isfinite(arr)]
        s = float(np.std(finite)) if finite.size > 1 else math.nan
    return None if math.isnan(s) else s


def _sort_key(v: Any) -> tuple[int, Any]:
    if v is None:
        return (1, 0)
    if isinstance(v, (int, float)):
        return (0, float(v))
    return (0, str(v)) if not isinstance(v, list) else (0, sum(v))


def _disclosed(
    plan: Plan,
    config: AnalyticsConfig,
    blocks: Sequence[Block],
    stats: Mapping[str, np.ndarray],
    n: int,
    *,
    draws: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """What the answer discloses beyond its cells: bounds, clamping, NULLs, dropped rows;
    under DP (``draws``: simulated re-draws of the noise) the NULL and clamped counts are
    noisy (released with the query's epsilon, counted over the public groups) and carry
    their standard error."""
    dp = draws is not None
    out: dict[str, Any] = {
        "max_contributions": config.max_contributions,
        "privacy_unit": config.privacy_unit,
    }
    columns: dict[str, Any] = {}
    for i, col in enumerate(plan.columns):
        entry: dict[str, Any] = {}
        name = plan.bounds_of(col)
        if name in config.bounds:
            entry["bounds"] = list(config.bounds[name])
        for kind, key in (("nulls", "null_rows_ignored"), ("clamped", "values_clamped")):
            counts = stats.get(f"{kind}:c{i}")
            if counts is None:
                continue
            # One number over the groups (Block.total): under DP a noisy count over the
            # public groups, with its standard error.
            if draws is not None:
                entry[key] = float(counts[0, 0])
                entry[f"{key}_error"] = _spread(draws[f"{kind}:c{i}"][:, 0, 0])
            else:
                entry[key] = round(float(counts[0, 0]))
        columns[col] = entry
    out["columns"] = columns
    rows = stats.get("rows")
    if not dp and rows is not None and plan.keys:
        out["rows_outside_groups"] = round(float(rows[n:, 0].sum()))
    return out
