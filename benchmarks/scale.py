"""Scale-out cost: RayEngine against LocalEngine, the plain-loop floor and Flower 1.42 on Ray.

The workload is ``benchmarks/simulation.py``'s: N nodes of 32 digits images each (node i's
drawn with the seeded rule ``simulation.shard``), FedAvg over all N nodes every round (3 local
epochs, batch 16, lr 0.5), the server's test accuracy after every round. Rows, each run in a
fresh process of its own, interleaved repeat by repeat (floor, local, ray, floor, ...):

* ``floor``: ``simulation.floor_run``, the minimal NumPy FedAvg loop, node data built once
  before timing, one process, one core.
* ``local``: ``simulate(...)`` on its default LocalEngine (one worker thread), node data
  built before the call, as in simulation.py.
* ``ray``: ``simulate(..., engine=RayEngine(...))`` on a private Ray started in the child
  (``ray.init(num_cpus=--cpus)``, one actor per CPU). The actors build their nodes' data
  themselves from a recipe (``scale:shards``, the same seeded rule) on first use and cache
  all of it (``cache_size=N``).
* ``flower``: Flower 1.42's Ray simulation (``benchmarks/simulation_flower.py``) in its own
  venv, each client's data built once per Ray actor and cached, ``--cpus`` actors.

Seconds per round: for ``floor`` the whole loop over the rounds; for ``local``, ``ray`` and
``flower`` the time between round ends (shoal: ``on_round``; Flower: its ServerApp's clock),
the first round not counted (it starts Ray's actors and builds the data). Each row's figure
is the median over ``--repeats`` repeats of the median over its timed rounds. CPU per round
is, likewise, the CPU seconds of the row's whole process tree (driver, Ray's daemons and
actors) between round ends; for the floor, its process CPU. Flower's rounds are timed inside
its ServerApp, so its CPU column is empty. Peak memory is
the largest sum, sampled every 0.2 s, of the proportional set size (PSS: shared pages split
between the processes that map them) of the row's process and all its descendants (Ray's
GCS, raylet and workers included). The machine may be shared: on a loaded machine a
multi-process row's wall time depends on how much of the cores it gets, which its CPU
column does not.

    python benchmarks/scale.py --nodes 1000 10000 --rounds 4 --repeats 3 \\
        --flower-python /work/venvs/flower/bin/python --flower-nodes 1000 --json scale.json

Flower's venv: ``python3 -m venv /work/venvs/flower &&
/work/venvs/flower/bin/pip install "flwr[simulation]==1.42.0" numpy scikit-learn``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS = ("floor", "local", "ray")


def shards(*, seed: int) -> Any:
    """node id ``n<i>`` -> node i's 32 images (the floor's own rule): a RayEngine data
    recipe's target, so each actor builds its nodes itself (the pool once per actor)."""
    from simulation import digits, shard

    from shoal.data import Dataset

    pool_x, pool_y, _, _ = digits(seed)

    def node(node_id: str) -> Dataset:
        x, y = shard(pool_x, pool_y, seed, int(node_id[1:]))
        return Dataset(x=x, y=y, classes=10, name=node_id)

    return node


