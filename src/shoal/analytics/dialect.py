"""The restricted SQL dialect of federated queries, parsed and validated with sqlglot.

A query aggregates: ``SELECT`` lists group keys and aggregates (``COUNT``, ``SUM``, ``AVG``,
``VAR``/``STDDEV``, quantiles, ``HISTOGRAM``) or arithmetic over them, from the job's table
and tables joined inside one party's database, with ``WHERE``, ``GROUP BY`` on columns,
``HAVING`` on aggregates, ``ORDER BY`` and ``LIMIT`` on the output. Anything else is refused
with a message naming the construct. Each party re-parses the SQL itself: a node never runs a
plan the coordinator built.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.analytics import _deps
from shoal.analytics.config import AnalyticsConfig
from shoal.errors import QueryError

__all__ = ["Aggregate", "Output", "Plan", "check_joins_under_dp", "evaluate", "parse"]

ROW_LEVEL = (
    "row-level output is refused: a federated query releases only aggregates, because rows "
    "would expose individual records of a party's data; aggregate the column (COUNT, SUM, "
    "AVG, VAR, STDDEV, quantiles, HISTOGRAM) or GROUP BY it"
)
# What each aggregate needs from the parties, per column (see stats.py for the blocks).
KINDS = (
    "count_rows",
    "count",
    "sum",
    "avg",
    "var_samp",
    "var_pop",
    "stddev_samp",
    "stddev_pop",
    "quantile",
    "histogram",
)
NEEDS_BOUNDS = frozenset(KINDS) - {"count_rows", "count"}
# A query's text is bounded before it is parsed: every party parses what a coordinator sends,
# and sqlglot's parsing time grows faster than the text (an IN list of 100,000 numbers took
# 45 s of a node's CPU; 20,000 characters parse in about a second on a loaded machine).
MAX_SQL_CHARS = 20_000


@dataclass(frozen=True)
class Aggregate:
    """One aggregate call: its kind, its column (SQL text), a quantile or histogram bins."""

    kind: str
    column: str | None = None
    q: float | None = None
    bins: int | None = None

    @property
    def bounds_name(self) -> str | None:
        """The column's name without its table qualifier: how bounds are declared."""
        return None if self.column is None else self.column.rsplit(".", 1)[-1].strip('"').lower()


@dataclass(frozen=True)
class Output:
    """An output column: a group key, or an expression over aggregates ``__a0``, ``__a1``..."""

    name: str
    key: int | None  # index into Plan.keys
    expr: Any  # sqlglot expression over aggregate placeholders (None for a key)


