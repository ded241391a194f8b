"""Robust aggregation against poisoned updates: final digits accuracy per rule and attack.

Digits over 20 nodes (IID by default), all 20 nodes per round, 20 rounds of FedAvg-style
training; 0%, 10% and 20% of the nodes are attackers. Each aggregation rule (mean, median,
trimmed mean, Krum, Multi-Krum) sees the same attackers; the table gives the final
server-side test accuracy and the drop from the same rule's clean run.

    python benchmarks/robustness.py --json results/robustness.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shoal.aggregate import Krum, Mean, Median, MultiKrum, TrimmedMean
from shoal.attacks import attacked_app, build_attack, choose_malicious
from shoal.data import load_digits, partition
from shoal.learn import FedAvg, SoftmaxRegression, simulate


def rules(nodes: int, fraction: float) -> dict[str, Any]:
    f = max(1, round(0.2 * nodes))  # rules are configured for the worst case we test
    return {
        "mean (FedAvg)": Mean(),
        "median": Median(),
        "trimmed_mean(0.2)": TrimmedMean(beta=0.2),
        f"krum(f={f})": Krum(f=f),
        f"multikrum(f={f},m={nodes - 2 * f})": MultiKrum(f=f, m=nodes - 2 * f),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=["sign_flip", "sign_flip:scale=4", "gaussian_noise:sigma=1", "label_flip"],
        help="attack names, with options after a colon: sign_flip:scale=4",
    )
    parser.add_argument("--scheme", default="iid")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    train, test = load_digits(test_fraction=0.2, seed=0)
    parts = partition(train, nodes=args.nodes, scheme=args.scheme, seed=0)
    model = SoftmaxRegression(features=64, classes=10)
    node_ids = [f"n{i}" for i in range(args.nodes)]
    results: list[dict[str, Any]] = []
    for attack_name in args.attacks:
        name, _, option_text = attack_name.partition(":")
        options = {
            key: float(value)
            for key, value in (item.split("=") for item in option_text.split(",") if item)
        }
        attack = build_attack(name, **options)
        for fraction in args.fractions:
            malicious = choose_malicious(node_ids, fraction, seed=1)
            for rule_name, rule in rules(args.nodes, fraction).items():
                algorithm = FedAvg(
                    rounds=args.rounds,
                    nodes_per_round=args.nodes,
                    local_epochs=2,
                    lr=0.3,
                    batch_size=16,
                    aggregator=rule,
                )
                out = simulate(
                    model=model,
                    nodes=parts,
                    algorithm=algorithm,
                    test=test,
                    app=attacked_app(model, attack, malicious),
                )
                results.append(
                    {
                        "attack": attack_name,
                        "malicious_fraction": fraction,
                        "malicious_nodes": len(malicious),
                        "rule": rule_name,
                        "accuracy": out.metrics["accuracy"],
                    }
                )
    clean = {
        (r["attack"], r["rule"]): r["accuracy"] for r in results if r["malicious_fraction"] == 0
    }
    print(f"{'attack':<22} {'rule':<24}" + "".join(f"{f:>8.0%}" for f in args.fractions))
    for attack_name in args.attacks:
        for rule_name in rules(args.nodes, 0.0):
            row = [
                r["accuracy"]
                for r in results
                if r["attack"] == attack_name and r["rule"] == rule_name
            ]
            print(f"{attack_name:<22} {rule_name:<24}" + "".join(f"{a:>8.4f}" for a in row))
    for r in results:
        baseline = clean.get((r["attack"], r["rule"]))
        r["drop_vs_clean"] = None if baseline is None else baseline - r["accuracy"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
