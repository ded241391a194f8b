"""A hostile coordinator against the node's release policies and ledger (red-team findings).

Each test is an attack that once worked; the node must now refuse it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.errors import ReleaseRefused
from shoal.privacy.guard import DPRequest, budget_guard
from shoal.runtime import FETCH_TASK, NodeApp, TaskContext, read_held
from shoal.runtime.request import request_digest
from shoal.wire import decode, encode

SECRET = np.full(4, 0.25)


def _app(*, level: str = "node") -> NodeApp:
    app = NodeApp()

    @app.task("train", release={"delta": "noised", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": SECRET.copy(), "n": 5}

    app.add_guard(budget_guard(max_epsilon=1e9, max_delta=1e-5, tasks={"train"}))
    return app


def _run(app: NodeApp, state: dict[str, Any], task_id: str, name: str, payload: Any, **kw: Any):
    ctx = TaskContext(node_id="n0", state=state, task_id=task_id)
    return decode(app.handle(ctx, name, encode(payload), **kw))


def _made_by(payload: Any) -> str:
    """The digest a secure sum states for a value that "train" produced from ``payload``."""
    return request_digest("train", encode(payload))


def _dp(**over: Any) -> dict[str, Any]:
    request = DPRequest(clip=1.0, noise_multiplier=4.0, sample_rate=1.0, steps=1, level="node")
    return {**request.to_json(), **over}


def test_a_tiny_distributed_noise_share_does_not_buy_a_clear_release() -> None:
    # The ledger is charged for noise_multiplier 4 (std 4), but the request claims this node's
    # share of distributed noise is ~0. Alone (a fetch, not a secure sum) the node's value
    # needs the full std the ledger was charged for, not the share.
    app, state = _app(), {}
    _run(app, state, "t1", "train", {"dp": _dp(node_noise_multiplier=1e-12)}, keep_as="h")
    charged = state["shoal.node_state"].charges()
    assert [c["noise_multiplier"] for c in charged] == [4.0]
    with pytest.raises(ReleaseRefused, match="less noise than it charged"):
        _run(
            app,
            state,
            "t2",
            FETCH_TASK,
            {"handle": "h", "fields": ["delta"], "noise": {"clip": 1.0, "std": 1e-12}},
        )
    # The honest release (the full charged std) still works, once.
    out = _run(
        app,
        state,
        "t3",
        FETCH_TASK,
        {"handle": "h", "fields": ["delta"], "noise": {"clip": 1.0, "std": 4.0}},
    )
    assert out["delta"].shape == (4,)


def test_the_share_is_enough_inside_a_secure_sum() -> None:
    app, state = _app(), {}
    _run(app, state, "t1", "train", {"dp": _dp(node_noise_multiplier=2.0)}, keep_as="h")
    ctx = TaskContext(node_id="n0", state=state, task_id="t2")
    made_by = _made_by({"dp": _dp(node_noise_multiplier=2.0)})
    got = read_held(
        ctx, "h", ["delta"], use="secure", request=made_by, clip=1.0, noise_std=2.0, group=4
    )
    np.testing.assert_array_equal(got["delta"], SECRET)


def test_example_level_with_a_tiny_share_leaves_only_into_a_secure_sum() -> None:
    # level="example": the task adds the noise itself (DP-SGD), with only the node's share
    # when the request names one. Charged for z = 4, noised with ~0: such a result must not
    # leave in the clear (direct reply, send, or fetch); only into a secure sum.
    app, state = _app(), {}
    dp = _dp(level="example", node_noise_multiplier=1e-12)
    with pytest.raises(ReleaseRefused):
        _run(app, state, "t1", "train", {"dp": dp})
    with pytest.raises(ReleaseRefused):
        _run(app, state, "t2", "train", {"dp": dp, "shoal.send": ["delta"]}, keep_as="h2")
    _run(app, state, "t3", "train", {"dp": dp}, keep_as="h3")
    with pytest.raises(ReleaseRefused):
        _run(app, state, "t4", FETCH_TASK, {"handle": "h3", "fields": ["delta"]})
    ctx = TaskContext(node_id="n0", state=state, task_id="t5")
    # Nor into a secure sum over the 5 participants the node sees: shares that small never
    # add up to the charged std 4 (it would take 1.6e25 of them).
    with pytest.raises(ReleaseRefused, match="participant"):
        read_held(
            ctx,
            "h3",
            ["delta"],
            use="secure",
            request=_made_by({"dp": dp}),
            clip=1.0,
            noise_std=0.0,
            group=5,
        )
    # A share of 2 adds up to std 4 over 4 participants: that secure sum is let in.
    dp2 = _dp(level="example", node_noise_multiplier=2.0)
    _run(app, state, "t7", "train", {"dp": dp2}, keep_as="h7")
    got = read_held(ctx, "h7", ["delta"], use="secure", request=_made_by({"dp": dp2}), group=4)
    assert got["delta"].shape == (4,)
    # Without a share, example-level noise is the full charged noise: it leaves as it is.
    assert _run(app, state, "t6", "train", {"dp": _dp(level="example")})["n"] == 5


def test_a_secure_field_joins_one_secure_sum_so_no_difference_of_two_sums_reveals_it() -> None:
    # The attack: sum the same held value over all five nodes, then over the four others;
    # the difference is n0's value. The node lets each secure field into one sum.
    from shoal.aggregate import Clip
    from shoal.core import Federation
    from shoal.crypto import SecureSum, secure_sum_tasks
    from shoal.runtime import FailureKind, LocalEngine

    app = NodeApp()

    @app.task("train", release={"delta": "secure", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.full(4, float(ctx.node_id[1:]) + 1.0), "n": 3}

    app.install(secure_sum_tasks())
    engine = LocalEngine(app, nodes=5)
    out = Federation(engine).all().map("train")
    chain = Clip(100.0) | SecureSum(dropout_fraction=0.0)
    total = out["delta"].aggregate(chain)
    np.testing.assert_allclose(total, np.full(4, 15.0), atol=1e-3)
    others = out["delta"].without(["n0"], FailureKind.REJECTED, "left out on purpose")
    with pytest.raises(Exception, match="masked inputs"):
        others.aggregate(chain)
    for node in engine.node_ids()[1:]:
        state = engine.node_state(node)["shoal.node_state"]
        (entry,) = [e.detail for e in state.entries if e.action == "refused"]
        assert "already entered a secure sum" in entry["reason"]
    # Clear fields stay free, and a fresh map (a new value) may be summed again.
    again = Federation(engine).all().map("train")
    np.testing.assert_allclose(again["delta"].aggregate(chain), np.full(4, 15.0), atol=1e-3)
