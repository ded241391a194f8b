"""A real node process for the hostile-coordinator tests (run as a script, not collected).

Its owner declares a release policy on every task: ``train``'s update only into a secure
sum, ``dp_train``'s only noised (node-level DP, charged to the owner's durable ledger),
``evaluate``'s metrics only noised (the policy the learning app uses under DP), counts in
the clear. The ledger and audit log live in ``--state``.

    python tests/deploy/policy_node.py --port P --key n0.key --state n0.db --value 1
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

import numpy as np

from shoal.crypto import secure_sum_tasks
from shoal.data import Dataset
from shoal.learn import ExampleDP, SoftmaxRegression, learning_app
from shoal.privacy.guard import budget_guard
from shoal.runtime import NodeApp, TaskContext, open_node_state
from shoal.runtime.grpc import Backoff, NodeClient, fingerprint, load_private_key, public_key_bytes

DIM = 4
# The plan of the job this node holds: DP-SGD with noise multiplier 1 at the node.
PLAN = ExampleDP(noise_multiplier=1.0, clip=1.0, sample_rate=0.5, steps_per_round=2)


def local_data(value: float) -> Dataset:
    rng = np.random.default_rng(int(value))
    x = rng.normal(size=(16, DIM))
    return Dataset(x=x, y=(x[:, 0] > 0).astype(np.int64), classes=2)


def build_app(*, value: float, max_epsilon: float) -> NodeApp:
    app = NodeApp(require_release=True)

    @app.task("train", release={"delta": "secure", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.full(DIM, value), "n": 1}

    @app.task("dp_train", release={"delta": "noised", "n": "clear"})
    def dp_train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.full(DIM, 0.1 * value), "n": 1}

    @app.task("evaluate", release={"accuracy": "noised", "loss": "noised", "n": "clear"})
    def evaluate(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"accuracy": 0.5 + 0.1 * value, "loss": 1.0 / value, "n": 10}

    app.install(secure_sum_tasks())
    learning_app(SoftmaxRegression(features=DIM, classes=2), app=app, plan=PLAN)
    app.add_guard(
        budget_guard(max_epsilon=max_epsilon, max_delta=1e-5, tasks={"dp_train", "evaluate"})
    )
    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--value", type=float, default=1.0)
    parser.add_argument("--max-epsilon", type=float, default=1000.0)
    args = parser.parse_args(argv)
    key = load_private_key(args.key)
    state = open_node_state(args.state, owner=fingerprint(public_key_bytes(key)))
    client = NodeClient(
        app=build_app(value=args.value, max_epsilon=args.max_epsilon),
        coordinator=f"127.0.0.1:{args.port}",
        key=key,
        data=local_data(args.value),
        insecure=True,
        backoff=Backoff(initial_s=0.05, max_s=0.3),
        max_idle_s=120.0,
        node_state=state,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        client.stop()

    signal.signal(signal.SIGTERM, stop)
    print(f"node ready, spent {len(state.charges())} charge(s)", flush=True)
    outcome = client.run()
    print(f"node exit: {outcome.value}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
