"""The node-side tasks driven as a runtime would: payload dicts in, payload dicts out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from shoal.crypto.secagg import (
    ADVERTISE_TASK,
    MASKED_INPUT_TASK,
    SHARE_TASK,
    UNMASK_TASK,
    AdvertiseReply,
    MaskedInputReply,
    SecAggParams,
    SecAggServer,
    ShareKeysReply,
    UnmaskReply,
    input_context,
    parse_replies,
    quantizer_for,
    secagg_tasks,
)
from shoal.errors import ProtocolError, ReleaseRefused, TaskError
from shoal.runtime.request import request_digest


@dataclass
class Ctx:
    node_id: str
    vector: np.ndarray
    state: dict[str, Any] = field(default_factory=dict)


def run_round(
    params: SecAggParams, ctxs: dict[str, Ctx], extra: dict[str, Any], drop: set[str]
) -> tuple[SecAggServer, np.ndarray]:
    tasks = secagg_tasks(get_input=lambda ctx, payload, group: ctx.vector)
    server = SecAggServer(params=params)
    req = server.advertise_request().to_dict()
    out = {v: tasks[ADVERTISE_TASK](c, dict(req)) for v, c in ctxs.items()}
    replies, failed = parse_replies(AdvertiseReply, out)
    assert not failed
    requests = server.collect_keys(replies)
    out = {v: tasks[SHARE_TASK](ctxs[v], r.to_dict()) for v, r in requests.items()}
    requests2 = server.collect_shares(parse_replies(ShareKeysReply, out)[0])
    out = {
        v: tasks[MASKED_INPUT_TASK](ctxs[v], {**r.to_dict(), **extra})
        for v, r in requests2.items()
        if v not in drop
    }
    requests3 = server.collect_masked(parse_replies(MaskedInputReply, out)[0])
    out = {v: tasks[UNMASK_TASK](ctxs[v], r.to_dict()) for v, r in requests3.items()}
    return server, server.finish(parse_replies(UnmaskReply, out)[0])


def test_round_through_tasks_with_quantization() -> None:
    ids = [f"n{i}" for i in range(7)]
    params = SecAggParams.create(
        ids, vector_length=50, max_dropouts=2, context=input_context({"clip": 1.0})
    )
    rng = np.random.default_rng(0)
    ctxs = {v: Ctx(node_id=v, vector=rng.uniform(-1, 1, 50)) for v in ids}
    server, total = run_round(params, ctxs, {"clip": 1.0}, drop={"n3"})
    q = quantizer_for(1.0, nodes=len(ids), bits=params.bits)
    estimate = q.dequantize_sum(total, count=len(server.survivors))
    exact = sum(ctxs[v].vector for v in server.survivors)
    assert "n3" not in server.survivors
    assert np.max(np.abs(estimate - exact)) <= len(server.survivors) * q.step


def test_a_request_other_than_the_rounds_context_is_refused() -> None:
    ids = [f"n{i}" for i in range(4)]
    params = SecAggParams.create(ids, vector_length=3, context=input_context({"clip": 1.0}))
    ctxs = {v: Ctx(node_id=v, vector=np.full(3, 0.5)) for v in ids}
    # a node told to quantize on another range than the round's refuses
    with pytest.raises(ReleaseRefused, match="differently from the round's parameters"):
        run_round(params, ctxs, {"clip": 1e9}, drop=set())


def test_nodes_given_different_parameters_cannot_complete_a_round() -> None:
    # One round id, but n0 is told another context (so it could be told to prepare its
    # input otherwise) than the others: its pair keys differ, so no share to or from it
    # opens, and its masks could never cancel with theirs.
    ids = [f"n{i}" for i in range(4)]
    honest = SecAggParams.create(ids, vector_length=3, context=input_context({"clip": 1.0}))
    other = SecAggParams.from_dict({**honest.to_dict(), "context": "{}"})
    assert other.round_id == honest.round_id and other.digest != honest.digest
    tasks = secagg_tasks(get_input=lambda ctx, payload, group: ctx.vector)
    server = SecAggServer(params=honest)
    ctxs = {v: Ctx(node_id=v, vector=np.full(3, 1, dtype=np.uint32)) for v in ids}
    out = {}
    for v, c in ctxs.items():
        told = other if v == "n0" else honest
        out[v] = tasks[ADVERTISE_TASK](c, SecAggServer(params=told).advertise_request().to_dict())
    requests = server.collect_keys(parse_replies(AdvertiseReply, out)[0])
    out = {v: tasks[SHARE_TASK](ctxs[v], r.to_dict()) for v, r in requests.items()}
    masked = server.collect_shares(parse_replies(ShareKeysReply, out)[0])
    refused = []
    for v, r in masked.items():
        extra = {} if v == "n0" else {"clip": 1.0}
        try:
            tasks[MASKED_INPUT_TASK](ctxs[v], {**r.to_dict(), **extra})
        except ProtocolError:
            refused.append(v)
    assert sorted(refused) == ids


def test_sessions_are_per_round_and_keys_are_not_reissued() -> None:
    ids = ["a", "b", "c", "d"]
    tasks = secagg_tasks(get_input=lambda ctx, payload, group: ctx.vector)
    ctx = Ctx(node_id="a", vector=np.zeros(3, dtype=np.uint32))
    p1 = SecAggParams.create(ids, vector_length=3, max_dropouts=1)
    request = SecAggServer(params=p1).advertise_request().to_dict()
    tasks[ADVERTISE_TASK](ctx, dict(request))
    with pytest.raises(ProtocolError, match="already advertised"):
        tasks[ADVERTISE_TASK](ctx, dict(request))
    for _ in range(6):
        p = SecAggParams.create(ids, vector_length=3, max_dropouts=1)
        tasks[ADVERTISE_TASK](ctx, SecAggServer(params=p).advertise_request().to_dict())
    assert len(ctx.state["shoal.secagg"]) == 4  # the oldest sessions were forgotten
    with pytest.raises(ProtocolError, match="no SecAgg session"):
        tasks[UNMASK_TASK](
            ctx,
            {"secagg": "unmask_request", "round_id": p1.round_id, "survivors": [], "dropped": []},
        )


def test_parse_replies_turns_garbage_into_failures() -> None:
    parsed, failed = parse_replies(AdvertiseReply, {"x": {"secagg": "nope"}})
    assert parsed == {} and "x" in failed


def test_default_input_is_a_value_the_node_kept() -> None:
    app = pytest.importorskip("shoal.runtime.app")
    from shoal.crypto.secagg.tasks import kept_input

    vector = np.arange(5, dtype=np.uint32)
    node = app.NodeApp()
    node.register("make", lambda ctx, p: {"delta": vector, "note": 1}, release={"delta": "secure"})
    ctx = app.TaskContext(node_id="a", data=None, state={}, task_id="t")
    node.handle(ctx, "make", b"", keep_as="h1", decoded={})
    made = request_digest("make", b"")
    assert kept_input(ctx, {"handle": "h1", "field": "delta", "request": made}, 4) is vector
    with pytest.raises(ReleaseRefused, match="'note' as never"):  # no entry: never
        kept_input(ctx, {"handle": "h1", "field": "note", "request": made}, 4)
    with pytest.raises(TaskError, match="no field"):
        kept_input(ctx, {"handle": "h1", "field": "nope", "request": made}, 4)
    # A sum that states no digest, or another request's, does not get the value.
    for other in (None, request_digest("make", b"\x00"), request_digest("other", b"")):
        with pytest.raises(ReleaseRefused, match="request digest mismatch"):
            kept_input(ctx, {"handle": "h1", "field": "delta", "request": other}, 4)
    with pytest.raises(TaskError, match="handle"):
        kept_input(ctx, {}, 4)
