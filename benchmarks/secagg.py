"""Secure aggregation cost: the same rounds with a plain sum and with SecAgg+, side by side.

Every node holds a fixed float32 vector of D values (its "update"). A plain round maps the
train task and sums the values in the clear (one fetch); a secure round maps the same task
and runs ``Clip | SecureSum`` (four protocol phases). Both go through the Core API on the
LocalEngine, so nodes run one after another in this process: ``wall_ratio`` compares the
simulated rounds, and ``parallel_ratio`` compares the critical path a deployment would see
(server time plus, per dispatch, the slowest node), since there nodes run at the same time.
Seconds per node (mean), server seconds and the bytes each node uploads are reported too.
Each timed round follows an untimed round of its own kind (medians over ``--repeats``).
``--degree K`` fixes the neighbours per node (SecAgg+'s k) instead of the default choice,
which grows with N: at a fixed degree the server's work should grow linearly in N.

``--flower-python PATH`` names the python of a virtualenv holding Flower 1.42 (never a
dependency of shoal): each case then also runs ``secagg_flower.py`` there with the same N, D,
dropout rate, repeats and SecAgg+ degree and threshold, and reports Flower's plain and secure
round seconds and their ratio beside shoal's, measured on the same machine (see that file for
how its setup differs from this one).

    python benchmarks/secagg.py --nodes 10 100 500 --dim 10000 100000 1000000 --json out.json
    python benchmarks/secagg.py --nodes 100 200 400 800 --dim 10000 --dropouts 0.1 \
        --degree 40 --max-failure-probability 0.01
    python benchmarks/secagg.py --nodes 100 --dim 100000 --dropouts 0.1 \
        --flower-python /work/venvs/flower/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from shoal.aggregate import Clip, Sum
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.crypto.secagg import SecAggParams
from shoal.runtime import DispatchResult, Faults, LocalEngine, NodeApp

RANGE = 1.0


class MeteredEngine(LocalEngine):
    """Counts node compute time (per dispatch: total and slowest) and bytes each node sends."""

    def reset(self) -> None:
        self.node_seconds = 0.0
        self.slowest_sum = 0.0
        self.upload: dict[str, int] = defaultdict(int)

    def dispatch(self, tasks: Any, *, deadline_s: float) -> DispatchResult:
        result = super().dispatch(tasks, deadline_s=deadline_s)
        elapsed = [r.elapsed_s for r in result.replies.values()]
        self.node_seconds += sum(elapsed)
        self.slowest_sum += max(elapsed, default=0.0)
        for node, reply in result.replies.items():
            self.upload[node] += memoryview(reply.payload).nbytes
        return result


def run_case(
    nodes: int,
    dim: int,
    dropout: float,
    repeats: int,
    seed: int,
    degree: int | None = None,
    failure_probability: float = 1e-6,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ids = [f"n{i}" for i in range(nodes)]
    vectors = {v: rng.uniform(-RANGE, RANGE, size=dim).astype(np.float32) for v in ids}
    app = NodeApp()

    @app.task("train")
    def train(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": vectors[ctx.node_id]}

    # SecAgg+ as deployed: the sparse O(log n) graph (failure probability 1e-6 under random
    # dropouts unless told otherwise) from 50 nodes up, and a dropout tolerance of twice the
    # expected rate, so a round fails with negligible probability (P[Bin(100, 0.1) > 20] ~ 0.1%).
    sparse = failure_probability if nodes >= 50 else 0.0
    tolerance = max(2 * dropout, 0.05)
    secure = Clip(RANGE * np.sqrt(dim)) | SecureSum(
        value_range=RANGE,
        dropout_fraction=tolerance,
        max_failure_probability=sparse,
        degree=degree,
    )
    # the parameters SecureSum picks for these nodes (every node holds a value)
    params = SecAggParams.create(
        ids,
        vector_length=dim,
        dropout_fraction=tolerance,
        max_failure_probability=sparse,
        degree=degree,
    )
    app.install(secure.node_tasks())
    # Dropouts strike the secure rounds' masked-input phase (the costly case: the server
    # must rebuild the dropped nodes' pairwise masks) and the plain rounds' upload.
    faults = Faults(
        drop=dropout,
        tasks=frozenset({"shoal.secagg.masked_input", "shoal.fetch"}),
        seed=seed,
    )
    engine = MeteredEngine(app, nodes=ids, faults=faults if dropout else None, seed=seed)
    federation = Federation(engine, min_nodes=1)

    def one(kind: str) -> dict[str, float]:
        engine.reset()
        t0 = time.perf_counter()
        out = federation.all().map("train")
        if kind == "plain":
            out["delta"].aggregate(Sum())
        else:
            out["delta"].aggregate(secure)
        wall = time.perf_counter() - t0
        # One process runs everything in turn, so what the nodes did not spend, the server did.
        server_s = max(wall - engine.node_seconds, 0.0)
        uploads = list(engine.upload.values())
        return {
            "wall_s": wall,
            "parallel_s": server_s + engine.slowest_sum,
            "node_s_mean": engine.node_seconds / nodes,
            "server_s": server_s,
            "bytes_per_node": statistics.median(uploads) if uploads else 0.0,
        }

    runs: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        for kind in ("plain", "secure"):
            # An untimed round of the same kind first: a round right after one of the other
            # kind pays for memory the other freed (a plain round after a secure one took
            # 0.2 s instead of 0.07 s, mostly page faults in np.stack), which is not its cost.
            one(kind)
            runs[kind].append(one(kind))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {
        "nodes": nodes,
        "dim": dim,
        "degree": params.degree,
        "threshold": params.threshold,
        "dropout": dropout,
        "plain": med["plain"],
        "secure": med["secure"],
        "overhead_vs_plain": med["secure"]["wall_s"] / med["plain"]["wall_s"],
        "parallel_overhead_vs_plain": med["secure"]["parallel_s"] / med["plain"]["parallel_s"],
        "bytes_vs_float32_upload": med["secure"]["bytes_per_node"] / (4 * dim),
    }


def run_flower(
    python: str,
    nodes: int,
    dim: int,
    dropout: float,
    repeats: int,
    seed: int,
    shoal: dict[str, Any],
) -> dict[str, Any] | None:
    """Flower's plain and SecAgg+ rounds for the same case, from ``secagg_flower.py``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flower.json"
        cmd = [
            python,
            str(Path(__file__).with_name("secagg_flower.py")),
            *("--nodes", str(nodes), "--dim", str(dim), "--dropouts", str(dropout)),
            *("--repeats", str(repeats), "--seed", str(seed)),
            *("--degree", str(shoal["degree"]), "--threshold", str(shoal["threshold"])),
            *("--json", str(out)),
        ]
        # Ray puts its driver's working directory on its workers' path: keep that one empty.
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(f"Flower run failed (exit {proc.returncode}):", *tail, sep="\n  ", flush=True)
            return None
        (result,) = json.loads(out.read_text())["results"]
    return result


