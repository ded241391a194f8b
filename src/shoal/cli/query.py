"""``shoal query``: answer SQL queries across the parties of an analytics job.

The job file's ``[analytics]`` table declares the parties' data, the table, the privacy unit,
bounds and categories; ``[privacy]`` (optional) the per-query epsilon. Without it, answers
are exact and protected only by the secure sum. By default the parties are simulated in
this process; with ``--listen`` this process is the coordinator of a deployment whose parties
run ``shoal node --db FILE`` (gRPC, mutual TLS), and answers each ``--sql`` (or
each line of stdin with ``--sql -``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shoal.cli.text import inert
from shoal.errors import ConfigError

__all__ = ["load_analytics_job", "register", "run", "run_node"]

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
    parser.add_argument(
        "--sql",
        required=True,
        action="append",
        help="the query (one SELECT of aggregates); repeat it for several, '-' reads stdin",
    )
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
    deployed = parser.add_argument_group("deployed (a coordinator for `shoal node --db` parties)")
    deployed.add_argument("--listen", metavar="HOST:PORT", help="serve parties here")
    deployed.add_argument("--certs", metavar="DIR", help="certificate directory (shoal certs)")
    deployed.add_argument(
        "--insecure", action="store_true", help="plaintext, unauthenticated: tests only"
    )
    deployed.add_argument("--store", help="the node registry (shoal nodes add ...)")
    deployed.add_argument("--wait-nodes", type=int, metavar="N", help="parties to wait for")
    deployed.add_argument("--wait-timeout", type=float, default=300.0, metavar="S")
    parser.set_defaults(func=run)

    node = subparsers.add_parser(
        "analytics-node",
        help="alias of `shoal node --db FILE`: serve a party's database",
        description="The same as `shoal node --db FILE` (kept as an alias): connect to "
        "`shoal query --listen` and answer its queries on --db; the owner's rules "
        "(--require-dp, --max-epsilon, --privacy-unit) are enforced here.",
    )
    node.add_argument("--db", required=True, help="DuckDB, SQLite, CSV or Parquet file")
    node.add_argument("--table", help="the table a CSV/Parquet file is loaded as")
    node.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    node.add_argument("--key", required=True, metavar="KEYFILE", help="this node's private key")
    node.add_argument("--certs", metavar="DIR", help="certificate directory")
    node.add_argument("--cert-name", help="certificate name (default: the key file's name)")
    node.add_argument("--insecure", action="store_true", help="plaintext: tests only")
    node.add_argument(
        "--require-dp", action="store_true", help="decline exact and central-noise queries"
    )
    node.add_argument("--max-epsilon", type=float, help="this owner's total privacy budget")
    node.add_argument("--max-delta", type=float, default=1e-6)
    node.add_argument("--privacy-unit", help="the owner's privacy unit column (overrides)")
    node.add_argument("--max-idle", type=float, metavar="S", help="leave after S idle seconds")
    node.set_defaults(func=run_node)


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
    from shoal.analytics import Privacy
    from shoal.analytics.simulate import federation

    config, privacy, min_nodes = load_analytics_job(args.job)
    if args.exact:
        privacy = None
    elif args.epsilon is not None or args.mode is not None:
        base = privacy or Privacy(epsilon=args.epsilon or 1.0)
        privacy = Privacy(
            epsilon=args.epsilon if args.epsilon is not None else base.epsilon,
            mode=args.mode or base.mode,
            delta=base.delta,
            key_selection_share=base.key_selection_share,
            noise=base.noise,
        )
    queries = [q for sql in args.sql for q in (_stdin_queries() if sql == "-" else [sql])]
    if args.listen:
        return _deployed(args, config, privacy, min_nodes, queries)
    fed = federation(config, min_nodes=min_nodes)
    results = _answer_each(fed, queries, config, privacy, min_nodes)
    return _finish(queries, results, args.json)


def _stdin_queries() -> list[str]:
    return [line.strip() for line in sys.stdin if line.strip()]


def _answer_each(
    fed: Any, queries: list[str], config: Any, privacy: Any, min_nodes: int
) -> list[Any]:
    """Each query's QueryResult, or the ShoalError that stopped it (a query outside the
    dialect, too few parties able to answer): one failing query does not cost the others
    their answers, nor, deployed, the parties their connection."""
    from shoal.analytics import query
    from shoal.errors import ShoalError

    results: list[Any] = []
    for sql in queries:
        try:
            results.append(query(fed, sql, config=config, privacy=privacy, min_nodes=min_nodes))
        except ShoalError as exc:
            results.append(exc)
    return results


def _finish(queries: list[str], results: list[Any], path: str | None) -> int:
    """Print every answer (and every failure, to stderr), write the JSON; 2 if any failed."""
    out: list[dict[str, Any]] = []
    for i, (sql, result) in enumerate(zip(queries, results)):
        if isinstance(result, Exception):
            where = f"query {i + 1} ({sql[:60]})" if len(queries) > 1 else "the query"
            print(f"shoal: error: {where} failed: {result}", file=sys.stderr)
            out.append({"sql": sql, "failed": f"{type(result).__name__}: {result}"})
            continue
        _print(result)
        out.append({"sql": sql, **result.to_json()})
    if path:
        data: Any = out[0] if len(out) == 1 else out
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 2 if any(isinstance(r, Exception) for r in results) else 0


def _deployed(
    args: argparse.Namespace, config: Any, privacy: Any, min_nodes: int, queries: list[str]
) -> int:
    from shoal.cli.options import open_store
    from shoal.core import Federation
    from shoal.runtime.grpc import GrpcEngine, ServerTLS

    if not args.insecure and not args.certs:
        raise ConfigError("a deployed coordinator needs --certs DIR (or --insecure for tests)")
    tls = None if args.insecure else ServerTLS.from_dir(args.certs)
    wait = args.wait_nodes or min_nodes
    with open_store(args.store) as store:
        engine = GrpcEngine(listen=args.listen, registry=store, tls=tls, insecure=args.insecure)
        try:
            engine.start()
            host = args.listen.rsplit(":", 1)[0]
            print(
                f"analytics coordinator on {host}:{engine.port}; waiting for {wait} parties",
                flush=True,
            )
            connected = engine.wait_for_nodes(wait, timeout_s=args.wait_timeout)
            if connected < min_nodes:
                raise ConfigError(
                    f"only {connected} parties connected within {args.wait_timeout:.0f} s, "
                    f"fewer than min_nodes {min_nodes}"
                )
            fed = Federation(engine, min_nodes=min_nodes)
            results = _answer_each(fed, queries, config, privacy, min_nodes)
            engine.finish("queries answered")
        finally:
            engine.close()
    return _finish(queries, results, args.json)


def run_node(args: argparse.Namespace) -> int:
    """A party serving its database: ``shoal node --db FILE`` (and its older alias
    ``shoal analytics-node``), with the analytics and secure-sum tasks installed."""
    from shoal.analytics import Database, NodePolicy
    from shoal.analytics.simulate import node_app
    from shoal.runtime.grpc import (
        Backoff,
        ClientTLS,
        NodeClient,
        fingerprint,
        load_private_key,
        public_key_bytes,
    )

    policy = NodePolicy(
        require_dp=args.require_dp,
        max_epsilon=args.max_epsilon,
        max_delta=args.max_delta,
        privacy_unit=args.privacy_unit,
        table=args.table,
    )
    Database(args.db, table=args.table or "t")  # the format is checked before connecting
    if args.insecure:
        tls = None
    elif args.certs:
        name = args.cert_name or Path(args.key).name.removesuffix(".key")
        tls = ClientTLS.from_dir(
            args.certs, name=name, server_name=getattr(args, "server_name", None)
        )
    else:
        raise ConfigError("an analytics node needs --certs DIR (or --insecure for tests)")
    key = load_private_key(args.key)
    node_state = None
    state = getattr(args, "state", None)
    if state:
        from shoal.runtime import open_node_state

        # The owner's ledger survives restarts; the file is bound to this node's key.
        node_state = open_node_state(state, owner=fingerprint(public_key_bytes(key)))
    backoff = getattr(args, "backoff", 0.2)
    client = NodeClient(
        app=node_app(policy),
        coordinator=args.coordinator,
        key=key,
        data=str(Path(args.db).resolve()),
        node_state=node_state,
        tls=tls,
        insecure=bool(args.insecure),
        backoff=Backoff(initial_s=backoff, max_s=max(backoff, getattr(args, "backoff_max", 5.0))),
        max_idle_s=args.max_idle,
        lane=not getattr(args, "no_data_lane", False),
    )
    print(f"analytics node serving {args.db} to {args.coordinator}", flush=True)
    outcome = client.run()
    print(f"analytics node: {outcome.value} after {client.tasks_done} task(s)", flush=True)
    return 0


def _print(result: Any) -> None:
    out = sys.stdout
    mode = (
        result.mode if result.mode == "exact" else f"{result.mode} DP, epsilon {result.epsilon:g}"
    )
    print(f"{len(result.rows)} row(s) from {len(result.parties)} parties ({mode})", file=out)
    # Column names, group keys and the parties' reasons come from other parties' data: shown
    # inert (an ESC sequence would rewrite the screen; a tab or newline would shift the table).
    print("\t".join(inert(c, lines=False) for c in result.columns), file=out)
    for i, row in enumerate(result.rows):
        cells = []
        for j, v in enumerate(row):
            text = inert(_fmt(v), lines=False)
            if result.errors is not None and result.errors[i][j] is not None:
                text += f" ± {result.errors[i][j]:.3g}"
            cells.append(text)
        print("\t".join(cells), file=out)
    for line in _disclosure_lines(result.disclosed):
        print(inert(line, lines=False), file=out)
    for node, reason in result.failures.items():
        print(inert(f"party {node} did not answer: {reason}", lines=False), file=out)
    for note in result.notes:
        print(inert(f"note: {note}", lines=False), file=out)


DISCLOSED_COUNTS = (
    ("values_clamped", "value(s) clamped"),
    ("null_rows_ignored", "NULL(s) ignored"),
)


def _disclosure_lines(disclosed: Any) -> list[str]:
    """Per column: values clamped to its bounds and NULL rows ignored (noisy, with their
    standard error, under DP), and rows outside the declared groups (exact answers)."""
    lines = []
    for col, entry in (disclosed.get("columns") or {}).items():
        parts = []
        for key, what in DISCLOSED_COUNTS:
            if key not in entry:
                continue
            text = _fmt(entry[key])
            if entry.get(f"{key}_error") is not None:
                text += f" ± {entry[f'{key}_error']:.3g}"
            if key == "values_clamped" and "bounds" in entry:
                what += f" to [{_fmt(entry['bounds'][0])}, {_fmt(entry['bounds'][1])}]"
            parts.append(f"{text} {what}")
        if parts:
            lines.append(f"column {col}: " + ", ".join(parts))
    if disclosed.get("rows_outside_groups"):
        lines.append(f"rows outside the declared groups: {disclosed['rows_outside_groups']}")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ...]" if len(v) > 8 else "]")
    return str(v)