@dataclass(frozen=True)
class Plan:
    """A validated query: what each party computes and what the coordinator derives."""

    sql: str
    source: Any  # sqlglot Select: the FROM, JOINs and WHERE to run at each party
    keys: tuple[str, ...]  # SQL text of the GROUP BY columns
    key_names: tuple[str, ...]  # their unqualified lower-case names (categories are keyed so)
    aggregates: tuple[Aggregate, ...]
    outputs: tuple[Output, ...]
    having: Any  # sqlglot expression over placeholders, or None
    order: tuple[tuple[str, bool], ...]  # (output name, descending)
    limit: int | None
    _party_sql: dict[tuple[str, str | None, str], str] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def columns(self) -> tuple[str, ...]:
        """The value columns some aggregate reads, in first-use order."""
        seen: dict[str, None] = {}
        for agg in self.aggregates:
            if agg.column is not None:
                seen.setdefault(agg.column, None)
        return tuple(seen)

    def bounds_of(self, column: str) -> str:
        return column.rsplit(".", 1)[-1].strip('"').lower()

    def main_table(self, config: AnalyticsConfig) -> str:
        """How the query names the job's table: its alias, else its name (the first
        occurrence, if it is joined to itself)."""
        from_ = self.source.args.get("from_") or self.source.args.get("from")
        for src in [from_.this] + [j.this for j in self.source.args.get("joins") or []]:
            if src.name.lower() == config.table.lower():
                name: str = src.alias_or_name
                return name
        raise QueryError(f"the query must read the job's table: FROM {config.table}")

    def party_sql(self, config: AnalyticsConfig, dialect: str) -> str:
        """The SELECT a party runs: key columns, the privacy unit and the value columns
        (made once per table, privacy unit and SQL dialect: plans are shared, see parse)."""
        key = (config.table, config.privacy_unit, dialect)
        cached = self._party_sql.get(key)
        if cached is None:
            try:
                cached = self._party_sql[key] = self._make_party_sql(config, dialect)
            except RecursionError:  # as in parse: sqlglot writes SQL recursively
                raise QueryError(
                    "the query nests expressions too deeply; write it flatter"
                ) from None
        return cached

    def _make_party_sql(self, config: AnalyticsConfig, dialect: str) -> str:
        exp = _deps.sqlglot().exp
        select = self.source.copy()
        items = [exp.alias_(_column(k), f"k{i}") for i, k in enumerate(self.keys)]
        if config.privacy_unit is not None:
            # The unit is a column of the job's table: qualified by its name or alias, since
            # a joined table often holds the same column (JOIN patients USING (patient_id)
            # or ON v.patient_id = p.patient_id), where a bare name would be ambiguous.
            unit = _column(config.privacy_unit)
            unit.set("table", exp.to_identifier(self.main_table(config)))
            items.append(exp.alias_(unit, "u"))
        items += [exp.alias_(_column(c), f"c{i}") for i, c in enumerate(self.columns)]
        if not items:
            items = [exp.alias_(exp.Literal.number(1), "one")]
        select.set("expressions", items)
        sql: str = select.sql(dialect=dialect)
        return sql


def _column(text: str) -> Any:
    sqlglot = _deps.sqlglot()
    return sqlglot.parse_one(text, into=sqlglot.exp.Column)


def _allowed_scalar_types() -> tuple[type, ...]:
    exp = _deps.sqlglot().exp
    names = [
        "Column",
        "Identifier",
        "Literal",
        "Boolean",
        "Null",
        "Paren",
        "Not",
        "And",
        "Or",
        "Xor",
        "EQ",
        "NEQ",
        "GT",
        "GTE",
        "LT",
        "LTE",
        "Is",
        "In",
        "Between",
        "Like",
        "ILike",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "IntDiv",
        "Mod",
        "Neg",
        "Cast",
        "TryCast",
        "DataType",
        "DataTypeParam",
        "Abs",
        "Lower",
        "Upper",
        "Length",
        "Coalesce",
        "Round",
        "Floor",
        "Ceil",
        "Substring",
        "Extract",
        "Year",
        "Month",
        "Day",
        "Var",
        "Case",
        "If",
        "Concat",
        "DPipe",
        "Trim",
        "Least",
        "Greatest",
        "Sqrt",
        "Ln",
        "Exp",
        "Pow",
        "Sign",
        "Nullif",
        "StrPosition",
        "Left",
        "Right",
        "Tuple",
        "Date",
        "DateTrunc",
        "Interval",
        "TimeUnit",
        "RegexpLike",
        "Star",
    ]
    return tuple(getattr(exp, n) for n in names if hasattr(exp, n))


def _describe(node: Any) -> str:
    exp = _deps.sqlglot().exp
    if isinstance(node, exp.Anonymous):
        return f"function {node.name.upper()}()"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name()}()"
    return f"{type(node).__name__} ({node.sql()[:60]})"


def _check_scalar(node: Any, where: str) -> None:
    """Only plain scalar SQL may run at a party: no subqueries, table functions or UDFs."""
    exp = _deps.sqlglot().exp
    allowed = _allowed_scalar_types()
    for sub in node.walk():
        if isinstance(sub, (exp.Subquery, exp.Select, exp.Exists)):
            raise QueryError(f"{where}: subqueries are not in the federated SQL dialect")
        if isinstance(sub, exp.AggFunc):
            raise QueryError(f"{where}: an aggregate ({sub.sql()}) cannot appear here")
        if isinstance(sub, exp.Star):
            raise QueryError(f"{where}: '*' is not allowed here")
        if not isinstance(sub, allowed):
            raise QueryError(
                f"{where}: {_describe(sub)} is not in the federated SQL dialect; "
                "use comparisons, arithmetic, CASE, CAST and common string/number functions"
            )


