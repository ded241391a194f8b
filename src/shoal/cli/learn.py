"""``shoal demo``, ``shoal run JOB.toml`` and ``shoal runs``: simulate and inspect runs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.cli.options import (
    count,
    default_store_path,
    open_store,
    positive_float,
    positive_int,
    reconcile_runs,
    record_process,
)
from shoal.errors import ConfigError, StoreError

if TYPE_CHECKING:  # loaded when a command runs, so that `--help` stays fast
    from rich.console import Console
    from rich.progress import Progress

    from shoal.cli.job import JobSpec
    from shoal.learn import RoundReport, TrainingResult
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
  shoal run job.toml --baseline      also train centrally on the pooled data, to compare
  shoal run job.toml --eval-every 5 --eval-examples 0
                                     test on the whole test set, every 5th round and the last
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
    demo.add_argument(
        "--resume", metavar="RUN_ID", help="continue an interrupted demo (same options)"
    )
    _common(demo, baseline=True)
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
    run.add_argument(
        "--eval-every",
        type=positive_int,
        metavar="N",
        help="evaluate the server's test set every N rounds and after the last "
        "([engine] eval_every; default 1)",
    )
    run.add_argument(
        "--eval-examples",
        type=count,
        metavar="N",
        help="evaluate on N test examples drawn once, 0 for all ([engine] eval_examples; "
        "default all, 2,000 windows for text)",
    )
    _common(run, baseline=False)
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


def _common(parser: argparse.ArgumentParser, *, baseline: bool) -> None:
    parser.add_argument("--json", metavar="PATH", help="write a JSON summary to PATH")
    parser.add_argument("--store", help=f"store file (default {default_store_path()})")
    parser.add_argument(
        "--quiet", action="store_true", help="no per-round output (the result still prints)"
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=baseline,
        help="also train the same model centrally on the pooled data, for comparison "
        f"(default: {'on' if baseline else 'off'}; timed apart from the federated run)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from shoal.cli.job import parse_job

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
    again = "shoal demo" + "".join(
        f" --{name} {getattr(args, name)}"
        for name in ("rounds", "nodes", "epsilon")
        if getattr(args, name)
    )
    if args.epsilon and args.delta != 1e-5:
        again += f" --delta {args.delta}"
    return _execute(parse_job(raw), args, resume=args.resume, again=again)


def _run_job(args: argparse.Namespace) -> int:
    from shoal.cli.job import load_job
    from shoal.cli.vertical import is_vertical, run_vertical

    if is_vertical(args.job):  # a [vertical] job: parties with their own columns
        return run_vertical(args)
    engine = {
        key: value
        for key, value in (("eval_every", args.eval_every), ("eval_examples", args.eval_examples))
        if value is not None
    }
    job = load_job(args.job, engine=engine)
    return _execute(job, args, resume=args.resume, again=f"shoal run {args.job}")


def _execute(job: JobSpec, args: argparse.Namespace, *, resume: str | None, again: str) -> int:
    from rich.console import Console

    from shoal.cli.job import simulate_job
    from shoal.cli.trees import is_tree_job, run_tree_job, tree_line

    console = Console(highlight=False, soft_wrap=True)
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
    if not args.quiet:
        console.print(
            f"[bold]{job.name}[/]: {job.data.get('dataset') or job.data.get('path')} over "
            f"{nodes} nodes ({job.partition['scheme']}), {algorithm['name']}, {rounds} rounds"
        )
    started = time.perf_counter()
    run_ids: list[str | None] = []
    with open_store(args.store) as store:
        if resume is not None:
            _get_run(store, resume)  # an unknown id is a clear error before any work

        def on_start(run_id: str | None) -> None:
            run_ids.append(run_id)
            record_process(store, run_id)

        try:
            with _progress(console, rounds, quiet=args.quiet) as on_round:
                result = simulate_job(
                    job, store=store, resume=resume, on_round=on_round, on_start=on_start
                )
        except KeyboardInterrupt:
            if run_ids and run_ids[-1] is not None:
                print(
                    f"\ninterrupted: run {run_ids[-1]} is recorded up to its last completed "
                    f"round; continue it with `{again} --resume {run_ids[-1]}`"
                    + (f" --store {args.store}" if args.store else ""),
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print("\ninterrupted before the run started", file=sys.stderr, flush=True)
            return 130
    wall = time.perf_counter() - started
    central: dict[str, float] | None = None
    baseline_s = 0.0
    if args.baseline:
        if not args.quiet:
            console.print("training the centralized baseline (same model, pooled data) ...")
        t0 = time.perf_counter()
        central = _baseline(job, nodes)
        baseline_s = time.perf_counter() - t0
    summary = _summary(job, result, wall, nodes, central, baseline_s)
    parts = [f"federated accuracy [bold]{_fmt(summary['accuracy'])}[/]"]
    if central is not None:
        parts.append(
            f"centralized {_fmt(summary['centralized_accuracy'])} (same model on the pooled "
            f"data, no privacy; {baseline_s:.1f} s)"
        )
    if summary.get("epsilon") is not None:
        parts.append(f"epsilon {summary['epsilon']:.3f} at delta {summary['delta']:g}")
    parts.append(f"{wall:.1f} s")
    parts.append(f"run {result.run_id}")
    console.print("; ".join(parts))
    if args.json:
        text = json.dumps(_finite(summary), indent=2, allow_nan=False)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


def _baseline(job: JobSpec, nodes: int) -> dict[str, float]:
    from shoal.learn import train_centralized

    train, _ = job.load_data()
    test = job.eval_data()  # the examples the federated run was judged on
    algorithm = job.build_algorithm()
    # The baseline sees as many examples as the federation processed, in passes of the pool.
    passes = algorithm.rounds * algorithm.local_epochs * min(algorithm.nodes_per_round, nodes)
    return train_centralized(
        job.build_model(),
        train,
        test,
        epochs=max(1, round(passes / nodes)),
        lr=algorithm.lr,
        batch_size=algorithm.batch_size,
        seed=job.seed,
    )


def _summary(
    job: JobSpec,
    result: TrainingResult,
    wall: float,
    nodes: int,
    central: Mapping[str, float] | None,
    baseline_s: float,
) -> dict[str, Any]:
    metrics = result.metrics
    return {
        "accuracy": metrics.get("accuracy"),
        # "loss" alone was the test loss here and the training loss on screen: name both.
        "test_loss": metrics.get("loss"),
        "train_loss": metrics.get("train_loss"),
        "perplexity": metrics.get("perplexity"),
        "federated_accuracy": metrics.get("federated_accuracy"),
        "baseline": central is not None,
        "centralized_accuracy": central.get("accuracy") if central is not None else None,
        "centralized_perplexity": central.get("perplexity") if central is not None else None,
        "baseline_s": baseline_s if central is not None else None,
        "epsilon": metrics.get("epsilon"),
        "delta": metrics.get("delta"),
        "rounds": len(result.history),
        "nodes": nodes,
        "wall_s": wall,
        "run_id": result.run_id,
        "history": [_round_dict(r.metrics()) for r in result.history],
    }


def _round_dict(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A round's metrics with the server's test loss named ``test_loss``, as in the summary."""
    out = dict(metrics)
    if "loss" in out:
        out["test_loss"] = out.pop("loss")
    return out


