"""Flower's SecAgg+ cost on this machine: its plain round and its SecAgg+ round, side by side.

The counterpart of ``benchmarks/secagg.py`` for Flower 1.42, so that shoal's secure-aggregation
overhead can be compared with Flower's measured under the same conditions rather than quoted
from elsewhere. It runs under a separate virtualenv (Flower is never a dependency of shoal, and
this file imports nothing from shoal):

    python3 -m venv /work/venvs/flower
    /work/venvs/flower/bin/pip install "flwr[simulation]==1.42.0" numpy
    /work/venvs/flower/bin/python benchmarks/secagg_flower.py --nodes 100 --dim 100000 \
        --dropouts 0.1 --repeats 3 --json out.json

(If pip cannot resolve flwr 1.42.0's pin on a certifi release the index does not serve yet,
install ``flwr==1.42.0`` with ``--no-deps`` and its other requirements plus ``ray==2.55.1``
and the newest certifi by hand: certifi is only the CA bundle, unused here.)

What runs: ``run_simulation`` with the Ray backend and N SuperNodes. Every node's ClientApp
returns a fixed float32 vector of D values drawn uniformly from [-1, 1] (``num_examples`` 1),
like shoal's benchmark. One ServerApp alternates, ``--repeats`` times, a plain fit round (the
fit step of Flower's ``DefaultWorkflow``: FedAvg over all N nodes) and a secure fit round
(``SecAggPlusWorkflow``, whose four stages the clients answer through ``secaggplus_mod``), and
times each round from the ServerApp: wall seconds, median over repeats, and for secure rounds
the seconds of each SecAgg+ stage (node and server work of that stage together). Evaluation is
off. An untimed pair of rounds without dropouts comes first: it starts the Ray actors and loads
Flower's code in them (shoal's benchmark has nothing to warm up), and checks that the secure
round's mean matches the plain round's (``warmup_max_abs_diff`` in the JSON).

Settings and how they differ from shoal's benchmark:

* The SecAgg+ graph: Flower links each node to the ``num_shares - 1`` nodes nearest to it on a
  shuffled ring (Flower makes ``num_shares`` odd; it counts the node's own share), shoal to
  ``degree`` nodes of a random regular graph. ``--degree K --threshold T`` take shoal's numbers
  (for N=100 and 10% dropouts shoal picks K=37, T=19) and become ``num_shares`` = the smallest
  odd number above K (so at least K neighbours; 39 for K=37) and ``reconstruction_threshold``
  = max(T, num_shares // 2 + 1), which keeps the threshold above half the shares as shoal does.
* Quantization: ``clipping_range`` 1.0 (shoal's value range), Flower's default
  ``quantization_range`` 2**22 and ``modulus_range`` 2**32 (shoal: a 32-bit modulus with a
  grid sized for N). Flower also masks and sums a weight alongside the vector (FedAvg's
  weighted mean), and its secure round ends with FedAvg over the unmasked result.
* Dropouts: each node drops with probability ``--dropouts`` in each round (seeded draws, as
  shoal's ``Faults``, though not the same draws): in a secure round when it receives the
  collect-masked-vectors message, after it has shared its keys (the server then rebuilds its
  pairwise masks, as in shoal); in a plain round when it receives the train message. A dropped
  node's ClientApp raises, which Flower reports to the server at once as an error reply, so no
  round waits for a timeout.
* Parallelism: ``--actors`` Ray actors run the ClientApps (default 1, so nodes run one after
  another as on shoal's LocalEngine); the ServerApp runs in the driver process. Flower's
  messages go through its simulation runtime and Ray, which shoal's in-process engine skips:
  that is part of what a Flower round costs, in both kinds of round alike.
"""

