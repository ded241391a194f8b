"""The contract suite's nodes: one app per role, and a real node process serving it over gRPC.

Every engine under test runs these same apps, so a difference in outcome is the engine's.
Run as a script it is one node process (not collected by pytest):

    python tests/runtime/contract/apps.py --port P --key n1.key --certs DIR --node n1 --state n1.db
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Mapping
from types import FrameType
from typing import Any

import numpy as np

from shoal.core.routing import received
from shoal.errors import PrivacyBudgetExceeded
from shoal.runtime import Buffer, NodeApp, TaskContext
from shoal.wire import WireLimits

# n0 is the guest, the others are hosts (a vertical job's shape: one label holder).
ROLES = {"n0": "guest", "n1": "host", "n2": "host", "n3": "host"}
NODES = tuple(ROLES)
# A node's wire limit: large payloads under it pass, one over it is refused before it is read.
LIMIT_BYTES = 8 << 20
GARBAGE = b"\x00this is not a wire message"


class ContractApp(NodeApp):
    """A NodeApp whose ``garble`` task answers with bytes no decoder accepts (a broken node)."""

    def handle(self, ctx: TaskContext, name: str, payload: Buffer, **kwargs: Any) -> Buffer:
        if name == "garble":
            return GARBAGE
        return super().handle(ctx, name, payload, **kwargs)


def build_app(node_id: str) -> NodeApp:
    """The app of node ``node_id``: the common tasks, and its role's own."""
    app = ContractApp(limits=WireLimits(max_bytes=LIMIT_BYTES))

    @app.task("echo")
    def echo(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"node": ctx.node_id, "task_id": ctx.task_id}
        if "x" in payload:
            out["x"] = payload["x"] * 2
        return out

    @app.task("append")
    def append(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        payload["log"].append(ctx.node_id)  # changes this node's copy of the payload only
        return {"log": payload["log"]}

    @app.task("count")
    def count(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        key = f"count/{payload['key']}"
        ctx.state[key] = ctx.state.get(key, 0) + 1
        return {"count": ctx.state[key], "node": ctx.node_id}

    @app.task("sleep")
    def sleep(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(payload["s"]))
        return {"slept": payload["s"]}

    @app.task("boom")
    def boom(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("task exploded")

    @app.task("garble")
    def garble(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {}  # never runs: ContractApp.handle answers first

    @app.task("secret", release={"delta": "secure", "n": "clear", "hidden": "never"})
    def secret(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.arange(3.0) + int(ctx.node_id[1:]), "n": 1, "hidden": 7}

    @app.task("noisy", release={"delta": "noised", "n": "clear"})
    def noisy(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.ones(3), "n": 1}

    if ROLES.get(node_id) == "guest":

        @app.task("open", release={"*": "clear"})
        def open_(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            shares = received(payload, "share")
            return {"total": np.sum([shares[s] for s in sorted(shares)], axis=0)}

    else:

        @app.task("seal", release={"share": "sealed:guest", "n": "clear"})
        def seal(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            return {"share": np.full(3, float(ctx.node_id[1:])), "n": 1}

    def guard(name: str, ctx: TaskContext, args: Mapping[str, Any]) -> None:
        if args.get("private"):
            raise PrivacyBudgetExceeded("the owner's budget for this is spent")

    app.add_guard(guard)
    return app


def main(argv: list[str]) -> int:
    from shoal.runtime import open_node_state
    from shoal.runtime.grpc import (
        Backoff,
        ClientTLS,
        NodeClient,
        fingerprint,
        load_private_key,
        public_key_bytes,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--certs", required=True)
    parser.add_argument("--node", required=True, choices=NODES)
    parser.add_argument("--state", required=True)
    parser.add_argument("--no-lane", action="store_true")
    args = parser.parse_args(argv)
    key = load_private_key(args.key)
    client = NodeClient(
        app=build_app(args.node),
        coordinator=f"127.0.0.1:{args.port}",
        key=key,
        tls=ClientTLS.from_dir(args.certs, name=args.node),
        partition_index=NODES.index(args.node),
        backoff=Backoff(initial_s=0.05, max_s=0.5),
        max_idle_s=300.0,  # a safety net: a node orphaned by a killed test run leaves
        lane=not args.no_lane,
        node_state=open_node_state(args.state, owner=fingerprint(public_key_bytes(key))),
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        client.stop()

    signal.signal(signal.SIGTERM, stop)
    print(f"node {args.node} exit: {client.run().value}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
