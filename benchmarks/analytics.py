"""Federated analytics: exactness against DuckDB, DP error against smartnoise-sql, latency.

A generated table (person_id, age, income in thousands, region, sex; one row per person) is
split over ``--parties`` DuckDB files of ``--rows`` rows each, and pooled in one DuckDB
table as the reference.

* exactness: each query without [privacy] (secure sum only) against DuckDB on the pooled
  rows; the largest relative difference per query, and quantiles' distance in bins.
* dp_error: 10 queries, each answered ``--repeats`` times by shoal with distributed noise
  (every party adds a Gamma-difference share of the Laplace noise inside the secure sum)
  and by smartnoise-sql with central DP on the pooled table, at the same epsilon: shoal's
  epsilon per query is what smartnoise's odometer charges for it (1 per mechanism, e.g. 2
  for an AVG). The mean absolute error over cells and repeats, against the truth on the
  clamped pooled rows, and shoal's error divided by smartnoise's (target: <= 1.2).
  Each error comes with its standard error over the repeats, and for a query releasing one
  count or sum per cell, the ratio it estimates: both sides' Laplace scales (shoal's
  ``laplace_scales``, smartnoise's accuracy interval at alpha = 1/e), since a Laplace(b)
  draw's mean absolute error is b. ``--dp-queries`` picks queries (0-based) to repeat more.
  smartnoise-sql is not a dependency of shoal; it runs in its own virtualenv:

      python -m venv /work/venvs/smartnoise
      /work/venvs/smartnoise/bin/pip install smartnoise-sql pandas

  and ``--smartnoise-python /work/venvs/smartnoise/bin/python`` (the default) names it.
* latency: wall seconds of the same query answered by shoal (exact, and distributed DP)
  over the parties, and by DuckDB on the pooled rows, interleaved, medians of ``--repeats``.
* heavy_hitters: if ../shared/data/tinyshakespeare.txt is there, the 10 most frequent
  words across 1,000 role stretches (shoal.data.split_roles: the file has 299 speaker
  names) by GROUP BY on undeclared keys under DP (secure-summed Count-Min sketches, then the
  aggregate round): precision and recall against the true top 10, per epsilon, seconds.

    python benchmarks/analytics.py --parties 3 --rows 1000 \
        --skip exactness dp_error latency --json hh.json

    python benchmarks/analytics.py --parties 10 --rows 100000 --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from shoal.analytics import AnalyticsConfig, Party, Privacy, query
from shoal.analytics.dialect import parse
from shoal.analytics.simulate import federation
from shoal.analytics.stats import blocks_for, laplace_scales

BOUNDS = {"age": [0, 100], "income": [0, 200]}
CATEGORIES = {"region": ["north", "south", "east", "west", "centre"], "sex": ["F", "M"]}
EXACT_QUERIES = [
    "SELECT COUNT(*) AS n FROM t",
    "SELECT region, COUNT(*) AS n, SUM(income) AS s FROM t GROUP BY region ORDER BY region",
    "SELECT sex, AVG(age) AS a, VAR_SAMP(income) AS v FROM t WHERE age > 30 GROUP BY sex "
    "ORDER BY sex",
    "SELECT region, STDDEV_POP(age) AS s FROM t GROUP BY region HAVING COUNT(*) > 10 "
    "ORDER BY region",
    "SELECT SUM(income) / COUNT(*) AS per_person FROM t WHERE sex = 'F'",
]
QUANTILE_QUERY = (
    "SELECT region, QUANTILE_CONT(income, {q}) AS x FROM t GROUP BY region ORDER BY region"
)
# Queries both shoal and smartnoise-sql answer (smartnoise names the table public.t).
DP_QUERIES = [
    "SELECT COUNT(*) AS n FROM t",
    "SELECT SUM(income) AS s FROM t",
    "SELECT AVG(age) AS a FROM t",
    "SELECT COUNT(*) AS n FROM t WHERE age > 60",
    "SELECT region, COUNT(*) AS n FROM t GROUP BY region",
    "SELECT region, SUM(income) AS s FROM t GROUP BY region",
    "SELECT region, AVG(income) AS a FROM t GROUP BY region",
    "SELECT sex, VAR(age) AS v FROM t GROUP BY sex",
    "SELECT STDDEV(income) AS s FROM t",
    "SELECT region, sex, COUNT(*) AS n FROM t GROUP BY region, sex",
]
MIN_USES = 3  # heavy hitters: a party's words are those it uses at least this often
HH_CAP = 10  # ... of which each party (one privacy unit) contributes at most this many
HH_KEY_BYTES = 4  # the true top 10 words are at most 4 bytes long
LATENCY_QUERY = "SELECT region, COUNT(*) AS n, AVG(income) AS a FROM t GROUP BY region"

SMARTNOISE = r"""
import json, sys
import numpy as np, pandas as pd, snsql
from snsql import Privacy
spec = json.load(sys.stdin)
df = pd.read_csv(spec["path"])
cols = {"pid": {"type": "int", "private_id": True}, "region": {"type": "string"},
        "sex": {"type": "string"}}
