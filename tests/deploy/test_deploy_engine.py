"""GrpcEngine and NodeClient in one process over loopback: the Engine contract, failure
kinds, deadlines, chunking, TLS, authentication and protocol abuse."""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest

from shoal.errors import ConfigError, PrivacyBudgetExceeded
from shoal.privacy.guard import DPRequest, budget_guard
from shoal.runtime import DECLINED_DETAIL, FailureKind, LocalEngine, NodeApp, Task
from shoal.runtime.grpc import ClientTLS, NodeExit, ServerTLS, public_key_bytes, write_key_pair
from shoal.runtime.grpc.protocol import MAX_FRAME_BYTES, TO_COORDINATOR_CHUNK, chunk_frame
from shoal.wire import decode, encode

release = threading.Event()


def make_app() -> NodeApp:
    app = NodeApp()

    @app.task("echo")
    def echo(ctx, payload):
        return {"x": payload["x"] * 2, "who": ctx.node_id, "draw": float(ctx.rng.random())}

    @app.task("boom")
    def boom(ctx, payload):
        raise RuntimeError("task exploded")

    @app.task("sleep")
    def sleep(ctx, payload):
        time.sleep(float(payload["s"]))
        return {"slept": payload["s"]}

    @app.task("block")
    def block(ctx, payload):
        release.wait(30)
        return {}

    def guard(name, ctx, args):
        if name == "echo" and args.get("private"):
            raise PrivacyBudgetExceeded("budget spent")

    app.add_guard(guard)
    return app


def connect(federation, engine, names, **options):
    clients = [
        federation.client(n, make_app(), engine.port, partition_index=i, **options)
        for i, n in enumerate(names)
    ]
    assert engine.wait_for_nodes(len(names), timeout_s=30) == len(names)
    return clients


def tasks(node_ids, name, payload, prefix="t"):
    return [Task(node_id=n, name=name, payload=payload, task_id=f"{prefix}/{n}") for n in node_ids]


def test_dispatch_matches_local_engine(federation) -> None:
    engine = federation.engine(seed=7)
    names = ["n0", "n1", "n2"]
    connect(federation, engine, names)
    assert list(engine.node_ids()) == names
    payload = encode({"x": np.arange(5.0)})
    local = LocalEngine(make_app(), nodes=names, seed=7)
    got = engine.dispatch(tasks(reversed(names), "echo", payload), deadline_s=30)
    want = local.dispatch(tasks(reversed(names), "echo", payload), deadline_s=30)
    assert list(got.replies) == ["n2", "n1", "n0"]  # task order, not arrival order
    assert not got.failures
    for node in names:
        mine, theirs = decode(got.replies[node].payload), decode(want.replies[node].payload)
        assert mine["who"] == node
        np.testing.assert_array_equal(mine["x"], np.arange(5.0) * 2)
        assert mine["draw"] == theirs["draw"]  # same per-task randomness as the simulation


def test_failure_kinds(federation) -> None:
    engine = federation.engine()
    connect(federation, engine, ["n0", "n1"])
    ok = encode({"x": np.ones(2)})
    result = engine.dispatch(
        [
            Task(node_id="n0", name="boom", payload=ok, task_id="a"),
            Task(node_id="n1", name="missing", payload=ok, task_id="b"),
        ],
        deadline_s=30,
    )
    assert result.failures["n0"].kind == FailureKind.ERROR
    assert "task exploded" in result.failures["n0"].detail
    assert result.failures["n1"].kind == FailureKind.REJECTED
    declined = engine.dispatch(
        tasks(["n0"], "echo", encode({"x": np.ones(1), "private": True})), deadline_s=30
    )
    assert declined.failures["n0"].kind == FailureKind.DECLINED
    # the coordinator learns only that the node declined, not why in the owner's terms
    assert declined.failures["n0"].detail == DECLINED_DETAIL
    assert "budget spent" not in declined.failures["n0"].detail
    garbage = engine.dispatch(tasks(["n1"], "echo", b"not a wire payload"), deadline_s=30)
    assert garbage.failures["n1"].kind == FailureKind.REJECTED
    offline = engine.dispatch(tasks(["n3"], "echo", ok), deadline_s=30)  # registered, not here
    assert offline.failures["n3"].kind == FailureKind.DROPPED
    with pytest.raises(ConfigError, match="registry"):
        engine.dispatch(tasks(["stranger"], "echo", ok), deadline_s=30)
    with pytest.raises(ConfigError, match="two tasks"):
        engine.dispatch(tasks(["n0", "n0"], "echo", ok), deadline_s=30)
    with pytest.raises(ConfigError, match="positive"):
        engine.dispatch(tasks(["n0"], "echo", ok), deadline_s=0)


