"""Release policies at the node: parsing, and every way a value leaves checked against them."""

from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core import Federation
from shoal.crypto.secagg.tasks import MASKED_INPUT_TASK
from shoal.errors import ConfigError, ReleaseRefused, TaskError
from shoal.runtime import (
    FETCH_TASK,
    FORWARD_TASK,
    SEND_KEY,
    FailureKind,
    LocalEngine,
    NodeApp,
    ReleasePolicy,
    TaskContext,
    TaskSpec,
    read_held,
)
from shoal.runtime.app import KEPT_STATE_KEY
from shoal.runtime.request import request_digest
from shoal.wire import decode, encode

POLICY = {
    "n": "clear",
    "delta": "secure",
    "metric/*": "noised",
    "enc": "sealed:host,arbiter",
    "metric/count": "clear",  # an exact name wins over the pattern declared before it
}


def make_app(**options: Any) -> NodeApp:
    app = NodeApp(**options)

    @app.task("train", release=POLICY)
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "n": 3,
            "delta": np.full(4, 2.0),
            "metric/loss": 0.5,
            "metric/count": 7,
            "enc": b"ciphertext".hex(),
            "secret": np.array([42.0]),
        }

    return app


def ctx_for(node: str = "n0", task_id: str = "t0", state: dict[str, Any] | None = None) -> Any:
    return TaskContext(node_id=node, state={} if state is None else state, task_id=task_id)


def run(app: NodeApp, ctx: Any, name: str, payload: dict[str, Any], **kw: Any) -> Any:
    return decode(app.handle(ctx, name, encode(payload), **kw))


def refusals(ctx: Any) -> list[dict[str, Any]]:
    return [dict(e.detail) for e in ctx.node_state.entries if e.action == "refused"]


# -- parsing -----------------------------------------------------------------------------------


def test_kinds_exact_names_patterns_and_the_default() -> None:
    policy = ReleasePolicy(POLICY, task="train")
    assert str(policy.kind_of("n")) == "clear"
    assert str(policy.kind_of("delta")) == "secure"
    assert str(policy.kind_of("metric/loss")) == "noised"
    assert str(policy.kind_of("metric/count")) == "clear"
    assert policy.kind_of("enc").roles == frozenset({"host", "arbiter"})
    assert str(policy.kind_of("enc")) == "sealed:arbiter,host"
    assert str(policy.kind_of("secret")) == "never"  # no entry matches: never
    assert not policy.all_clear
    assert ReleasePolicy.clear(task="t").all_clear


def test_patterns_apply_in_declaration_order() -> None:
    policy = ReleasePolicy({"d/*": "secure", "*": "clear", "d/x": "never"}, task="t")
    assert str(policy.kind_of("d/w")) == "secure"
    assert str(policy.kind_of("loss")) == "clear"
    assert str(policy.kind_of("d/x")) == "never"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "names no field"),
        ({"x": "public"}, "unknown release kind"),
        ({"x": "sealed"}, "names the roles"),
        ({"x": "sealed:"}, "names the roles"),
        ({"x": "sealed:ho st"}, "role names"),
        ({"x": "clear:host"}, "unknown release kind"),
        ({"x": 3}, "is a string"),
        ({"": "clear"}, "non-empty"),
    ],
)
def test_bad_policies_are_refused_at_registration(spec: Any, message: str) -> None:
    app = NodeApp()
    with pytest.raises(ConfigError, match=message):
        app.register("t", lambda ctx, p: {}, release=spec)
    assert "t" not in app.task_names  # nothing half-registered


def test_a_node_may_require_every_task_to_declare() -> None:
    app = NodeApp(require_release=True)
    with pytest.raises(ConfigError, match="declares no release policy"):
        app.register("t", lambda ctx, p: {})
    app.install({"u": TaskSpec(lambda ctx, p: {"x": 1}, {"x": "clear"})})
    assert "u" in app.task_names and app.policy("u").all_clear is False


def reference_kind(spec: dict[str, str], field: str) -> str:
    if field in spec and not any(c in field for c in "*?["):
        return spec[field]
    for name, kind in spec.items():
        if any(c in name for c in "*?[") and fnmatch.fnmatchcase(field, name):
            return kind
    return "never"


names = st.text(alphabet="ab/*?", min_size=1, max_size=4)


