"""map(send=...): fields the code will aggregate in the clear travel with the receipts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.core import Federation
from shoal.errors import NotEnoughNodes
from shoal.runtime import FETCH_TASK, SEND_KEY, LocalEngine, NodeApp, TaskContext
from shoal.wire import decode


def app() -> NodeApp:
    node_app = NodeApp()

    @node_app.task("train")
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        assert SEND_KEY not in payload  # the instruction is the runtime's, not the task's
        i = int(ctx.node_id[1:])
        return {"delta": np.full(3, float(i)), "n": i + 1, "secret": np.ones(2) * i}

    return node_app


def test_sent_fields_need_no_fetch_and_give_the_same_aggregate(spy_factory) -> None:
    spy = spy_factory(LocalEngine(app(), nodes=5))
    fed = Federation(spy)
    out = fed.all().map("train", send=["delta", "n"])
    mean = out["delta"].mean(weights=out["n"])
    assert not spy.dispatches_of(FETCH_TASK)
    weights = np.arange(1, 6)
    np.testing.assert_allclose(mean, np.full(3, (np.arange(5) * weights).sum() / weights.sum()))
    # the receipts carried only what was asked for
    ((_, result),) = spy.dispatches_of("train")
    for reply in result.replies.values():
        receipt = decode(reply.payload)
        assert "sent/delta" in receipt and "sent/n" in receipt
        assert "sent/secret" not in receipt
    # a field that was not sent is fetched as usual
    out["secret"].sum()
    assert spy.dispatches_of(FETCH_TASK)


def test_a_malformed_send_instruction_is_rejected() -> None:
    engine = LocalEngine(app(), nodes=2)
    fed = Federation(engine)
    with pytest.raises(NotEnoughNodes, match="must list field names"):
        fed.all().map("train", **{SEND_KEY: "delta"})
