"""``shoal query``: answer one SQL query across the parties of an analytics job, simulated.

The job file's ``[analytics]`` table declares the parties' data, the table, the privacy unit,
bounds and categories; ``[privacy]`` (optional) the per-query epsilon. Without it, answers
are exact and protected only by the secure sum.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError

__all__ = ["load_analytics_job", "register", "run"]

EPILOG = """\
examples:
  shoal query --job analytics.toml --sql "SELECT ward, COUNT(*), AVG(age) FROM visits GROUP BY ward"
  shoal query --job analytics.toml --epsilon 1 --sql "SELECT MEDIAN(stay_days) FROM visits" \\
      --json out.json

job file:
  [analytics]
  table = "visits"
  privacy_unit = "patient_id"
  max_contributions = 1
  parties = [ { name = "north", path = "north.csv" }, { name = "south", path = "south.csv" } ]
  bounds = { age = [0, 120], stay_days = [0, 60] }
  categories = { ward = ["A", "B", "C"] }

  [privacy]            # omit for exact, secure-sum-only answers
  epsilon = 1.0        # per query
  mode = "distributed" # or "central"
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "query",
        help="answer a SQL query across the parties of an analytics job (simulation)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--job", required=True, help="analytics job file (TOML)")
    parser.add_argument("--sql", required=True, help="the query (one SELECT of aggregates)")
    parser.add_argument("--json", metavar="PATH", help="write the answer as JSON here")
    parser.add_argument(
        "--epsilon", type=float, help="DP epsilon for this query (overrides [privacy])"
    )
    parser.add_argument(
        "--mode", choices=("distributed", "central"), help="where the DP noise is added"
    )
    parser.add_argument(
        "--exact", action="store_true", help="ignore [privacy]: exact, secure-sum-only answer"
    )
    parser.set_defaults(func=run)


def load_analytics_job(path: str | Path) -> tuple[Any, Any, int]:
    """(AnalyticsConfig, Privacy or None, min_nodes) from a job file; party paths are
    resolved relative to the file."""
    from shoal.analytics import AnalyticsConfig, privacy_from_dict

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    job = Path(path)
    try:
        raw = tomllib.loads(job.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the job file {job}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{job} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"analytics", "privacy", "engine", "job"})
    if unknown:
        raise ConfigError(
            f"{job}: unknown table(s) {unknown}; an analytics job has [analytics], "
            "[privacy], [engine] and [job]"
        )
    if "analytics" not in raw:
        raise ConfigError(f"{job} has no [analytics] table")
    analytics = dict(raw["analytics"])
    parties = []
    for p in analytics.get("parties", []):
        if isinstance(p, dict) and isinstance(p.get("path"), str):
            p = {**p, "path": str((job.parent / p["path"]).resolve())}
        parties.append(p)
    analytics["parties"] = parties
    config = AnalyticsConfig.from_dict(analytics)
    privacy = privacy_from_dict(raw.get("privacy"))
    engine = raw.get("engine", {})
    if not isinstance(engine, dict) or set(engine) - {"min_nodes"}:
        raise ConfigError(f"{job}: [engine] of an analytics job takes only min_nodes")
    min_nodes = engine.get("min_nodes", 3)
    if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 3:
        raise ConfigError(f"{job}: [engine] min_nodes must be an int >= 3 (secure sums)")
    return config, privacy, min_nodes


def run(args: argparse.Namespace) -> int:
    from shoal.analytics import Privacy, query
    from shoal.analytics.simulate import federation

    config, privacy, min_nodes = load_analytics_job(args.job)
    if args.exact:
        privacy = None
    elif args.epsilon is not None or args.mode is not None:
        base = privacy or Privacy(epsilon=args.epsilon or 1.0)
        privacy = Privacy(
            epsilon=args.epsilon if args.epsilon is not None else base.epsilon,
            mode=args.mode or base.mode,
            key_selection_share=base.key_selection_share,
        )
    fed = federation(config, min_nodes=min_nodes)
    result = query(fed, args.sql, config=config, privacy=privacy, min_nodes=min_nodes)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return 0


def _print(result: Any) -> None:
    out = sys.stdout
    mode = (
        result.mode if result.mode == "exact" else f"{result.mode} DP, epsilon {result.epsilon:g}"
    )
    print(f"{len(result.rows)} row(s) from {len(result.parties)} parties ({mode})", file=out)
    print("\t".join(result.columns), file=out)
    for i, row in enumerate(result.rows):
        cells = []
        for j, v in enumerate(row):
            text = _fmt(v)
            if result.errors is not None and result.errors[i][j] is not None:
                text += f" ± {result.errors[i][j]:.3g}"
            cells.append(text)
        print("\t".join(cells), file=out)
    for node, reason in result.failures.items():
        print(f"party {node} did not answer: {reason}", file=out)
    for note in result.notes:
        print(f"note: {note}", file=out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ...]" if len(v) > 8 else "]")
    return str(v)