@given(
    spec=st.dictionaries(
        names, st.sampled_from(["clear", "secure", "noised", "never"]), min_size=1
    ),
    fields=st.lists(st.text(alphabet="ab/", min_size=1, max_size=4), max_size=8),
)
def test_lookup_matches_the_documented_rule(spec: dict[str, str], fields: list[str]) -> None:
    policy = ReleasePolicy(spec, task="t")
    for field in fields * 2:  # the second pass answers from the cache
        assert str(policy.kind_of(field)) == reference_kind(spec, field)


# -- every way out -------------------------------------------------------------------------------


def test_a_direct_reply_carries_only_clear_fields() -> None:
    app, ctx = make_app(), ctx_for()
    with pytest.raises(ReleaseRefused, match="'delta' as secure") as caught:
        app.handle(ctx, "train", encode({}))
    assert "'secret' as never" in str(caught.value)
    (entry,) = refusals(ctx)
    assert entry["task"] == "train" and entry["task_id"] == "t0"
    assert "direct reply" in entry["reason"]


def test_send_with_the_receipt_only_for_clear_fields() -> None:
    app, ctx = make_app(), ctx_for()
    receipt = run(app, ctx, "train", {SEND_KEY: ["n", "metric/count"]}, keep_as="v")
    assert receipt["sent/n"] == 3 and receipt["sent/metric/count"] == 7
    with pytest.raises(ReleaseRefused, match="'delta' as secure"):
        run(app, ctx, "train", {SEND_KEY: ["n", "delta"]}, keep_as="w")
    assert len(refusals(ctx)) == 1


def test_fetch_releases_clear_fields_and_refuses_the_rest() -> None:
    app, ctx = make_app(), ctx_for()
    run(app, ctx, "train", {}, keep_as="v")
    assert run(app, ctx, FETCH_TASK, {"handle": "v", "fields": ["n"]}) == {"n": 3}
    for field, kind in [("delta", "secure"), ("secret", "never"), ("enc", "sealed")]:
        with pytest.raises(ReleaseRefused, match=f"'{field}' as {kind}"):
            run(app, ctx, FETCH_TASK, {"handle": "v", "fields": ["n", field]})
    with pytest.raises(ReleaseRefused, match="no privacy charge"):
        run(app, ctx, FETCH_TASK, {"handle": "v", "fields": ["metric/loss"]})
    assert len(refusals(ctx)) == 4


def test_secure_protocol_input_through_the_checked_accessor() -> None:
    app, ctx = make_app(), ctx_for()
    run(app, ctx, "train", {}, keep_as="v")
    made_by = request_digest("train", encode({}))  # what the secure sum's parameters state
    got = read_held(ctx, "v", ["delta", "n"], use="secure", request=made_by)
    np.testing.assert_array_equal(got["delta"], np.full(4, 2.0))
    with pytest.raises(ReleaseRefused, match="into a secure sum"):
        read_held(ctx, "v", ["enc"], use="secure", request=made_by)
    with pytest.raises(ReleaseRefused, match="in the clear"):
        read_held(ctx, "v", ["delta"], use="clear")
    with pytest.raises(TaskError, match="no field"):
        read_held(ctx, "v", ["nope"], use="secure", request=made_by)
    with pytest.raises(TaskError, match="no longer holds"):
        read_held(ctx, "gone", ["delta"], use="secure")


def test_sealed_fields_are_forwarded_only_to_their_roles() -> None:
    app, ctx = make_app(), ctx_for()
    run(app, ctx, "train", {}, keep_as="v")
    out = run(app, ctx, FORWARD_TASK, {"handle": "v", "fields": ["enc"], "role": "host"})
    assert out == {"enc": b"ciphertext".hex()}
    with pytest.raises(ReleaseRefused, match="to 'guest'"):
        run(app, ctx, FORWARD_TASK, {"handle": "v", "fields": ["enc"], "role": "guest"})
    with pytest.raises(ReleaseRefused, match="'delta' as secure"):
        run(app, ctx, FORWARD_TASK, {"handle": "v", "fields": ["delta"], "role": "host"})
    forwards = [e.detail for e in ctx.node_state.entries if e.action == "release.forward"]
    assert forwards == [{"task_id": "t0", "handle": "v", "fields": ["enc"], "role": "host"}]