def _literal_number(node: Any, what: str) -> float:
    exp = _deps.sqlglot().exp
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        return -_literal_number(node.this, what)
    if not isinstance(node, exp.Literal) or node.is_string:
        raise QueryError(f"{what} must be a number literal, got {node.sql()}")
    return float(node.this)


def _aggregate(node: Any, config: AnalyticsConfig) -> Aggregate:
    """The Aggregate an aggregate call stands for, or a QueryError naming what is wrong."""
    exp = _deps.sqlglot().exp

    def column_of(arg: Any, fn: str) -> str:
        if isinstance(arg, exp.Distinct):
            raise QueryError(
                f"{fn}(DISTINCT ...) is not supported: distinct counts across parties would "
                "need a secure-summed sketch of each party's values"
            )
        if not isinstance(arg, exp.Column) or isinstance(arg.this, exp.Star):
            raise QueryError(
                f"{fn}() takes a column, got {arg.sql()}; aggregate a column of the table "
                "(expressions have no declared bounds)"
            )
        _check_column(arg, config)
        text: str = arg.sql()
        return text

    if isinstance(node, exp.WithinGroup):
        inner, order = node.this, node.expression
        if not isinstance(inner, exp.PercentileCont) or not order.expressions:
            raise QueryError(f"{node.sql()} is not in the dialect; use PERCENTILE_CONT")
        q = _literal_number(inner.this, "the quantile")
        col = column_of(order.expressions[0].this, "PERCENTILE_CONT")
        return _quantile(col, q)
    if isinstance(node, exp.Count):
        arg = node.this
        if isinstance(arg, exp.Star):
            return Aggregate("count_rows")
        return Aggregate("count", column_of(arg, "COUNT"))
    simple: dict[type, str] = {
        exp.Sum: "sum",
        exp.Avg: "avg",
        exp.Variance: "var_samp",
        exp.VariancePop: "var_pop",
        exp.Stddev: "stddev_samp",
        exp.StddevPop: "stddev_pop",
    }
    if hasattr(exp, "StddevSamp"):
        simple[exp.StddevSamp] = "stddev_samp"
    kind = simple.get(type(node))
    if kind is not None:
        return Aggregate(kind, column_of(node.this, kind.upper()))
    if isinstance(node, exp.Median):
        return _quantile(column_of(node.this, "MEDIAN"), 0.5)
    if isinstance(node, exp.PercentileCont) and node.args.get("expression") is not None:
        return _quantile(
            column_of(node.this, "QUANTILE_CONT"),
            _literal_number(node.args["expression"], "the quantile"),
        )
    if isinstance(node, exp.ApproxQuantile):
        q = node.args.get("quantile")
        if q is None:
            raise QueryError("APPROX_QUANTILE(column, q) needs the quantile q")
        return _quantile(column_of(node.this, "APPROX_QUANTILE"), _literal_number(q, "q"))
    if isinstance(node, exp.Anonymous) and node.name.upper() == "VAR":  # T-SQL's name
        if len(node.expressions) != 1:
            raise QueryError("VAR(column) takes one column")
        return Aggregate("var_samp", column_of(node.expressions[0], "VAR"))
    if isinstance(node, exp.Anonymous) and node.name.upper() == "HISTOGRAM":
        args = node.expressions
        if not 1 <= len(args) <= 2:
            raise QueryError("HISTOGRAM(column[, bins]) takes a column and optionally bins")
        bins = config.bins
        if len(args) == 2:
            value = _literal_number(args[1], "HISTOGRAM's bins")
            if value != int(value) or not 1 <= value <= 100_000:
                raise QueryError(f"HISTOGRAM's bins must be an integer in [1, 100000], got {value}")
            bins = int(value)
        return Aggregate("histogram", column_of(args[0], "HISTOGRAM"), bins=bins)
    raise QueryError(
        f"{_describe(node)} is not in the federated SQL dialect; aggregates are COUNT(*), "
        "COUNT(col), SUM, AVG, VAR_SAMP/VARIANCE, VAR_POP, STDDEV/STDDEV_SAMP, STDDEV_POP, "
        "PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col), QUANTILE_CONT(col, q), "
        "APPROX_QUANTILE(col, q), MEDIAN(col) and HISTOGRAM(col[, bins])"
    )