def test_deadline_then_the_node_keeps_serving(federation) -> None:
    engine = federation.engine()
    connect(federation, engine, ["n0", "n1"])
    slow = engine.dispatch(
        [
            Task(node_id="n0", name="sleep", payload=encode({"s": 1.5}), task_id="slow"),
            Task(node_id="n1", name="sleep", payload=encode({"s": 0.0}), task_id="fast"),
        ],
        deadline_s=0.5,
    )
    assert slow.failures["n0"].kind == FailureKind.TIMEOUT
    assert "n1" in slow.replies
    # The late reply is drained and ignored; the next task gets its own answer.
    later = engine.dispatch(tasks(["n0"], "echo", encode({"x": np.ones(3)})), deadline_s=30)
    assert decode(later.replies["n0"].payload)["x"].tolist() == [2.0, 2.0, 2.0]


def test_disconnect_mid_task_is_dropped(federation) -> None:
    engine = federation.engine()
    clients = connect(federation, engine, ["n0", "n1"])
    release.clear()
    timer = threading.Timer(0.5, clients[0].stop)
    timer.start()
    try:
        result = engine.dispatch(
            tasks(["n0"], "block", encode({})) + tasks(["n1"], "echo", encode({"x": np.ones(1)})),
            deadline_s=60,
        )
    finally:
        release.set()
        timer.cancel()
    # DROPPED, not TIMEOUT: reported when the stream broke, not when the deadline passed
    assert result.failures["n0"].kind == FailureKind.DROPPED
    assert "n1" in result.replies
    assert engine.wait_for_nodes(2, timeout_s=0.2) == 1


def test_large_payload_is_chunked(federation) -> None:
    engine = federation.engine(chunk_bytes=1 << 20)
    connect(federation, engine, ["n0"])
    x = np.random.default_rng(0).standard_normal(3_000_000)  # 24 MB: far over one gRPC message
    result = engine.dispatch(tasks(["n0"], "echo", encode({"x": x})), deadline_s=60)
    np.testing.assert_array_equal(decode(result.replies["n0"].payload)["x"], x * 2)


def test_mutual_tls(federation) -> None:
    engine = federation.engine(tls=ServerTLS.from_dir(federation.certs))
    tls = ClientTLS.from_dir(federation.certs, name="n0")
    connect(federation, engine, ["n0"], tls=tls)
    result = engine.dispatch(tasks(["n0"], "echo", encode({"x": np.ones(2)})), deadline_s=30)
    assert "n0" in result.replies
    # Without a client certificate the TLS handshake fails: the node never gets in.
    no_cert = federation.client(
        "n1", make_app(), engine.port, tls=ClientTLS.from_dir(federation.certs), max_idle_s=1.0
    )
    deadline = time.monotonic() + 30
    while no_cert.sessions == 0 and time.monotonic() < deadline and no_cert.detail == "":
        time.sleep(0.05)
    assert engine.wait_for_nodes(2, timeout_s=0.5) == 1
    assert no_cert.sessions == 0


def test_unregistered_and_revoked_nodes_are_refused(federation) -> None:
    engine = federation.engine(registry_refresh_s=0.2)
    _, _, stranger = write_key_pair(federation.root / "stranger.key")
    client = federation.client("n0", make_app(), engine.port, key=stranger, start=False)
    assert client.run() == NodeExit.REJECTED
    assert "not registered" in client.detail
    connect(federation, engine, ["n1"])
    federation.store.revoke_node("n1")
    deadline = time.monotonic() + 30
    while engine.node_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.node_ids() == ()
    actions = [r.action for r in federation.store.audit_log()]
    assert "node.rejected" in actions and "node.connected" in actions


