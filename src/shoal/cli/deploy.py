"""``shoal certs``, ``shoal keys``, ``shoal nodes``, ``shoal coordinator`` and ``shoal node``.

Deployment: the coordinator runs a job file over nodes that connect to it over gRPC (TLS
and registered Ed25519 keys); each node runs the same tasks as in simulation on its own data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from shoal.cli.options import open_store, port_number, positive_float, positive_int
from shoal.errors import ConfigError

if TYPE_CHECKING:  # loaded when a command runs, so that `--help` stays fast
    from shoal.cli.job import JobSpec
    from shoal.data import Dataset
    from shoal.learn import RoundReport
    from shoal.runtime import Store
    from shoal.runtime.grpc import GrpcEngine

__all__ = ["job_digest", "register"]

INSECURE_WARNING = (
    "WARNING: --insecure: traffic is NOT encrypted and the {peer} is NOT authenticated by a "
    "certificate; use this only for tests on a network you trust"
)

DEPLOY_EPILOG = """\
step by step (see docs/deployment.md):
  shoal certs --out certs --nodes 3 --host coord.example.org
  shoal keys new --out node-0.key                      # on each node
  shoal nodes add node-0.pub --name node-0 --store fl.db   # at the coordinator
  shoal coordinator --job job.toml --listen 0.0.0.0:7000 --certs certs --store fl.db
  shoal node --coordinator coord.example.org:7000 --certs certs --key node-0.key \\
      --job job.toml --partition 0/3