def _quantile(column: str, q: float) -> Aggregate:
    if not 0.0 <= q <= 1.0:
        raise QueryError(f"a quantile must lie in [0, 1], got {q}")
    return Aggregate("quantile", column, q=q)


def _check_column(col: Any, config: AnalyticsConfig) -> None:
    if col.args.get("db") is not None or col.args.get("catalog") is not None:
        raise QueryError(f"column {col.sql()}: name columns as column or table.column")


def _check_tables(select: Any, config: AnalyticsConfig) -> None:
    exp = _deps.sqlglot().exp
    allowed = {t.lower() for t in config.tables}
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None:
        raise QueryError(f"a query needs FROM {config.table}")
    sources = [from_.this] + [j.this for j in select.args.get("joins") or []]
    for src in sources:
        if not isinstance(src, exp.Table) or not isinstance(src.this, exp.Identifier):
            raise QueryError(
                f"FROM/JOIN {src.sql()[:60]}: only tables of the party's database may be "
                f"read ({sorted(allowed)}); subqueries and table functions are refused"
            )
        if src.args.get("db") is not None or src.args.get("catalog") is not None:
            raise QueryError(f"table {src.sql()}: use the table's bare name")
        alias = src.args.get("alias")
        if alias is not None and alias.args.get("columns"):
            # FROM visits AS v(ward, patient_id) would rename the table's columns: the privacy
            # unit and the bounds are declared by column name, so a renamed column would
            # stand in for the unit (lifting the cap on rows per unit) or for a bounded one.
            raise QueryError(
                f"{src.sql()[:60]}: column aliases on a table are refused (renaming columns "
                "would change which column is the privacy unit or has which bounds); alias "
                "the table only, as in FROM visits v"
            )
        if src.name.lower() not in allowed:
            raise QueryError(
                f"table {src.name!r} is not declared for this job; it may read "
                f"{sorted(allowed)} (declare joinable tables as [analytics] join_tables)"
            )
    if not any(src.name.lower() == config.table.lower() for src in sources):
        raise QueryError(
            f"a query reads the job's table {config.table!r} (FROM {config.table}), to which "
            "its privacy unit and bounds belong; other tables may only be joined to it"
        )
    for join in select.args.get("joins") or []:
        if join.args.get("on") is not None:
            _check_scalar(join.args["on"], "JOIN ... ON")
        if join.args.get("method") or join.args.get("kind") in ("CROSS",):
            raise QueryError(f"{join.sql()[:60]}: only inner and outer joins with ON or USING")
    if config.privacy_unit is not None:
        main = next(s for s in sources if s.name.lower() == config.table.lower())
        _check_joins_keep_units(select, sources, main, config.privacy_unit)


