"""``shoal run`` / ``coordinator`` / ``node`` for vertical jobs (a ``[vertical]`` table)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["coordinate_vertical", "is_vertical", "register", "run_vertical", "serve_party"]


def is_vertical(path: str | Path) -> bool:
    """Whether the job file at ``path`` is a vertical job (loads shoal.vertical only here,
    so that `shoal predict --help` stays fast)."""
    from shoal.vertical.job import is_vertical as check

    return bool(check(path))


def _print_summary(summary: dict[str, Any]) -> None:
    keys = ("auc", "accuracy", "rmse")
    parts = [f"intersection {summary['intersection_size']}"]
    for k in keys:
        if k in summary:
            ref = summary.get(f"centralized_{k}")
            parts.append(f"{k} {summary[k]:.4f}" + (f" (centralized {ref:.4f})" if ref else ""))
    parts.append(f"{summary['wall_s']:.1f} s, {summary['bytes_sent'] / 1e6:.1f} MB relayed")
    print(", ".join(parts), flush=True)


def _trees_config(job: Any) -> Any:
    """A secureboost job's checked SecureBoostConfig (None for hetero linear models)."""
    from shoal.vertical.job import SECUREBOOST

    if job.model != SECUREBOOST:
        return None
    from shoal.trees.secureboost import config_from_job

    return config_from_job(job)