class _progress:
    """A rich progress bar on terminals; one line per round everywhere (unless quiet)."""

    def __init__(self, console: Console, rounds: int, *, quiet: bool) -> None:
        self.console = console
        self.rounds = rounds
        self.quiet = quiet
        self.bar: Progress | None = None

    def __enter__(self) -> Callable[[RoundReport], None]:
        if self.console.is_terminal and not self.quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

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
        if self.quiet:
            return
        parts = [f"round {report.round:>3}/{self.rounds}", f"nodes {report.participants:>3}"]
        if report.failed:
            parts[-1] += f" (-{report.failed})"
        if report.train_loss == report.train_loss:  # not NaN: DP runs keep it at the nodes
            parts.append(f"train loss {report.train_loss:.4f}")
        if report.loss is not None:
            parts.append(f"test loss {report.loss:.4f}")
        if report.accuracy is not None:
            parts.append(f"acc {report.accuracy:.4f}")
        if "perplexity" in report.extra:
            parts.append(f"ppl {report.extra['perplexity']:.3f}")
        if report.epsilon is not None:
            parts.append(f"eps {report.epsilon:.3f}")
        line = "  ".join(parts)
        if self.bar is not None:
            self.bar.update(self.task, completed=report.round, status=line)
        self.console.print(line, highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _console() -> Console:
    """Tables at their natural width when piped (a pipe is not an 80-column terminal)."""
    from rich.console import Console

    probe = Console()
    return probe if probe.is_terminal else Console(width=1000)


def _get_run(store: Store, run_id: str) -> Any:
    try:
        return store.get_run(run_id)
    except StoreError:
        raise ConfigError(
            f"no run {run_id!r} in store {store.path}; list its runs with "
            f"`shoal runs --store {store.path}`"
        ) from None


def _runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    console = _console()
    with open_store(args.store, create=False) as store:
        for run_id in reconcile_runs(store):
            print(
                f"note: run {run_id} was marked interrupted: its process is gone; continue it "
                "with --resume",
                file=sys.stderr,
            )
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
            table.add_column(column, overflow="fold")
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
    from rich.table import Table

    record = _get_run(store, run_id)
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
    for column in ("round", "nodes", "failed", "train loss", "test loss", "accuracy"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rounds:
        m: Mapping[str, Any] = r.metrics
        table.add_row(
            str(r.round),
            str(r.participants.get("ok", 0)),
            str(sum(v for k, v in r.participants.items() if k != "ok")),
            _fmt(m.get("train_loss")),
            _fmt(m.get("loss")),
            _fmt(m.get("accuracy")),
        )
    console.print(table)
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric that was not measured (e.g. DP's training loss) is null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
