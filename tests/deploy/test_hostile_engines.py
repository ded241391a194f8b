"""The same hostile requests get the same answers from LocalEngine and a gRPC node.

Release policies are enforced in NodeApp, so a simulation refuses exactly what a deployed
node refuses, with the same reason, and both nodes write the same audit entries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.runtime import FETCH_TASK, FORWARD_TASK, LocalEngine, NodeApp, Task, TaskContext
from shoal.runtime.nodestate import NODE_STATE_KEY
from shoal.wire import encode

NAMES = ["n0", "n1"]


def make_app() -> NodeApp:
    app = NodeApp(require_release=True)

    @app.task("train", release={"delta": "secure", "enc": "sealed:host", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.ones(3), "enc": "c1pher", "n": 2}

    return app


def requests() -> list[tuple[str, dict[str, Any], str | None]]:
    """(task, payload, keep_as): one honest map, then what a hostile coordinator tries."""
    return [
        ("train", {}, "h"),
        ("train", {}, None),  # the whole result as a direct reply
        (FETCH_TASK, {"handle": "h", "fields": ["delta"]}, None),
        (FETCH_TASK, {"handle": "h", "fields": ["n"]}, None),
        (FORWARD_TASK, {"handle": "h", "fields": ["enc"], "role": "guest"}, None),
        (FORWARD_TASK, {"handle": "h", "fields": ["enc"], "role": "host"}, None),
        ("train", {"shoal.send": ["delta"]}, "h2"),
        ("dump_everything", {}, None),
    ]


def outcomes(engine: Any) -> list[dict[str, tuple[str, str]]]:
    seen = []
    for i, (name, payload, keep_as) in enumerate(requests()):
        tasks = [
            Task(node_id=n, name=name, payload=encode(payload), task_id=f"{i}/{n}", keep_as=keep_as)
            for n in NAMES
        ]
        result = engine.dispatch(tasks, deadline_s=30)
        row = {n: ("ok", "") for n in result.replies}
        row.update({n: (f.kind.value, f.detail) for n, f in result.failures.items()})
        seen.append(row)
    return seen


def test_local_and_grpc_nodes_refuse_the_same_requests(federation: Any) -> None:
    engine = federation.engine()
    apps = {n: make_app() for n in NAMES}
    clients = [federation.client(n, apps[n], engine.port) for n in NAMES]
    assert engine.wait_for_nodes(len(NAMES), timeout_s=30) == len(NAMES)
    local = LocalEngine(make_app(), nodes=NAMES)
    deployed, simulated = outcomes(engine), outcomes(local)
    kinds = [{n: kind for n, (kind, _) in row.items()} for row in deployed]
    assert kinds == [{n: kind for n, (kind, _) in row.items()} for row in simulated]
    assert [row["n0"][0] for row in deployed] == [
        "ok", "rejected", "rejected", "ok", "rejected", "ok", "rejected", "rejected",
    ]  # fmt: skip
    for mine, theirs in zip(deployed, simulated, strict=True):
        assert mine == theirs  # the same reason, word for word
    assert all("no task named 'dump_everything'" in d for _, d in deployed[-1].values())
    for client, node in zip(clients, NAMES, strict=True):
        grpc_log = client.state[NODE_STATE_KEY].entries
        local_log = local.node_state(node)[NODE_STATE_KEY].entries
        assert [e.action for e in grpc_log] == [e.action for e in local_log]
        assert [dict(e.detail) for e in grpc_log] == [dict(e.detail) for e in local_log]