"""


def job_digest(job: JobSpec) -> str:
    """A fingerprint of a job file's content: coordinator and nodes must agree on it."""
    text = json.dumps(job.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    store_help = "the coordinator's store file (default $SHOAL_STORE or ~/.shoal/store.db)"

    certs = subparsers.add_parser(
        "certs",
        help="make a CA and TLS certificates for a federation",
        description="Create (or extend) a certificate directory: CA, coordinator and node "
        "certificates. An existing CA in DIR is reused, so new nodes can be added later.",
        epilog="examples:\n  shoal certs --out certs --nodes 5\n"
        "  shoal certs --out certs --node hospital-3 --host coord.example.org\n",
        formatter_class=fmt,
    )
    certs.add_argument("--out", required=True, metavar="DIR", help="certificate directory")
    group = certs.add_mutually_exclusive_group()
    group.add_argument(
        "--nodes", type=positive_int, metavar="N", help="node certificates node-0..node-N-1"
    )
    group.add_argument(
        "--node", action="append", default=[], metavar="NAME", help="a node certificate (repeat)"
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP the nodes use to reach the coordinator (repeat); "
        "localhost and 127.0.0.1 are always included",
    )
    certs.add_argument("--days", type=positive_int, default=365, help="validity (default 365)")
    certs.add_argument("--force", action="store_true", help="re-issue existing node certificates")
    certs.set_defaults(func=_certs)

    keys = subparsers.add_parser(
        "keys",
        help="create or inspect a node's Ed25519 identity key",
        description="A node proves who it is with an Ed25519 key pair; the coordinator admits "
        "the public half with `shoal nodes add`.",
        epilog="examples:\n  shoal keys new --out node-0.key   # writes node-0.key (0600) and "
        "node-0.pub\n  shoal keys show node-0.pub\n",
        formatter_class=fmt,
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    new = keys_sub.add_parser("new", help="create a key pair")
    new.add_argument("--out", required=True, metavar="KEYFILE", help="private key path (.key)")
    new.add_argument("--force", action="store_true", help="replace existing files")
    new.set_defaults(func=_keys_new)
    show = keys_sub.add_parser("show", help="print a key's fingerprint")
    show.add_argument("keyfile", help="a .pub (or private .key) file")
    show.set_defaults(func=_keys_show)
    keys.set_defaults(func=_subcommand_help(keys))

    nodes = subparsers.add_parser(
        "nodes",
        help="admit, list or revoke nodes in the coordinator's registry",
        description="The coordinator admits only nodes whose public keys are registered here.",
        epilog="examples:\n  shoal nodes add node-0.pub --name node-0 --store fl.db\n"
        "  shoal nodes list --store fl.db\n  shoal nodes revoke node-0 --store fl.db\n",
        formatter_class=fmt,
    )
    nodes_sub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    add = nodes_sub.add_parser("add", help="register a node's public key")
    add.add_argument("keyfile", help="the node's public key file (.pub)")
    add.add_argument("--name", help="node id (default: the key file's name without .pub)")
    add.add_argument("--label", default="", help="free text, e.g. the organisation")
    add.add_argument("--store", help=store_help)
    add.set_defaults(func=_nodes_add)
    listing = nodes_sub.add_parser("list", help="list registered nodes")
    listing.add_argument("--store", help=store_help)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_nodes_list)
    revoke = nodes_sub.add_parser("revoke", help="revoke a node for good")
    revoke.add_argument("name", help="node id")
    revoke.add_argument("--store", help=store_help)
    revoke.set_defaults(func=_nodes_revoke)
    nodes.set_defaults(func=_subcommand_help(nodes))

    coord = subparsers.add_parser(
        "coordinator",
        help="serve a job to nodes over gRPC and train",
        description="Listen for nodes, wait for enough of them, run the job's algorithm over "
        "them and record every round in the store. Resumable after a crash.",
        epilog=DEPLOY_EPILOG,
        formatter_class=fmt,
    )
    coord.add_argument("--job", required=True, metavar="JOB.toml", help="the job file")
    coord.add_argument("--listen", default="0.0.0.0:7000", metavar="HOST:PORT")
    lane = coord.add_mutually_exclusive_group()
    lane.add_argument(
        "--data-port",
        type=port_number,
        metavar="PORT",
        help="TCP port of the bulk lane, where nodes send and receive payloads beside the "
        "gRPC stream (same host and TLS; default: the --listen port + 1, or any free port if "
        "that one is taken; 0: any free port)",
    )
    lane.add_argument(
        "--no-data-lane",
        action="store_true",
        help="no bulk lane: every byte goes over the gRPC port (slower for large models)",
    )
    _tls_args(coord)
    coord.add_argument("--store", help=store_help)
    coord.add_argument(
        "--min-nodes", type=positive_int, help="fewest answers a round needs (default: job's)"
    )
    coord.add_argument(
        "--wait-nodes",
        type=positive_int,
        metavar="N",
        help="connected nodes to wait for before training (default: --min-nodes)",
    )
    coord.add_argument(
        "--wait-timeout",
        type=positive_float,
        default=300.0,
        metavar="S",
        help="how long to wait for them (default 300 s); training starts anyway with at "
        "least --min-nodes",
    )
    coord.add_argument(
        "--round-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each later round, wait up to S s for --wait-nodes nodes (e.g. for a "
        "restarted node to rejoin; default 0)",
    )
    coord.add_argument(
        "--deadline", type=positive_float, metavar="S", help="per-task deadline (default: job's)"
    )
    coord.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_ID",
        help="continue an interrupted run from its last completed round (default: the newest "
        "unfinished run of this job)",
    )
    coord.add_argument("--json", metavar="PATH", help="write a JSON summary to PATH")
    coord.add_argument(
        "--insecure-test-keys",
        action="store_true",
        help="vertical jobs: allow Paillier keys under 2048 bits (tests only)",
    )
    coord.add_argument(
        "--heartbeat", type=positive_float, default=5.0, metavar="S", help="node heartbeat period"
    )
    coord.add_argument("--quiet", action="store_true", help="no per-round output")
    coord.set_defaults(func=_coordinator)

    node = subparsers.add_parser(
        "node",
        help="connect to a coordinator and run its tasks on local data",
        description="Dial out to the coordinator, authenticate with KEYFILE and serve the job's "
        "tasks (the same ones as in simulation) on this node's data until the run ends.",
        epilog=DEPLOY_EPILOG,
        formatter_class=fmt,
    )
    node.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    node.add_argument("--key", required=True, metavar="KEYFILE", help="this node's private key")
    node.add_argument(
        "--job",
        metavar="JOB.toml",
        help="the coordinator's job file (model and hyper-parameters; checked against the "
        "coordinator's); not with --db, whose queries carry their own declarations",
    )
    # required for row-partitioned jobs (checked in _node); a vertical party's CSV comes
    # from its job file, and the arbiter holds no data
    source = node.add_mutually_exclusive_group()
    source.add_argument(
        "--partition", metavar="I/N", help="use slice I of N of the job's data set (testing)"
    )
    source.add_argument("--data", metavar="FILE", help="this node's data (.csv or .npz)")
    source.add_argument(
        "--db",
        metavar="FILE",
        help="federated analytics: answer `shoal query --listen`'s SQL on this database "
        "(DuckDB, SQLite, CSV or Parquet) instead of training",
    )
    node.add_argument("--dataset", metavar="NAME", help="with --partition: must be the job's")
    node.add_argument("--label", default="label", help="label column of a CSV file")
    node.add_argument("--classes", type=positive_int, help="number of classes (with --data)")
    _tls_args(node)
    node.add_argument(
        "--cert-name",
        metavar="NAME",
        help="node certificate in --certs (default: the key file's name, e.g. node-0)",
    )
    node.add_argument(
        "--server-name", metavar="NAME", help="name to check on the coordinator's certificate"
    )
    node.add_argument(
        "--max-idle", type=positive_float, metavar="S", help="exit after S s without a task"
    )
    node.add_argument("--backoff", type=positive_float, default=0.5, metavar="S")
    node.add_argument(
        "--party", help="vertical jobs: this node's party (default: the key file's name)"
    )
    node.add_argument(
        "--insecure-test-keys",
        action="store_true",
        help="vertical jobs: allow Paillier keys under 2048 bits (tests only)",
    )
    node.add_argument("--backoff-max", type=positive_float, default=30.0, metavar="S")
    node.add_argument(
        "--max-epsilon",
        type=positive_float,
        metavar="E",
        help="this data owner's privacy budget: decline training that would spend more",
    )
    node.add_argument(
        "--max-delta", type=positive_float, default=1e-5, metavar="D", help="budget delta"
    )
    node.add_argument(
        "--state",
        metavar="FILE",
        help="this node's durable state (SQLite): its privacy ledger and audit log survive "
        "restarts (and a SecureBoost party's part of each complete tree, so a restarted "
        "party resumes the run); without it they live in memory and --max-epsilon restarts "
        "from zero",
    )
    node.add_argument(
        "--model-out",
        metavar="FILE",
        help="SecureBoost parties: write this party's part of the trained model to FILE when "
        "the run ends (JSON: the guest's cuts, trees and leaves, or a host's cuts and split "
        "table; the path is this node's, the coordinator names none)",
    )
    node.add_argument(
        "--no-data-lane",
        action="store_true",
        help="never open the coordinator's bulk lane: every byte goes over gRPC (for a "
        "firewall that lets only the gRPC port through)",
    )
    node.add_argument("--verbose", action="store_true", help="log connection events")
    analytics = node.add_argument_group("analytics (with --db; see docs/analytics.md)")
    analytics.add_argument("--table", help="the table a CSV/Parquet file is loaded as")
    analytics.add_argument(
        "--require-dp", action="store_true", help="decline exact and central-noise queries"
    )
    analytics.add_argument(
        "--privacy-unit", metavar="COLUMN", help="the owner's privacy unit (overrides the query's)"
    )
    node.set_defaults(func=_node)