def child(row: str, nodes: int, rounds: int, seed: int, cpus: int) -> dict[str, Any]:
    from simulation import BATCH, CLASSES, EPOCHS, FEATURES, LR, digits, floor_run, shard

    pool_x, pool_y, test_x, test_y = digits(seed)
    out: dict[str, Any] = {"row": row, "nodes": nodes}
    if row == "floor":
        built = [shard(pool_x, pool_y, seed, i) for i in range(nodes)]
        c0, t0 = time.process_time(), time.perf_counter()
        out["accuracy"] = floor_run(lambda: built, test_x, test_y, rounds, seed)
        out["wall_s_per_round"] = (time.perf_counter() - t0) / rounds
        out["cpu_s_per_round"] = (time.process_time() - c0) / rounds
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    from shoal.data import Dataset
    from shoal.learn import FedAvg, SoftmaxRegression, simulate

    test = Dataset(x=test_x, y=test_y, classes=CLASSES, name="test")
    ends: list[tuple[float, float]] = []
    options: dict[str, Any] = {}
    engine = None
    if row == "local":
        node_data = [
            Dataset(x=x, y=y, classes=CLASSES, name=f"n{i}")
            for i, (x, y) in enumerate(shard(pool_x, pool_y, seed, i) for i in range(nodes))
        ]
        options["nodes"] = node_data
    else:
        import ray

        from shoal.runtime import Recipe
        from shoal.runtime.ray import RayEngine

        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        app = Recipe(
            target="shoal.learn.tasks:model_app",
            options={"model": "softmax_regression", "features": FEATURES, "classes": CLASSES},
        )
        # Every node's data cached in its actor once built (cache_size=nodes), as the floor
        # holds all its nodes' data and Flower's runner caches each client's per actor.
        data = Recipe(target="scale:shards", options={"seed": seed})
        engine = RayEngine(app=app, data=data, nodes=nodes, cache_size=nodes)
        options["engine"] = engine
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        result = simulate(
            model=SoftmaxRegression(features=FEATURES, classes=CLASSES),
            algorithm=FedAvg(
                rounds=rounds, nodes_per_round=nodes, local_epochs=EPOCHS, lr=LR, batch_size=BATCH
            ),
            test=test,
            on_round=lambda report: ends.append((time.perf_counter(), tree_cpu())),
            **options,
        )
    finally:
        if engine is not None:
            engine.close()
    wall = time.perf_counter() - t0
    rounds_s = [b[0] - a[0] for a, b in itertools.pairwise(ends)]  # the first round is not timed
    cpu_s = [b[1] - a[1] for a, b in itertools.pairwise(ends)]
    out["round_s"] = rounds_s
    out["round_cpu_s"] = cpu_s
    out["wall_s_per_round"] = statistics.median(rounds_s)
    out["cpu_s_per_round"] = statistics.median(cpu_s)
    out["whole_call_s_per_round"] = wall / rounds
    out["whole_call_cpu_s_per_round"] = (time.process_time() - c0) / rounds
    out["accuracy"] = float(result.metrics["accuracy"])
    return out


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and all its live descendants: for the
    Ray row, the driver, Ray's daemons and the actors together."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measured(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``command``; its output and the peak PSS (MB) of it and its descendants."""
    import psutil

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                family = []
            for p in family:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_full_info().pss
            peak[0] = max(peak[0], total / 2**20)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), peak[0]


def run_row(row: str, args: argparse.Namespace, nodes: int) -> dict[str, Any] | None:
    command = [sys.executable, __file__, "--child", row, "--nodes", str(nodes)]
    command += ["--rounds", str(args.rounds), "--seed", str(args.seed), "--cpus", str(args.cpus)]
    done, peak = measured(command)
    if done.returncode != 0:
        print(f"{row} failed at N={nodes}:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_pss_mb"] = peak
    return result


