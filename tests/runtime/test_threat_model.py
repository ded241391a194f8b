"""The threat model's rows, checked at the engine boundary (docs/privacy.md).

A spy engine records every byte a coordinator receives and every byte each node receives
during a round with a secure sum; the nodes' private values are distinctive numbers, so a
leak would show up as that number in someone's view.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.aggregate import Clip
from shoal.core import Federation
from shoal.crypto import SecureSum, secure_sum_tasks
from shoal.runtime import DispatchResult, LocalEngine, NodeApp, Task, TaskContext
from shoal.wire import decode

NODES = 5
# Each node's private value: far from anything a protocol message holds by chance.
SECRETS = {f"n{i}": 1234.5 + 7.25 * i for i in range(NODES)}


class SpyEngine(LocalEngine):
    """A LocalEngine that keeps what each side sees: node inputs and coordinator inputs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_node: dict[str, list[Any]] = defaultdict(list)
        self.to_coordinator: list[Any] = []

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        for task in tasks:
            self.to_node[task.node_id].append(decode(task.payload))
        result = super().dispatch(tasks, deadline_s=deadline_s)
        self.to_coordinator.extend(decode(r.payload) for r in result.replies.values())
        self.to_coordinator.extend(f.detail for f in result.failures.values())
        return result


def numbers(value: Any) -> list[float]:
    """Every number inside a decoded payload (arrays, JSON, nested), as floats."""
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.ravel()] if value.dtype.kind in "biuf" else []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    if isinstance(value, str):
        return [float(s) for s in _floats_in(value)]
    return []


def _floats_in(text: str) -> list[str]:
    import re

    return re.findall(r"\d+\.\d+", text)


def secure_round() -> tuple[SpyEngine, np.ndarray]:
    app = NodeApp()

    @app.task("train", release={"delta": "secure", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.full(3, SECRETS[ctx.node_id]), "n": 1}

    app.install(secure_sum_tasks())
    engine = SpyEngine(app, nodes=NODES)
    fed = Federation(engine)
    out = fed.all().map("train")
    total = out["delta"].aggregate(Clip(1e4) | SecureSum(value_range=3e3))
    # The hostile half of the coordinator: it also asks for the field in the clear.
    out["delta"].reveal()
    return engine, total


def leaked(values: list[Any], secret: float) -> bool:
    return any(abs(n - secret) < 1e-3 for value in values for n in numbers(value))


def test_a_curious_coordinator_sees_only_the_sum() -> None:
    engine, total = secure_round()
    np.testing.assert_allclose(total, np.full(3, sum(SECRETS.values())), rtol=1e-6)
    for node, secret in SECRETS.items():
        assert not leaked(engine.to_coordinator, secret), node


def test_a_curious_node_sees_no_other_nodes_value() -> None:
    engine, _ = secure_round()
    for node in SECRETS:
        seen = engine.to_node[node]
        assert seen  # it took part in every phase
        for other, secret in SECRETS.items():
            assert not leaked(seen, secret), (node, other)
