"""Simulation overhead: the README Quickstart's ``simulate(...)`` against a minimal NumPy loop.

The workload: N nodes, each holding 32 digits images (drawn from the training split with a
per-node seed, built once before any timing), FedAvg over all N nodes every round with the
Quickstart's settings (3 local epochs, batch 16, lr 0.5), the server's test accuracy after
every round. Rows, all in one process per N, interleaved repeat by repeat:

* ``floor``: the primary floor, a FedAvg loop written here in plain NumPy as a researcher
  would: node data built once, one shuffle per epoch, one gather per batch, no loss computed,
  the example-weighted mean of the deltas, test accuracy per round.
* ``simulate``: ``shoal.learn.simulate(model=SoftmaxRegression(...), nodes=..., algorithm=
  FedAvg(...), test=test)``, called exactly as the Quickstart calls it; its wall and CPU
  seconds (the whole call, engine start included) divided by the rounds.
* ``floor, data rebuilt``: a secondary row, the same loop building every node's data again
  each round (what this benchmark's floor used to do; not the floor any more).
* ``flower``: Flower 1.42 on the same workload (``benchmarks/simulation_flower.py``, run in
  Flower's own venv with ``--flower-python``; each client's data built once per Ray actor and
  cached, as here). Its seconds per round come from its ServerApp's clock, first round
  excluded (Ray start-up). Flower's ClientApps run in Ray actor processes, so the CPU column
  is left empty for it; ``--flower-actors`` (default 1) matches shoal's one worker thread.

What the node's enforcement costs (at each N of ``--enforcement-nodes``, 1,000 by default):
the same ``simulate()`` call, enforced as shipped (``after``) and with the node-side
enforcement replaced by a no-op (``before``), for three plans: ``plain`` (the Quickstart's
call above), ``node DP`` (``privacy=NodeDP(noise_multiplier=1.0)``: every node's update
clipped and charged to its ledger, central noise) and ``example DP`` (``privacy=ExampleDP(
noise_multiplier=1.0, sample_rate=0.25, steps_per_round=5)``: local DP-SGD, charged). The
no-op is made here, by patching, for the ``before`` call only (:func:`enforcement_off`): every
release policy is ``{"*": "clear"}`` (no check on any reply, receipt or fetch) and no guard is
installed (no noise floor, no ledger charge or its audit entry, no noise binding). shoal has
no switch that turns enforcement off. ``before`` and ``after`` alternate, their order flipped
each repeat, and both are reported as ratios to the floor run in the same repeat loop. The
overhead to trust is the order-balanced one: whichever row of a pair runs first pays a few
percent more, so it is the median, over consecutive repeats (one in each order), of the
geometric mean of their two after/before ratios; use an even ``--repeats``.

Wall and process CPU per round are medians over ``--repeats`` interleaved repeats (floor,
simulate, the enforcement pairs, rebuilt floor, floor, ...), each call timed after a
``gc.collect()``. The machine may be shared: the
ratios, taken within one run, are what to trust. Each N runs in a fresh process, so that its
peak RSS is its own.

    python benchmarks/simulation.py --nodes 100 1000 10000 --rounds 3 --repeats 5 \
        --flower-python /work/venvs/flower/bin/python --json results/simulation.json
    OPENBLAS_NUM_THREADS=1 python benchmarks/simulation.py --nodes 1000 --rounds 3 \
        --repeats 16 --json results/enforcement.json

Flower's venv: ``python3 -m venv /work/venvs/flower &&
/work/venvs/flower/bin/pip install "flwr[simulation]==1.42.0" numpy``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SHARD = 32
EPOCHS = 3
BATCH = 16
LR = 0.5
FEATURES = 64
CLASSES = 10
HERE = Path(__file__).resolve().parent
# The enforcement rows' plans (``--enforcement-plans``), each enforced and not.
ENFORCEMENT_PLANS = ("plain", "node DP", "example DP")


@contextlib.contextmanager
def enforcement_off() -> Iterator[None]:
    """The node's enforcement replaced by a no-op, inside this block only (the ``before`` row).

    Patches what ``simulate()`` builds: every task's release policy becomes ``{"*":
    "clear"}``, so no reply, receipt or fetch is checked, and ``NodeApp.add_guard`` installs
    nothing, so no noise floor is checked, nothing is charged to a ledger or audited and no
    noise is bound. Everything else (the plan's rounds, DP-SGD, the server's noise) is as
    shipped. Checked on entry: an app built inside has no guard and only clear policies.
    """
    from unittest import mock

    from shoal.learn import TRAIN, SoftmaxRegression, learning_app
    from shoal.privacy.plans import NodeDP
    from shoal.runtime import app as app_module
    from shoal.runtime.policy import ReleasePolicy

    class AllClear(ReleasePolicy):
        __slots__ = ()

        def __init__(self, spec: Any, *, task: str) -> None:
            super().__init__({"*": "clear"}, task=task)

    with (
        mock.patch.object(app_module, "ReleasePolicy", AllClear),
        mock.patch.object(app_module.NodeApp, "add_guard", lambda self, guard: None),
    ):
        probe = learning_app(
            SoftmaxRegression(features=4, classes=2), plan=NodeDP(noise_multiplier=1.0)
        )
        assert probe.policy(TRAIN).all_clear and not probe._guards, "the patch missed"
        yield


def plan_of(name: str) -> Any:
    """The privacy plan of an enforcement row (None: the Quickstart's plain FedAvg)."""
    from shoal.privacy.plans import ExampleDP, NodeDP

    if name == "plain":
        return None
    if name == "node DP":
        return NodeDP(noise_multiplier=1.0, clip=1.0)
    if name == "example DP":
        return ExampleDP(noise_multiplier=1.0, clip=1.0, sample_rate=0.25, steps_per_round=5)
    raise ValueError(f"no enforcement plan {name!r}; use one of {ENFORCEMENT_PLANS}")


def digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from shoal.data import load_digits

    train, test = load_digits(test_fraction=0.2, seed=seed)
    return train.x, train.y, test.x, test.y


def shard(pool_x: np.ndarray, pool_y: np.ndarray, seed: int, node: int) -> tuple[Any, Any]:
    """Node ``node``'s examples (the Flower script draws the very same ones)."""
    pick = np.random.default_rng([seed, node]).choice(len(pool_y), size=SHARD, replace=False)
    return pool_x[pick], pool_y[pick]


def floor_run(
    shards: Callable[[], list[tuple[np.ndarray, np.ndarray]]],
    test_x: np.ndarray,
    test_y: np.ndarray,
    rounds: int,
    seed: int,
) -> float:
    """The minimal FedAvg loop; ``shards()`` is called once per round. Returns the accuracy."""
    rng = np.random.default_rng(seed)
    W = np.zeros((FEATURES, CLASSES))
    b = np.zeros(CLASSES)
    rows = np.arange(BATCH)
    accuracy = 0.0
    for _ in range(rounds):
        sum_W, sum_b, total = np.zeros_like(W), np.zeros_like(b), 0
        for x, y in shards():
            w, c, n = W.copy(), b.copy(), len(y)
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
            sum_W += n * (w - W)
            sum_b += n * (c - b)
            total += n
        W += sum_W / total
        b += sum_b / total
        accuracy = float(((test_x @ W + b).argmax(axis=1) == test_y).mean())
    return accuracy


def run_one(
    nodes: int, rounds: int, repeats: int, seed: int, enforcement: tuple[str, ...] = ()
) -> dict[str, Any]:
    from shoal.data import Dataset
    from shoal.learn import FedAvg, SoftmaxRegression, simulate

    pool_x, pool_y, test_x, test_y = digits(seed)
    test = Dataset(x=test_x, y=test_y, classes=CLASSES, name="test")
    built = [shard(pool_x, pool_y, seed, i) for i in range(nodes)]
    node_data = [Dataset(x=x, y=y, classes=CLASSES, name=f"n{i}") for i, (x, y) in enumerate(built)]

    def floor() -> float:
        return floor_run(lambda: built, test_x, test_y, rounds, seed)

    def rebuilt() -> float:
        def fresh() -> list[tuple[np.ndarray, np.ndarray]]:
            return [shard(pool_x, pool_y, seed, i) for i in range(nodes)]

        return floor_run(fresh, test_x, test_y, rounds, seed)

    def quickstart(plan: Any = None) -> float:
        result = simulate(
            model=SoftmaxRegression(features=FEATURES, classes=CLASSES),
            nodes=node_data,
            algorithm=FedAvg(
                rounds=rounds,
                nodes_per_round=nodes,
                local_epochs=EPOCHS,
                lr=LR,
                batch_size=BATCH,
                privacy=plan,
            ),
            test=test,
        )
        return float(result.metrics["accuracy"])

    def unenforced(plan: Any) -> float:
        with enforcement_off():
            return quickstart(plan)

    rows: dict[str, Callable[[], float]] = {"floor": floor, "simulate": quickstart}
    # Enforcement pairs, (after, before) row names, each pair's rows next to each other;
    # "simulate" is the plain pair's "after".
    pairs: dict[str, tuple[str, str]] = {}
    for name in ("plain", *(n for n in enforcement if n != "plain")):
        if name not in enforcement:
            continue
        plan = plan_of(name)
        after = "simulate" if name == "plain" else f"simulate, {name}"
        if after not in rows:
            rows[after] = lambda plan=plan: quickstart(plan)
        rows[f"{after}, unenforced"] = lambda plan=plan: unenforced(plan)
        pairs[name] = (after, f"{after}, unenforced")
    rows["floor_rebuilt"] = rebuilt
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    accuracy: dict[str, float] = {}
    for repeat in range(repeats):  # interleaved: load changes on a shared machine hit every row
        order = list(rows)
        if repeat % 2:  # each pair's two rows swap places: neither always runs first
            for after, before in pairs.values():
                i, j = order.index(after), order.index(before)
                order[i], order[j] = order[j], order[i]
        for name in order:
            fn = rows[name]
            gc.collect()  # every row starts from the same heap: no row pays another's garbage
            c0, t0 = time.process_time(), time.perf_counter()
            accuracy[name] = fn()
            wall[name].append((time.perf_counter() - t0) / rounds)
            cpu[name].append((time.process_time() - c0) / rounds)
    out: dict[str, Any] = {"nodes": nodes, "rounds": rounds, "repeats": repeats}
    for name in rows:
        out[name] = {
            "wall_s_per_round": statistics.median(wall[name]),
            "cpu_s_per_round": statistics.median(cpu[name]),
            "wall_runs": wall[name],
            "cpu_runs": cpu[name],
            "accuracy": accuracy[name],
        }
    base = out["floor"]
    for name in [n for n in rows if n != "floor"]:
        out[name]["wall_vs_floor"] = out[name]["wall_s_per_round"] / base["wall_s_per_round"]
        out[name]["cpu_vs_floor"] = out[name]["cpu_s_per_round"] / base["cpu_s_per_round"]
        # Each repeat's own ratio (its row against the floor run just before it): the spread
        # of these is the range a re-run should land in on a machine as busy as this one.
        for kind, runs in (("wall", wall), ("cpu", cpu)):
            ratios = [a / b for a, b in zip(runs[name], runs["floor"])]
            out[name][f"{kind}_ratio_runs"] = ratios
            out[name][f"{kind}_ratio_range"] = [min(ratios), max(ratios)]
    enforced: dict[str, Any] = {}
    for name, (after, before) in pairs.items():
        row: dict[str, Any] = {"after": after, "before": before}
        for kind, runs in (("wall", wall), ("cpu", cpu)):
            key = f"{kind}_s_per_round"
            row[f"{kind}_before_vs_floor"] = out[before][f"{kind}_vs_floor"]
            row[f"{kind}_after_vs_floor"] = out[after][f"{kind}_vs_floor"]
            row[f"{kind}_overhead"] = out[after][key] / out[before][key] - 1
            # Within each repeat, after against the before run next to it.
            ratios = [a / b for a, b in zip(runs[after], runs[before])]
            row[f"{kind}_overhead_runs"] = [r - 1 for r in ratios]
            row[f"{kind}_overhead_range"] = [min(ratios) - 1, max(ratios) - 1]
            # Whichever of a pair runs first pays a few percent more (caches and heap
            # cold after the row before): repeats 2k and 2k + 1 run the pair in opposite
            # orders, so the geometric mean of their two ratios cancels that; the median
            # over such pairs is the overhead to trust (an odd last repeat is left out).
            balanced = [
                (ratios[i] * ratios[i + 1]) ** 0.5 - 1 for i in range(0, len(ratios) - 1, 2)
            ]
            row[f"{kind}_overhead_balanced_runs"] = balanced
            if balanced:
                row[f"{kind}_overhead_balanced"] = statistics.median(balanced)
        enforced[name] = row
    if enforced:
        out["enforcement"] = enforced
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_flower(
    python: str, nodes: int, rounds: int, seed: int, actors: int
) -> dict[str, Any] | None:
    pool_x, pool_y, test_x, test_y = digits(seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits.npz"
        np.savez(data, pool_x=pool_x, pool_y=pool_y, test_x=test_x, test_y=test_y)
        out = Path(tmp) / "flower.json"
        command = [python, str(HERE / "simulation_flower.py"), "--data", str(data)]
        command += ["--nodes", str(nodes), "--rounds", str(rounds), "--seed", str(seed)]
        command += ["--actors", str(actors), "--json", str(out)]
        # Flower's ray.init() joins any Ray cluster this machine has running (found through
        # RAY_ADDRESS or /tmp/ray/ray_current_cluster, e.g. another job's `ray start`), and
        # then fails or measures that cluster: its own temp dir keeps it on a private Ray.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env=env)
        if done.returncode != 0 or not out.exists():
            print(f"flower run failed at N={nodes}:\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flower-python", metavar="PYTHON", help="Flower 1.42's venv python")
    parser.add_argument("--flower-nodes", type=int, nargs="+", help="N for Flower (default: all)")
    parser.add_argument("--flower-rounds", type=int, default=4, help="Flower rounds (1st untimed)")
    parser.add_argument("--flower-actors", type=int, default=1)
    parser.add_argument(
        "--enforcement-nodes",
        type=int,
        nargs="*",
        default=[1000],
        help="N at which to time simulate() with and without the node's enforcement",
    )
    parser.add_argument(
        "--enforcement-plans", nargs="+", default=list(ENFORCEMENT_PLANS), choices=ENFORCEMENT_PLANS
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        plans = tuple(args.enforcement_plans) if args.enforcement_nodes else ()
        result = run_one(args.nodes[0], args.rounds, args.repeats, args.seed, plans)
        print(json.dumps(result))
        return 0
    results = []
    for n in args.nodes:
        command = [sys.executable, __file__, "--child", "--nodes", str(n)]
        command += ["--rounds", str(args.rounds), "--repeats", str(args.repeats)]
        command += ["--seed", str(args.seed)]
        if n in args.enforcement_nodes:
            command += ["--enforcement-nodes", str(n), "--enforcement-plans"]
            command += args.enforcement_plans
        else:
            command += ["--enforcement-nodes"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        flower_nodes = args.flower_nodes or args.nodes
        if args.flower_python and n in flower_nodes:
            flower = run_flower(
                args.flower_python, n, args.flower_rounds, args.seed, args.flower_actors
            )
            if flower is not None:
                result["flower"] = flower
                result["flower"]["wall_vs_floor"] = (
                    flower["wall_s_per_round"] / result["floor"]["wall_s_per_round"]
                )
                result["flower"]["wall_vs_simulate"] = (
                    flower["wall_s_per_round"] / result["simulate"]["wall_s_per_round"]
                )
        results.append(result)
    header = (
        f"{'nodes':>6} {'row':<22} {'wall s/round':>13} {'CPU s/round':>12} {'wall x floor':>13}"
        f" {'CPU x floor':>12} {'accuracy':>9}"
    )
    print(header)
    print("-" * len(header))
    labels = {
        "floor": "floor (minimal NumPy)",
        "simulate": "simulate() Quickstart",
        "floor_rebuilt": "floor, data rebuilt*",
        "flower": "Flower 1.42",
    }
    for name in ENFORCEMENT_PLANS:
        after = "simulate" if name == "plain" else f"simulate, {name}"
        if after != "simulate":
            labels[after] = f"{name} (enforced)"
        labels[f"{after}, unenforced"] = f"{name}, no-op enf.**"
    for r in results:
        for key, label in labels.items():
            row = r.get(key)
            if row is None:
                continue
            wall_x = row["wall_s_per_round"] / r["floor"]["wall_s_per_round"]
            cpu = row.get("cpu_s_per_round")
            cpu_x, cpu_s = f"{'':>12}", f"{'-':>12}"
            if cpu is not None:
                cpu_x = f"{cpu / r['floor']['cpu_s_per_round']:>11.2f}x"
                cpu_s = f"{cpu:>12.4f}"
            print(
                f"{r['nodes']:>6} {label:<22} {row['wall_s_per_round']:>13.4f} {cpu_s}"
                f" {wall_x:>12.2f}x {cpu_x} {row['accuracy']:>9.3f}"
            )
            if "wall_ratio_range" in row:
                (wa, wb), (ca, cb) = row["wall_ratio_range"], row["cpu_ratio_range"]
                print(
                    f"{'':>6} {'  per-repeat range':<22} {'':>26} {wa:>5.2f}-{wb:.2f}x"
                    f" {ca:>5.2f}-{cb:.2f}x"
                )
        extra = f"peak RSS {r['peak_rss_mb']:.0f} MB"
        if "flower" in r:
            extra += f"; Flower / simulate() per round: {r['flower']['wall_vs_simulate']:.1f}x"
        print(f"{'':>6} {extra}")
        for name, e in r.get("enforcement", {}).items():
            pairs = e.get("cpu_overhead_balanced_runs") or [math.nan]
            balanced = e.get("cpu_overhead_balanced", math.nan)
            print(
                f"{'':>6} enforcement, {name}: CPU x floor before {e['cpu_before_vs_floor']:.3f}x,"
                f" after {e['cpu_after_vs_floor']:.3f}x ({100 * e['cpu_overhead']:+.1f}%);"
                f" order-balanced {100 * balanced:+.1f}% (pairs {100 * min(pairs):+.1f}% to"
                f" {100 * max(pairs):+.1f}%); wall before {e['wall_before_vs_floor']:.3f}x,"
                f" after {e['wall_after_vs_floor']:.3f}x ({100 * e['wall_overhead']:+.1f}%;"
                f" balanced {100 * e.get('wall_overhead_balanced', math.nan):+.1f}%)"
            )
    print("* secondary row: the floor building every node's data again each round")
    if any("enforcement" in r for r in results):
        print("** the same simulate() with the node's enforcement patched to a no-op here")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
