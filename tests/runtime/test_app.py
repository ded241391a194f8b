"""Tests for NodeApp: task registry, guards, how one task is decoded, run, kept and fetched."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from shoal.errors import (
    ConfigError,
    DataError,
    PrivacyBudgetExceeded,
    TaskError,
    UnknownTask,
    WireError,
)
from shoal.runtime import FETCH_TASK, FORWARD_TASK, NodeApp, TaskContext, read_held
from shoal.runtime.app import KEPT_STATE_KEY
from shoal.wire import WireLimits, decode, encode


def make_ctx(node_id: str = "n0", *, data: Any = None, seed: Any = 0) -> TaskContext:
    return TaskContext(node_id=node_id, data=data, state={}, task_id="t0", seed=seed)


@pytest.fixture
def app() -> NodeApp:
    app = NodeApp()

    @app.task("echo")
    def echo(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return dict(payload)

    @app.task("train")
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": payload["w"] + ctx.data, "n": 3, "tag": "local"}

    return app


def call(app: NodeApp, ctx: TaskContext, name: str, payload: Mapping[str, Any], **kw: Any) -> Any:
    return decode(app.handle(ctx, name, encode(payload), **kw))


def test_registered_tasks_run_on_decoded_payloads(app: NodeApp) -> None:
    out = call(app, make_ctx(data=np.ones(3)), "train", {"w": np.arange(3.0)})
    np.testing.assert_array_equal(out["delta"], np.arange(3.0) + 1)
    assert out["n"] == 3 and out["tag"] == "local"
    assert set(app.task_names) == {FETCH_TASK, FORWARD_TASK, "echo", "train"}


def test_register_refuses_duplicates_and_bad_names(app: NodeApp) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        app.register("echo", lambda ctx, p: {})
    for bad in ("", None, 3):
        with pytest.raises(ConfigError):
            app.register(bad, lambda ctx, p: {})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):  # the runtime's own fetch cannot be replaced
        app.register(FETCH_TASK, lambda ctx, p: {})


def test_config_errors_are_value_errors_too() -> None:
    with pytest.raises(ValueError):
        NodeApp(max_kept=0)


def test_install_is_idempotent_for_the_same_functions(app: NodeApp) -> None:
    def step(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    app.install({"feature.step": step})
    app.install({"feature.step": step})  # a second federation installing the same feature
    assert call(app, make_ctx(), "feature.step", {}) == {"ok": True}
    with pytest.raises(ConfigError):
        app.install({"feature.step": lambda ctx, p: {}})


def test_unknown_task_names_the_tasks_it_does_run(app: NodeApp) -> None:
    with pytest.raises(UnknownTask, match="has no task named 'steal'") as info:
        app.handle(make_ctx(), "steal", encode({}))
    assert "echo" in str(info.value) and "train" in str(info.value)
    assert FETCH_TASK not in str(info.value)  # internal tasks are not advertised
    assert isinstance(info.value, LookupError)


def test_malformed_payload_is_a_wire_error(app: NodeApp) -> None:
    with pytest.raises(WireError):
        app.handle(make_ctx(), "echo", b"not a payload")


def test_task_exceptions_become_task_errors_with_the_message(app: NodeApp) -> None:
    @app.task("buggy")
    def buggy(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("missing column 'age'")

    with pytest.raises(TaskError, match=r"'buggy' raised KeyError: .*missing column 'age'") as info:
        app.handle(make_ctx(), "buggy", encode({}))
    assert isinstance(info.value.__cause__, KeyError)


def test_shoal_errors_from_tasks_keep_their_type(app: NodeApp) -> None:
    @app.task("picky")
    def picky(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        raise DataError("node has no rows")

    with pytest.raises(DataError, match="no rows"):
        app.handle(make_ctx(), "picky", encode({}))


def test_task_results_are_checked(app: NodeApp) -> None:
    @app.task("nothing")
    def nothing(ctx: TaskContext, payload: dict[str, Any]) -> None:
        return None

    @app.task("a_list")
    def a_list(ctx: TaskContext, payload: dict[str, Any]) -> Any:
        return [1, 2]

    @app.task("unsendable")
    def unsendable(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"names": np.array(["alice", "bob"])}

    assert call(app, make_ctx(), "nothing", {}) == {}
    with pytest.raises(TaskError, match="returned list"):
        app.handle(make_ctx(), "a_list", encode({}))
    # The request was fine, so this is the task's failure, not a rejected request.
    with pytest.raises(TaskError, match="wire refuses"):
        app.handle(make_ctx(), "unsendable", encode({}))


def test_guards_see_every_request_and_can_decline(app: NodeApp) -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    def budget(name: str, ctx: TaskContext, payload: Mapping[str, Any]) -> None:
        seen.append((name, ctx.node_id, dict(payload)))
        if name == "train":
            raise PrivacyBudgetExceeded("epsilon 3.0 already spent")

    app.add_guard(budget)
    assert call(app, make_ctx("n7"), "echo", {"a": 1}) == {"a": 1}
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon"):
        app.handle(make_ctx("n7", data=np.ones(1)), "train", encode({"w": np.ones(1)}))
    assert [(name, node) for name, node, _ in seen] == [("echo", "n7"), ("train", "n7")]
    assert seen[0][2] == {"a": 1}


def test_keep_as_holds_the_result_and_sends_only_a_description(app: NodeApp) -> None:
    ctx = make_ctx(data=np.full(3, 7.0))
    receipt = call(app, ctx, "train", {"w": np.zeros(3, np.float32)}, keep_as="v1")
    assert receipt == {
        "kept": "v1",
        "fields": {
            "delta": "<f8:3",
            "n": "json:",
            "tag": "json:",
        },
    }
    held = read_held(ctx, "v1", ["delta"], use="clear")
    np.testing.assert_array_equal(held["delta"], np.full(3, 7.0))
    fetched = call(app, ctx, FETCH_TASK, {"handle": "v1", "fields": ["delta", "n"]})
    assert set(fetched) == {"delta", "n"}
    np.testing.assert_array_equal(fetched["delta"], np.full(3, 7.0))


def test_nodes_keep_only_their_most_recent_results() -> None:
    app = NodeApp(max_kept=2)
    app.register("count", lambda ctx, p: {"i": p["i"]})
    ctx = make_ctx()
    for i in range(3):
        call(app, ctx, "count", {"i": i}, keep_as=f"v{i}")
    assert list(ctx.state[KEPT_STATE_KEY]) == ["v1", "v2"]
    with pytest.raises(TaskError, match="no longer holds value 'v0'"):
        app.handle(ctx, FETCH_TASK, encode({"handle": "v0", "fields": ["i"]}))
    assert call(app, ctx, FETCH_TASK, {"handle": "v2", "fields": ["i"]}) == {"i": 2}


def test_fetch_checks_its_request(app: NodeApp) -> None:
    ctx = make_ctx(data=np.zeros(1))
    call(app, ctx, "train", {"w": np.zeros(1)}, keep_as="v")
    with pytest.raises(TaskError, match="no field"):
        app.handle(ctx, FETCH_TASK, encode({"handle": "v", "fields": ["secret"]}))
    for bad in ({}, {"handle": 1, "fields": []}, {"handle": "v", "fields": "delta"}):
        with pytest.raises(WireError):
            app.handle(ctx, FETCH_TASK, encode(bad))


def test_a_kept_value_that_cannot_travel_fails_at_fetch_as_a_task_error(app: NodeApp) -> None:
    app.register("odd", lambda ctx, p: {"x": {1, 2}})
    ctx = make_ctx()
    receipt = call(app, ctx, "odd", {}, keep_as="v")
    assert receipt["fields"] == {"x": "json:"}
    with pytest.raises(TaskError, match="wire refuses"):
        app.handle(ctx, FETCH_TASK, encode({"handle": "v", "fields": ["x"]}))


def test_context_rng_is_seeded_and_lazy() -> None:
    first, second = make_ctx(seed=(1, 2, 3)), make_ctx(seed=(1, 2, 3))
    assert first._rng is None  # not built until a task asks for it
    np.testing.assert_array_equal(first.rng.random(5), second.rng.random(5))
    assert first.rng is first.rng
    other = make_ctx(seed=(1, 2, 4))
    assert not np.array_equal(make_ctx(seed=(1, 2, 3)).rng.random(5), other.rng.random(5))


def test_app_limits_apply_to_requests_and_results() -> None:
    app = NodeApp(limits=WireLimits(max_items=2))
    app.register("wide", lambda ctx, p: {"a": 1, "b": 2, "c": 3})
    with pytest.raises(WireError):
        app.handle(make_ctx(), "wide", encode({"a": 1, "b": 2, "c": 3}))
    with pytest.raises(TaskError):
        app.handle(make_ctx(), "wide", encode({}))