for c, (lo, hi) in spec["bounds"].items():
    cols[c] = {"type": "float", "lower": lo, "upper": hi}
meta = {"Collection": {"public": {"t": {"row_privacy": False, "rows": len(df), "max_ids": 1,
        "censor_dims": False, **cols}}}}
reader = snsql.from_df(df, privacy=Privacy(epsilon=1.0, delta=1e-6), metadata=meta)
out = []
for q in spec["queries"]:
    q2 = q.replace(" FROM t", " FROM public.t")
    eps, delta = reader.get_privacy_cost(q2)
    # the accuracy interval's half-width at alpha = 1/e is b for Laplace(b)
    scale = reader.get_simple_accuracy(q2, float(np.exp(-1)))[-1]
    runs = []
    for _ in range(spec["repeats"]):
        rows = reader.execute(q2)[1:]
        runs.append([[None if isinstance(v, float) and v != v else v for v in r] for r in rows])
    out.append({"query": q, "epsilon": float(eps), "delta": float(delta), "runs": runs,
                "scale": None if scale is None else float(scale)})
json.dump(out, sys.stdout, default=float)
"""


def make_parties(root: Path, parties: int, rows: int, seed: int) -> tuple[list[Party], Any]:
    """Party DuckDB files and the pooled table (in memory, and as parquet for smartnoise)."""
    pool = duckdb.connect()
    pool.execute(f"SELECT setseed({(seed % 1000) / 1000.0})")
    pool.execute(
        f"""CREATE TABLE t AS SELECT range AS pid,
            floor(random() * 100)::DOUBLE AS age,
            round(-20.0 * ln(random() * random()), 3) AS income,
            ['north', 'south', 'east', 'west', 'centre'][1 + floor(random() * 5)::INT] AS region,
            CASE WHEN random() < 0.5 THEN 'F' ELSE 'M' END AS sex,
            range // {rows} AS party
            FROM range({parties * rows})"""
    )
    out = []
    for p in range(parties):
        path = root / f"party{p}.duckdb"
        pool.execute(f"ATTACH '{path}' AS p{p}")
        pool.execute(
            f"CREATE TABLE p{p}.t AS SELECT pid, age, income, region, sex FROM t WHERE party = {p}"
        )
        pool.execute(f"DETACH p{p}")
        out.append(Party(name=f"party{p}", path=str(path)))
    pool.execute(
        f"COPY (SELECT pid, age, income, region, sex FROM t) TO '{root / 'pool.csv'}' (HEADER)"
    )
    # The reference answers see the values clamped to the declared bounds, as both DP
    # systems and shoal's parties clamp them.
    pool.execute(
        "CREATE TABLE tc AS SELECT pid, LEAST(GREATEST(age, 0), 100) AS age, "
        "LEAST(GREATEST(income, 0), 200) AS income, region, sex FROM t"
    )
    return out, pool


def config_for(parties: list[Party]) -> AnalyticsConfig:
    return AnalyticsConfig(
        table="t",
        privacy_unit="pid",
        max_contributions=1,
        bounds=BOUNDS,
        categories=CATEGORIES,
        parties=tuple(parties),
        bins=1000,
    )


def _rel(a: Any, b: Any) -> float:
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return 0.0 if a == b else math.inf
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def exactness(fed: Any, config: AnalyticsConfig, pool: Any) -> list[dict[str, Any]]:
    out = []
    for sql in EXACT_QUERIES:
        got = query(fed, sql, config=config).rows
        want = pool.execute(sql.replace(" FROM t", " FROM tc")).fetchall()
        worst = max((_rel(g, w) for gr, wr in zip(got, want) for g, w in zip(gr, wr)), default=0)
        out.append(
            {
                "query": sql,
                "rows": len(got),
                "same_rows": len(got) == len(want),
                "max_rel_diff": worst,
            }
        )
    width = (BOUNDS["income"][1] - BOUNDS["income"][0]) / config.bins
    for q in (0.1, 0.5, 0.9):
        sql = QUANTILE_QUERY.format(q=q)
        got = query(fed, sql, config=config).rows
        want = pool.execute(sql.replace(" FROM t", " FROM tc")).fetchall()
        bins = max(abs(g[1] - w[1]) / width for g, w in zip(got, want))
        out.append(
            {
                "query": sql,
                "rows": len(got),
                "same_rows": len(got) == len(want),
                "max_diff_bins": bins,
            }
        )
    return out


def truth_for(pool: Any, sql: str) -> dict[tuple[Any, ...], float]:
    """The query on the pooled rows with values clamped as both sides clamp them."""
    clamped = sql.replace(" FROM t", " FROM tc").replace("VAR(", "VAR_SAMP(")
    rows = pool.execute(clamped).fetchall()
    return {tuple(r[:-1]): float(r[-1]) for r in rows}


def run_errors(runs: list[list[list[Any]]], truth: dict[tuple[Any, ...], float]) -> list[float]:
    """Each run's mean absolute error over the truth's cells (a missing cell counts whole)."""
    out = []
    for rows in runs:
        seen = {tuple(r[:-1]): r[-1] for r in rows}
        errors = [
            abs(float(got) - value) if (got := seen.get(key)) is not None else abs(value)
            for key, value in truth.items()
        ]
        out.append(float(np.mean(errors)))
    return out


def mae(runs: list[list[list[Any]]], truth: dict[tuple[Any, ...], float]) -> tuple[float, float]:
    """Mean absolute error over cells and runs, and its standard error over the runs (a
    one-cell query's error from few runs is itself noisy: about b / sqrt(runs) for
    Laplace(b))."""
    per_run = run_errors(runs, truth)
    spread = float(np.std(per_run, ddof=1) / np.sqrt(len(per_run))) if len(per_run) > 1 else 0.0
    return float(np.mean(per_run)), spread


def released_scale(sql: str, config: AnalyticsConfig, epsilon: float) -> float | None:
    """The Laplace scale shoal gives the one count or sum ``sql`` releases per cell (its own
    accounting: ``blocks_for`` and ``laplace_scales``), or None for an answer built from
    several statistics (AVG, VAR: a ratio of noisy sums)."""
    plan = parse(sql, config)
    if len(plan.aggregates) != 1:
        return None
    agg = plan.aggregates[0]
    blocks = blocks_for(plan, config, dp=True)
    scales = laplace_scales(blocks, config, epsilon)
    if agg.kind == "count_rows":
        return scales["rows"]
    i = plan.columns.index(agg.column) if agg.column is not None else None
    name = {"count": f"n:c{i}", "sum": f"sum:c{i}"}.get(agg.kind)
    return scales.get(name) if name is not None else None


def dp_error(
    fed: Any,
    config: AnalyticsConfig,
    pool: Any,
    root: Path,
    repeats: int,
    python: str | None,
    queries: list[str],
) -> list[dict[str, Any]]:
    sn: list[dict[str, Any]] | None = None
    if python and Path(python).exists():
        spec = {
            "path": str(root / "pool.csv"),
            "queries": queries,
            "repeats": repeats,
            "bounds": BOUNDS,
        }
        proc = subprocess.run(
            [python, "-c", SMARTNOISE],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            check=True,
        )
        sn = json.loads(proc.stdout)
    out = []
    for i, sql in enumerate(queries):
        truth = truth_for(pool, sql)
        epsilon = sn[i]["epsilon"] if sn else 1.0
        runs = []
        for _ in range(repeats):
            result = query(fed, sql, config=config, privacy=Privacy(epsilon=epsilon))
            if result.failures:  # every party must be in every answer compared
                raise RuntimeError(f"{sql}: parties failed: {dict(result.failures)}")
            runs.append([list(r) for r in result.rows])

        shoal_mae, shoal_se = mae(runs, truth)
        row: dict[str, Any] = {
            "query": sql,
            "epsilon": epsilon,
            "cells": len(truth),
            "shoal_mae": shoal_mae,
            "shoal_mae_se": shoal_se,
        }
        if sn:
            sn_mae, sn_se = mae(sn[i]["runs"], truth)
            row["smartnoise_mae"] = sn_mae
            row["smartnoise_mae_se"] = sn_se
            row["smartnoise_delta"] = sn[i]["delta"]
            row["ratio"] = shoal_mae / sn_mae
            # the ratio's standard error to first order (the two errors are independent)
            row["ratio_se"] = row["ratio"] * math.hypot(shoal_se / shoal_mae, sn_se / sn_mae)
            shoal_scale = released_scale(sql, config, epsilon)
            if shoal_scale is not None and sn[i].get("scale"):
                # Each cell is one Laplace(b) release on both sides, whose mean absolute
                # error is b: the ratio the measured one estimates, without sampling noise.
                row["shoal_scale"] = shoal_scale
                row["smartnoise_scale"] = sn[i]["scale"]
                row["expected_ratio"] = row["shoal_scale"] / row["smartnoise_scale"]
        out.append(row)
    return out


def latency(fed: Any, config: AnalyticsConfig, pool: Any, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"duckdb_pooled": [], "shoal_exact": [], "shoal_dp": []}
    query(fed, LATENCY_QUERY, config=config)  # warm: connections open, caches filled
    for _ in range(repeats):
        t = time.perf_counter()
        pool.execute(LATENCY_QUERY).fetchall()
        times["duckdb_pooled"].append(time.perf_counter() - t)
        t = time.perf_counter()
        query(fed, LATENCY_QUERY, config=config)
        times["shoal_exact"].append(time.perf_counter() - t)
        t = time.perf_counter()
        query(fed, LATENCY_QUERY, config=config, privacy=Privacy(epsilon=1.0))
        times["shoal_dp"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "query": LATENCY_QUERY,
        "median_s": med,
        "exact_vs_duckdb": med["shoal_exact"] / med["duckdb_pooled"],
        "dp_vs_duckdb": med["shoal_dp"] / med["duckdb_pooled"],
    }


def heavy_hitters(
    root: Path, epsilons: list[float], top: int, parties: int, repeats: int
) -> dict[str, Any] | None:
    """Top words across tinyshakespeare split into ``parties`` role stretches (split_roles):
    each party is one privacy unit and holds one row per word it uses at least MIN_USES
    times; the query keeps up to HH_CAP such rows per unit (a random subset) and asks for
    the ``top`` words by parties. Precision and recall against the true top words (by
    parties using them that often, before the cap), per epsilon, ``repeats`` runs each."""
    from shoal.analytics import heavy_hitters as top_k
    from shoal.data.text import split_roles

    corpus = Path(os.environ.get("SHOAL_DATA_DIR", Path(__file__).parents[2] / "shared/data"))
    path = corpus / "tinyshakespeare.txt"
    if not path.exists():
        path = Path("/work/shared/data/tinyshakespeare.txt")
    if not path.exists():
        return None
    stretches = split_roles(path.read_text(), parties)
    members, counts = [], Counter()
    for i, text in enumerate(stretches.values()):
        uses = Counter(re.findall(r"[a-z']+", text.lower()))
        often = {w: n for w, n in uses.items() if n >= MIN_USES}
        counts.update(often.keys())  # parties using the word that often
        file = root / f"role{i}.csv"
        # Quoted: a word such as 'tis must not make DuckDB's sniffer take ' as the quote.
        file.write_text("role,word,uses\n" + "".join(f'{i},"{w}",{n}\n' for w, n in often.items()))
        members.append(Party(name=f"role{i}", path=str(file)))
    config = AnalyticsConfig(
        table="words",
        privacy_unit="role",
        max_contributions=HH_CAP,
        parties=tuple(members),
        max_key_bytes=HH_KEY_BYTES,
        max_groups=64,
    )
    fed = federation(config, min_nodes=len(members) // 2)
    ranked = counts.most_common()
    true_top = [w for w, _ in ranked[:top]]
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        for eps in epsilons:  # interleaved, so machine load spreads over the epsilons
            t = time.perf_counter()
            result = top_k(fed, "word", k=top, config=config, privacy=Privacy(epsilon=eps))
            wall = time.perf_counter() - t
            found = [r[0] for r in result.rows]
            hits = len(set(found) & set(true_top))
            runs.append(
                {
                    "epsilon": eps,
                    "found": found,
                    "precision": hits / len(found) if found else None,
                    "recall": hits / top,
                    "seconds": wall,
                    "parties_in_sum": len(result.parties),
                }
            )
    summary = []
    for eps in epsilons:
        mine = [r for r in runs if r["epsilon"] == eps]
        precisions = [r["precision"] for r in mine if r["precision"] is not None]
        summary.append(
            {
                "epsilon": eps,
                "precision_median": statistics.median(precisions) if precisions else None,
                "recall_median": statistics.median(r["recall"] for r in mine),
                "recall_min": min(r["recall"] for r in mine),
                "seconds_median": statistics.median(r["seconds"] for r in mine),
                "runs": len(mine),
            }
        )
    return {
        "parties": len(members),
        "speaker_names": len({n.rsplit("/", 1)[0] for n in stretches}),
        "max_contributions": HH_CAP,
        "min_uses": MIN_USES,
        "max_key_bytes": HH_KEY_BYTES,
        "sketch": [config.sketch_depth, config.sketch_columns],
        "true_top": [list(t) for t in ranked[: top + 2]],
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parties", type=int, default=10)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per party")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smartnoise-python", default="/work/venvs/smartnoise/bin/python")
    parser.add_argument(
        "--heavy-hitters-epsilons", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0]
    )
    parser.add_argument("--heavy-hitters-parties", type=int, default=1000)
    parser.add_argument("--heavy-hitters-repeats", type=int, default=3)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["exactness", "dp_error", "latency", "heavy_hitters"],
    )
    parser.add_argument(
        "--dp-queries",
        type=int,
        nargs="+",
        metavar="I",
        help=f"dp_error: only these of its {len(DP_QUERIES)} queries (0-based; default all)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    dp_queries = DP_QUERIES if args.dp_queries is None else [DP_QUERIES[i] for i in args.dp_queries]
    report: dict[str, Any] = {
        "parties": args.parties,
        "rows_per_party": args.rows,
        "repeats": args.repeats,
        "dp_queries": dp_queries,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parties, pool = make_parties(root, args.parties, args.rows, args.seed)
        config = config_for(parties)
        fed = federation(config)
        if "exactness" not in args.skip:
            report["exactness"] = exactness(fed, config, pool)
            print("\nexactness (no [privacy]) against DuckDB on the pooled rows")
            for r in report["exactness"]:
                diff = r.get("max_rel_diff", r.get("max_diff_bins"))
                unit = "rel" if "max_rel_diff" in r else "bins"
                print(
                    f"  {diff:10.3g} {unit:4s}  rows {r['rows']:3d} {r['same_rows']}  {r['query']}"
                )
        if "dp_error" not in args.skip:
            report["dp_error"] = dp_error(
                fed, config, pool, root, args.repeats, args.smartnoise_python, dp_queries
            )
            print("\nDP error: mean absolute error, shoal distributed vs smartnoise-sql central")
            print("  (+- one standard error over the repeats)")
            print(f"  {'eps':>4s} {'shoal':>20s} {'smartnoise':>20s} {'ratio':>12s}  query")
            for r in report["dp_error"]:
                shoal_cell = f"{r['shoal_mae']:.4g} +- {r['shoal_mae_se']:.2g}"
                sn_cell = (
                    f"{r['smartnoise_mae']:.4g} +- {r['smartnoise_mae_se']:.2g}"
                    if "smartnoise_mae" in r
                    else "-"
                )
                ratio_cell = f"{r['ratio']:.2f} +- {r['ratio_se']:.2f}" if "ratio" in r else "-"
                print(
                    f"  {r['epsilon']:4.1f} {shoal_cell:>20s} {sn_cell:>20s} "
                    f"{ratio_cell:>12s}  {r['query']}"
                )
            for r in report["dp_error"]:
                if "expected_ratio" in r:
                    print(
                        f"  expected from the Laplace scales: shoal b {r['shoal_scale']:.4g}, "
                        f"smartnoise b {r['smartnoise_scale']:.4g}, ratio "
                        f"{r['expected_ratio']:.3f}  {r['query']}"
                    )
            ratios = [r["ratio"] for r in report["dp_error"] if "ratio" in r]
            if ratios:
                report["dp_error_ratio_max"] = max(ratios)
                report["dp_error_ratio_geomean"] = float(np.exp(np.mean(np.log(ratios))))
                print(
                    f"  ratio: max {max(ratios):.2f}, geometric mean "
                    f"{report['dp_error_ratio_geomean']:.2f}"
                )
        if "latency" not in args.skip:
            report["latency"] = lat = latency(fed, config, pool, args.repeats)
            m = lat["median_s"]
            print(
                f"\nlatency ({args.parties} parties x {args.rows} rows), medians of "
                f"{args.repeats}: DuckDB pooled {m['duckdb_pooled'] * 1e3:.1f} ms, shoal "
                f"exact {m['shoal_exact'] * 1e3:.0f} ms ({lat['exact_vs_duckdb']:.0f}x), "
                f"shoal DP {m['shoal_dp'] * 1e3:.0f} ms ({lat['dp_vs_duckdb']:.0f}x)"
            )
        if "heavy_hitters" not in args.skip:
            hh = heavy_hitters(
                root,
                args.heavy_hitters_epsilons,
                top=10,
                parties=args.heavy_hitters_parties,
                repeats=args.heavy_hitters_repeats,
            )
            report["heavy_hitters"] = hh
            if hh is None:
                print("\nheavy hitters: tinyshakespeare.txt not found, skipped")
            else:
                print(
                    f"\nheavy hitters: top 10 words across {hh['parties']} role stretches "
                    f"({hh['speaker_names']} speaker names), Count-Min {hh['sketch']}, "
                    f"true top {[w for w, _ in hh['true_top']]}"
                )
                print(f"  {'eps':>5s} {'precision':>9s} {'recall':>6s} {'min':>4s} {'s':>6s}")
                for r in hh["summary"]:
                    p = r["precision_median"]
                    print(
                        f"  {r['epsilon']:5.1f} {'-' if p is None else f'{p:.2f}':>9s} "
                        f"{r['recall_median']:6.2f} {r['recall_min']:4.1f} "
                        f"{r['seconds_median']:6.1f}"
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