def _tls_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--certs", metavar="DIR", help="certificate directory (`shoal certs`)")
    group.add_argument(
        "--insecure", action="store_true", help="plaintext, no certificates (tests only)"
    )


def _subcommand_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


# -- certs, keys, nodes --------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    from shoal.runtime.grpc import make_certs

    names = [f"node-{i}" for i in range(args.nodes)] if args.nodes else list(args.node)
    files = make_certs(args.out, nodes=names, hosts=args.host, days=args.days, force=args.force)
    for path in files.created:
        print(f"wrote {path}")
    print(
        f"CA {files.ca}: give ca.pem and each node its <name>.pem and <name>-key.pem; keep "
        "ca-key.pem and coordinator-key.pem on the coordinator"
    )
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from shoal.runtime.grpc import fingerprint, public_key_bytes, write_key_pair

    private, public, key = write_key_pair(args.out, force=args.force)
    print(f"wrote {private} (private, mode 0600: keep it on this node)")
    print(f"wrote {public} (public: give it to the coordinator's operator)")
    print(f"fingerprint {fingerprint(public_key_bytes(key))}")
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from shoal.runtime.grpc import (
        fingerprint,
        load_private_key,
        load_public_key,
        public_key_bytes,
    )

    path = Path(args.keyfile)
    try:
        raw = load_public_key(path)
    except ConfigError:
        raw = public_key_bytes(load_private_key(path))
    print(fingerprint(raw))
    return 0


