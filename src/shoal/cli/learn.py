"""``shoal demo``, ``shoal run JOB.toml`` and ``shoal runs``: simulate and inspect runs."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shoal.cli.job import JobSpec, load_job, parse_job, simulate_job
from shoal.cli.options import default_store_path, open_store, positive_float, positive_int
from shoal.cli.trees import is_tree_job, run_tree_job, tree_line
from shoal.errors import ConfigError
from shoal.learn import RoundReport, TrainingResult, train_centralized
from shoal.runtime import Store

__all__ = ["DEMO_JOB", "register"]

DEMO_JOB: dict[str, Any] = {
    "job": {"name": "demo", "seed": 0},
    "data": {
        "dataset": "digits",
        "test_fraction": 0.2,
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "nodes": 20},
    },
    "model": {"name": "softmax_regression"},
    "algorithm": {
        "name": "fedavg",
        "rounds": 30,
        "nodes_per_round": 10,
        "local_epochs": 3,
        "lr": 0.5,
        "batch_size": 16,
    },
}

DEMO_EPILOG = """\
examples:
  shoal demo                         digits over 20 simulated nodes, FedAvg, 30 rounds
  shoal demo --rounds 10 --nodes 50  a shorter run over more, smaller nodes
  shoal demo --json demo.json        also write a summary (accuracy, centralized_accuracy, ...)
"""

RUN_EPILOG = """\
examples:
  shoal run job.toml                 simulate the job described in job.toml
  shoal run job.toml --json out.json write a summary as JSON
  shoal run job.toml --resume RUN_ID continue an interrupted run from its last round
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    demo = subparsers.add_parser(
        "demo",
        help="train digits across simulated nodes and compare with centralized training",
        description="Run the built-in demo job: digits, Dirichlet(0.5) split, FedAvg.",
        epilog=DEMO_EPILOG,
        formatter_class=fmt,
    )
    demo.add_argument("--rounds", type=positive_int, default=None, help="rounds (default 30)")
    demo.add_argument("--nodes", type=positive_int, default=None, help="nodes (default 20)")
    demo.add_argument(
        "--epsilon",
        type=positive_float,
        help="train with example-level differential privacy at this epsilon (distributed "
        "DP-SGD inside secure aggregation; noise calibrated automatically)",
    )
    demo.add_argument("--delta", type=positive_float, default=1e-5, help="DP delta (1e-5)")
    _common(demo)
    demo.set_defaults(func=_run_demo)

    run = subparsers.add_parser(
        "run",
        help="simulate a job file",
        description="Simulate the job in JOB.toml (see the README for the format).",
        epilog=RUN_EPILOG,
        formatter_class=fmt,
    )
    run.add_argument("job", help="path to a job file (TOML)")
    run.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run")
    run.add_argument(
        "--insecure-test-keys",
        action="store_true",
        help="vertical jobs: allow Paillier keys under 2048 bits (tests only)",
    )
    _common(run)
    run.set_defaults(func=_run_job)

    runs = subparsers.add_parser(
        "runs",
        help="list recorded runs, or show one",
        description="List the runs recorded in the store, or show one run's rounds.",
        epilog="examples:\n  shoal runs\n  shoal runs show RUN_ID\n",
        formatter_class=fmt,
    )
    runs.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    runs.add_argument("run_id", nargs="?", help="the run to show")
    runs.add_argument("--store", help=f"store file (default {default_store_path()})")
    runs.add_argument("--limit", type=positive_int, default=20)
    runs.add_argument("--json", action="store_true", help="print JSON instead of tables")
    runs.set_defaults(func=_runs)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write a JSON summary to PATH")
    parser.add_argument("--store", help=f"store file (default {default_store_path()})")
    parser.add_argument("--quiet", action="store_true", help="no per-round output")


