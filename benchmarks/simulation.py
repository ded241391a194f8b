"""Simulation overhead: shoal's LocalEngine + Core API against a plain Python loop (the floor).

Each round is FedAvg-shaped: broadcast a weight vector, every node runs the same fixed NumPy
work on its shard (2 epochs of softmax-regression SGD on 32 digits images, batch 16), and
the server takes the example-weighted mean of the deltas. The floor calls the very same
per-node code in a for-loop over in-memory data; shoal goes through wire encoding, the
engine, node-held results and the fetch for the aggregate, exactly as a simulation does.
Rounds of the two are interleaved and medians reported; each N runs in a fresh process so
that its peak RSS is its own.

    python benchmarks/simulation.py --nodes 100 1000 --rounds 5 --json results/simulation.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD = 32
EPOCHS = 2
BATCH = 16
LR = 0.1


def node_shard_factory(pool_x: np.ndarray, pool_y: np.ndarray, seed: int) -> Any:
    from shoal.data import Dataset

    def make(node_id: str) -> Dataset:
        index = int(node_id[1:])
        rng = np.random.default_rng([seed, index])
        pick = rng.choice(len(pool_y), size=SHARD, replace=False)
        return Dataset(x=pool_x[pick], y=pool_y[pick], classes=10, name=node_id)

    return make


def run_one(nodes: int, rounds: int, seed: int) -> dict[str, Any]:
    from shoal.core import Federation
    from shoal.data import load_digits
    from shoal.learn import FedAvg, FitConfig, SoftmaxRegression, learning_app
    from shoal.runtime import LocalEngine

    train, _ = load_digits(test_fraction=0.2, seed=seed)
    factory = node_shard_factory(train.x, train.y, seed)
    model = SoftmaxRegression(features=64, classes=10)
    algorithm = FedAvg(
        rounds=rounds, nodes_per_round=nodes, local_epochs=EPOCHS, lr=LR, batch_size=BATCH
    )

    # The floor: the same node work in a loop; data materialized per node, as shoal does.
    floor_model = model.clone()
    floor_weights = model.get_weights()
    node_ids = [f"n{i}" for i in range(nodes)]
    config = FitConfig(epochs=EPOCHS, lr=LR, batch_size=BATCH)

    def floor_round(weights: dict[str, np.ndarray], round_num: int) -> dict[str, np.ndarray]:
        deltas, counts = [], []
        for i, node_id in enumerate(node_ids):
            data = factory(node_id)
            floor_model.set_weights(weights)
            fit = floor_model.fit(data, config=config, rng=np.random.default_rng([round_num, i]))
            new = floor_model.get_weights()
            deltas.append(np.concatenate([(new[k] - weights[k]).ravel() for k in weights]))
            counts.append(fit.examples)
        mean = np.average(np.stack(deltas), axis=0, weights=counts)
        out, position = {}, 0
        for k, w in weights.items():
            out[k] = w + mean[position : position + w.size].reshape(w.shape)
            position += w.size
        return out

    # No data cache: the floor builds every node's shard every round, so shoal does too
    # (a cache would spare shoal work the floor does and flatter the ratio).
    engine = LocalEngine(learning_app(model), data=factory, nodes=nodes, seed=seed, cache_size=0)
    federation = Federation(engine, seed=seed)
    state = algorithm.init(model.get_weights())

    floor_times, shoal_times, floor_cpu, shoal_cpu = [], [], [], []
    for r in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        floor_weights = floor_round(floor_weights, r)
        floor_times.append(time.perf_counter() - t0)
        floor_cpu.append(time.process_time() - c0)
        c0, t0 = time.process_time(), time.perf_counter()
        state = algorithm.round(federation, state, seed=r).state
        shoal_times.append(time.perf_counter() - t0)
        shoal_cpu.append(time.process_time() - c0)
    drift = max(float(np.abs(state.weights[k] - floor_weights[k]).max()) for k in floor_weights)
    floor = statistics.median(floor_times)
    shoal = statistics.median(shoal_times)
    return {
        "nodes": nodes,
        "rounds": rounds,
        "floor_s_per_round": floor,
        "shoal_s_per_round": shoal,
        "overhead_ratio": shoal / floor,
        # CPU seconds of this process: less disturbed by other jobs on a shared machine
        "floor_cpu_s_per_round": statistics.median(floor_cpu),
        "shoal_cpu_s_per_round": statistics.median(shoal_cpu),
        "cpu_overhead_ratio": statistics.median(shoal_cpu) / statistics.median(floor_cpu),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_weight_difference_vs_floor": drift,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.nodes[0], args.rounds, args.seed)))
        return 0
    results = []
    for n in args.nodes:
        command = [sys.executable, __file__, "--child", "--nodes", str(n)]
        command += ["--rounds", str(args.rounds), "--seed", str(args.seed)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    header = (
        f"{'nodes':>7} {'floor s/round':>14} {'shoal s/round':>14} {'overhead':>9}"
        f" {'CPU overhead':>13} {'peak RSS MB':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['nodes']:>7} {r['floor_s_per_round']:>14.4f} {r['shoal_s_per_round']:>14.4f}"
            f" {r['overhead_ratio']:>8.2f}x {r['cpu_overhead_ratio']:>12.2f}x"
            f" {r['peak_rss_mb']:>12.0f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
