"""Node apps and data recipes for tests/runtime/test_ray.py, imported by name on Ray workers.

The test puts this folder on the workers' PYTHONPATH; a recipe names ``shoal_ray_apps:...``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.runtime import NodeApp, TaskContext


def app() -> NodeApp:
    node_app = NodeApp()

    @node_app.task("count")
    def count(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        # Per-node state: must persist across dispatches to the same node.
        import ray

        n = ctx.state.get("n", 0) + 1
        ctx.state["n"] = n
        return {"n": n, "pid": os.getpid(), "ray_node": ray.get_runtime_context().get_node_id()}

    @node_app.task("echo")
    def echo(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"x": payload["x"] * 2, "rows": len(ctx.data), "first": float(ctx.data[0])}

    @node_app.task("draw")
    def draw(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"r": ctx.rng.random(3)}

    @node_app.task("slow")
    def slow(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(payload["s"]))
        return {"ok": 1}

    return node_app


def data(*, broken: list[str]) -> Callable[[str], Any]:
    """Node ``n<i>`` holds ``[i, i+1, ..., 2i]``; a node in ``broken`` cannot be built."""

    def node(node_id: str) -> Any:
        if node_id in broken:
            raise FileNotFoundError(f"no such file: /data/{node_id}.csv")
        i = int(node_id[1:])
        return np.arange(i, 2 * i + 1, dtype=float)

    return node


def contract_apps(*, nodes: list[str]) -> NodeApp:
    """The Engine contract suite's apps (tests/runtime/contract/apps.py), one per node."""
    import importlib.util
    import sys
    from pathlib import Path

    from shoal.runtime.roles import NodeApps

    name = "shoal_contract_apps"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "contract" / "apps.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return NodeApps({n: module.build_app(n) for n in nodes})
