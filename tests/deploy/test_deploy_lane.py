"""The bulk lane beside the gRPC stream: rounds over it (plaintext and TLS), the fallback to
gRPC, and a misbehaving lane peer (no or wrong token, tampered, malformed or oversized frames,
no valid certificate) refused while the coordinator keeps serving."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from shoal.errors import AuthenticationError, TransportError
from shoal.runtime import FailureKind, NodeApp, Task
from shoal.runtime.grpc import ClientTLS, ServerTLS, make_certs
from shoal.runtime.grpc.lane import (
    DOWN,
    LANE_MIN_BYTES,
    UP,
    BufferPool,
    LaneSocket,
    connect_lane,
    parse_address,
)
from shoal.runtime.grpc.protocol import INLINE_MAX_BYTES
from shoal.wire import decode, encode

BIG = np.random.default_rng(1).standard_normal(40_000)  # 320 kB: several chunks on gRPC


def make_app() -> NodeApp:
    app = NodeApp()

    @app.task("echo")
    def echo(ctx, payload):
        return {"x": payload["x"] * 2, "who": ctx.node_id}

    @app.task("slow")
    def slow(ctx, payload):
        time.sleep(float(payload["s"]))
        return {"x": payload["x"]}

    return app


def tasks(node_ids, payload, prefix="t"):
    return [
        Task(node_id=n, name="echo", payload=payload, task_id=f"{prefix}/{n}") for n in node_ids
    ]


def connect_both(port: int, lane_id: bytes, token: bytes, context) -> list:
    """A session's two lane connections (down, up), as a node opens them."""
    return [
        connect_lane(
            host="127.0.0.1",
            port=port,
            lane_id=lane_id,
            token=token,
            direction=direction,
            context=context,
        )
        for direction in (DOWN, UP)
    ]