def _run_demo(args: argparse.Namespace) -> int:
    raw: dict[str, Any] = json.loads(json.dumps(DEMO_JOB))
    if args.rounds:
        raw["algorithm"]["rounds"] = args.rounds
    if args.nodes:
        raw["data"]["partition"]["nodes"] = args.nodes
        raw["algorithm"]["nodes_per_round"] = max(1, args.nodes // 2)
    if args.epsilon:
        # One DP-SGD step over the federation per round, its noise added in shares inside
        # SecAgg+; a single global step per round wants a larger learning rate.
        raw["privacy"] = {"epsilon": args.epsilon, "delta": args.delta, "sample_rate": 0.2}
        raw["aggregate"] = {"secure": True}
        raw["algorithm"]["lr"] = 3.0
    return _execute(parse_job(raw), args, resume=None)


def _run_job(args: argparse.Namespace) -> int:
    from shoal.cli.vertical import is_vertical, run_vertical

    if is_vertical(args.job):  # a [vertical] job: parties with their own columns
        return run_vertical(args)
    return _execute(load_job(args.job), args, resume=args.resume)


def _execute(job: JobSpec, args: argparse.Namespace, *, resume: str | None) -> int:
    console = Console(quiet=args.quiet)
    if is_tree_job(job):
        if resume:
            raise ConfigError("tree jobs do not resume; run them again")
        summary = run_tree_job(job)
        console.print(tree_line(summary))
        if args.json:
            text = json.dumps(_finite(summary), indent=2, allow_nan=False)
            Path(args.json).write_text(text + "\n", encoding="utf-8")
        return 0
    algorithm = job.algorithm
    rounds = int(algorithm.get("rounds", 10))
    nodes = int(job.partition["nodes"])
    console.print(
        f"[bold]{job.name}[/]: {job.data.get('dataset') or job.data.get('path')} over {nodes} "
        f"nodes ({job.partition['scheme']}), {algorithm['name']}, {rounds} rounds"
    )
    started = time.perf_counter()
    with open_store(args.store) as store, _progress(console, rounds) as on_round:
        result = simulate_job(job, store=store, resume=resume, on_round=on_round)
    wall = time.perf_counter() - started
    summary = _summary(job, result, wall, nodes)
    privacy = (
        f"; epsilon {summary['epsilon']:.3f} at delta {summary['delta']:g}"
        if summary.get("epsilon") is not None
        else ""
    )
    console.print(
        f"federated accuracy [bold]{summary['accuracy']:.4f}[/], centralized "
        f"{summary['centralized_accuracy']:.4f} (same model on the pooled data, no privacy)"
        f"{privacy}; {wall:.1f} s; run {result.run_id}"
    )
    if args.json:
        text = json.dumps(_finite(summary), indent=2, allow_nan=False)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


def _summary(job: JobSpec, result: TrainingResult, wall: float, nodes: int) -> dict[str, Any]:
    train, test = job.load_data()
    algorithm = job.build_algorithm()
    # The baseline sees as many examples as the federation processed, in passes of the pool.
    passes = algorithm.rounds * algorithm.local_epochs * min(algorithm.nodes_per_round, nodes)
    central = train_centralized(
        job.build_model(),
        train,
        test,
        epochs=max(1, round(passes / nodes)),
        lr=algorithm.lr,
        batch_size=algorithm.batch_size,
        seed=job.seed,
    )
    metrics = result.metrics
    return {
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "federated_accuracy": metrics.get("federated_accuracy"),
        "centralized_accuracy": central.get("accuracy"),
        "epsilon": metrics.get("epsilon"),
        "delta": metrics.get("delta"),
        "rounds": len(result.history),
        "nodes": nodes,
        "wall_s": wall,
        "run_id": result.run_id,
        "history": [r.metrics() for r in result.history],
    }


class _progress:
    """A rich progress bar on terminals; one line per round everywhere."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.console = console
        self.rounds = rounds
        self.bar: Progress | None = None

    def __enter__(self) -> Callable[[RoundReport], None]:
        if self.console.is_terminal and not self.console.quiet:
            self.bar = Progress(
                TextColumn("round"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("rounds", total=self.rounds, status="")
        return self.update

    def update(self, report: RoundReport) -> None:
        parts = [f"round {report.round:>3}/{self.rounds}", f"nodes {report.participants:>3}"]
        if report.failed:
            parts[-1] += f" (-{report.failed})"
        if report.train_loss == report.train_loss:  # not NaN: DP runs keep it at the nodes
            parts.append(f"loss {report.train_loss:.4f}")
        if report.accuracy is not None:
            parts.append(f"acc {report.accuracy:.4f}")
        if report.epsilon is not None:
            parts.append(f"eps {report.epsilon:.3f}")
        line = "  ".join(parts)
        if self.bar is not None:
            self.bar.update(self.task, completed=report.round, status=line)
        self.console.print(line, highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _runs(args: argparse.Namespace) -> int:
    console = Console()
    with open_store(args.store) as store:
        if args.action == "show" or args.run_id:
            if not args.run_id:
                raise ConfigError("shoal runs show needs a RUN_ID; list them with `shoal runs`")
            return _show_run(console, store, args.run_id, as_json=args.json)
        records = store.list_runs(limit=args.limit)
        if args.json:
            print(json.dumps([_run_dict(r) for r in records], indent=2))
            return 0
        table = Table(title=f"runs in {store.path}")
        table.add_column("run id", no_wrap=True)
        for column in ("name", "status", "created", "rounds", "accuracy"):
            table.add_column(column)
        for record in records:
            summary = record.summary or {}
            accuracy = summary.get("accuracy")
            table.add_row(
                record.id,
                record.name,
                record.status,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
                str(summary.get("round", "")),
                f"{accuracy:.4f}" if isinstance(accuracy, float) else "",
            )
        console.print(table)
    return 0


def _run_dict(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "created_at": record.created_at,
        "summary": record.summary,
    }


def _show_run(console: Console, store: Store, run_id: str, *, as_json: bool) -> int:
    record = store.get_run(run_id)
    rounds = store.round_metrics(run_id)
    if as_json:
        out = _run_dict(record)
        out["config"] = record.config
        out["rounds"] = [
            {"round": r.round, "metrics": r.metrics, "participants": r.participants} for r in rounds
        ]
        print(json.dumps(out, indent=2))
        return 0
    console.print(f"[bold]{record.name}[/] ({record.id}): {record.status}")
    table = Table()
    for column in ("round", "nodes", "failed", "train loss", "accuracy"):
        table.add_column(column, justify="right")
    for r in rounds:
        m: Mapping[str, Any] = r.metrics
        table.add_row(
            str(r.round),
            str(r.participants.get("ok", 0)),
            str(sum(v for k, v in r.participants.items() if k != "ok")),
            _fmt(m.get("train_loss")),
            _fmt(m.get("accuracy")),
        )
    console.print(table)
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric that was not measured (e.g. DP's training loss) is null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
