"""Discarding kept values: a simulation's nodes forget a map's results once the code is done
with them (no dispatch; engines whose nodes keep their own values ignore it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from shoal.core import Federation
from shoal.errors import NotEnoughNodes
from shoal.runtime import DispatchResult, LocalEngine, NodeApp, Task, TaskContext
from shoal.runtime.app import KEPT_STATE_KEY


def make_app() -> NodeApp:
    app = NodeApp()

    @app.task("train")
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"d": np.full(3, float(ctx.node_id[1:]))}

    return app


def test_discarded_values_are_gone_from_the_nodes() -> None:
    engine = LocalEngine(make_app(), nodes=3)
    federation = Federation(engine, seed=0)
    group = federation.all()
    first, second = group.map("train"), group.map("train")
    first.discard()
    for node in group.node_ids:
        kept = engine.node_state(node)[KEPT_STATE_KEY]
        assert first.handle not in kept and second.handle in kept
    with pytest.raises(NotEnoughNodes, match="no longer holds"):
        first["d"].mean()
    np.testing.assert_allclose(second["d"].mean(), np.ones(3))
    engine.forget({"n0": ["unknown"], "n9": ["v0"]})  # unknown nodes and handles: nothing


class NoForget:
    """An engine whose nodes keep their own values (as deployed ones do): no forget()."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.dispatches = 0

    def node_ids(self) -> Sequence[str]:
        return self.engine.node_ids()

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        self.dispatches += 1
        return self.engine.dispatch(tasks, deadline_s=deadline_s)

    def close(self) -> None:
        self.engine.close()


def test_discard_costs_no_dispatch_on_an_engine_without_forget() -> None:
    inner = LocalEngine(make_app(), nodes=2)
    engine = NoForget(inner)
    federation = Federation(engine, seed=0)  # type: ignore[arg-type]
    out = federation.all().map("train")
    out.discard()
    assert engine.dispatches == 1
    assert out.handle in inner.node_state("n0")[KEPT_STATE_KEY]