def flower_python(path: str | None) -> str | None:
    """The Flower venv's python if usable, else None (after saying why, on stderr)."""
    if path is None:
        print("Flower comparison off (pass --flower-python PATH to add it)", file=sys.stderr)
        return None
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        print(f"Flower comparison off: no python at {path}", file=sys.stderr)
        return None
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--dim", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--degree", type=int, help="neighbours per node (default: the smallest safe choice)"
    )
    parser.add_argument(
        "--max-failure-probability",
        type=float,
        default=1e-6,
        help="allowed chance that random dropouts break a round (from 50 nodes up)",
    )
    parser.add_argument(
        "--flower-python",
        metavar="PATH",
        help="python of a venv with flwr[simulation]==1.42.0: also measure Flower's rounds",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    flower = flower_python(args.flower_python)
    results = []
    header = (
        f"{'N':>5} {'k':>4} {'D':>8} {'drop':>5} {'plain s':>8} {'secure s':>9} {'wall x':>7}"
        f" {'parallel x':>10} {'node s':>8} {'server s':>9} {'bytes x f32':>11}"
    )
    if flower:
        header += f" {'flwr plain s':>12} {'flwr secure s':>13} {'flwr x':>7}"
    print(header)
    print("-" * len(header))
    for n in args.nodes:
        for d in args.dim:
            for dropout in args.dropouts:
                r = run_case(
                    n,
                    d,
                    dropout,
                    args.repeats,
                    args.seed,
                    args.degree,
                    args.max_failure_probability,
                )
                line = (
                    f"{n:>5} {r['degree']:>4} {d:>8} {dropout:>5.0%} {r['plain']['wall_s']:>8.3f}"
                    f" {r['secure']['wall_s']:>9.3f} {r['overhead_vs_plain']:>6.1f}x"
                    f" {r['parallel_overhead_vs_plain']:>9.1f}x"
                    f" {r['secure']['node_s_mean']:>8.4f}"
                    f" {r['secure']['server_s']:>9.3f} {r['bytes_vs_float32_upload']:>10.3f}x"
                )
                if flower:
                    f = run_flower(flower, n, d, dropout, args.repeats, args.seed, r)
                    r["flower"] = f
                    r["flower_overhead_vs_plain"] = f["overhead_vs_plain"] if f else None
                    line += (
                        f" {f['plain']['wall_s']:>12.3f} {f['secure']['wall_s']:>13.3f}"
                        f" {f['overhead_vs_plain']:>6.1f}x"
                        if f
                        else f" {'n/a':>12} {'n/a':>13} {'n/a':>7}"
                    )
                results.append(r)
                print(line, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