def test_node_reconnects_to_a_restarted_coordinator(federation) -> None:
    first = federation.engine()
    port = first.port
    client = connect(federation, first, ["n0"])[0]
    client.state["memory"] = "kept"  # node state outlives its sessions
    first.close()
    second = federation.engine(listen=f"127.0.0.1:{port}")
    assert second.wait_for_nodes(1, timeout_s=30) == 1
    result = second.dispatch(tasks(["n0"], "echo", encode({"x": np.ones(1)})), deadline_s=30)
    assert "n0" in result.replies
    assert client.sessions == 2 and client.state["memory"] == "kept"


def test_finish_ends_the_nodes(federation) -> None:
    engine = federation.engine()
    client = federation.client("n0", make_app(), 0, start=False)
    client.coordinator = f"127.0.0.1:{engine.port}"
    outcome: list[NodeExit] = []
    thread = threading.Thread(target=lambda: outcome.append(client.run()))
    thread.start()
    assert engine.wait_for_nodes(1, timeout_s=30) == 1
    engine.finish()
    thread.join(30)
    assert outcome == [NodeExit.FINISHED]


# -- a misbehaving node, by hand -------------------------------------------------------------


def test_replayed_forged_and_stale_hellos_are_refused(federation, raw_session) -> None:
    engine = federation.engine()
    target = f"127.0.0.1:{engine.port}"
    key = federation.keys["n0"]
    first = raw_session(target)
    recorded = first.hello(key)
    first.send(recorded)
    assert first.recv().WhichOneof("kind") == "welcome"
    # The same signed hello on a new connection: the challenge differs.
    replay = raw_session(target)
    replay.send(recorded)
    code, details = replay.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "another session" in details
    # n1's public key, signed with some other key: impersonation.
    _, _, other = write_key_pair(federation.root / "other.key")
    forged = raw_session(target)
    forged.send(forged.hello(federation.keys["n1"], signer=forged.signer(other)))
    code, details = forged.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bad signature" in details
    # A correctly signed hello with a timestamp ten minutes old.
    stale = raw_session(target)
    signer = stale.signer(federation.keys["n2"])
    message = signer.message()
    message.timestamp_ms -= 600_000
    message.hello.protocol = 1
    message.hello.public_key = public_key_bytes(federation.keys["n2"])
    stale.send(signer.frame(message))
    code, details = stale.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "timestamp" in details
    # Within a session, a repeated message (same nonce) is a replay too.
    signer = first.signer(key)
    beat = signer.message()
    beat.heartbeat.tasks_done = 0
    frame = signer.frame(beat)
    first.send(frame)
    first.send(frame)
    code, details = first.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "already used" in details
    assert engine.rejections >= 3