def run_vertical(args: argparse.Namespace) -> int:
    from shoal.vertical.job import SECUREBOOST, load_vertical_job, simulate

    job = load_vertical_job(args.job, insecure_test_keys=bool(args.insecure_test_keys))
    if job.model == SECUREBOOST:
        from shoal.trees.secureboost import simulate as simulate_trees

        summary = simulate_trees(job)
    else:
        summary = simulate(job)
    if not getattr(args, "quiet", False):
        _print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def _digest(job: Any) -> str:
    import hashlib

    text = json.dumps(job.raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def coordinate_vertical(args: argparse.Namespace) -> int:
    """The coordinator of a deployed vertical job: waits for every party, then trains."""
    import time

    from shoal.cli.options import open_store
    from shoal.core import Federation
    from shoal.errors import NotEnoughNodes
    from shoal.runtime.grpc import GrpcEngine, ServerTLS
    from shoal.vertical.job import load_vertical_job, summarize
    from shoal.vertical.protocol import train

    job = load_vertical_job(args.job, insecure_test_keys=bool(args.insecure_test_keys))
    trees = _trees_config(job)  # tree parameters checked before any party connects
    roles = job.roles
    parties = [n for nodes in roles.values() for n in nodes]
    tls = None if args.insecure else ServerTLS.from_dir(args.certs)
    with open_store(args.store) as store:
        engine = GrpcEngine(
            listen=args.listen,
            registry=store,
            tls=tls,
            insecure=bool(args.insecure),
            seed=job.config.seed,
            job_digest=_digest(job),
            heartbeat_s=args.heartbeat,
        )
        try:
            engine.start()
            print(
                f"coordinator for vertical job {job.name!r} on port {engine.port}; waiting for "
                f"{', '.join(parties)}",
                flush=True,
            )
            engine.wait_for_nodes(len(parties), timeout_s=args.wait_timeout)
            missing = sorted(set(parties) - set(engine.node_ids()))
            if missing:
                raise NotEnoughNodes(
                    f"part(ies) {missing} did not connect within {args.wait_timeout:.0f} s"
                )
            fed = Federation(
                engine,
                roles=roles,
                deadline_s=args.deadline or 3600.0,
                seed=job.config.seed,
            )
            start = time.perf_counter()
            if trees is not None:
                from shoal.trees import secureboost

                def on_tree(done: int, total: int) -> None:
                    print(f"tree {done}/{total}", flush=True)

                routed = secureboost.train_routed(fed, trees, on_tree=on_tree)
                summary = secureboost.summarize(job, routed, time.perf_counter() - start)
            else:
                result = train(fed, job.config)
                summary = summarize(job, result, time.perf_counter() - start)
            engine.finish("run finished")  # the parties exit now, not after --max-idle
        finally:
            engine.close()
    if not args.quiet:
        _print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def serve_party(args: argparse.Namespace) -> int:
    """One party's node: its own CSV, its role's tasks, nothing else."""
    from shoal.runtime import NodeApp, open_node_state
    from shoal.runtime.grpc import (
        Backoff,
        ClientTLS,
        NodeClient,
        NodeExit,
        fingerprint,
        load_private_key,
        public_key_bytes,
    )
    from shoal.vertical.checkpoint import FileCheckpoints
    from shoal.vertical.job import ARBITER, SECUREBOOST, load_vertical_job
    from shoal.vertical.tasks import vertical_tasks

    job = load_vertical_job(args.job, insecure_test_keys=bool(args.insecure_test_keys))
    name = args.party or Path(args.key).name.removesuffix(".key")
    data = None
    if name == ARBITER and job.config.mode == "arbiter":
        role = ARBITER
    else:
        party = job.party(name)
        role = party.role
        path = Path(args.data) if args.data else None
        if job.model == SECUREBOOST:
            from shoal.trees.secureboost import load_party

            data = load_party(job, party, path)
        else:
            data = party.load(job.id_column, path)
    key = load_private_key(args.key)
    node_state, checkpoints = None, None
    if getattr(args, "state", None):
        # The node's audit log and ledger file, bound to its key (another node's is refused);
        # the party's coefficients of each completed epoch (or its part of each complete
        # round of trees) go in a table of the same file, so a restarted party resumes.
        node_state = open_node_state(args.state, owner=fingerprint(public_key_bytes(key)))
        node_state.audit("node.started", key=fingerprint(public_key_bytes(key)))
        checkpoints = FileCheckpoints(args.state)
    app = NodeApp(max_kept=8)
    model_out = getattr(args, "model_out", None)
    if _trees_config(job) is not None:
        from shoal.trees.secureboost import secureboost_tasks

        app.install(secureboost_tasks(role, checkpoints=checkpoints, model_out=model_out))
    elif model_out:
        from shoal.errors import ConfigError

        raise ConfigError("--model-out is for the parties of a secureboost job")
    else:
        app.install(vertical_tasks(role, mode=job.config.mode, checkpoints=checkpoints))
    tls = (
        None
        if args.insecure
        else ClientTLS.from_dir(
            args.certs, name=args.cert_name or name, server_name=args.server_name
        )
    )
    client = NodeClient(
        app=app,
        coordinator=args.coordinator,
        key=key,
        data=data,
        node_state=node_state,
        tls=tls,
        insecure=bool(args.insecure),
        job_digest=_digest(job),
        backoff=Backoff(initial_s=args.backoff, max_s=max(args.backoff, args.backoff_max)),
        max_idle_s=args.max_idle,
    )
    print(f"party {name} ({role}) connecting to {args.coordinator}", flush=True)
    outcome = client.run()
    print(f"party {name}: {outcome.value} after {client.tasks_done} task(s)", flush=True)
    return 3 if outcome == NodeExit.REJECTED else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``shoal predict serve`` (the model owner's node) and ``shoal predict query`` (client)."""
    from shoal.cli.options import positive_float, positive_int

    predict = subparsers.add_parser(
        "predict",
        help="private prediction: serve a linear model on encrypted rows, or query one",
        description="The client encrypts its rows under its own Paillier key; the owner "
        "scores them without seeing them and the client never sees the weights.",
    )
    sub = predict.add_subparsers(dest="predict_command", metavar="serve|query")
    serve = sub.add_parser("serve", help="the model owner: a node serving a linear model")
    serve.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the client")
    serve.add_argument("--key", required=True, metavar="KEYFILE", help="this node's key")
    serve.add_argument("--certs", metavar="DIR", help="certificate directory (mutual TLS)")
    serve.add_argument("--insecure", action="store_true", help="plaintext (tests only)")
    serve.add_argument("--model", required=True, help=".npz with 'weights' (and 'bias')")
    serve.add_argument("--budget-rows", type=positive_int, help="rows this client may score")
    serve.add_argument(
        "--state",
        metavar="FILE",
        help="the owner node's durable state (SQLite): the client's rows scored so far survive "
        "restarts; without it the budget restarts from zero with the process",
    )
    serve.add_argument(
        "--client",
        metavar="NAME",
        help="whose budget the queries are charged to (default: the --coordinator address)",
    )
    serve.add_argument("--noise-std", type=float, default=0.0, help="noise on every score")
    serve.add_argument("--insecure-test-keys", action="store_true", help="accept short keys")
    serve.add_argument("--max-idle", type=positive_float, metavar="S")
    serve.set_defaults(func=_predict_serve)
    query = sub.add_parser("query", help="the client: score a CSV of rows at the owner")
    query.add_argument("--listen", default="127.0.0.1:7000", metavar="HOST:PORT")
    query.add_argument("--certs", metavar="DIR", help="certificate directory (mutual TLS)")
    query.add_argument("--insecure", action="store_true", help="plaintext (tests only)")
    query.add_argument("--store", help="registry of admitted nodes (shoal nodes add)")
    query.add_argument("--owner", required=True, help="the model owner's node id")
    query.add_argument("--rows", required=True, help="CSV of feature rows (header line)")
    query.add_argument("--out", required=True, help="write the scores here (one per line)")
    query.add_argument("--key-bits", type=positive_int, default=2048)
    query.add_argument("--insecure-test-keys", action="store_true", help="allow short keys")
    query.add_argument("--wait-timeout", type=positive_float, default=120.0, metavar="S")
    query.set_defaults(func=_predict_query)


def _predict_serve(args: argparse.Namespace) -> int:
    import numpy as np

    from shoal.errors import ConfigError
    from shoal.runtime import NodeApp, open_node_state
    from shoal.runtime.grpc import (
        ClientTLS,
        NodeClient,
        fingerprint,
        load_private_key,
        public_key_bytes,
    )
    from shoal.vertical.prediction import FileQueryLedger, ServedModel, serving_tasks

    try:
        with np.load(args.model, allow_pickle=False) as npz:
            weights, bias = npz["weights"], float(npz["bias"]) if "bias" in npz else 0.0
    except (OSError, KeyError, ValueError, MemoryError) as exc:  # MemoryError: a header's size
        raise ConfigError(f"cannot read model {args.model}: {exc}") from None
    model = ServedModel(
        weights=weights,
        bias=bias,
        budget_rows=args.budget_rows,
        noise_std=args.noise_std,
        min_key_bits=512 if args.insecure_test_keys else 2048,
    )
    key = load_private_key(args.key)
    node_state, ledger = None, None
    if args.state:
        # bound to this node's key like any node state; the budget is a table of the file
        node_state = open_node_state(args.state, owner=fingerprint(public_key_bytes(key)))
        ledger = FileQueryLedger(args.state)
    elif args.budget_rows is not None:
        print(
            "shoal predict serve: warning: --budget-rows without --state keeps the budget in "
            "memory; a restart starts again from zero (give --state owner.db)",
            file=sys.stderr,
            flush=True,
        )
    app = NodeApp()
    app.install(serving_tasks(model, ledger=ledger, client=args.client or args.coordinator))
    name = Path(args.key).name.removesuffix(".key")
    client = NodeClient(
        app=app,
        coordinator=args.coordinator,
        key=key,
        node_state=node_state,
        tls=None if args.insecure else ClientTLS.from_dir(args.certs, name=name),
        insecure=bool(args.insecure),
        max_idle_s=args.max_idle,
    )
    print(f"serving a {len(model.weights)}-feature linear model to {args.coordinator}", flush=True)
    outcome = client.run()
    print(f"model owner: {outcome.value} after {client.tasks_done} task(s)", flush=True)
    return 0


def _predict_query(args: argparse.Namespace) -> int:
    import numpy as np

    from shoal.cli.options import open_store
    from shoal.core import Federation
    from shoal.errors import NotEnoughNodes
    from shoal.runtime.grpc import GrpcEngine, ServerTLS
    from shoal.vertical.party import PartyData
    from shoal.vertical.prediction import PredictionClient

    rows = _read_rows(Path(args.rows), PartyData)
    with open_store(args.store) as store:
        engine = GrpcEngine(
            listen=args.listen,
            registry=store,
            tls=None if args.insecure else ServerTLS.from_dir(args.certs),
            insecure=bool(args.insecure),
        ).start()
        try:
            engine.wait_for_nodes(1, timeout_s=args.wait_timeout)
            if args.owner not in engine.node_ids():
                raise NotEnoughNodes(f"the model owner {args.owner!r} did not connect")
            client = PredictionClient(
                Federation(engine),
                owner=args.owner,
                key_bits=args.key_bits,
                insecure=bool(args.insecure_test_keys),
            )
            scores = client.predict(rows)
        finally:
            engine.close()
    Path(args.out).write_text("".join(f"{s!r}\n" for s in np.asarray(scores).tolist()))
    print(f"{len(scores)} scores written to {args.out}", flush=True)
    return 0


def _read_rows(path: Path, party_cls: Any) -> Any:
    import csv

    import numpy as np

    from shoal.errors import DataError

    with path.open(newline="") as fh:
        lines = list(csv.reader(fh))
    if not lines:
        raise DataError(f"{path} is empty")
    header, body = lines[0], lines[1:]
    try:
        x = np.array([[float(v) for v in row] for row in body], dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: every value must be a number") from None
    if x.ndim != 2 or x.shape[1] != len(header):
        raise DataError(f"{path}: every row needs {len(header)} values")
    return party_cls.from_columns([str(i) for i in range(len(x))], x, columns=header).x
