"""NodeHost: one Ray actor hosting a share of a RayEngine's virtual nodes.

It builds its NodeApp and its nodes' data from recipes (JSON), never from pickled objects,
and runs each batch of tasks in a LocalEngine of its own, so a node behaves exactly as it
does in LocalEngine: same task context, same seed, same release-policy checks, same
virtual clock. What crosses in and out is plain: strings, numbers and wire bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shoal.data.spec import DataSpec
from shoal.errors import ConfigError
from shoal.runtime.app import NodeApp
from shoal.runtime.engine import Task
from shoal.runtime.local import LocalEngine
from shoal.runtime.nodestate import NODE_STATE_KEY
from shoal.runtime.recipe import Recipe

__all__ = ["NodeHost"]

# One task of a batch: (node id, task name, task id, keep_as, payload slot, injected delay).
TaskRow = tuple[str, str, str, "str | None", int, float]
# A batch's outcome: the replying nodes, their measured compute and reply sizes, every reply
# one after the other in one buffer, and the failures as (node id, FailureKind value, detail).
# One buffer rather than a bytes object per reply: Ray moves a NumPy array through its object
# store without pickling or copying it, and thousands of replies cost one object, not
# thousands.
BatchOutcome = tuple[list[str], list[float], list[int], np.ndarray, list[tuple[str, str, str]]]


class NodeHost:
    """A Ray actor's body (RayEngine wraps it in ``ray.remote``); see the module docstring."""

    def __init__(self, config: str) -> None:
        cfg = json.loads(config)
        self.problem: str | None = None
        nodes: int | list[str] = cfg["nodes"]
        ids = [f"n{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        try:
            app = Recipe.from_json(cfg["app"]).build()
            if not isinstance(app, NodeApp):
                raise ConfigError(
                    f"the app recipe {cfg['app']} built a {type(app).__name__}, not a NodeApp"
                )
        except Exception as exc:  # reported by ready(): the engine refuses to start
            self.problem = f"cannot build the node app here: {exc}"
            return
        self.engine = LocalEngine(
            app,
            data=_data_source(cfg.get("data"), ids),
            nodes=nodes if isinstance(nodes, int) else ids,
            seed=int(cfg["seed"]),
            cache_size=int(cfg["cache_size"]),
            workers=int(cfg["workers"]),
        )

    def ready(self) -> str | None:
        """None when this host can run tasks, else why not."""
        return self.problem

    def run(
        self,
        rows: Sequence[TaskRow],
        inline: Sequence[bytes],
        deadline_s: float,
        dispatch: int,
        *shared: bytes,
    ) -> BatchOutcome:
        """Run one batch; a payload slot below ``len(shared)`` names a shared payload (one
        object for all its tasks, so the LocalEngine decodes it once), the rest ``inline``.
        The replies come back as wire bytes, concatenated (see ``BatchOutcome``)."""
        payloads = [*shared, *inline]
        runnable = [
            (
                Task(node_id=n, name=name, task_id=tid, keep_as=keep, payload=payloads[slot]),
                delay,
            )
            for n, name, tid, keep, slot, delay in rows
        ]
        result = self.engine.run(runnable, deadline_s=deadline_s, dispatch=dispatch)
        replies = result.replies.values()
        bodies = [r.payload for r in replies]
        blob = np.frombuffer(b"".join(bodies), dtype=np.uint8)
        return (
            [r.node_id for r in replies],
            [r.elapsed_s for r in replies],
            [b.nbytes if type(b) is memoryview else len(b) for b in bodies],
            blob,
            [(f.node_id, f.kind.value, f.detail) for f in result.failures.values()],
        )

    def forget(self, handles: str) -> None:
        """Drop kept values, ``handles`` as JSON {node: [handle, ...]} (LocalEngine.forget)."""
        if self.problem is None:
            self.engine.forget(json.loads(handles))

    def audit(self, node_id: str) -> str:
        """The node's own audit log as JSON [[action, detail], ...] (tests and debugging)."""
        if self.problem is not None:
            return "[]"
        state = self.engine.node_state(node_id).get(NODE_STATE_KEY)
        entries = [] if state is None else [(e.action, dict(e.detail)) for e in state.entries]
        return json.dumps(entries, default=str)

    def close(self) -> None:
        if self.problem is None:
            self.engine.close()


def _data_source(description: dict[str, Any] | None, ids: list[str]) -> Callable[[str], Any] | None:
    """node id -> data, built on first use. A description that cannot be built fails each
    node's task with the reason (the LocalEngine reports it as that node's ERROR)."""
    if description is None:
        return None
    index = {node_id: i for i, node_id in enumerate(ids)}
    kind, body = description["kind"], description["body"]
    if kind == "spec":
        try:
            spec = DataSpec.from_json(body)
        except Exception as exc:
            return _failing(f"cannot read the data description: {exc}")
        return lambda node_id: spec.node(index[node_id])
    built: list[Callable[[str], Any]] = []

    def factory(node_id: str) -> Any:
        if not built:  # the recipe runs once per host, on first use
            made = Recipe.from_json(body).build()
            if not callable(made):
                raise ConfigError(
                    f"the data recipe {body} built a {type(made).__name__}, not a function of "
                    "the node id"
                )
            built.append(made)
        return built[0](node_id)

    return factory


def _failing(reason: str) -> Callable[[str], Any]:
    def fail(node_id: str) -> Any:
        raise ConfigError(reason)

    return fail
