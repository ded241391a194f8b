"""Digests of what ``simulate()`` computes, to show a speed change left the results alone.

Runs ``simulate()`` on ``simulation.py``'s workload (digits shards, 3 rounds, the
Quickstart's settings) in several configurations (plain FedAvg at 100 and 1,000 nodes, node
DP, example DP, a sample of nodes per round, FedProx, SCAFFOLD, injected faults, two worker
threads) and prints, for each, the SHA-256 of the final weights' bytes and of the numeric
metrics (timings left out). Run it on two commits and compare: equal digests mean
bit-identical models. DP noise comes from the OS, so ``os.urandom`` is made a seeded stream
here (a measurement only: never in the library) for the DP rows to compare too.

    PYTHONPATH=src python benchmarks/simulation_digest.py > after.json
    git stash; PYTHONPATH=src python benchmarks/simulation_digest.py > before.json; git stash pop
    diff before.json after.json

Digests depend on the machine's NumPy kernels (AVX2 or AVX-512 paths round differently):
compare runs on the same machine and NumPy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simulation as sim


def digest(
    nodes: int,
    *,
    plan: Any = None,
    algorithm: str = "fedavg",
    faults: Any = None,
    per_round: int | None = None,
    workers: int = 1,
    seed: int = 0,
) -> str:
    """The digest of one ``simulate()`` call's final weights and numeric metrics."""
    from shoal.data import Dataset
    from shoal.learn import FedAvg, FedProx, Scaffold, SoftmaxRegression, simulate

    os.urandom = random.Random(0).randbytes  # the same "entropy" in every run
    pool_x, pool_y, test_x, test_y = sim.digits(seed)
    test = Dataset(x=test_x, y=test_y, classes=sim.CLASSES, name="test")
    data = [
        Dataset(x=x, y=y, classes=sim.CLASSES, name=f"n{i}")
        for i, (x, y) in enumerate(sim.shard(pool_x, pool_y, seed, i) for i in range(nodes))
    ]
    kind = {"fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold}[algorithm]
    result = simulate(
        model=SoftmaxRegression(features=sim.FEATURES, classes=sim.CLASSES),
        nodes=data,
        algorithm=kind(
            rounds=3,
            nodes_per_round=per_round or nodes,
            local_epochs=sim.EPOCHS,
            lr=sim.LR,
            batch_size=sim.BATCH,
            privacy=plan,
        ),
        test=test,
        faults=faults,
        workers=workers,
        seed=seed,
    )
    h = hashlib.sha256()
    for name in sorted(result.weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(result.weights[name]).tobytes())
    numeric = sorted(
        (k, v)
        for k, v in result.metrics.items()
        if isinstance(v, (int, float)) and not k.endswith("_s")
    )
    h.update(repr(numeric).encode())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the digests here")
    args = parser.parse_args()
    from shoal.runtime import Faults

    runs = {
        "plain, 100 nodes": lambda: digest(100),
        "plain, 1000 nodes": lambda: digest(1000),
        "node DP, 100 nodes": lambda: digest(100, plan=sim.plan_of("node DP")),
        "example DP, 50 nodes": lambda: digest(50, plan=sim.plan_of("example DP")),
        "37 of 200 nodes a round": lambda: digest(200, per_round=37),
        "FedProx, 50 nodes": lambda: digest(50, algorithm="fedprox"),
        "SCAFFOLD, 50 nodes": lambda: digest(50, algorithm="scaffold"),
        "faults, 100 nodes": lambda: digest(100, faults=Faults(drop=0.1, error=0.05, seed=3)),
        "2 workers, 100 nodes": lambda: digest(100, workers=2),
    }
    out = {name: run() for name, run in runs.items()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
