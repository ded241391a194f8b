"""Cross-device scale: 100,000 registered nodes on LocalEngine, and FedBuff against FedAvg.

Two parts, each printed as a table and written to the JSON file:

``scale``: N registered nodes (default 100,000) with a diurnal availability model and
sampled device profiles (30% stragglers 10x slower, 1 Mbit/s links), FedAvg over K of them
per round (default 1,000), the workload of ``benchmarks/simulation.py`` (32 digits images a
node, 3 local epochs, batch 16, lr 0.5, test accuracy after every round). Rows, each in its
own process (so its peak RSS is its own), interleaved repeat by repeat:

* ``floor, sampled``: the minimal NumPy FedAvg loop of ``benchmarks/simulation.py``, doing
  the same work: each round it samples K of the N nodes and builds their 32-image shards (a
  node's data is a function of its index), trains them, averages, tests.
* ``floor, prebuilt``: simulation.py's floor exactly: the same K nodes every round, their
  data built once before timing (less work than the row above: no sampling, no building).
* ``shoal``: LocalEngine(nodes=N, data=factory, availability=Diurnal, devices=...),
  Federation + Trainer with FedAvg(nodes_per_round=K). Seconds per round exclude start-up
  (registering N nodes), which is reported on its own.

Memory per idle node (a separate process, tracemalloc): the bytes the engine allocates to
register N nodes with availability and device profiles (``idle``), then the bytes the
process holds after 6 more rounds (after a warm-up round), divided by the nodes that ran
for the first time in them (``after a round``: each such node's state dict, its ledger if
any, and whatever it keeps once the round has discarded its update).

``accuracy``: time to 0.90 test accuracy on digits, on the virtual clock, for M nodes
(default 1,000) each holding 32 training images drawn with class proportions from a
Dirichlet(0.3) (digits has 1,437 training images, so nodes share images), 30% stragglers 10x
slower (nominal train compute 1 s, 10 s; FedBuff's upload 0 s plus its transfer), 1 Mbit/s
links, diurnal availability (8 hours a day). FedAvg (K nodes per round) against FedBuff
(buffer K, concurrency 3K, max staleness 10) with the same number of node updates. Virtual
time is deterministic for the seed; wall time is not what this part measures.

    python benchmarks/scale_xdevice.py --json results/scale_xdevice.json
    python benchmarks/scale_xdevice.py --part scale --registered 100000 --per-round 1000 \
        --rounds 3 --repeats 3
    python benchmarks/scale_xdevice.py --part accuracy --nodes 1000 --updates 6000
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from simulation import (  # noqa: E402  (the floor and workload of benchmarks/simulation.py)
    BATCH,
    CLASSES,
    EPOCHS,
    FEATURES,
    LR,
    digits,
    floor_run,
    shard,
)

SEED = 0
MEMORY_ROUNDS = 6  # rounds after the warm one whose new nodes' memory is measured


# -- part 1: 100k registered nodes ----------------------------------------------------------


def _sampled(nodes: int, per_round: int, rounds: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 99])
    return [np.sort(rng.choice(nodes, size=per_round, replace=False)) for _ in range(rounds)]


def run_floor(mode: str, nodes: int, per_round: int, rounds: int) -> dict[str, Any]:
    pool_x, pool_y, test_x, test_y = digits(SEED)
    if mode == "prebuilt":
        built = [shard(pool_x, pool_y, SEED, i) for i in range(per_round)]
        t0, c0 = time.perf_counter(), time.process_time()
        accuracy = floor_run(lambda: built, test_x, test_y, rounds, SEED)
    else:
        picks = iter(_sampled(nodes, per_round, rounds, SEED))
        t0, c0 = time.perf_counter(), time.process_time()

        def round_data() -> list[tuple[np.ndarray, np.ndarray]]:
            return [shard(pool_x, pool_y, SEED, int(i)) for i in next(picks)]

        accuracy = floor_run(round_data, test_x, test_y, rounds, SEED)
    return {
        "wall_s_per_round": (time.perf_counter() - t0) / rounds,
        "cpu_s_per_round": (time.process_time() - c0) / rounds,
        "accuracy": accuracy,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _engine(nodes: int, *, trace_memory: bool = False) -> tuple[Any, Any, Any]:
    from shoal.data import Dataset
    from shoal.learn import FedAvg, SoftmaxRegression, learning_app
    from shoal.runtime import Devices, Diurnal, LocalEngine

    pool_x, pool_y, _, _ = digits(SEED)

    def data(node_id: str) -> Dataset:  # built when the node first trains, never kept all
        x, y = shard(pool_x, pool_y, SEED, int(node_id[1:]))
        return Dataset(x=x, y=y, classes=CLASSES, name=node_id)

    algorithm = FedAvg(rounds=1, nodes_per_round=1, local_epochs=EPOCHS, lr=LR, batch_size=BATCH)
    app = learning_app(SoftmaxRegression(features=FEATURES, classes=CLASSES), plan=algorithm.plan)
    engine = LocalEngine(
        app,
        nodes=nodes,
        data=data,
        availability=Diurnal(online_hours=16, seed=SEED),
        devices=Devices.sample(
            nodes, stragglers=0.3, slowdown=10, down_mbps=1.0, up_mbps=1.0, seed=SEED
        ),
    )
    return engine, app, algorithm


def run_shoal(nodes: int, per_round: int, rounds: int) -> dict[str, Any]:
    from shoal.core import Federation
    from shoal.data import Dataset
    from shoal.learn import FedAvg, SoftmaxRegression, Trainer

    _, _, test_x, test_y = digits(SEED)
    test = Dataset(x=test_x, y=test_y, classes=CLASSES, name="test")
    t0 = time.perf_counter()
    engine, _, _ = _engine(nodes)
    federation = Federation(engine, seed=SEED)
    online = len(federation.node_ids)
    startup = time.perf_counter() - t0
    algorithm = FedAvg(
        rounds=rounds, nodes_per_round=per_round, local_epochs=EPOCHS, lr=LR, batch_size=BATCH
    )
    model = SoftmaxRegression(features=FEATURES, classes=CLASSES)
    trainer = Trainer(federation=federation, algorithm=algorithm, model=model, test=test)
    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.run()
    wall = (time.perf_counter() - t0) / rounds
    cpu = (time.process_time() - c0) / rounds
    engine.close()
    return {
        "wall_s_per_round": wall,
        "cpu_s_per_round": cpu,
        "startup_s": startup,
        "online_at_start": online,
        "virtual_s_per_round": engine.clock.now / rounds,
        "accuracy": float(result.metrics["accuracy"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_memory(nodes: int, per_round: int, rounds: int) -> dict[str, Any]:
    from shoal.core import Federation
    from shoal.learn import FedAvg, SoftmaxRegression

    digits(SEED)  # load the data set before measuring: it is not per-node memory
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine, _, _ = _engine(nodes)
    federation = Federation(engine, seed=SEED)
    federation.node_ids  # noqa: B018  (builds the availability phases and the online mask)
    idle = tracemalloc.get_traced_memory()[0] - before
    algorithm = FedAvg(
        rounds=rounds, nodes_per_round=per_round, local_epochs=EPOCHS, lr=LR, batch_size=BATCH
    )
    model = SoftmaxRegression(features=FEATURES, classes=CLASSES)
    state = algorithm.init(model.get_weights())
    state = algorithm.round(federation, state, seed=0).state  # warm: threads, caches
    engine._cache.clear()  # the bounded data cache is not per-node memory
    gc.collect()
    warm = tracemalloc.get_traced_memory()[0]
    ran_before = len(engine._states)
    for r in range(1, MEMORY_ROUNDS + 1):
        state = algorithm.round(federation, state, seed=r).state
    engine._cache.clear()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - warm
    ran = len(engine._states) - ran_before
    tracemalloc.stop()
    engine.close()
    return {
        "nodes": nodes,
        "idle_bytes_per_node": idle / nodes,
        "nodes_that_ran": ran,
        "bytes_per_node_after_a_round": held / max(ran, 1),
    }


def part_scale(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"floor_sampled": [], "floor_prebuilt": [], "shoal": []}
    for _ in range(args.repeats):  # interleaved: load changes on a shared machine hit each row
        for row in rows:
            rows[row].append(_child(row, args.registered, args.per_round, args.rounds))
    memory = _child("memory", args.registered, args.per_round, args.rounds)
    out: dict[str, Any] = {
        "registered": args.registered,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "memory": memory,
    }
    for row, runs in rows.items():
        out[row] = {
            key: statistics.median(r[key] for r in runs)
            for key in runs[0]
            if isinstance(runs[0][key], (int, float))
        }
        out[row]["wall_runs"] = [r["wall_s_per_round"] for r in runs]
    for base in ("floor_sampled", "floor_prebuilt"):
        for kind in ("wall", "cpu"):
            ratios = [
                s[f"{kind}_s_per_round"] / f[f"{kind}_s_per_round"]
                for s, f in zip(rows["shoal"], rows[base])
            ]
            out["shoal"][f"{kind}_vs_{base}"] = statistics.median(ratios)
            out["shoal"][f"{kind}_vs_{base}_range"] = [min(ratios), max(ratios)]
    return out


def _child(row: str, nodes: int, per_round: int, rounds: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", row, "--registered", str(nodes)]
    command += ["--per-round", str(per_round), "--rounds", str(rounds)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def print_scale(out: dict[str, Any]) -> None:
    print(
        f"{out['registered']:,} registered nodes, {out['per_round']:,} per round, "
        f"{out['rounds']} rounds, median of {out['repeats']} interleaved repeats"
    )
    header = (
        f"{'row':<18} {'wall s/round':>13} {'CPU s/round':>12} {'peak RSS MB':>12} {'accuracy':>9}"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "floor_sampled": "floor, sampled",
        "floor_prebuilt": "floor, prebuilt*",
        "shoal": "shoal LocalEngine",
    }
    for key, label in labels.items():
        row = out[key]
        print(
            f"{label:<18} {row['wall_s_per_round']:>13.3f} {row['cpu_s_per_round']:>12.3f}"
            f" {row['peak_rss_mb']:>12.0f} {row['accuracy']:>9.3f}"
        )
    s = out["shoal"]
    for base in ("floor_sampled", "floor_prebuilt"):
        (wa, wb), (ca, cb) = s[f"wall_vs_{base}_range"], s[f"cpu_vs_{base}_range"]
        print(
            f"shoal / {labels[base]:<17}: wall {s[f'wall_vs_{base}']:.2f}x ({wa:.2f}-{wb:.2f}),"
            f" CPU {s[f'cpu_vs_{base}']:.2f}x ({ca:.2f}-{cb:.2f})"
        )
    m = out["memory"]
    print(
        f"start-up (register {out['registered']:,} nodes): {s['startup_s']:.2f} s; "
        f"{s['online_at_start']:.0f} online at t=0"
    )
    print(
        f"memory per idle registered node: {m['idle_bytes_per_node']:.0f} B; per node after a"
        f" round ({m['nodes_that_ran']:,} nodes): {m['bytes_per_node_after_a_round']:.0f} B"
    )
    print("* the same K nodes every round, their data built once (simulation.py's floor)")


# -- part 2: time to accuracy, FedBuff against FedAvg ---------------------------------------


def _dirichlet_nodes(nodes: int, alpha: float, per_node: int, seed: int) -> list[Any]:
    from shoal.data import Dataset

    pool_x, pool_y, _, _ = digits(seed)
    by_class = [np.flatnonzero(pool_y == c) for c in range(CLASSES)]
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(nodes):
        mix = rng.dirichlet([alpha] * CLASSES)
        labels = rng.choice(CLASSES, size=per_node, p=mix)
        pick = np.array([rng.choice(by_class[c]) for c in labels])
        out.append(Dataset(x=pool_x[pick], y=pool_y[pick], classes=CLASSES, name=f"n{i}"))
    return out


def run_to_accuracy(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from shoal.core import Federation
    from shoal.data import Dataset
    from shoal.learn import TRAIN, FedAvg, FedBuff, SoftmaxRegression, Trainer, learning_app
    from shoal.learn.tasks import UPLOAD
    from shoal.runtime import Devices, Diurnal, LocalEngine

    nodes = _dirichlet_nodes(args.nodes, args.alpha, 32, seed)
    _, _, test_x, test_y = digits(seed)
    test = Dataset(x=test_x, y=test_y, classes=CLASSES, name="test")
    k = args.buffer
    steps = args.updates // k
    common = {"rounds": steps, "nodes_per_round": k, "local_epochs": 1, "lr": 0.3}
    common["batch_size"] = BATCH
    algorithm = (
        FedAvg(**common)
        if name == "fedavg"
        else FedBuff(**common, concurrency=3 * k, max_staleness=10)
    )
    model = SoftmaxRegression(features=FEATURES, classes=CLASSES)
    app = learning_app(model, plan=algorithm.plan)
    engine = LocalEngine(
        app,
        data=nodes,
        seed=seed,
        availability=Diurnal(online_hours=8, seed=seed),
        devices=Devices.sample(
            args.nodes,
            stragglers=0.3,
            slowdown=10,
            down_mbps=1.0,
            up_mbps=1.0,
            compute_s={TRAIN: 1.0, UPLOAD: 0.0},  # nominal: virtual time exact for the seed
            seed=seed,
        ),
    )
    curve: list[tuple[float, float, int]] = []

    def record(report: Any) -> None:
        curve.append((engine.clock.now, float(report.accuracy), report.participants))

    federation = Federation(engine, seed=seed)
    t0 = time.perf_counter()
    result = Trainer(
        federation=federation,
        algorithm=algorithm,
        model=model,
        test=test,
        on_round=record,
        seed=seed,
    ).run()
    wall = time.perf_counter() - t0
    engine.close()
    reached = next((t for t, acc, _ in curve if acc >= args.target), None)
    return {
        "algorithm": name,
        "seed": seed,
        "server_steps": steps,
        "node_updates": sum(p for _, _, p in curve),
        "virtual_s_to_target": reached,
        "virtual_s_total": curve[-1][0],
        "final_accuracy": float(result.metrics["accuracy"]),
        "best_accuracy": max(acc for _, acc, _ in curve),
        "wall_s": wall,
        "curve": curve,
    }


def part_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    runs = [
        {name: run_to_accuracy(name, args, seed) for name in ("fedavg", "fedbuff")}
        for seed in args.seeds
    ]
    fractions = []
    for run in runs:
        a, b = run["fedavg"]["virtual_s_to_target"], run["fedbuff"]["virtual_s_to_target"]
        run["fedbuff_time_fraction"] = b / a if a and b else None
        fractions.append(run["fedbuff_time_fraction"])
    known = [f for f in fractions if f is not None]
    return {
        "nodes": args.nodes,
        "alpha": args.alpha,
        "buffer": args.buffer,
        "updates": args.updates,
        "target": args.target,
        "seeds": args.seeds,
        "runs": runs,
        "fedbuff_time_fraction_median": statistics.median(known) if known else None,
        "reached_in_every_seed": len(known) == len(fractions),
    }


def print_accuracy(out: dict[str, Any]) -> None:
    print(
        f"\ntime to {out['target']:.2f} accuracy on digits, {out['nodes']:,} nodes, Dirichlet "
        f"{out['alpha']}, 30% stragglers 10x slower, diurnal (8 h a day), 1 Mbit/s links"
    )
    header = (
        f"{'seed':>4} {'algorithm':<10} {'steps':>6} {'updates':>8} {'virtual s to target':>20}"
        f" {'virtual s total':>16} {'final acc':>10} {'best acc':>9} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for run in out["runs"]:
        for name in ("fedavg", "fedbuff"):
            r = run[name]
            reached = r["virtual_s_to_target"]
            shown = f"{reached:>20.1f}" if reached is not None else f"{'not reached':>20}"
            print(
                f"{r['seed']:>4} {name:<10} {r['server_steps']:>6} {r['node_updates']:>8} {shown}"
                f" {r['virtual_s_total']:>16.1f} {r['final_accuracy']:>10.3f}"
                f" {r['best_accuracy']:>9.3f} {r['wall_s']:>7.1f}"
            )
    fractions = [run["fedbuff_time_fraction"] for run in out["runs"]]
    shown = ", ".join("-" if f is None else f"{f:.2f}" for f in fractions)
    median = out["fedbuff_time_fraction_median"]
    if median is not None:
        print(
            f"FedBuff's virtual time to the target / FedAvg's: median {median:.2f}x "
            f"(per seed: {shown})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["scale", "accuracy", "both"], default="both")
    parser.add_argument("--registered", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--buffer", type=int, default=20, help="K: FedAvg's nodes per round")
    parser.add_argument("--updates", type=int, default=4000, help="node updates per algorithm")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        runner = {
            "floor_sampled": lambda *a: run_floor("sampled", *a),
            "floor_prebuilt": lambda *a: run_floor("prebuilt", *a),
            "shoal": run_shoal,
            "memory": run_memory,
        }[args.child]
        print(json.dumps(runner(args.registered, args.per_round, args.rounds)))
        return 0
    results: dict[str, Any] = {}
    if args.part in ("scale", "both"):
        results["scale"] = part_scale(args)
        print_scale(results["scale"])
    if args.part in ("accuracy", "both"):
        results["accuracy"] = part_accuracy(args)
        print_accuracy(results["accuracy"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