def test_malformed_and_oversized_frames(federation, raw_session) -> None:
    engine = federation.engine()
    target = f"127.0.0.1:{engine.port}"
    junk = raw_session(target)
    junk.send(os.urandom(200))
    assert junk.refused()[0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
    # Before a node authenticates, the front door cuts a connection past its byte budget
    # (transport.PREAUTH_BYTES): 8 MiB never reach gRPC.
    big = raw_session(target)
    big.send(b"\x0a" + b"x" * (8 << 20))
    assert big.refused()[0] == grpc.StatusCode.UNAVAILABLE
    silent = raw_session(target)  # never says hello; the coordinator is not blocked by it
    connect(federation, engine, ["n0"])
    result = engine.dispatch(tasks(["n0"], "echo", encode({"x": np.ones(1)})), deadline_s=30)
    assert "n0" in result.replies
    silent.close()
    engine._trail.flush(force=True)
    reasons = [r.detail.get("reason", "") for r in federation.store.audit_log(limit=100)]
    assert any("bytes before a node authenticated" in r for r in reasons), reasons


def test_an_authenticated_node_past_the_frame_limit_is_refused(federation, raw_session) -> None:
    """Past authentication, gRPC's own message limit applies (MAX_FRAME_BYTES)."""
    engine = federation.engine()
    session, _ = _welcomed(federation, raw_session, engine)
    session.send(b"\x0a" + b"x" * (MAX_FRAME_BYTES + 1))
    assert session.refused()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def _answer(session, signer, data: bytes, *, sent: bytes | None = None, key=None):
    """Run one dispatch to n0 on ``session``; reply ``data`` (tagged), sending ``sent``."""
    results: list = []
    engine_dispatch = session.engine.dispatch
    thread = threading.Thread(
        target=lambda: results.append(
            engine_dispatch(tasks(["n0"], "echo", encode({"x": np.ones(4)})), deadline_s=30)
        )
    )
    thread.start()
    header = session.recv().task
    assert header.inline == bytes(encode({"x": np.ones(4)}))  # small: inside its header
    # The reply comes back as chunk frames after its header (no lane, not inline).
    message = signer.message()
    message.reply.task_id = header.task_id
    message.reply.size = len(data)
    message.reply.tag = (key or signer.reply_key).tag(message.nonce, data)
    session.send(signer.frame(message))
    session.send(chunk_frame(TO_COORDINATOR_CHUNK, data if sent is None else sent))
    thread.join(30)
    return results[0]


def _welcomed(federation, raw_session, engine):
    session = raw_session(f"127.0.0.1:{engine.port}")
    session.engine = engine
    key = federation.keys["n0"]
    session.send(session.hello(key))
    assert session.recv().WhichOneof("kind") == "welcome"
    return session, session.signer(key)


def test_tampered_reply_is_invalid(federation, raw_session) -> None:
    engine = federation.engine()
    session, signer = _welcomed(federation, raw_session, engine)
    honest = bytes(encode({"x": np.full(4, 2.0)}))
    # The same hand-made reply, untouched, is accepted: the tag is what tells them apart.
    result = _answer(session, signer, honest)
    assert bytes(result.replies["n0"].payload) == honest
    tampered = bytearray(honest)
    tampered[-1] ^= 0xFF
    result = _answer(session, signer, honest, sent=bytes(tampered))
    failure = result.failures["n0"]
    assert failure.kind == FailureKind.INVALID and "tag" in failure.detail
    assert session.refused()[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "node.tampered_reply" in [r.action for r in federation.store.audit_log()]


def test_reply_tagged_under_another_key_is_invalid(federation, raw_session) -> None:
    # Whoever did not take part in the signed hello's key agreement (a proxy that sees every
    # byte, or the node's own key share from another session) cannot tag a reply.
    engine = federation.engine()
    session, signer = _welcomed(federation, raw_session, engine)
    other = raw_session(f"127.0.0.1:{engine.port}").signer(federation.keys["n0"])
    honest = bytes(encode({"x": np.full(4, 2.0)}))
    result = _answer(session, signer, honest, key=other.reply_key)
    assert result.failures["n0"].kind == FailureKind.INVALID
    assert session.refused()[0] == grpc.StatusCode.UNAUTHENTICATED


def test_hello_with_a_bad_key_share_is_refused(federation, raw_session) -> None:
    engine = federation.engine()
    session = raw_session(f"127.0.0.1:{engine.port}")
    session.send(session.hello(federation.keys["n0"], key_share=bytes(32)))
    code, details = session.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "key share" in details


def test_owner_budget_is_enforced_at_a_deployed_node(federation) -> None:
    engine = federation.engine()
    app = make_app()
    app.add_guard(budget_guard(max_epsilon=10.0, max_delta=1e-5, tasks={"echo"}))
    federation.client("n0", app, engine.port, partition_index=0)
    assert engine.wait_for_nodes(1, timeout_s=30) == 1
    request = DPRequest(clip=1.0, noise_multiplier=1.0, sample_rate=0.1, steps=50).to_json()
    outcomes = []
    for i in range(6):  # each request spends more of the owner's epsilon, until it is gone
        result = engine.dispatch(
            tasks(["n0"], "echo", encode({"x": np.ones(1), "dp": request}), prefix=f"r{i}"),
            deadline_s=30,
        )
        outcomes.append("ok" if "n0" in result.replies else result.failures["n0"].kind.value)
    # epsilon after 1, 2, 3, 4 requests: 5.9, 7.9, 9.6, 11.1 (RDP) against a limit of 10
    assert outcomes == ["ok", "ok", "ok", "declined", "declined", "declined"]
    undeclared = engine.dispatch(tasks(["n0"], "echo", encode({"x": np.ones(1)})), deadline_s=30)
    assert undeclared.failures["n0"].kind == FailureKind.DECLINED  # no DP stated: refused