def wait_for_lanes(engine, count: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        open_lanes = sum(s.lane for s in engine.sessions())
        if open_lanes >= count:
            return open_lanes
        time.sleep(0.02)
    return sum(s.lane for s in engine.sessions())


def reasons(federation, action: str) -> list[str]:
    return [r.detail.get("reason", "") for r in federation.store.audit_log() if r.action == action]


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_round_over_the_lane_matches_the_stream(federation, secure) -> None:
    options = {"tls": ServerTLS.from_dir(federation.certs)} if secure else {}
    engine = federation.engine(**options)
    assert engine.data_port and engine.data_port != engine.port
    for i, name in enumerate(["n0", "n1"]):
        client_tls = {"tls": ClientTLS.from_dir(federation.certs, name=name)} if secure else {}
        # n1 keeps every byte on the stream: both paths in one round, same answers.
        federation.client(
            name, make_app(), engine.port, partition_index=i, lane=i == 0, **client_tls
        )
    assert engine.wait_for_nodes(2, timeout_s=30) == 2
    assert wait_for_lanes(engine, 1) == 1
    assert {s.node_id: s.lane for s in engine.sessions()} == {"n0": True, "n1": False}
    payload = encode({"x": BIG})
    result = engine.dispatch(tasks(["n0", "n1"], payload), deadline_s=30)
    assert not result.failures
    for name in ["n0", "n1"]:
        got = decode(result.replies[name].payload)
        np.testing.assert_array_equal(got["x"], BIG * 2)
        assert got["who"] == name
    sent, received = engine.lane_bytes
    assert sent == len(payload)  # n0's task went over the lane, n1's over gRPC
    assert received == len(result.replies["n0"].payload)
    # Small payloads ride inside their headers (protocol 4), both ways, on either node.
    small = encode({"x": np.ones(3)})
    assert len(small) <= INLINE_MAX_BYTES
    result = engine.dispatch(tasks(["n0", "n1"], small, prefix="s"), deadline_s=30)
    for name in ["n0", "n1"]:
        assert decode(result.replies[name].payload)["x"].tolist() == [2.0, 2.0, 2.0]
    assert engine.lane_bytes == (sent, received)


def test_fallback_to_the_stream(federation, raw_session) -> None:
    # A coordinator without a lane (or an older one): nothing is announced, gRPC carries all.
    no_lane = federation.engine(data_listen=None)
    assert no_lane.data_port == 0
    federation.client("n0", make_app(), no_lane.port)
    # A lane that cannot be reached: the node carries on over gRPC.
    unreachable = federation.engine()
    assert unreachable._lanes.server is not None
    unreachable._lanes.server.close()
    federation.client("n1", make_app(), unreachable.port)
    payload = encode({"x": BIG})
    for engine, name in [(no_lane, "n0"), (unreachable, "n1")]:
        assert engine.wait_for_nodes(1, timeout_s=30) == 1
        result = engine.dispatch(tasks([name], payload), deadline_s=30)
        np.testing.assert_array_equal(decode(result.replies[name].payload)["x"], BIG * 2)
        assert engine.lane_bytes == (0, 0)
        assert not any(s.lane for s in engine.sessions())
    # A node of a pre-release protocol (2 and 3 had no inline payloads, 2 no lane) is refused
    # with the reason; a current node is offered the lane.
    engine = federation.engine()
    for version in (2, 3):
        old = raw_session(f"127.0.0.1:{engine.port}")
        old.send(old.hello(federation.keys["n2"], protocol=version))
        code, details = old.refused()
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"node speaks protocol {version}" in details and "same shoal version" in details
    new = raw_session(f"127.0.0.1:{engine.port}")
    new.send(new.hello(federation.keys["n3"]))
    assert new.recv().welcome.data_port == engine.data_port


def test_deadlines_cancels_and_a_lost_lane(federation) -> None:
    engine = federation.engine()
    client = federation.client("n0", make_app(), engine.port)
    assert engine.wait_for_nodes(1, timeout_s=30) == 1 and wait_for_lanes(engine, 1) == 1
    big = encode({"x": BIG, "s": 1.2})

    def slow(prefix: str, deadline_s: float):
        task = Task(node_id="n0", name="slow", payload=big, task_id=prefix)
        return engine.dispatch([task], deadline_s=deadline_s)

    # A runs late (its reply is drained when it comes); B, queued behind it, is cancelled
    # before it starts, so the node drains B's bytes from the lane without running it.
    assert slow("a", 0.3).failures["n0"].kind == FailureKind.TIMEOUT
    assert slow("b", 0.2).failures["n0"].kind == FailureKind.TIMEOUT
    result = engine.dispatch(tasks(["n0"], encode({"x": BIG})), deadline_s=30)
    np.testing.assert_array_equal(decode(result.replies["n0"].payload)["x"], BIG * 2)
    assert client.tasks_done == 2  # a and the echo: b never ran
    # The lane breaks while idle: the session ends with it, and the node comes back.
    socket.socket.shutdown(engine._table.get("n0").lane.up.sock, socket.SHUT_RDWR)
    deadline = time.monotonic() + 30
    while client.sessions < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.sessions == 2 and wait_for_lanes(engine, 1) == 1
    result = engine.dispatch(tasks(["n0"], encode({"x": BIG}), prefix="again"), deadline_s=30)
    np.testing.assert_array_equal(decode(result.replies["n0"].payload)["x"], BIG * 2)


# -- a hand-driven node and lane ------------------------------------------------------------


@pytest.fixture
def lanes():
    opened: list[LaneSocket] = []
    yield opened
    for lane in opened:
        lane.close()


def open_raw_node(
    federation, raw_session, engine, lanes, *, name="n0", tls=None, context=None, **hello
):
    """A welcomed raw session for ``name`` and its authenticated lane (down, up)."""
    session = raw_session(f"127.0.0.1:{engine.port}", tls=tls)
    key = federation.keys[name]
    session.send(session.hello(key, **hello))
    welcome = session.recv().welcome
    signer = session.signer(key)
    lane_id, token = signer.reply_key.lane()
    opened = connect_both(welcome.data_port, lane_id, token, context)
    lanes.extend(opened)
    deadline = time.monotonic() + 30
    attached = False
    while not attached and time.monotonic() < deadline:
        attached = any(s.lane for s in engine.sessions() if s.node_id == name)
        time.sleep(0.02)
    assert attached, "the coordinator never attached the lane to the session"
    return session, signer, opened[0], opened[1]


def dispatch_in_background(engine, node_ids, payload):
    results: list = []
    thread = threading.Thread(
        target=lambda: results.append(engine.dispatch(tasks(node_ids, payload), deadline_s=30))
    )
    thread.start()
    return thread, results


def receive_task(session, down):
    header = session.recv().task
    assert header.lane and header.size >= LANE_MIN_BYTES
    assert down.read_head() == (header.task_id, header.size)
    return header, down.read_payload(header.size)


def announce_reply(
    session, signer, header, data: bytes, *, size=None, lane=True, inline=False, tag=None
):
    """A signed reply header for ``data``: on the lane by default, or with ``inline`` inside
    the header (``size``, ``lane`` and ``tag`` may lie, to play a hostile node)."""
    message = signer.message()
    message.reply.task_id = header.task_id
    message.reply.size = len(data) if size is None else size
    message.reply.tag = signer.reply_tag(message, data) if tag is None else tag
    message.reply.lane = lane
    if inline:
        message.reply.inline = data
    session.send(signer.frame(message))


def test_tampered_lane_reply_is_invalid(federation, raw_session, lanes) -> None:
    engine = federation.engine()
    session, signer, down, up = open_raw_node(federation, raw_session, engine, lanes)
    honest = bytes(encode({"x": BIG * 2}))
    # Untouched, the hand-made reply is accepted: only the tag tells the two apart.
    thread, results = dispatch_in_background(engine, ["n0"], encode({"x": BIG}))
    header, payload = receive_task(session, down)
    np.testing.assert_array_equal(decode(payload)["x"], BIG)
    announce_reply(session, signer, header, honest)
    up.send(header.task_id, honest)
    thread.join(30)
    assert bytes(results[0].replies["n0"].payload) == honest
    # One flipped bit on the lane.
    thread, results = dispatch_in_background(engine, ["n0"], encode({"x": BIG}))
    header, _ = receive_task(session, down)
    announce_reply(session, signer, header, honest)
    tampered = bytearray(honest)
    tampered[len(tampered) // 2] ^= 0x01
    up.send(header.task_id, tampered)
    thread.join(30)
    failure = results[0].failures["n0"]
    assert failure.kind == FailureKind.INVALID and "tag" in failure.detail
    assert session.refused()[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "node.tampered_reply" in [r.action for r in federation.store.audit_log()]


def test_small_payloads_ride_inline(federation, raw_session, lanes) -> None:
    engine = federation.engine()
    small = encode({"x": np.ones(3)})
    session, signer, _, up = open_raw_node(federation, raw_session, engine, lanes)
    # A small task comes inside its header, never on the lane, and may be answered the same way.
    thread, results = dispatch_in_background(engine, ["n0"], small)
    header = session.recv().task
    assert header.HasField("inline") and not header.lane
    assert header.inline == bytes(small) and header.size == len(small)
    announce_reply(session, signer, header, b"fine", inline=True, lane=False)
    thread.join(30)
    assert bytes(results[0].replies["n0"].payload) == b"fine"
    # A node may still send a small reply on its lane.
    thread, results = dispatch_in_background(engine, ["n0"], small)
    header = session.recv().task
    assert header.HasField("inline")
    announce_reply(session, signer, header, b"ok")
    up.send(header.task_id, b"ok")
    thread.join(30)
    assert bytes(results[0].replies["n0"].payload) == b"ok"
    assert engine.lane_bytes == (0, 2)  # only that reply took the lane


@pytest.mark.parametrize("lie", ["size", "lane", "tag"])
def test_inconsistent_or_tampered_inline_reply_ends_the_session(
    federation, raw_session, lanes, lie
) -> None:
    engine = federation.engine()
    session, signer, _, _ = open_raw_node(federation, raw_session, engine, lanes)
    thread, results = dispatch_in_background(engine, ["n0"], encode({"x": np.ones(3)}))
    header = session.recv().task
    data = b"twelve bytes"
    if lie == "size":
        announce_reply(session, signer, header, data, size=len(data) + 1, inline=True, lane=False)
    elif lie == "lane":
        announce_reply(session, signer, header, data, lane=True, inline=True)
    else:
        announce_reply(session, signer, header, data, tag=bytes(16), inline=True, lane=False)
    thread.join(30)
    failure = results[0].failures["n0"]
    assert failure.kind == FailureKind.INVALID
    code, detail = session.refused()
    if lie == "tag":
        assert code == grpc.StatusCode.UNAUTHENTICATED and "tag" in detail
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "inline" in detail
    # The coordinator serves the other nodes on as before.
    federation.client("n1", make_app(), engine.port)
    deadline = time.monotonic() + 30
    while "n1" not in {s.node_id for s in engine.sessions()} and time.monotonic() < deadline:
        time.sleep(0.02)
    result = engine.dispatch(tasks(["n1"], encode({"x": np.ones(2)})), deadline_s=30)
    assert decode(result.replies["n1"].payload)["x"].tolist() == [2.0, 2.0]


def test_node_refuses_a_task_header_with_inconsistent_inline_bytes() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shoal.errors import ProtocolError
    from shoal.runtime.grpc import NodeClient
    from shoal.runtime.grpc.proto import shoal_pb2 as pb

    client = NodeClient(
        app=make_app(), coordinator="127.0.0.1:1", key=Ed25519PrivateKey.generate(), insecure=True
    )
    good = pb.TaskHeader(task_id="1:t", name="echo", size=3, inline=b"abc")
    assert client._announce(good).refusal == ""
    for bad in (
        pb.TaskHeader(task_id="1:t", name="echo", size=4, inline=b"abc"),
        pb.TaskHeader(task_id="1:t", name="echo", size=3, inline=b"abc", lane=True),
    ):
        with pytest.raises(ProtocolError, match="inline"):
            client._announce(bad)


def _raw_frame(kind: int, task_id: str, size: int) -> bytes:
    name = task_id.encode()
    return struct.pack("!BHQ", kind, len(name), size) + name


@pytest.mark.parametrize(
    "frame",
    ["oversized", "wrong_task", "unknown_kind", "unannounced_size"],
)
def test_malformed_or_oversized_lane_frames_end_only_that_session(
    federation, raw_session, lanes, frame
) -> None:
    engine = federation.engine(max_reply_bytes=1 << 20)
    federation.client("n1", make_app(), engine.port)
    session, signer, down, up = open_raw_node(federation, raw_session, engine, lanes)
    assert engine.wait_for_nodes(2, timeout_s=30) == 2
    thread, results = dispatch_in_background(engine, ["n0"], encode({"x": BIG}))
    header, _ = receive_task(session, down)
    honest = bytes(encode({"x": BIG * 2}))
    if frame == "oversized":
        # The signed header itself announces more than the coordinator takes.
        announce_reply(session, signer, header, honest, size=1 << 40)
        expected = grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        announce_reply(session, signer, header, honest)
        raw = {
            # Far more than announced (were it allocated, the coordinator would die).
            "unannounced_size": _raw_frame(1, header.task_id, 1 << 60),
            "wrong_task": _raw_frame(1, "someone-else", len(honest)),
            "unknown_kind": _raw_frame(9, header.task_id, len(honest)),
        }[frame]
        up.sock.sendall(raw)
        expected = grpc.StatusCode.INVALID_ARGUMENT
    thread.join(30)
    failure = results[0].failures["n0"]
    assert failure.kind in (FailureKind.INVALID, FailureKind.DROPPED)
    assert session.refused()[0] == expected
    # Only that node's session ended: the coordinator and the other node carry on.
    result = engine.dispatch(tasks(["n1"], encode({"x": BIG}), prefix="after"), deadline_s=30)
    np.testing.assert_array_equal(decode(result.replies["n1"].payload)["x"], BIG * 2)


def test_lane_without_the_session_token_is_refused(federation, raw_session, lanes) -> None:
    engine = federation.engine(handshake_timeout_s=0.5)
    federation.client("n1", make_app(), engine.port)
    assert engine.wait_for_nodes(1, timeout_s=30) == 1
    assert wait_for_lanes(engine, 1) == 1
    # A real session's lane id (it is sent in the clear) with a guessed token.
    session = raw_session(f"127.0.0.1:{engine.port}")
    session.send(session.hello(federation.keys["n0"]))
    port = session.recv().welcome.data_port
    lane_id, token = session.signer(federation.keys["n0"]).reply_key.lane()
    with pytest.raises((TransportError, AuthenticationError)):
        connect_lane(
            host="127.0.0.1",
            port=port,
            lane_id=lane_id,
            token=os.urandom(32),
            direction=UP,
            context=None,
        )
    # An id no session has, with its own (self-consistent) token.
    with pytest.raises((TransportError, AuthenticationError)):
        connect_lane(
            host="127.0.0.1",
            port=port,
            lane_id=os.urandom(16),
            token=token,
            direction=UP,
            context=None,
        )
    # A connection that never says anything is dropped after the handshake timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        silent.recv(64)  # the greeting
        assert silent.recv(64) == b""  # then the coordinator hangs up
    # Bytes that are not a lane hello at all.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as junk:
        junk.sendall(b"JUNK" + os.urandom(49))  # exactly a hello's length
        junk.recv(64)
        assert junk.recv(64) == b""
    # An expired connection is shut by the pending limiter's thread, and its handler records
    # the refusal just after: the peer may see the hang-up first, so wait for the record.
    expected = ("wrong lane token", "no live session", "within 0.5 s", "not a shoal bulk lane")
    deadline = time.monotonic() + 10
    while True:
        rejected = reasons(federation, "node.lane_rejected")
        missing = [e for e in expected if not any(e in r for r in rejected)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not missing, rejected
    # The session whose token was guessed at, and the other node, are unharmed.
    assert sorted(engine.node_ids()) == ["n0", "n1"]
    result = engine.dispatch(tasks(["n1"], encode({"x": BIG})), deadline_s=30)
    np.testing.assert_array_equal(decode(result.replies["n1"].payload)["x"], BIG * 2)
    # With the right token the same session gets its lane (both directions).
    lanes.extend(connect_both(port, lane_id, token, None))
    assert wait_for_lanes(engine, 2) == 2


def test_lane_tls_requires_a_federation_certificate(
    federation, raw_session, lanes, tmp_path
) -> None:
    engine = federation.engine(tls=ServerTLS.from_dir(federation.certs), handshake_timeout_s=1.0)
    tls = ClientTLS.from_dir(federation.certs, name="n0")
    session = raw_session(f"127.0.0.1:{engine.port}", tls=tls)
    session.send(session.hello(federation.keys["n0"]))
    port = session.recv().welcome.data_port
    lane_id, token = session.signer(federation.keys["n0"]).reply_key.lane()
    # Even with the session's token: no client certificate, no lane.
    no_cert = ClientTLS.from_dir(federation.certs).ssl_context()
    with pytest.raises(TransportError):
        connect_lane(
            host="127.0.0.1",
            port=port,
            lane_id=lane_id,
            token=token,
            direction=DOWN,
            context=no_cert,
        )
    # A certificate from another CA (that also trusts ours) is refused too.
    other = make_certs(tmp_path / "other", nodes=["n0"])
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(cadata=tls.ca.decode())
    foreign.load_cert_chain(other.nodes["n0"], tmp_path / "other" / "n0-key.pem")
    with pytest.raises(TransportError):
        connect_lane(
            host="127.0.0.1",
            port=port,
            lane_id=lane_id,
            token=token,
            direction=DOWN,
            context=foreign,
        )
    # Plaintext against the TLS lane fails as well.
    with pytest.raises((TransportError, AuthenticationError)):
        connect_lane(
            host="127.0.0.1", port=port, lane_id=lane_id, token=token, direction=UP, context=None
        )
    deadline = time.monotonic() + 10
    while len(reasons(federation, "node.lane_rejected")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("TLS" in r for r in reasons(federation, "node.lane_rejected")) >= 2
    # The federation's own certificate and the token: admitted.
    lanes.extend(connect_both(port, lane_id, token, tls.ssl_context()))
    assert wait_for_lanes(engine, 1) == 1


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:7001") == ("::1", 7001)
    assert parse_address("dns:///coord.example.org:7000") == ("coord.example.org", 7000)
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_address("no-port")


def test_buffer_pool_reuses_only_buffers_nothing_else_holds() -> None:
    pool = BufferPool(max_bytes=3000)
    first = pool.take(1000)
    first[:] = 7
    first.flags.writeable = False
    view = first.data  # a reply's payload view
    decoded = np.frombuffer(view, dtype=np.uint8)[10:20]  # an array decoded from it
    address = first.ctypes.data
    del first, view
    second = pool.take(1000)
    assert second.ctypes.data != address  # still in use: a new buffer, the old one intact
    assert decoded.tolist() == [7] * 10
    del decoded, second
    again = pool.take(1000)
    assert again.ctypes.data == address and again.flags.writeable  # nothing holds it: reused
    others = [pool.take(1000) for _ in range(3)]  # over max_bytes: the last is not kept
    assert all(o.nbytes == 1000 for o in others)
    del again, others
    big = pool.take(2500)  # free buffers of other sizes make room
    assert big.nbytes == 2500 and pool.take(2500).ctypes.data != big.ctypes.data


def test_buffer_pool_hands_out_free_buffers_longest_out_first() -> None:
    pool = BufferPool(max_bytes=10_000)
    held = [pool.take(100) for _ in range(5)]
    addresses = [b.ctypes.data for b in held]
    del held[3], held[1]  # two payloads released, in another order than taken
    again = [pool.take(100), pool.take(100)]
    assert [b.ctypes.data for b in again] == [addresses[1], addresses[3]]
    fresh = pool.take(100)  # the other three are still held: a new buffer
    assert fresh.ctypes.data not in addresses
    other = pool.take(200)  # another size never gets one of these
    assert other.ctypes.data not in addresses and other.nbytes == 200


def test_frames_carry_64_bit_sizes() -> None:
    a, b = socket.socketpair()
    sender, receiver = LaneSocket(a), LaneSocket(b)
    try:
        a.sendall(_raw_frame(1, "7:t/n0", 5 << 30))  # a 5 GiB payload's frame head
        assert receiver.read_head() == ("7:t/n0", 5 << 30)
        sender.send("task", b"abc")
        assert receiver.read_head() == ("task", 3)
        assert bytes(receiver.read_payload(3)) == b"abc"
    finally:
        sender.close()
        receiver.close()