def noised_app(*, applied: bool = False) -> NodeApp:
    app = NodeApp()

    @app.task("evaluate", release={"acc": "noised", "loss": "noised", "n": "clear"})
    def evaluate(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"acc": 0.75, "loss": np.array([0.5, 0.25]), "n": 10}

    def charge(task: str, ctx: TaskContext, payload: Any) -> None:
        if task == "evaluate":  # what a budget guard does once it has charged the ledger
            ctx.node_state.charge(task_id=ctx.task_id, charge={"std": 0.5}, task=task)
            ctx.bind_noise(clip=1.0, std=0.5, applied=applied)

    app.add_guard(charge)
    return app


def test_noised_fields_leave_once_with_at_least_the_charged_noise() -> None:
    app, ctx = noised_app(), ctx_for()
    run(app, ctx, "evaluate", {}, keep_as="v")
    fields = ["acc", "loss", "n"]
    with pytest.raises(ReleaseRefused, match="with the clip and noise"):
        run(app, ctx, FETCH_TASK, {"handle": "v", "fields": fields})
    for clip, std in [(1.0, 0.1), (2.0, 0.5)]:
        with pytest.raises(ReleaseRefused, match="less noise than it charged"):
            run(
                app,
                ctx,
                FETCH_TASK,
                {"handle": "v", "fields": fields, "noise": {"clip": clip, "std": std}},
            )
    out = run(
        app, ctx, FETCH_TASK, {"handle": "v", "fields": fields, "noise": {"clip": 1.0, "std": 0.5}}
    )
    assert out["n"] == 10 and isinstance(out["acc"], float) and out["loss"].shape == (2,)
    assert (out["acc"], *out["loss"]) != (0.75, 0.5, 0.25)  # noise was added at the node
    with pytest.raises(ReleaseRefused, match="second noisy sample"):
        run(
            app,
            ctx,
            FETCH_TASK,
            {"handle": "v", "fields": fields, "noise": {"clip": 1.0, "std": 5.0}},
        )
    actions = [e.action for e in ctx.node_state.entries]
    assert actions == [
        "privacy.charge",
        "refused",
        "refused",
        "refused",
        "release.noised",
        "refused",
    ]


def test_noise_the_task_added_itself_leaves_as_it_is() -> None:
    app, ctx = noised_app(applied=True), ctx_for()
    assert run(app, ctx, "evaluate", {})["acc"] == 0.75  # a direct reply: DP-SGD-style noise


def test_a_replayed_charged_request_is_refused() -> None:
    app, state = noised_app(), {}
    run(app, ctx_for(state=state, task_id="r1"), "evaluate", {}, keep_as="v")
    with pytest.raises(ReleaseRefused, match="charged to this node's privacy ledger already"):
        run(app, ctx_for(state=state, task_id="r1"), "evaluate", {}, keep_as="w")
    assert len(ctx_for(state=state).node_state.charges()) == 1
    assert "w" not in state[KEPT_STATE_KEY]


# -- through an engine -------------------------------------------------------------------------


def test_local_engine_reports_refusals_as_rejected_with_the_reason() -> None:
    engine = LocalEngine(make_app(), nodes=3)
    fed = Federation(engine)
    out = fed.all().map("train")
    assert out["n"].sum() == 9  # the clear part of the run still works
    delta = out["delta"]
    with pytest.raises(Exception, match="secure"):
        delta.mean()
    failures = delta.failures
    assert {f.kind for f in failures.values()} == {FailureKind.REJECTED}
    assert all("'delta' as secure" in f.detail for f in failures.values())
    for node in engine.node_ids():
        (entry,) = refusals(TaskContext(node_id=node, state=engine.node_state(node), task_id=""))
        assert entry["task"] == FETCH_TASK


def test_a_secure_sum_reads_secure_fields_and_refuses_never_fields() -> None:
    from shoal.aggregate import Clip
    from shoal.crypto import SecureSum, secure_sum_tasks

    app = make_app()
    app.install(secure_sum_tasks())
    engine = LocalEngine(app, nodes=4)
    out = Federation(engine).all().map("train")
    total = out["delta"].aggregate(Clip(10.0) | SecureSum())
    np.testing.assert_allclose(total, np.full(4, 8.0), atol=1e-3)
    with pytest.raises(Exception, match="masked inputs"):
        out["secret"].aggregate(Clip(100.0) | SecureSum())
    for node in engine.node_ids():
        (entry,) = refusals(TaskContext(node_id=node, state=engine.node_state(node), task_id=""))
        assert entry["task"] == MASKED_INPUT_TASK and "'secret' as never" in entry["reason"]