# ruff: noqa: E402  (the path fix below must run before Flower is imported)
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/grpc.py (shoal's gRPC benchmark) would shadow the grpc package Flower imports, here
# and in Ray's workers, which get the script's folder if it is on the path: drop the folder.
_HERE = Path(__file__).resolve().parent
if str(_HERE) in sys.path:
    sys.path.remove(str(_HERE))

from flwr.app import ConfigRecord, Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.compat.app_utils import (
    start_update_client_manager_thread,
)
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import (
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
)
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import (
    default_fit_workflow,
)
from flwr.simulation import run_simulation

RANGE = 1.0
DROP_KEY = "bench-drop"  # fit-config entry listing the partitions that drop this round


def flower_graph(degree: int, threshold: int) -> tuple[int, int]:
    """Flower's (num_shares, reconstruction_threshold) closest to shoal's (degree, threshold).

    A Flower node's shares go to itself and its ``num_shares - 1`` ring neighbours, and Flower
    raises an even ``num_shares`` by one: take the smallest odd number above ``degree``.
    """
    num_shares = degree + 1 if (degree + 1) % 2 else degree + 2
    return num_shares, max(threshold, num_shares // 2 + 1)


def make_client_app(dim: int, seed: int) -> Any:
    cache: dict[int, np.ndarray] = {}  # per actor process: draw each node's vector once

    def vector(pid: int) -> np.ndarray:
        if pid not in cache:
            rng = np.random.default_rng([seed, pid])
            cache[pid] = rng.uniform(-RANGE, RANGE, size=dim).astype(np.float32)
        return cache[pid]

    class Node(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict]:
            return [vector(self.pid)], 1, {}

    def client_fn(context: Context) -> Any:
        return Node(int(context.node_config["partition-id"])).to_client()

    def drops(msg: Message, ctxt: Context) -> bool:
        listed = ""
        for record in msg.content.config_records.values():
            if DROP_KEY in record:
                listed = str(record[DROP_KEY])
        pid = str(ctxt.node_config["partition-id"])
        return pid in listed.split(",")

    def bench_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        # One ClientApp serves both kinds of round: SecAgg+ messages go through Flower's mod,
        # plain train messages skip it (it would reject them), as a ClientApp without it would.
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        secure = configs is not None and Key.STAGE in configs
        if secure:
            # The masked-input stage: this node has shared its keys, then vanishes.
            if configs[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS and drops(msg, ctxt):
                raise RuntimeError("simulated dropout")
            return secaggplus_mod(msg, ctxt, call_next)
        if drops(msg, ctxt):
            raise RuntimeError("simulated dropout")
        return call_next(msg, ctxt)

    return ClientApp(client_fn=client_fn, mods=[bench_mod])


def make_server_app(
    nodes: int,
    dim: int,
    dropout: float,
    repeats: int,
    seed: int,
    num_shares: int,
    threshold: int,
    out: dict[str, Any],
) -> Any:
    app = ServerApp()
    drop_list = {"ids": ""}

    def fit_config(server_round: int) -> dict[str, Any]:
        return {DROP_KEY: drop_list["ids"]}

    @app.main()
    def main(grid: Any, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_available_clients=nodes,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
            on_fit_config_fn=fit_config,
        )
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        thread, stop, registered = start_update_client_manager_thread(grid, ctx.client_manager)
        registered.wait()
        while ctx.client_manager.num_available() < nodes:
            time.sleep(0.1)
        initial = strategy.initialize_parameters(client_manager=ctx.client_manager)
        cfg = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: time.time()})
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        secure = SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            clipping_range=RANGE,
            modulus_range=2**32,
        )

        # Seconds per SecAgg+ stage of the last secure round: each includes the nodes' work in
        # that stage and the server's (the unmask stage holds the mask reconstruction).
        stages: dict[str, float] = {}
        for name in ("setup", "share_keys", "collect_masked_vectors", "unmask"):
            step = getattr(secure, f"{name}_stage")

            def timed(*a: Any, _step: Any = step, _name: str = name) -> Any:
                t0 = time.perf_counter()
                try:
                    return _step(*a)
                finally:
                    stages[_name] = time.perf_counter() - t0

            setattr(secure, f"{name}_stage", timed)

        def one(kind: str, dropped: np.ndarray) -> tuple[float, np.ndarray]:
            drop_list["ids"] = ",".join(str(i) for i in dropped)
            # Every round starts from the same global model, as shoal's rounds do.
            ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                initial, keep_input=True
            )
            t0 = time.perf_counter()
            if kind == "plain":
                default_fit_workflow(grid, ctx)
            else:
                secure(grid, ctx)
            wall = time.perf_counter() - t0
            result = compat.arrayrecord_to_parameters(
                ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
            mean = parameters_to_ndarrays(result)[0]
            # A halted SecAgg+ round (too few nodes left) returns quickly and leaves the model
            # as it was: never time that as a round.
            if not np.any(mean):
                raise RuntimeError(f"Flower's {kind} round aggregated nothing")
            return wall, mean

        # An untimed pair without dropouts first: it starts the Ray actors and loads Flower's
        # code in them, and shows that the secure round returns the plain round's mean.
        _, plain_mean = one("plain", np.array([], dtype=int))
        _, secure_mean = one("secure", np.array([], dtype=int))
        out["warmup_max_abs_diff"] = float(np.max(np.abs(plain_mean - secure_mean)))
        rng = np.random.default_rng(seed)
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            for kind in ("plain", "secure"):
                dropped = np.flatnonzero(rng.random(nodes) < dropout)
                wall, _ = one(kind, dropped)
                run = {"wall_s": wall, "dropped": float(len(dropped))}
                if kind == "secure":
                    run.update({f"{k}_s": v for k, v in stages.items()})
                runs[kind].append(run)
                print(f"  flower {kind}: {wall:.3f} s ({len(dropped)} dropped)", flush=True)
        out["runs"] = runs
        stop.set()
        thread.join()

    return app


def run_case(
    nodes: int,
    dim: int,
    dropout: float,
    repeats: int,
    seed: int,
    degree: int,
    threshold: int,
    actors: int,
) -> dict[str, Any]:
    num_shares, flower_threshold = flower_graph(degree, threshold)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(
            nodes, dim, dropout, repeats, seed, num_shares, flower_threshold, out
        ),
        client_app=make_client_app(dim, seed),
        num_supernodes=nodes,
        backend_config={
            "init_args": {"num_cpus": actors, "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        },
    )
    total = time.perf_counter() - t0
    if "runs" not in out:
        raise RuntimeError("the Flower ServerApp did not finish its rounds (see its log above)")
    runs = out["runs"]
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {
        "nodes": nodes,
        "dim": dim,
        "dropout": dropout,
        "repeats": repeats,
        "actors": actors,
        "num_shares": num_shares,
        "reconstruction_threshold": flower_threshold,
        "plain": med["plain"],
        "secure": med["secure"],
        "runs": runs,
        "warmup_max_abs_diff": out["warmup_max_abs_diff"],
        "overhead_vs_plain": med["secure"]["wall_s"] / med["plain"]["wall_s"],
        "simulation_s": total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100])
    parser.add_argument("--dim", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--degree", type=int, default=37, help="shoal's neighbours per node (see the docstring)"
    )
    parser.add_argument("--threshold", type=int, default=19, help="shoal's share threshold")
    parser.add_argument("--actors", type=int, default=1, help="Ray actors running ClientApps")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's INFO log")
    args = parser.parse_args()
    if Path.cwd().resolve() == _HERE:
        # Ray puts the working directory on its workers' path too (see the path fix above).
        args.json = args.json and str(Path(args.json).resolve())
        os.chdir(_HERE.parent)
    if not args.verbose:
        # Dropped nodes make Flower log a traceback each: keep the table readable.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    results = []
    for n in args.nodes:
        for d in args.dim:
            for dropout in args.dropouts:
                r = run_case(
                    n, d, dropout, args.repeats, args.seed, args.degree, args.threshold, args.actors
                )
                results.append(r)
    header = (
        f"{'N':>5} {'shares':>6} {'t':>3} {'D':>8} {'drop':>5} {'plain s':>8} {'secure s':>9}"
        f" {'wall x':>7} {'sim s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['nodes']:>5} {r['num_shares']:>6} {r['reconstruction_threshold']:>3}"
            f" {r['dim']:>8} {r['dropout']:>5.0%} {r['plain']['wall_s']:>8.3f}"
            f" {r['secure']['wall_s']:>9.3f} {r['overhead_vs_plain']:>6.1f}x"
            f" {r['simulation_s']:>7.1f}"
        )
        stages = ", ".join(
            f"{k[:-2]} {v:.3f}" for k, v in r["secure"].items() if k not in ("wall_s", "dropped")
        )
        print(f"{'':>5} secure round by stage (median s): {stages}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