def run_flower(args: argparse.Namespace, nodes: int) -> dict[str, Any] | None:
    from simulation import digits

    pool_x, pool_y, test_x, test_y = digits(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits.npz"
        np.savez(data, pool_x=pool_x, pool_y=pool_y, test_x=test_x, test_y=test_y)
        out = Path(tmp) / "flower.json"
        command = [args.flower_python, str(HERE / "simulation_flower.py"), "--data", str(data)]
        command += ["--nodes", str(nodes), "--rounds", str(args.flower_rounds)]
        command += ["--seed", str(args.seed), "--actors", str(args.cpus), "--json", str(out)]
        done, peak = measured(command)
        if done.returncode != 0 or not out.exists():
            print(f"flower failed at N={nodes}:\n{done.stderr[-3000:]}", file=sys.stderr)
            return None
        result: dict[str, Any] = json.loads(out.read_text())
        result["round_s"] = result.pop("wall_runs")
        result["peak_pss_mb"] = peak
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (1st untimed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2, help="Ray's CPUs = actors (both rows)")
    parser.add_argument("--flower-python", metavar="PYTHON", help="Flower 1.42's venv python")
    parser.add_argument("--flower-nodes", type=int, nargs="+", help="N for Flower (default: all)")
    parser.add_argument("--flower-rounds", type=int, default=3, help="Flower rounds (1st untimed)")
    parser.add_argument("--flower-repeats", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is not timed)")
    if args.child:
        print(json.dumps(child(args.child, args.nodes[0], args.rounds, args.seed, args.cpus)))
        return 0
    results: list[dict[str, Any]] = []
    for n in args.nodes:
        runs: dict[str, list[dict[str, Any]]] = {}
        with_flower = args.flower_python and n in (args.flower_nodes or args.nodes)
        for rep in range(args.repeats):  # interleaved: load drift hits every row
            order = [*ROWS, "flower"] if with_flower and rep < args.flower_repeats else ROWS
            for row in order:
                got = run_flower(args, n) if row == "flower" else run_row(row, args, n)
                if got is not None:
                    runs.setdefault(row, []).append(got)
                    print(
                        f"N={n} repeat {rep} {row}: {got['wall_s_per_round']:.3f} s/round, "
                        f"peak {got['peak_pss_mb']:.0f} MB",
                        file=sys.stderr,
                        flush=True,
                    )
        summary: dict[str, Any] = {"nodes": n, "rounds": args.rounds, "cpus": args.cpus}
        for row, got in runs.items():
            summary[row] = {
                "wall_s_per_round": statistics.median(g["wall_s_per_round"] for g in got),
                "peak_pss_mb": statistics.median(g["peak_pss_mb"] for g in got),
                "accuracy": got[-1]["accuracy"],
                "runs": got,
            }
            if all("cpu_s_per_round" in g for g in got):
                summary[row]["cpu_s_per_round"] = statistics.median(
                    g["cpu_s_per_round"] for g in got
                )
        results.append(summary)
    header = (
        f"{'nodes':>6} {'row':<30} {'wall s/round':>13} {'x floor':>8} {'CPU s/round':>12}"
        f" {'x floor':>8}"
        f" {'peak MB (PSS)':>14} {'accuracy':>9}"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "floor": "floor (minimal NumPy, 1 core)",
        "local": "shoal LocalEngine (1 thread)",
        "ray": "shoal RayEngine",
        "flower": "Flower 1.42 (Ray)",
    }
    for r in results:
        base = r.get("floor", {}).get("wall_s_per_round")
        for key, label in labels.items():
            row = r.get(key)
            if row is None:
                continue
            cpu_base = r.get("floor", {}).get("cpu_s_per_round")
            ratio = f"{row['wall_s_per_round'] / base:.2f}x" if base else "-"
            cpu = f"{row['cpu_s_per_round']:.3f}" if "cpu_s_per_round" in row else "-"
            cpu_ratio = (
                f"{row['cpu_s_per_round'] / cpu_base:.2f}x"
                if cpu_base and "cpu_s_per_round" in row
                else "-"
            )
            print(
                f"{r['nodes']:>6} {label:<30} {row['wall_s_per_round']:>13.3f} {ratio:>8}"
                f" {cpu:>12} {cpu_ratio:>8} {row['peak_pss_mb']:>14.0f} {row['accuracy']:>9.3f}"
            )
        if "flower" in r and "ray" in r:
            speed = r["flower"]["wall_s_per_round"] / r["ray"]["wall_s_per_round"]
            memory = r["ray"]["peak_pss_mb"] / r["flower"]["peak_pss_mb"]
            r["flower_vs_ray"] = {"slower_per_round": speed, "ray_peak_memory_share": memory}
            print(
                f"{'':>6} Flower / RayEngine: {speed:.1f}x slower per round; RayEngine's peak "
                f"memory {memory:.2f} of Flower's"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
