"""What the node's enforcement costs: release policies, guards, ledger charges, audit entries.

Two apps run the same learning tasks on the same nodes, in one process, interleaved:

* ``checked``: what ``simulate()`` builds (``learning_app(model, plan=...)``): the plan's
  release policies checked on every reply, receipt and fetch, and under DP the node's guard
  (noise floor, a ledger charge and its hash-chained audit entry per task, the noise bound).
* ``minimal``: the floor, a NodeApp whose ``handle`` only decodes, runs the task and keeps or
  encodes the result: no guard, no policy, no audit (every field in the clear). What a node
  that enforces nothing does.

Two measurements per plan (``plain``: the README Quickstart's FedAvg; ``dp``: local
example-level DP, where every training task is charged to the node's ledger):

* ``node task``: one node's ``handle()`` of the training task, checked and minimal
  alternating, ``--calls`` times each; median process CPU per call. This is the node-round
  CPU the issue bounds (the enforcement's share of it).
* ``simulate``: the whole ``simulate()`` call at ``--nodes`` (engine, aggregation and server
  included) per round, checked and minimal alternating, medians over ``--repeats``, with the
  range of the per-repeat ratios.

    python benchmarks/enforcement.py --nodes 1000 --rounds 2 --repeats 5 --calls 400 \
        --json results/enforcement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulation import BATCH, CLASSES, EPOCHS, FEATURES, LR, digits, shard

from shoal.data import Dataset
from shoal.learn import TRAIN, FedAvg, SoftmaxRegression, learning_app, simulate
from shoal.learn.tasks import learning_tasks
from shoal.privacy.plans import ExampleDP, NoPrivacy
from shoal.runtime import NodeApp, TaskContext
from shoal.runtime.app import SEND_KEY, SENT_PREFIX, _Held, _keep
from shoal.runtime.policy import ReleasePolicy
from shoal.wire import decode, encode

ALL_CLEAR = ReleasePolicy.clear(task="minimal")
DP_PLAN = ExampleDP(noise_multiplier=1.0, clip=1.0, sample_rate=0.25, steps_per_round=5)


class MinimalApp(NodeApp):
    """The floor: decode, run the task, keep or encode. Nothing checked, nothing recorded."""

    def handle(
        self,
        ctx: TaskContext,
        name: str,
        payload: Any,
        *,
        keep_as: str | None = None,
        decoded: Mapping[str, Any] | None = None,
    ) -> Any:
        args = dict(decoded) if decoded is not None else decode(payload, limits=self.limits)
        send = args.pop(SEND_KEY, None)
        result = self._tasks[name](ctx, args) or {}
        if keep_as is None:
            return encode(result, limits=self.limits)
        receipt = _keep(ctx, keep_as, _Held(dict(result), ALL_CLEAR, None), self.max_kept)
        for field in send or ():
            if field in result:
                receipt[SENT_PREFIX + field] = result[field]
        return encode(receipt, limits=self.limits)


def model() -> SoftmaxRegression:
    return SoftmaxRegression(features=FEATURES, classes=CLASSES)


def apps(plan: Any) -> dict[str, Callable[[], NodeApp]]:
    def checked() -> NodeApp:
        return learning_app(model(), plan=plan)

    def minimal() -> NodeApp:
        app = MinimalApp()
        app.install(learning_tasks(model()))
        return app

    return {"checked": checked, "minimal": minimal}


def train_payload(plan: Any, seed: int) -> dict[str, Any]:
    weights = {f"w/{k}": v for k, v in model().get_weights().items()}
    payload: dict[str, Any] = {**weights, "epochs": EPOCHS, "lr": LR, "batch_size": BATCH}
    payload["seed"] = seed
    if isinstance(plan, ExampleDP):
        payload["dp"] = plan.request(nodes=1).to_json()
    return payload


def node_task(plan: Any, data: Dataset, calls: int) -> dict[str, Any]:
    """One node's training task through each app's handle(), alternating; CPU per call."""
    payload = train_payload(plan, seed=0)
    send = [f"d/{k}" for k in model().get_weights()]
    built = {name: make() for name, make in apps(plan).items()}
    states: dict[str, dict[str, Any]] = {name: {} for name in built}
    cpu: dict[str, list[float]] = {name: [] for name in built}
    for i in range(calls):
        for name, app in built.items() if i % 2 == 0 else reversed(built.items()):
            ctx = TaskContext(node_id="n0", data=data, state=states[name], task_id=f"t{i}")
            args = {**payload, SEND_KEY: send}
            c0 = time.process_time()
            app.handle(ctx, TRAIN, b"", keep_as=f"h{i}", decoded=args)
            cpu[name].append(time.process_time() - c0)
    out = {name: {"cpu_s_per_call": statistics.median(runs)} for name, runs in cpu.items()}
    out["overhead"] = out["checked"]["cpu_s_per_call"] / out["minimal"]["cpu_s_per_call"] - 1
    return out


def simulated(
    plan: Any, nodes: list[Dataset], test: Dataset, rounds: int, repeats: int
) -> dict[str, Any]:
    makers = apps(plan)
    wall: dict[str, list[float]] = {name: [] for name in makers}
    cpu: dict[str, list[float]] = {name: [] for name in makers}
    accuracy: dict[str, float] = {}
    for repeat in range(repeats):  # interleaved: load changes on a shared machine hit both
        order = list(makers.items())
        for name, make in order if repeat % 2 == 0 else order[::-1]:  # neither always first
            algorithm = FedAvg(
                rounds=rounds,
                nodes_per_round=len(nodes),
                local_epochs=EPOCHS,
                lr=LR,
                batch_size=BATCH,
                privacy=None if isinstance(plan, NoPrivacy) else plan,
            )
            c0, t0 = time.process_time(), time.perf_counter()
            # The checked app is the one simulate() builds itself; both are built in the timing.
            result = simulate(
                model=model(), nodes=nodes, algorithm=algorithm, test=test, app=make()
            )
            wall[name].append((time.perf_counter() - t0) / rounds)
            cpu[name].append((time.process_time() - c0) / rounds)
            accuracy[name] = float(result.metrics["accuracy"])
    out: dict[str, Any] = {}
    for name in makers:
        out[name] = {
            "wall_s_per_round": statistics.median(wall[name]),
            "cpu_s_per_round": statistics.median(cpu[name]),
            "cpu_runs": cpu[name],
            "accuracy": accuracy[name],
        }
    ratios = [a / b for a, b in zip(cpu["checked"], cpu["minimal"])]
    out["cpu_overhead"] = out["checked"]["cpu_s_per_round"] / out["minimal"]["cpu_s_per_round"] - 1
    out["cpu_overhead_range"] = [min(ratios) - 1, max(ratios) - 1]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--plans", nargs="+", default=["plain", "dp"], choices=["plain", "dp"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    pool_x, pool_y, test_x, test_y = digits(args.seed)
    test = Dataset(x=test_x, y=test_y, classes=CLASSES, name="test")
    nodes = []
    for i in range(args.nodes):
        x, y = shard(pool_x, pool_y, args.seed, i)
        nodes.append(Dataset(x=x, y=y, classes=CLASSES, name=f"n{i}"))
    plans = {"plain": NoPrivacy(), "dp": DP_PLAN}
    results: dict[str, Any] = {"nodes": args.nodes, "rounds": args.rounds}
    header = f"{'plan':<6} {'measure':<24} {'checked':>12} {'minimal':>12} {'overhead':>10}"
    print(header)
    print("-" * len(header))
    for key in args.plans:
        plan = plans[key]
        task = node_task(plan, nodes[0], args.calls)
        sim = simulated(plan, nodes, test, args.rounds, args.repeats)
        results[key] = {"node_task": task, "simulate": sim}
        print(
            f"{key:<6} {'node task, CPU s/call':<24} {task['checked']['cpu_s_per_call']:>12.6f}"
            f" {task['minimal']['cpu_s_per_call']:>12.6f} {100 * task['overhead']:>9.2f}%"
        )
        lo, hi = sim["cpu_overhead_range"]
        checked, minimal = sim["checked"]["cpu_s_per_round"], sim["minimal"]["cpu_s_per_round"]
        print(
            f"{key:<6} {f'simulate N={args.nodes}, CPU s/round':<24}"
            f" {checked:>12.4f} {minimal:>12.4f}"
            f" {100 * sim['cpu_overhead']:>9.2f}%   (per repeat {100 * lo:.1f}% to {100 * hi:.1f}%;"
            f" accuracy {sim['checked']['accuracy']:.3f} / {sim['minimal']['accuracy']:.3f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
