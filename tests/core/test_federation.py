"""Tests for Federation and NodeGroup: sampling, broadcast, map placement, minimum nodes."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import Broadcast, Federation, NodeGroup, NodeValues
from shoal.errors import ConfigError, NotEnoughNodes
from shoal.runtime import (
    FETCH_TASK,
    DispatchResult,
    FailureKind,
    Faults,
    LocalEngine,
    NodeApp,
    Reply,
    TaskContext,
)
from shoal.wire import decode, encode

SECRET = 1234.5678


def make_app() -> NodeApp:
    app = NodeApp()

    @app.task("train")
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        w = payload.get("w", np.zeros(3))
        return {"delta": w + ctx.data, "n": int(ctx.node_id[1:]) + 1, "note": "ok"}

    @app.task("echo")
    def echo(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"got": sorted(payload), "node": ctx.node_id}

    @app.task("fail_odd")
    def fail_odd(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        if int(ctx.node_id[1:]) % 2:
            raise RuntimeError("odd node refuses")
        return {"x": np.ones(2)}

    return app


def node_data(n: int) -> list[np.ndarray]:
    return [np.full(3, SECRET + i) for i in range(n)]


def federation(n: int = 6, **kw: Any) -> Federation:
    return Federation(LocalEngine(make_app(), data=node_data(n)), **kw)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"min_nodes": 0}, {"deadline_s": 0}, {"deadline_s": -1.0}])
def test_bad_federation_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        federation(**kwargs)


def test_groups() -> None:
    fed = federation(4)
    assert fed.node_ids == ("n0", "n1", "n2", "n3")
    assert fed.all().node_ids == fed.node_ids
    group = fed.group(["n2", "n0"])
    assert isinstance(group, NodeGroup) and group.node_ids == ("n2", "n0") and len(group) == 2
    assert "2 nodes" in repr(group)
    with pytest.raises(ConfigError, match="n9"):
        fed.group(["n0", "n9"])


# -- sampling ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=30), st.integers(min_value=0, max_value=2**32))
def test_sample_is_deterministic_and_without_replacement(k: int, seed: int) -> None:
    fed = Federation(LocalEngine(NodeApp(), nodes=20))
    group = fed.sample(k, seed=seed)
    assert group.node_ids == fed.sample(k, seed=seed).node_ids
    assert len(set(group.node_ids)) == len(group) == min(k, 20)
    assert set(group.node_ids) <= set(fed.node_ids)


def test_sample_draws_vary_and_follow_the_federation_seed() -> None:
    groups = {federation(50).sample(5, seed=s).node_ids for s in range(20)}
    assert len(groups) > 15
    a, b = federation(50, seed=3), federation(50, seed=3)
    assert [a.sample(5).node_ids for _ in range(4)] == [b.sample(5).node_ids for _ in range(4)]
    assert len({a.sample(5).node_ids for _ in range(10)}) > 1


def test_sample_skips_offline_nodes_and_checks_the_minimum() -> None:
    engine = LocalEngine(NodeApp(), nodes=6)
    fed = Federation(engine, min_nodes=3)
    engine.set_offline(["n0", "n1", "n2"])
    assert set(fed.sample(6).node_ids) == {"n3", "n4", "n5"}
    engine.set_offline(["n3"])
    with pytest.raises(NotEnoughNodes, match=r"2 node.*minimum of 3"):
        fed.sample(2)
    with pytest.raises(ConfigError):
        fed.sample(0)


# -- map keeps values at the nodes ------------------------------------------------------------


def test_map_leaves_values_at_the_nodes(spy_factory: Any) -> None:
    spy = spy_factory(LocalEngine(make_app(), data=node_data(5)))
    fed = Federation(spy)
    out = fed.all().map("train", w=np.ones(3))
    assert isinstance(out, NodeValues) and len(out) == 5
    ((map_tasks, map_result),) = spy.dispatches_of("train")
    assert all(t.keep_as == out.handle for t in map_tasks)
    secret = np.float64(SECRET + 1).tobytes()
    for reply in map_result.replies.values():
        raw = bytes(reply.payload)
        assert secret not in raw  # not even as raw bytes
        receipt = decode(raw)
        assert set(receipt) == {"kept", "fields"}
        assert receipt["fields"] == {
            "delta": "<f8:3",
            "n": "json:",
            "note": "json:",
        }
    assert not spy.dispatches_of(FETCH_TASK)  # nothing fetched until an aggregate asks
    assert out.field_names == ("delta", "n", "note")
    assert out.spec("n0", "delta").shape == (3,)
    # The aggregate is what brings a value back.
    np.testing.assert_allclose(out["delta"].mean(), np.full(3, SECRET + 1 + 2.0))


def test_broadcast_is_encoded_once_and_shared(spy_factory: Any) -> None:
    spy = spy_factory(LocalEngine(make_app(), data=node_data(4)))
    group = Federation(spy).all()
    weights = group.broadcast(w=np.arange(3.0))
    assert isinstance(weights, Broadcast)
    group.map("train", weights)
    ((sent, _),) = spy.dispatches_of("train")
    assert all(task.payload is weights.encoded for task in sent)
    out = group.map("echo", weights, lr=0.1)  # extra values are merged in
    assert out.field_names == ("got", "node")
    (sent, _) = spy.dispatches_of("echo")[0]
    assert decode(sent[0].payload).keys() == {"w", "lr"}


def test_request_with_per_node_values() -> None:
    fed = federation(3)
    replies, failures = fed.request(
        ["n0", "n1", "n2"], "echo", common={"a": 1}, per_node={"n1": {"b": 2}}
    )
    assert not failures
    assert replies["n0"] == {"got": ["a"], "node": "n0"}
    assert replies["n1"] == {"got": ["a", "b"], "node": "n1"}


def test_task_ids_are_unique_per_request(spy_factory: Any) -> None:
    spy = spy_factory(LocalEngine(make_app(), data=node_data(3)))
    fed = Federation(spy)
    fed.all().map("train")
    fed.all().map("train")
    task_ids = [t.task_id for batch in spy.sent for t in batch]
    assert len(task_ids) == len(set(task_ids)) == 6


# -- failures and the minimum ----------------------------------------------------------------


def test_failed_nodes_are_dropped_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(6)
    with caplog.at_level(logging.INFO, logger="shoal.core"):
        out = fed.all().map("fail_odd")
    assert out.node_ids == ("n0", "n2", "n4")
    assert {n: f.kind for n, f in out.failures.items()} == {
        n: FailureKind.ERROR for n in ("n1", "n3", "n5")
    }
    assert "odd node refuses" in out.failures["n1"].detail
    assert "n1" in caplog.text
    np.testing.assert_array_equal(out["x"].sum(), np.full(2, 3.0))


def test_too_few_successes_at_map_is_not_enough_nodes() -> None:
    fed = federation(6, min_nodes=4)
    with pytest.raises(NotEnoughNodes) as info:
        fed.all().map("fail_odd")
    message = str(info.value)
    assert "'fail_odd'" in message and "3 of 6" in message and "minimum of 4" in message
    assert "error" in message and "odd node refuses" in message
    assert fed.all().map("fail_odd", min_nodes=3).node_ids == ("n0", "n2", "n4")


def test_not_enough_nodes_when_everything_is_dropped() -> None:
    engine = LocalEngine(make_app(), data=node_data(4), faults=Faults(drop=1.0))
    with pytest.raises(NotEnoughNodes, match=r"0 of 4.*dropped"):
        Federation(engine).all().map("train")


def test_an_empty_group_is_not_enough_nodes() -> None:
    with pytest.raises(NotEnoughNodes):
        federation(3).group([]).map("train")


def test_undecodable_replies_are_invalid(spy_factory: Any) -> None:
    def corrupt(tasks: Any, result: DispatchResult) -> DispatchResult:
        replies = dict(result.replies)
        good = replies["n1"]
        replies["n1"] = Reply(node_id="n1", task_id=good.task_id, payload=b"garbage", elapsed_s=0.0)
        forged = encode({"kept": "someone-else", "fields": {}})
        replies["n2"] = Reply(node_id="n2", task_id=good.task_id, payload=forged, elapsed_s=0.0)
        return DispatchResult(replies=replies, failures=result.failures)

    spy = spy_factory(LocalEngine(make_app(), data=node_data(4)), tamper=corrupt)
    out = Federation(spy).all().map("train")
    assert out.node_ids == ("n0", "n3")
    assert out.failures["n1"].kind is FailureKind.INVALID
    assert "undecodable" in out.failures["n1"].detail
    assert out.failures["n2"].kind is FailureKind.INVALID


def test_nodes_missing_from_the_engine_result_count_as_dropped(spy_factory: Any) -> None:
    def lose(tasks: Any, result: DispatchResult) -> DispatchResult:
        replies = {n: r for n, r in result.replies.items() if n != "n0"}
        return DispatchResult(replies=replies, failures=result.failures)

    spy = spy_factory(LocalEngine(make_app(), data=node_data(3)), tamper=lose)
    out = Federation(spy).all().map("train")
    assert out.node_ids == ("n1", "n2")
    assert out.failures["n0"].kind is FailureKind.DROPPED