def _check_joins_keep_units(select: Any, sources: list[Any], main: Any, unit: str) -> None:
    """Every joined row must belong to the privacy unit of the row it is joined to: each
    JOIN is tied by the unit (``USING (unit)``, or ``a.unit = b.unit`` among the ANDed
    conditions of its ON, with an earlier table), and may add NULLs only on its own side,
    never on the job's table (whose unit would be NULL).

    Otherwise one unit's row could carry another's values, and the cap of
    ``max_contributions`` rows per unit (which the noise is scaled to) would not bound what
    one person changes: ``FROM visits v JOIN patients p ON p.patient_id = 42`` copies one
    patient's columns into every unit's rows, so a count filtered on them tells, with
    all the rows' weight, what patient 42's are."""
    exp = _deps.sqlglot().exp
    unit = unit.lower()
    seen = [sources[0].alias_or_name.lower()]
    for join, src in zip(select.args.get("joins") or [], sources[1:]):
        name = src.alias_or_name.lower()
        what = join.sql()[:80]
        side = (join.args.get("side") or "").upper()
        if side in ("RIGHT", "FULL") or (side == "LEFT" and src is main):
            raise QueryError(
                f"{what}: a {side} join keeps rows without a row of the job's table, whose "
                "privacy unit would then be NULL; use an inner join, or a LEFT join from the "
                "job's table"
            )
        using = [
            (u.name if isinstance(u, exp.Identifier) else u.sql()).lower()
            for u in join.args.get("using") or []
        ]
        tied = unit in using
        on = join.args.get("on")
        for cond in on.flatten() if isinstance(on, exp.And) else [on] if on is not None else []:
            if not (isinstance(cond, exp.EQ) and _both_columns(cond, unit)):
                continue
            tables = {cond.this.table.lower(), cond.expression.table.lower()}
            if name in tables and (tables - {name}) and (tables - {name}) <= set(seen):
                tied = True
        if not tied:
            raise QueryError(
                f"{what}: a joined table's rows must belong to the same privacy unit as the "
                f"rows they join; tie the join by the unit: ON <earlier>.{unit} = {name}.{unit} "
                f"(AND other conditions), or USING ({unit})"
            )
        seen.append(name)


def check_joins_under_dp(plan: Plan, config: AnalyticsConfig) -> None:
    """Under DP a join needs a privacy unit: without one every row is a unit, and a row of a
    joined table that matches many rows would count many times (exact answers may join)."""
    if config.privacy_unit is None and plan.source.args.get("joins"):
        raise QueryError(
            "a join under differential privacy needs a privacy unit: declare [analytics] "
            "privacy_unit (a column of the job's table that the joined tables also hold), so "
            "that each unit's joined rows are capped at max_contributions"
        )


def _both_columns(cond: Any, unit: str) -> bool:
    exp = _deps.sqlglot().exp
    return all(
        isinstance(side, exp.Column) and side.name.lower() == unit and side.table
        for side in (cond.this, cond.expression)
    )


# Validated plans by (SQL, the public declarations): parsing is pure, and in a simulation the
# same query is parsed by every party of the process, twice per query with key selection
# (4.5 ms each: a tenth of a party's work for a heavy-hitters query). A plan is only read
# after parse (party_sql works on a copy of its tree), so parties share it.
PLAN_CACHE = 64
_plans: OrderedDict[tuple[str, str], Plan] = OrderedDict()
_plans_lock = threading.Lock()


def parse(sql: str, config: AnalyticsConfig) -> Plan:
    """Validate ``sql`` against the dialect and the job's declarations; raise QueryError."""
    if not isinstance(sql, str):
        return _parse(sql, config)
    key = (sql, json.dumps(config.to_json(), sort_keys=True, default=repr))
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    plan = _parse(sql, config)
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > PLAN_CACHE:
            _plans.popitem(last=False)
    return plan


def _parse(sql: str, config: AnalyticsConfig) -> Plan:
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("the query is empty; write SELECT <aggregates> FROM <table> ...")
    if len(sql) > MAX_SQL_CHARS:
        raise QueryError(
            f"the query is {len(sql)} characters long, over the dialect's {MAX_SQL_CHARS}: "
            "every party parses it; shorten it (a long IN list of categories can become a "
            "declared category column, or a join table)"
        )
    try:
        return _validate(sql, config)
    except RecursionError:
        # sqlglot parses and walks nested expressions recursively: about 50 nested
        # parentheses, or a few hundred nested CASE/NOT, exhaust Python's stack.
        raise QueryError(
            "the query nests expressions too deeply to be parsed (parentheses, CASE or NOT "
            "inside one another); write it flatter"
        ) from None