def _nodes_add(args: argparse.Namespace) -> int:
    from shoal.runtime.grpc import fingerprint, load_public_key

    raw = load_public_key(args.keyfile)
    name = args.name or Path(args.keyfile).name.removesuffix(".pub")
    with open_store(args.store) as store:
        record = store.add_node(node_id=name, public_key=raw, label=args.label)
        store.audit(
            actor="operator",
            action="node.added",
            detail={"node_id": name, "key": fingerprint(raw), "label": args.label},
        )
    print(f"admitted node {record.node_id} ({fingerprint(raw)}) into {store.path}")
    return 0


def _nodes_list(args: argparse.Namespace) -> int:
    from shoal.runtime.grpc import fingerprint

    with open_store(args.store) as store:
        records = store.list_nodes()
    rows: list[dict[str, Any]] = [
        {
            "node_id": r.node_id,
            "fingerprint": fingerprint(r.public_key),
            "label": r.label,
            "added_at": r.added_at,
            "revoked": r.revoked,
        }
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no nodes registered; admit one with `shoal nodes add NODE.pub`")
    for row in rows:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["added_at"]))
        status = "REVOKED" if row["revoked"] else "active"
        print(f"{row['node_id']:<24} {row['fingerprint']:<30} {status:<8} {added}  {row['label']}")
    return 0


