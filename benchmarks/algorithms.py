"""FedAvg, FedProx, FedAdam and SCAFFOLD on digits under strong and mild label skew.

Each algorithm trains the built-in softmax regression on digits split over 20 nodes with
Dirichlet(alpha) label skew, 10 nodes per round, and is evaluated on the server's test set
after every round. The centralized model (same model, pooled data, as many passes over the
data as the federation made) is the reference line. Prints the accuracy at a few rounds and
writes the whole curves to JSON.

    python benchmarks/algorithms.py --rounds 30 --json results/algorithms.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shoal.data import load_digits, partition
from shoal.learn import FedAdam, FedAvg, FedProx, Scaffold, SoftmaxRegression, simulate
from shoal.learn.centralized import train_centralized

COMMON = {"nodes_per_round": 10, "local_epochs": 3, "lr": 0.3, "batch_size": 16}


def algorithms(rounds: int) -> dict[str, Any]:
    return {
        "fedavg": FedAvg(rounds=rounds, **COMMON),
        "fedprox(mu=0.1)": FedProx(rounds=rounds, mu=0.1, **COMMON),
        "fedadam": FedAdam(rounds=rounds, server_lr=0.3, **COMMON),
        "scaffold": Scaffold(rounds=rounds, **COMMON),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    train, test = load_digits(test_fraction=0.2, seed=0)
    model = SoftmaxRegression(features=64, classes=10)
    passes = args.rounds * COMMON["local_epochs"] * COMMON["nodes_per_round"] / args.nodes
    central = train_centralized(
        model, train, test, epochs=round(passes), lr=COMMON["lr"], batch_size=16
    )["accuracy"]
    results: list[dict[str, Any]] = []
    for alpha in args.alphas:
        for seed in args.seeds:
            nodes = partition(train, nodes=args.nodes, scheme="dirichlet", alpha=alpha, seed=seed)
            for name, algorithm in algorithms(args.rounds).items():
                t0 = time.perf_counter()
                out = simulate(model=model, nodes=nodes, algorithm=algorithm, test=test, seed=seed)
                results.append(
                    {
                        "alpha": alpha,
                        "seed": seed,
                        "algorithm": name,
                        "accuracy_per_round": [r.accuracy for r in out.history],
                        "final_accuracy": out.metrics["accuracy"],
                        "wall_s": time.perf_counter() - t0,
                    }
                )
    marks = sorted({5, 10, args.rounds // 2, args.rounds} & set(range(1, args.rounds + 1)))
    header = f"{'alpha':>5} {'algorithm':<16}" + "".join(f"{'r' + str(m):>8}" for m in marks)
    print(f"centralized accuracy (same model, pooled data): {central:.4f}")
    print(header)
    print("-" * len(header))
    for r in results:
        curve = r["accuracy_per_round"]
        cells = "".join(f"{curve[m - 1]:>8.4f}" for m in marks)
        print(f"{r['alpha']:>5} {r['algorithm']:<16}{cells}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"centralized_accuracy": central, "config": COMMON, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