def _validate(sql: str, config: AnalyticsConfig) -> Plan:
    sqlglot = _deps.sqlglot()
    exp = sqlglot.exp
    try:
        trees = sqlglot.parse(sql, read="duckdb")
    except sqlglot.errors.ParseError as exc:
        raise QueryError(f"the query is not valid SQL: {str(exc).splitlines()[0]}") from None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        raise QueryError("send one SELECT statement per query")
    tree = trees[0]
    if not isinstance(tree, exp.Select):
        raise QueryError(
            f"{type(tree).__name__.upper()} statements are not in the dialect: a federated "
            "query is one SELECT of aggregates (no UNION, INSERT, CTE or DDL)"
        )
    for arg, what in (
        ("with", "WITH (common table expressions)"),
        ("with_", "WITH (common table expressions)"),
        ("distinct", "SELECT DISTINCT"),
        ("offset", "OFFSET"),
        ("qualify", "QUALIFY"),
        ("windows", "WINDOW"),
    ):
        if tree.args.get(arg):
            raise QueryError(f"{what} is not in the federated SQL dialect")
    if any(isinstance(n, exp.Window) for n in tree.walk()):
        raise QueryError("window functions (OVER ...) are not in the federated SQL dialect")
    if any(isinstance(n, exp.TableSample) for n in tree.walk()):
        raise QueryError(
            "TABLESAMPLE / USING SAMPLE is not in the federated SQL dialect (each party "
            "already keeps a random subset of at most max_contributions rows per unit)"
        )
    _check_tables(tree, config)
    where = tree.args.get("where")
    if where is not None:
        _check_scalar(where.this, "WHERE")

    keys: list[str] = []
    key_names: list[str] = []
    group = tree.args.get("group")
    for key in group.expressions if group is not None else []:
        if not isinstance(key, exp.Column) or isinstance(key.this, exp.Star):
            raise QueryError(
                f"GROUP BY {key.sql()}: group by columns only (for bins of a value, use "
                "HISTOGRAM(column, bins))"
            )
        _check_column(key, config)
        keys.append(key.sql())
        key_names.append(key.name.lower())

    aggregates: list[Aggregate] = []
    index: dict[Aggregate, int] = {}

    def placeholder(node: Any) -> Any:
        if isinstance(node, (exp.AggFunc, exp.WithinGroup)) or (
            isinstance(node, exp.Anonymous) and node.name.upper() in ("HISTOGRAM", "VAR")
        ):
            agg = _aggregate(node, config)
            if agg.kind in NEEDS_BOUNDS and agg.bounds_name not in config.bounds:
                raise QueryError(
                    f"{node.sql()} needs bounds for column {agg.bounds_name!r}: declare them "
                    f"in [analytics] bounds, e.g. bounds = {{ {agg.bounds_name} = [low, high] }}; "
                    "values are clamped to them so that one record's influence is bounded"
                )
            if agg not in index:
                index[agg] = len(aggregates)
                aggregates.append(agg)
            return exp.column(f"__a{index[agg]}")
        return node

    outputs: list[Output] = []
    for item in tree.expressions:
        name = item.alias if isinstance(item, exp.Alias) else item.sql()
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, exp.Star) or (
            isinstance(node, exp.Column) and isinstance(node.this, exp.Star)
        ):
            raise QueryError(f"SELECT *: {ROW_LEVEL}")
        if isinstance(node, exp.Column):
            text = node.sql()
            match = [
                i for i, k in enumerate(keys) if k == text or key_names[i] == node.name.lower()
            ]
            if not match:
                raise QueryError(f"selecting column {text} without an aggregate: {ROW_LEVEL}")
            name = item.alias if isinstance(item, exp.Alias) else node.name
            outputs.append(Output(name=name, key=match[0], expr=None))
            continue
        replaced = node.copy().transform(placeholder)
        _check_output(replaced, item.sql())
        outputs.append(Output(name=name, key=None, expr=replaced))
    if not outputs:
        raise QueryError("SELECT lists nothing to compute")
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise QueryError(f"output columns need distinct names, got {names}; use AS")

    having = tree.args.get("having")
    having_expr = None
    if having is not None:
        having_expr = having.this.copy().transform(placeholder)
        _check_output(having_expr, "HAVING " + having.this.sql(), allow_keys=key_names)

    order: list[tuple[str, bool]] = []
    order_arg = tree.args.get("order")
    for ordered in order_arg.expressions if order_arg is not None else []:
        target = ordered.this
        text = target.sql()
        found = next((o.name for o in outputs if o.name == text or o.name == target.name), None)
        if found is None:
            raise QueryError(f"ORDER BY {text}: order by an output column's name or alias")
        order.append((found, bool(ordered.args.get("desc"))))

    limit = None
    limit_arg = tree.args.get("limit")
    if limit_arg is not None:
        value = _literal_number(limit_arg.expression, "LIMIT")
        if value != int(value) or value < 1:
            raise QueryError(f"LIMIT must be a positive integer (the k of a top-k), got {value}")
        limit = int(value)

    source = tree.copy()
    for arg in ("group", "having", "order", "limit"):
        source.set(arg, None)
    return Plan(
        sql=sql,
        source=source,
        keys=tuple(keys),
        key_names=tuple(key_names),
        aggregates=tuple(aggregates),
        outputs=tuple(outputs),
        having=having_expr,
        order=tuple(order),
        limit=limit,
    )


