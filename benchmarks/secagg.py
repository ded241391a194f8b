"""Secure aggregation cost: the same rounds with a plain sum and with SecAgg+, side by side.

Every node holds a fixed float32 vector of D values (its "update"). A plain round maps the
train task and sums the values in the clear (one fetch); a secure round maps the same task
and runs ``Clip | SecureSum`` (four protocol phases). Both go through the Core API.

``--engine local`` (the default) runs them on the LocalEngine, so nodes run one after
another in this process: ``overhead_vs_plain`` compares the simulated rounds, and
``parallel_overhead_vs_plain`` the critical path a deployment would see (server time plus,
per dispatch, the slowest node), since there nodes run at the same time. Seconds per node
(mean) and server seconds are reported too. ``floor_overhead_vs_plain`` is the least that
critical path could be in this run: the plain round's plus the bare cryptography a secure
round must do on it (``crypto_floor``, timed here with the same primitives), as if every
message and every protocol step besides the crypto were free.

``--engine grpc`` runs them deployed: this process is a GrpcEngine coordinator (mutual TLS,
bulk lane) and every node is its own process on 127.0.0.1, so ``overhead_vs_plain`` is the
ratio of real round times, transport included. All processes share this machine's cores:
with N node processes on two cores the nodes' crypto is still paid one after another.
Reported beside it are the CPU seconds of the coordinator and of a node (mean), per round.
Dropouts are drawn the same way in both: the chosen tasks never reach a ``--dropouts``
fraction of the nodes.

Both report the bytes each node uploads (median). Each timed round follows an untimed round
of its own kind, and plain and secure rounds alternate (medians over ``--repeats``).
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
    python benchmarks/secagg.py --nodes 100 --dim 100000 --dropouts 0.1 --engine local grpc
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
from _deploy import cpu_s, make_federation, run_node, spawn_nodes, stop, wait_for_lanes

from shoal.aggregate import Clip, Sum
from shoal.core import Federation
from shoal.crypto import SecureSum, shamir
from shoal.crypto.keys import KEY_BYTES, KeyPair, agree_many, decrypt, derive_key, encrypt
from shoal.crypto.prg import SEED_BYTES, add_masks
from shoal.crypto.secagg import SecAggParams
from shoal.runtime import (
    DispatchResult,
    Engine,
    Failure,
    FailureKind,
    Faults,
    LocalEngine,
    NodeApp,
    Task,
)

HERE = Path(__file__).resolve()
RANGE = 1.0
# Dropouts strike the secure rounds' masked-input phase (the costly case: the server must
# rebuild the dropped nodes' pairwise masks) and the plain rounds' upload.
MASKED_INPUT_TASK = "shoal.secagg.masked_input"
DROPPED_TASKS = frozenset({MASKED_INPUT_TASK, "shoal.fetch"})


class Metering:
    """Counts node compute time (per dispatch: total and slowest), bytes each node sends, and
    which nodes answered the masked-input phase."""

    def reset(self) -> None:
        self.node_seconds = 0.0
        self.slowest_sum = 0.0
        self.upload: dict[str, int] = defaultdict(int)
        self.masked_asked: list[str] = []
        self.masked_answered: set[str] = set()

    def dispatch(self, tasks: Any, *, deadline_s: float) -> DispatchResult:
        result: DispatchResult = super().dispatch(tasks, deadline_s=deadline_s)  # type: ignore[misc]
        if tasks and tasks[0].name == MASKED_INPUT_TASK:
            self.masked_asked = [task.node_id for task in tasks]
            self.masked_answered = set(result.replies)
        elapsed = [r.elapsed_s for r in result.replies.values()]
        self.node_seconds += sum(elapsed)
        self.slowest_sum += max(elapsed, default=0.0)
        for node, reply in result.replies.items():
            self.upload[node] += memoryview(reply.payload).nbytes
        return result


class MeteredEngine(Metering, LocalEngine):
    """The simulation: every node in this process, one after another."""


class Dropping:
    """A deployment's engine (a GrpcEngine) whose DROPPED_TASKS fail to reach a ``drop``
    fraction of their nodes (seeded draws, as LocalEngine's Faults make them), so that those
    nodes send nothing in that phase."""

    def __init__(self, inner: Engine, *, drop: float, seed: int) -> None:
        self.inner = inner
        self.drop = drop
        self.rng = np.random.default_rng(seed)

    def node_ids(self) -> Any:
        return self.inner.node_ids()

    def close(self) -> None:
        self.inner.close()

    def dispatch(self, tasks: Any, *, deadline_s: float) -> DispatchResult:
        kept: list[Task] = []
        dropped: dict[str, Failure] = {}
        for task in tasks:
            if task.name in DROPPED_TASKS and self.rng.random() < self.drop:
                dropped[task.node_id] = Failure(
                    node_id=task.node_id,
                    task_id=task.task_id,
                    kind=FailureKind.DROPPED,
                    detail="simulated dropout",
                )
            else:
                kept.append(task)
        result = self.inner.dispatch(kept, deadline_s=deadline_s)
        return DispatchResult(replies=result.replies, failures={**result.failures, **dropped})


class DeployedEngine(Metering, Dropping):
    """The deployment, metered like the simulation."""


def node_vector(name: str, dim: int, seed: int) -> np.ndarray:
    """Node ``name``'s fixed update: D values uniform in [-RANGE, RANGE]."""
    return (
        np.random.default_rng([seed, int(name.lstrip("n"))])
        .uniform(-RANGE, RANGE, size=dim)
        .astype(np.float32)
    )


def node_app(vector_of: Any) -> NodeApp:
    """The node side of both rounds: ``train`` returns the node's vector; SecAgg+ tasks."""
    app = NodeApp()

    @app.task("train")
    def train(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": vector_of(ctx.node_id)}

    app.install(SecureSum().node_tasks())
    return app


def node_main(args: argparse.Namespace) -> int:
    """A node process of the deployed benchmark."""
    vector = node_vector(args.name, args.node_dim, args.seed)
    run_node(node_app(lambda _: vector), args, max_idle_s=900)
    return 0


def run_case(
    nodes: int,
    dim: int,
    dropout: float,
    repeats: int,
    seed: int,
    degree: int | None = None,
    failure_probability: float = 1e-6,
    engine_kind: str = "local",
) -> dict[str, Any]:
    ids = [f"n{i}" for i in range(nodes)]

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
    if engine_kind == "grpc":
        with tempfile.TemporaryDirectory() as tmp:
            return deployed_case(Path(tmp), ids, dim, dropout, repeats, seed, secure, params)
    vectors = {v: node_vector(v, dim, seed) for v in ids}
    faults = Faults(drop=dropout, tasks=DROPPED_TASKS, seed=seed)
    engine = MeteredEngine(
        node_app(vectors.__getitem__), nodes=ids, faults=faults if dropout else None, seed=seed
    )
    return measure(engine, [], ids, dim, dropout, repeats, secure, params, "local")


def deployed_case(
    root: Path,
    ids: list[str],
    dim: int,
    dropout: float,
    repeats: int,
    seed: int,
    secure: Any,
    params: SecAggParams,
) -> dict[str, Any]:
    """The same rounds with this process as a GrpcEngine coordinator (mutual TLS, bulk lane)
    and one process per node on 127.0.0.1."""
    from shoal.runtime.grpc import GrpcEngine, ServerTLS

    store, keys = make_federation(root, len(ids))
    grpc_engine = GrpcEngine(
        listen="127.0.0.1:0", registry=store, tls=ServerTLS.from_dir(root / "certs")
    ).start()
    engine = DeployedEngine(grpc_engine, drop=dropout, seed=seed)
    extra = ["--node-dim", str(dim), "--seed", str(seed)]
    target = f"127.0.0.1:{grpc_engine.port}"
    procs = spawn_nodes(HERE, keys, target, root / "certs", extra=extra)
    try:
        if grpc_engine.wait_for_nodes(len(ids), timeout_s=600) < len(ids):
            raise RuntimeError("not all node processes connected")
        wait_for_lanes(grpc_engine, len(ids), timeout_s=300)
        return measure(engine, procs, ids, dim, dropout, repeats, secure, params, "grpc")
    finally:
        engine.close()
        stop(procs)
        store.close()


def crypto_floor(
    params: SecAggParams, asked: list[str], survivors: set[str], *, repeats: int = 5
) -> dict[str, float]:
    """The bare cryptography one secure round puts on its critical path, timed here with
    shoal's own primitives (best of ``repeats``): no messages, no Python protocol logic.

    Server: for every node that dropped before its masked input, agreeing a seed with, and
    expanding a mask for, each surviving neighbour; a self-mask per survivor; rebuilding one
    secret per survivor and per dropped node from ``threshold`` shares. Slowest node (degree
    k): 2k agreements and key derivations, two Shamir splits, k share encryptions (share
    phase), k + 1 masks (masked input), k share decryptions (unmask).
    """
    k, t, dim = params.degree, params.threshold, params.vector_length
    dropped = [u for u in asked if u not in survivors]
    edges = sum(1 for u in dropped for v in params.graph[u] if v in survivors)
    secrets = len(survivors) + len(dropped)
    own = KeyPair.generate().private
    publics = [KeyPair.generate().public for _ in range(max(2 * k, edges))]
    seeds = [(os.urandom(SEED_BYTES), 1) for _ in range(max(k + 1, len(survivors) + edges))]
    xs = list(range(1, k + 1))
    shares = [shamir.split(os.urandom(KEY_BYTES), threshold=t, xs=xs) for _ in range(secrets)]
    aead_key = os.urandom(KEY_BYTES)
    plaintext = os.urandom(4 + 2 * len(shares[0][0].to_bytes()))
    acc = np.zeros(dim, dtype=params.dtype)

    def agreements(count: int) -> None:
        for z in agree_many(own, publics[:count]):
            derive_key(z, purpose="floor", context=b"")

    def server() -> None:
        agreements(edges)
        add_masks(acc, seeds[: len(survivors) + edges])
        for held in shares:
            shamir.combine(held, threshold=t, length=KEY_BYTES)

    def node() -> None:
        agreements(2 * k)
        for _ in range(2):
            shamir.split(os.urandom(KEY_BYTES), threshold=t, xs=xs)
        blobs = [encrypt(aead_key, plaintext, associated_data=b"") for _ in range(k)]
        add_masks(acc, seeds[: k + 1])
        for blob in blobs:
            decrypt(aead_key, blob, associated_data=b"")

    def best(step: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return min(times)

    return {"server_s": best(server), "node_s": best(node), "dropped": len(dropped)}


def measure(
    engine: Any,
    procs: list[Any],
    ids: list[str],
    dim: int,
    dropout: float,
    repeats: int,
    secure: Any,
    params: SecAggParams,
    engine_kind: str,
) -> dict[str, Any]:
    """Plain and secure rounds, interleaved, each timed after an untimed one of its kind."""
    nodes = len(ids)
    federation = Federation(engine, min_nodes=1)

    def one(kind: str) -> dict[str, float]:
        engine.reset()
        own, theirs = cpu_s([None]), cpu_s(procs)
        t0 = time.perf_counter()
        out = federation.all().map("train")
        if kind == "plain":
            out["delta"].aggregate(Sum())
        else:
            out["delta"].aggregate(secure)
        wall = time.perf_counter() - t0
        uploads = list(engine.upload.values())
        bytes_per_node = statistics.median(uploads) if uploads else 0.0
        if engine_kind == "grpc":  # CPU seconds of the coordinator and of the node processes
            return {
                "wall_s": wall,
                "node_cpu_s_mean": (cpu_s(procs) - theirs) / nodes,
                "server_cpu_s": cpu_s([None]) - own,
                "bytes_per_node": bytes_per_node,
            }
        # One process runs everything in turn, so what the nodes did not spend, the server did.
        server_s = max(wall - engine.node_seconds, 0.0)
        return {
            "wall_s": wall,
            "parallel_s": server_s + engine.slowest_sum,
            "node_s_mean": engine.node_seconds / nodes,
            "server_s": server_s,
            "bytes_per_node": bytes_per_node,
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
    result = {
        "engine": engine_kind,
        "nodes": nodes,
        "dim": dim,
        "degree": params.degree,
        "threshold": params.threshold,
        "dropout": dropout,
        "plain": med["plain"],
        "secure": med["secure"],
        "overhead_vs_plain": med["secure"]["wall_s"] / med["plain"]["wall_s"],
        "bytes_vs_float32_upload": med["secure"]["bytes_per_node"] / (4 * dim),
    }
    if engine_kind == "local":
        plain_s = med["plain"]["parallel_s"]
        result["parallel_overhead_vs_plain"] = med["secure"]["parallel_s"] / plain_s
        # The least the critical path can be: the plain round's plus the bare crypto of the
        # last secure round (its dropouts), as if every message and protocol step were free.
        floor = crypto_floor(params, engine.masked_asked, engine.masked_answered)
        result["crypto_floor"] = floor
        result["floor_overhead_vs_plain"] = (
            plain_s + floor["server_s"] + floor["node_s"]
        ) / plain_s
    return result


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


def row(r: dict[str, Any]) -> str:
    """One table line; deployed rows report CPU seconds where simulated ones report time."""
    secure = r["secure"]
    deployed = r["engine"] == "grpc"
    parallel = "n/a" if deployed else f"{r['parallel_overhead_vs_plain']:.1f}x"
    floor = "n/a" if deployed else f"{r['floor_overhead_vs_plain']:.1f}x"
    node_s = secure["node_cpu_s_mean"] if deployed else secure["node_s_mean"]
    server_s = secure["server_cpu_s"] if deployed else secure["server_s"]
    return (
        f"{r['engine']:>6} {r['nodes']:>5} {r['degree']:>4} {r['dim']:>8} {r['dropout']:>5.0%}"
        f" {r['plain']['wall_s']:>8.3f} {secure['wall_s']:>9.3f} {r['overhead_vs_plain']:>6.1f}x"
        f" {parallel:>10} {floor:>7} {node_s:>8.4f} {server_s:>9.3f}"
        f" {r['bytes_vs_float32_upload']:>10.3f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--dim", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument(
        "--engine",
        nargs="+",
        choices=["local", "grpc"],
        default=["local"],
        help="local: the in-process simulation; grpc: one process per node, mutual TLS",
    )
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
    # a node process of --engine grpc
    parser.add_argument("--worker", choices=["node"], help=argparse.SUPPRESS)
    for name in ("--target", "--key", "--name", "--certs"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--node-dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # benchmarks/grpc.py sits beside this file: with this directory first on sys.path,
    # `import grpc` (shoal's deployment imports it) would find that script, not grpcio.
    if sys.path and Path(sys.path[0]).resolve() == HERE.parent:
        sys.path.pop(0)
    if args.worker == "node":
        return node_main(args)
    flower = flower_python(args.flower_python)
    results = []
    header = (
        f"{'engine':>6} {'N':>5} {'k':>4} {'D':>8} {'drop':>5} {'plain s':>8} {'secure s':>9}"
        f" {'wall x':>7} {'parallel x':>10} {'floor x':>7} {'node s':>8} {'server s':>9}"
        f" {'bytes x f32':>11}"
    )
    if flower:
        header += f" {'flwr plain s':>12} {'flwr secure s':>13} {'flwr x':>7}"
    print(header)
    print("-" * len(header))
    for n in args.nodes:
        for d in args.dim:
            for dropout in args.dropouts:
                for engine_kind in args.engine:
                    r = run_case(
                        n,
                        d,
                        dropout,
                        args.repeats,
                        args.seed,
                        args.degree,
                        args.max_failure_probability,
                        engine_kind,
                    )
                    line = row(r)
                    if flower and engine_kind == "local":
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
