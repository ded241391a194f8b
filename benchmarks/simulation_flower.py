"""Flower 1.42's simulation on ``benchmarks/simulation.py``'s workload, for its Flower row.

Runs under Flower's own virtualenv (Flower is never a dependency of shoal; this file imports
nothing from shoal); ``simulation.py --flower-python`` calls it with the digits arrays in an
npz file:

    python3 -m venv /work/venvs/flower
    /work/venvs/flower/bin/pip install "flwr[simulation]==1.42.0" numpy

The workload is the one ``simulation.py`` times: N SuperNodes, node i's 32 examples drawn with
the same seeded rule, built once per Ray actor and cached (as shoal's and the floor's nodes
are built once), FedAvg over all N nodes every round (``fraction_fit`` 1), each client running
the floor's own NumPy SGD (3 epochs, batch 16, lr 0.5), the server's test accuracy after every
round (``evaluate_fn``), no federated evaluation. ``run_simulation`` with the Ray backend and
``--actors`` actors (default 1: clients run one after another, as on shoal's one worker).
Seconds per round come from the ServerApp's clock (the start of one round's ``configure_fit``
to the next's, the last round ending after its evaluation); the first round, which starts
the Ray actors, is not counted.
"""

# ruff: noqa: E402  (the path fix below must run before Flower is imported)
from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/grpc.py would shadow the grpc package Flower imports: drop this folder.
_HERE = Path(__file__).resolve().parent
if str(_HERE) in sys.path:
    sys.path.remove(str(_HERE))

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

SHARD, EPOCHS, BATCH, LR = 32, 3, 16, 0.5


def sgd(w: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray, rng: Any) -> None:
    """The floor's local training, in place (the same lines as simulation.py's floor)."""
    rows = np.arange(BATCH)
    n = len(y)
    for _ in range(EPOCHS):
        order = rng.permutation(n)
        for start in range(0, n, BATCH):
            idx = order[start : start + BATCH]
            xb = x[idx]
            p = xb @ w
            p += c
            p -= p.max(axis=1, keepdims=True)
            np.exp(p, out=p)
            p /= p.sum(axis=1, keepdims=True)
            p[rows[: len(idx)], y[idx]] -= 1.0
            p *= LR / len(idx)
            w -= xb.T @ p
            c -= p.sum(axis=0)


def make_client_app(path: str, seed: int) -> ClientApp:
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per actor process, built once
    pool: dict[str, np.ndarray] = {}

    def shard(pid: int) -> tuple[np.ndarray, np.ndarray]:
        if pid not in cache:
            if not pool:
                with np.load(path, allow_pickle=False) as data:
                    pool.update(x=data["pool_x"], y=data["pool_y"])
            rng = np.random.default_rng([seed, pid])
            pick = rng.choice(len(pool["y"]), size=SHARD, replace=False)
            cache[pid] = (pool["x"][pick], pool["y"][pick])
        return cache[pid]

    class Node(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict]:
            x, y = shard(self.pid)
            w, c = parameters[0].copy(), parameters[1].copy()
            rng = np.random.default_rng([seed, self.pid, int(config["round"])])
            sgd(w, c, x, y, rng)
            return [w, c], len(y), {}

    def client_fn(context: Context) -> Any:
        return Node(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)


def make_server_app(path: str, nodes: int, rounds: int, out: dict[str, Any]) -> ServerApp:
    with np.load(path, allow_pickle=False) as data:
        test_x, test_y = data["test_x"], data["test_y"]
    starts: list[float] = []

    class Timed(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            starts.append(time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

    def evaluate(server_round: int, arrays: list[np.ndarray], config: Any) -> Any:
        w, c = arrays
        accuracy = float(((test_x @ w + c).argmax(axis=1) == test_y).mean())
        if server_round == rounds:
            starts.append(time.perf_counter())
            out["round_s"] = [b - a for a, b in itertools.pairwise(starts)]
            out["accuracy"] = accuracy
        return 0.0, {"accuracy": accuracy}

    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros((64, 10)), np.zeros(10)]),
        on_fit_config_fn=lambda r: {"round": r},
        evaluate_fn=evaluate,
    )

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="npz with pool_x, pool_y, test_x, test_y")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is not timed)")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(args.data, args.nodes, args.rounds, out),
        client_app=make_client_app(args.data, args.seed),
        num_supernodes=args.nodes,
        backend_config={
            "init_args": {"num_cpus": args.actors, "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        },
    )
    if "round_s" not in out:
        raise SystemExit("Flower's ServerApp did not finish its rounds (see its log above)")
    timed = out["round_s"][1:]
    result = {
        "nodes": args.nodes,
        "rounds": args.rounds,
        "actors": args.actors,
        "wall_s_per_round": statistics.median(timed),
        "wall_runs": timed,
        "first_round_s": out["round_s"][0],
        "accuracy": out["accuracy"],
        "simulation_s": time.perf_counter() - t0,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