def _check_output(node: Any, where: str, allow_keys: tuple[str, ...] | list[str] = ()) -> None:
    """Outputs and HAVING combine aggregates with arithmetic, comparisons and literals."""
    exp = _deps.sqlglot().exp
    allowed = (
        exp.Column,
        exp.Identifier,
        exp.Literal,
        exp.Paren,
        exp.Neg,
        exp.Add,
        exp.Sub,
        exp.Mul,
        exp.Div,
        exp.Not,
        exp.And,
        exp.Or,
        exp.EQ,
        exp.NEQ,
        exp.GT,
        exp.GTE,
        exp.LT,
        exp.LTE,
        exp.Boolean,
    )
    for sub in node.walk():
        if isinstance(sub, exp.Column) and not sub.name.startswith("__a"):
            if sub.name.lower() in allow_keys:
                continue
            raise QueryError(f"{where}: column {sub.sql()} outside an aggregate: {ROW_LEVEL}")
        if not isinstance(sub, allowed):
            raise QueryError(
                f"{where}: {_describe(sub)} is not allowed around aggregates; combine them "
                "with + - * / and comparisons"
            )


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b if b != 0 else math.nan,
    "EQ": lambda a, b: a == b,
    "NEQ": lambda a, b: a != b,
    "GT": lambda a, b: a > b,
    "GTE": lambda a, b: a >= b,
    "LT": lambda a, b: a < b,
    "LTE": lambda a, b: a <= b,
    "And": lambda a, b: bool(a) and bool(b),
    "Or": lambda a, b: bool(a) or bool(b),
}


def evaluate(node: Any, env: Mapping[str, Any]) -> Any:
    """Value of an output or HAVING expression, given aggregate values (and group keys) by
    name. NULL (None) propagates as in SQL; a comparison with NULL is not true."""
    exp = _deps.sqlglot().exp
    if isinstance(node, exp.Column):
        name = node.name if node.name.startswith("__a") else node.name.lower()
        return env[name]
    if isinstance(node, exp.Literal):
        return node.this if node.is_string else float(node.this)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Paren):
        return evaluate(node.this, env)
    if isinstance(node, exp.Neg):
        v = evaluate(node.this, env)
        return None if v is None else -v
    if isinstance(node, exp.Not):
        v = evaluate(node.this, env)
        return None if v is None else not v
    op = _BINARY.get(type(node).__name__)
    if op is None:  # parse() admits nothing else
        raise QueryError(f"cannot evaluate {node.sql()}")
    a, b = evaluate(node.this, env), evaluate(node.expression, env)
    if a is None or b is None or _isnan(a) or _isnan(b):
        return None
    return op(a, b)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