def _nodes_revoke(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        record = store.revoke_node(args.name)
        store.audit(actor="operator", action="node.revoked", detail={"node_id": args.name})
    print(f"revoked node {record.node_id}; a running coordinator drops it within seconds")
    return 0


# -- coordinator -----------------------------------------------------------------------------


def _resolve_resume(store: Store, job: JobSpec, resume: str | None) -> str | None:
    if resume is None:
        return None
    if resume:
        from shoal.errors import StoreError

        try:
            record = store.get_run(resume)
        except StoreError:
            raise ConfigError(
                f"no run {resume!r} in store {store.path}; list its runs with "
                f"`shoal runs --store {store.path}`"
            ) from None
        if record.status == "finished":
            raise ConfigError(f"run {resume} already finished; start a new run without --resume")
        return resume
    for record in store.list_runs(limit=1000):
        if record.name == job.name and record.status != "finished":
            return record.id
    raise ConfigError(
        f"no unfinished run of job {job.name!r} in the store to resume; drop --resume to start one"
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _coordinator(args: argparse.Namespace) -> int:
    from shoal.cli.job import load_job, refuse_simulation_engine
    from shoal.cli.trees import is_tree_job, run_tree_job
    from shoal.cli.vertical import coordinate_vertical, is_vertical
    from shoal.core import Federation
    from shoal.errors import NotEnoughNodes
    from shoal.learn import Trainer
    from shoal.runtime.grpc import GrpcEngine, ServerTLS

    if is_vertical(args.job):  # parties holding columns, not rows: their own protocol
        return coordinate_vertical(args)
    job = load_job(args.job)
    refuse_simulation_engine(job, "shoal coordinator")
    if args.insecure:
        print(INSECURE_WARNING.format(peer="node side"), file=sys.stderr, flush=True)
    tls = None if args.insecure else ServerTLS.from_dir(args.certs)
    min_nodes = args.min_nodes or job.min_nodes
    wait_nodes = args.wait_nodes or min_nodes
    if wait_nodes < min_nodes:
        raise ConfigError(f"--wait-nodes {wait_nodes} is below --min-nodes {min_nodes}")
    if job.faults is not None:
        print("note: the job's [faults] table only applies to simulations", flush=True)
    if "workers" in (job.raw.get("engine") or {}):
        print("note: [engine] workers only applies to simulations (threads per engine)", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    events = logging.getLogger("shoal.deploy")
    events.addHandler(_EventPrinter())
    events.setLevel(logging.INFO)
    events.propagate = False
    started = time.perf_counter()
    # Everything slow (data, model) happens before listening, so nodes never wait on it.
    test = job.eval_data()
    tree_job = is_tree_job(job)
    model = None if tree_job else job.build_model()
    algorithm = None if tree_job else job.build_algorithm()
    tree_summary: dict[str, Any] | None = None
    with open_store(args.store) as store:
        resume = _resolve_resume(store, job, args.resume)
        if not store.list_nodes(include_revoked=False):
            print(
                "warning: no nodes are registered in this store; admit them with "
                "`shoal nodes add NODE.pub --store ...`",
                file=sys.stderr,
                flush=True,
            )
        host = args.listen.rsplit(":", 1)[0]
        if args.no_data_lane:
            data_listen: str | None = None
        elif args.data_port is None:
            data_listen = "auto"
        else:
            data_listen = f"{host}:{args.data_port}"
        engine = GrpcEngine(
            listen=args.listen,
            data_listen=data_listen,
            registry=store,
            tls=tls,
            insecure=bool(args.insecure),
            seed=job.seed,
            job_digest=job_digest(job),
            heartbeat_s=args.heartbeat,
            run_id=resume,
        )
        try:
            engine.start()
            lane = f", bulk lane on port {engine.data_port}" if engine.data_port else ""
            print(
                f"coordinator for job {job.name!r} listening on {host}:{engine.port}{lane} "
                f"({'plaintext' if args.insecure else 'mutual TLS'}); waiting for {wait_nodes} "
                f"node(s)" + (f", resuming run {resume}" if resume else ""),
                flush=True,
            )
            connected = engine.wait_for_nodes(wait_nodes, timeout_s=args.wait_timeout)
            if connected < min_nodes:
                raise NotEnoughNodes(
                    f"only {connected} node(s) connected within {args.wait_timeout:.0f} s, fewer "
                    f"than --min-nodes {min_nodes}; start more nodes or check their logs"
                )
            print(f"{connected} node(s) connected: {', '.join(engine.node_ids())}", flush=True)
            federation = Federation(
                engine,
                min_nodes=min_nodes,
                deadline_s=args.deadline or float(job.engine["deadline_s"]),
                seed=job.seed,
            )
            if tree_job:
                tree_summary = run_tree_job(
                    job, federation, progress=lambda line: print(line, flush=True)
                )
                engine.finish("run finished")
                return _tree_done(tree_summary, args, connected)
            assert model is not None and algorithm is not None
            trainer = Trainer(
                federation=federation,
                algorithm=algorithm,
                model=model,
                test=test,
                store=store,
                run_name=job.name,
                config=job.to_dict(),
                federated_eval_every=int(job.engine["federated_eval_every"]),
                eval_every=int(job.engine["eval_every"]),
                seed=job.seed,
                on_round=_progress(engine, algorithm.rounds, args, wait_nodes),
            )
            try:
                result = trainer.run(resume=resume)
            except NotEnoughNodes as exc:
                raise NotEnoughNodes(
                    f"{exc}; continue the run later with `shoal coordinator --resume`"
                ) from None
            engine.finish("run finished")
        finally:
            engine.close()
        wall = time.perf_counter() - started
        metrics = result.metrics
        summary: dict[str, Any] = {
            "run_id": result.run_id,
            "job": job.name,
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "rounds": len(result.history),
            "nodes": connected,
            "wall_s": wall,
            "resumed": bool(resume),
            "metrics": metrics,
            "history": [r.metrics() for r in result.history],
        }
    accuracy = summary["accuracy"]
    print(
        f"run {result.run_id} finished: {summary['rounds']} rounds, accuracy "
        + (f"{accuracy:.4f}" if isinstance(accuracy, float) else "n/a")
        + f", {wall:.1f} s",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def _progress(
    engine: GrpcEngine, rounds: int, args: argparse.Namespace, wait_nodes: int
) -> Callable[[RoundReport], None]:
    def on_round(report: RoundReport) -> None:
        if not args.quiet:
            accuracy = f"  accuracy {report.accuracy:.4f}" if report.accuracy is not None else ""
            print(
                f"round {report.round}/{rounds}: {report.participants} node(s) ok, "
                f"{report.failed} failed, train loss {report.train_loss:.4f}{accuracy} "
                f"({report.wall_s:.2f} s)",
                flush=True,
            )
            for line in failure_lines(report.failures):
                print(line, flush=True)
        if args.round_wait > 0 and report.round < rounds:
            engine.wait_for_nodes(wait_nodes, timeout_s=args.round_wait)

    return on_round


def failure_lines(failures: Mapping[str, str], *, limit: int = 5) -> list[str]:
    """One line per failed node, or per reason when many nodes failed alike."""
    if len(failures) <= limit:
        return [f"  {node} failed: {reason}" for node, reason in sorted(failures.items())]
    by_reason: dict[str, list[str]] = {}
    for node, reason in sorted(failures.items()):
        by_reason.setdefault(reason, []).append(node)
    lines = []
    for reason, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(nodes[:limit]) + (
            f" and {len(nodes) - limit} more" if len(nodes) > limit else ""
        )
        lines.append(f"  {len(nodes)} node(s) failed ({shown}): {reason}")
    return lines


class _EventPrinter(logging.Handler):
    """Prints the engine's connection events (connects, reconnects, disconnects, revocations,
    refusals) as plain lines; refusals are coalesced per peer address and reason."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("node ") and " connected from " in message:
            node = message.split()[1]
            if node in self.seen:
                message = message.replace(" connected from ", " reconnected from ", 1)
            self.seen.add(node)
        print(message, flush=True)


# -- node ------------------------------------------------------------------------------------


def _tree_done(summary: dict[str, Any], args: argparse.Namespace, connected: int) -> int:
    from shoal.cli.trees import tree_line

    summary["nodes"] = connected
    print(f"run finished: {tree_line(summary)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def _node_data(job: JobSpec, args: argparse.Namespace) -> tuple[Any, int | None, Dataset]:
    """(what the tasks see, partition index or None, the training set)."""
    from shoal.data import load_csv, load_npz, split_holdout
    from shoal.data.files import is_file
    from shoal.learn import LocalData

    if args.partition:
        if args.dataset and args.dataset != job.data.get("dataset"):
            raise ConfigError(
                f"--dataset {args.dataset!r} differs from the job's data set "
                f"{job.data.get('dataset') or job.data.get('path')!r}"
            )
        try:
            index_text, count_text = args.partition.split("/")
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise ConfigError(f"--partition takes I/N, e.g. 0/5, got {args.partition!r}") from None
        part = job.node_data(index, count)
        holdout = float(job.data["holdout"])
        if holdout > 0:  # the same split the simulation makes for node `index`
            train, test = split_holdout(part, fraction=holdout, seed=job.seed + index)
            return LocalData(train=train, test=test), index, train
        return part, index, part
    path = Path(args.data)
    if not is_file(path, "--data"):
        raise ConfigError(f"--data {str(path)!r} does not exist")
    if path.suffix.lower() == ".npz":
        dataset = load_npz(path)
    else:
        from shoal.cli.trees import categorical_columns

        # a tree job's categorical columns: this node's labels coded by the job's tables,
        # or by its own sorted labels (the coordinator compares the tables' digests)
        dataset = load_csv(
            path,
            label=args.label,
            classes=args.classes,
            categorical=categorical_columns(job.model),
        )
    return dataset, None, dataset


def _node(args: argparse.Namespace) -> int:
    from shoal.cli.job import load_job, refuse_simulation_engine
    from shoal.cli.trees import is_tree_job, party_table, tree_node_app
    from shoal.cli.vertical import is_vertical, serve_party
    from shoal.learn import TRAIN, learning_app
    from shoal.privacy.guard import budget_guard
    from shoal.runtime.grpc import (
        Backoff,
        ClientTLS,
        NodeClient,
        NodeExit,
        fingerprint,
        load_private_key,
        public_key_bytes,
    )

    if args.db:
        from shoal.cli.query import run_node

        if args.job:
            raise ConfigError(
                "--db serves analytics queries, which carry their own declarations: drop --job"
            )
        return run_node(args)
    if not args.job:
        raise ConfigError("give --job JOB.toml (or --db FILE to serve analytics queries)")
    if is_vertical(args.job):
        return serve_party(args)
    if not args.partition and not args.data:
        raise ConfigError("give --partition I/N (slice of the job's data set) or --data FILE")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    job = load_job(args.job)
    refuse_simulation_engine(job, "shoal node")
    key = load_private_key(args.key)
    if args.insecure:
        print(INSECURE_WARNING.format(peer="coordinator"), file=sys.stderr, flush=True)
        tls = None
    else:
        name = args.cert_name or Path(args.key).name.removesuffix(".key")
        tls = ClientTLS.from_dir(args.certs, name=name, server_name=args.server_name)
    party = None
    if is_tree_job(job) and job.model["name"] == "secureboost":
        if not args.partition:
            raise ConfigError(
                "a secureboost party takes --partition I/N (0 the guest, 1..N-1 the hosts)"
            )
        index_text, _, count_text = args.partition.partition("/")
        try:
            party, count = int(index_text), int(count_text)
        except ValueError:
            raise ConfigError(f"--partition is I/N, got {args.partition!r}") from None
        data: Any = party_table(job, party, count)
        index: int | None = party
    else:
        data, index, train = _node_data(job, args)
    if args.model_out and party is None:
        raise ConfigError(
            "--model-out is for SecureBoost parties; a horizontal model is grown at the coordinator"
        )
    if is_tree_job(job):
        checkpoints = None
        if party is not None and args.state:
            from shoal.vertical.checkpoint import FileCheckpoints

            # a SecureBoost party's part of each complete round, in the state file: a
            # restarted process resumes the run with it
            checkpoints = FileCheckpoints(args.state)
        app = tree_node_app(job, party, checkpoints=checkpoints, model_out=args.model_out)
    elif index is not None:
        model = job.build_model()
    else:
        features = int(train.x.reshape(len(train.x), -1).shape[1])
        model = job.build_model(features=features, classes=args.classes or train.classes)
    if not is_tree_job(job):
        # The release policies and the noise floor follow from the job this node holds, not
        # the coordinator; the owner's own limit (--max-epsilon) is enforced here too: the
        # coordinator only sees "declined".
        algorithm = job.build_algorithm()
        app = learning_app(
            model, plan=algorithm.plan, max_epsilon=args.max_epsilon, max_delta=args.max_delta
        )
        app.install(algorithm.node_tasks())  # e.g. the secure sum's protocol tasks
    elif args.max_epsilon is not None:
        app.add_guard(
            budget_guard(max_epsilon=args.max_epsilon, max_delta=args.max_delta, tasks={TRAIN})
        )
    node_state = None
    if args.max_epsilon is not None and not args.state:
        print(
            "shoal node: warning: --max-epsilon without --state keeps the privacy ledger in "
            "memory; a restart starts again from epsilon 0 (give --state node.db)",
            file=sys.stderr,
            flush=True,
        )
    if args.state:
        from shoal.runtime import open_node_state

        # The file is bound to this node's key: another node's ledger is refused.
        node_state = open_node_state(args.state, owner=fingerprint(public_key_bytes(key)))
        node_state.audit("node.started", key=fingerprint(public_key_bytes(key)))

    def on_retry(attempt: int, delay: float, reason: str) -> None:
        print(
            f"attempt {attempt}: no session with {args.coordinator}: {reason}; retrying in "
            f"{delay:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    client = NodeClient(
        app=app,
        coordinator=args.coordinator,
        key=key,
        data=data,
        node_state=node_state,
        tls=tls,
        insecure=bool(args.insecure),
        partition_index=index,
        job_digest=job_digest(job),
        backoff=Backoff(initial_s=args.backoff, max_s=max(args.backoff, args.backoff_max)),
        max_idle_s=args.max_idle,
        lane=not args.no_data_lane,
        on_retry=on_retry,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        client.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    me = fingerprint(public_key_bytes(key))
    print(f"node {me} connecting to {args.coordinator}", flush=True)
    outcome = client.run()
    name = client.node_id or me
    if outcome == NodeExit.REJECTED:
        print(f"node {name}: the coordinator refused it: {client.detail}", flush=True)
        return 3
    if client.tasks_done and client.tasks_failed == client.tasks_done:
        print(
            f"node {name}: {outcome.value}, but every one of its {client.tasks_done} task(s) "
            f"failed; the last error: {client.last_failure}",
            flush=True,
        )
        return 4
    failed = f", {client.tasks_failed} failed" if client.tasks_failed else ""
    print(f"node {name}: {outcome.value} after {client.tasks_done} task(s){failed}", flush=True)
    return 0
