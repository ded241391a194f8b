"""``shoal run`` / ``coordinator`` / ``node`` for vertical jobs (a ``[vertical]`` table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shoal.vertical.job import is_vertical, load_vertical_job, simulate

__all__ = ["is_vertical", "run_vertical"]


def _print_summary(summary: dict[str, Any]) -> None:
    keys = ("auc", "accuracy", "rmse")
    parts = [f"intersection {summary['intersection_size']}"]
    for k in keys:
        if k in summary:
            ref = summary.get(f"centralized_{k}")
            parts.append(f"{k} {summary[k]:.4f}" + (f" (centralized {ref:.4f})" if ref else ""))
    parts.append(f"{summary['wall_s']:.1f} s, {summary['bytes_sent'] / 1e6:.1f} MB relayed")
    print(", ".join(parts), flush=True)


def run_vertical(args: argparse.Namespace) -> int:
    job = load_vertical_job(args.job, insecure_test_keys=bool(args.insecure_test_keys))
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
    from shoal.vertical.job import summarize
    from shoal.vertical.protocol import train

    job = load_vertical_job(args.job, insecure_test_keys=bool(args.insecure_test_keys))
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
            result = train(fed, job.config)
            summary = summarize(job, result, time.perf_counter() - start)
        finally:
            engine.close()
    if not args.quiet:
        _print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def serve_party(args: argparse.Namespace) -> int:
    """One party's node: its own CSV, its role's tasks, nothing else."""
    from shoal.runtime import NodeApp
    from shoal.runtime.grpc import Backoff, ClientTLS, NodeClient, NodeExit, load_private_key
    from shoal.vertical.job import ARBITER
    from shoal.vertical.tasks import vertical_tasks

    job = load_vertical_job(args.job, insecure_test_keys=bool(args.insecure_test_keys))
    name = args.party or Path(args.key).name.removesuffix(".key")
    data = None
    if name == ARBITER and job.config.mode == "arbiter":
        role = ARBITER
    else:
        party = job.party(name)
        role = party.role
        data = party.load(job.id_column, Path(args.data) if args.data else None)
    app = NodeApp(max_kept=8)
    app.install(vertical_tasks(role, mode=job.config.mode))
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
        key=load_private_key(args.key),
        data=data,
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
