"""The digest of the producing request, kept with a held value and fixed by a secure sum.

What is in it: the task's name and every byte of its request (learning rate, epochs, query,
model weights, what to send along). What is not: what differs per node legitimately and
travels outside the payload (node id, task id, seed, the handle) and the node's own data.
A secure sum's nodes refuse to mask a value whose digest is not the round's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Clip
from shoal.core import Federation
from shoal.crypto import SecureSum, secure_sum_tasks
from shoal.errors import ProtocolError
from shoal.learn import TRAIN
from shoal.learn.tasks import buffered_rule
from shoal.runtime import LocalEngine, NodeApp, TaskContext
from shoal.runtime.app import KEPT_STATE_KEY
from shoal.runtime.request import request_digest, rule_digest
from shoal.wire import encode


def _held_request(app: NodeApp, payload: bytes, *, node: str = "a", **ctx: Any) -> str:
    context = TaskContext(node_id=node, data=ctx.get("data"), state={}, task_id=ctx.get("tid", "t"))
    app.handle(context, "make", payload, keep_as=ctx.get("keep_as", "h"))
    held = context.state[KEPT_STATE_KEY][ctx.get("keep_as", "h")]
    return str(held.request)


def test_the_digest_covers_the_task_and_every_byte_of_its_request() -> None:
    base = encode({"lr": 0.1, "epochs": 1, "w/W": np.zeros((2, 2))})
    digest = request_digest("train", base)
    assert digest == request_digest("train", bytes(base))  # the bytes, not the object
    changed = [
        request_digest("other", base),
        request_digest("train", encode({"lr": 0.0, "epochs": 1, "w/W": np.zeros((2, 2))})),
        request_digest("train", encode({"lr": 0.1, "epochs": 0, "w/W": np.zeros((2, 2))})),
        request_digest("train", encode({"lr": 0.1, "epochs": 1, "w/W": np.ones((2, 2))})),
        request_digest("train", encode({"lr": 0.1, "epochs": 1})),
    ]
    assert len({digest, *changed}) == 1 + len(changed)
    # The task name and the bytes are delimited: moving a byte between them changes it.
    assert request_digest("ab", b"c") != request_digest("a", b"bc")


def test_what_differs_per_node_is_not_in_the_digest() -> None:
    app = NodeApp()
    app.register("make", lambda ctx, p: {"x": np.full(2, len(ctx.data))}, release={"x": "secure"})
    payload = encode({"lr": 0.5})
    one = _held_request(app, payload, node="a", data=[1], tid="t1", keep_as="h1")
    two = _held_request(app, payload, node="b", data=[1, 2, 3], tid="t2", keep_as="h2")
    assert one == two == request_digest("make", payload)
    assert _held_request(app, encode({"lr": 0.0}), data=[1]) != one


def test_a_mutable_buffer_is_hashed_again_after_it_changes() -> None:
    buffer = bytearray(b"request")
    first = request_digest("t", buffer)
    buffer[0] = ord("R")
    assert request_digest("t", buffer) != first
    view = memoryview(b"same")
    assert request_digest("t", view) == request_digest("t", view) == request_digest("t", b"same")


def test_the_map_states_the_digest_its_holders_keep() -> None:
    app = NodeApp()
    app.register("make", lambda ctx, p: {"x": np.ones(3) * p["k"]}, release={"x": "secure"})
    app.install(secure_sum_tasks())
    engine = LocalEngine(app, data=[0, 1, 2, 3])
    fed = Federation(engine)
    out = fed.all().map("make", k=2.0)
    assert out.request == request_digest("make", encode({"k": 2.0}))
    assert out["x"].request == out.request
    for node in engine.node_ids():
        assert engine.node_state(node)[KEPT_STATE_KEY][out.handle].request == out.request
    np.testing.assert_allclose(out["x"].aggregate(Clip(10.0) | SecureSum()), np.full(3, 8.0))
    # A sum stating another request's digest: every holder refuses, nothing is summed.
    other = fed.all().map("make", k=2.0)
    other.request = request_digest("make", encode({"k": 0.0}))
    with pytest.raises(ProtocolError):
        other["x"].aggregate(Clip(10.0) | SecureSum())
    for node in engine.node_ids():
        state = engine.node_state(node)["shoal.node_state"]
        reasons = [e.detail["reason"] for e in state.entries if e.action == "refused"]
        assert len(reasons) == 1 and "request digest mismatch" in reasons[0]


def test_fedbuffs_rule_leaves_out_the_version_and_nothing_else() -> None:
    def request(**over: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "w/W": np.zeros(2),
            "lr": 0.1,
            "epochs": 1,
            "batch_size": 32,
            "seed": 7,
            "buffered": {"version": 3, "max_staleness": 10, "exponent": 0.5},
        }
        return {**base, **over}

    rule = buffered_rule(request())
    buffered = {"version": 9, "max_staleness": 10, "exponent": 0.5}
    same = [
        request(**{"w/W": np.ones(2)}),
        request(seed=8),
        request(buffered=buffered),
        {**request(), "shoal.send": ["n"]},
    ]
    assert all(buffered_rule(r) == rule for r in same)
    differ = [
        request(lr=0.0),
        request(epochs=0),
        request(batch_size=1),
        request(buffered={**buffered, "max_staleness": 0}),
        request(buffered={**buffered, "exponent": 1.0}),
        request(dp={"clip": 1.0}),
    ]
    assert len({rule, *map(buffered_rule, differ)}) == 1 + len(differ)
    assert rule != rule_digest("other", {})
    assert buffered_rule(request()) == rule_digest(
        TRAIN,
        {
            "lr": 0.1,
            "epochs": 1,
            "batch_size": 32,
            "buffered": {"max_staleness": 10, "exponent": 0.5},
        },
    )
