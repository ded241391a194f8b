"""A flood of unauthenticated connections (real sockets on 127.0.0.1, bounded in count and
time) never keeps a registered node from its session or its bulk lane, and every rejection
is recorded: individually up to a burst per address, then as a counted summary."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from shoal.runtime import NodeApp
from shoal.runtime.grpc.limits import RejectionLog, peer_host
from shoal.runtime.grpc.protocol import METHOD

pytestmark = pytest.mark.serial  # floods: run alone (make test's second pass)

FLOOD = 60  # connections held open at once, at most
FLOOD_S = 20.0  # the flood stops by itself after this


class Flood:
    """Keeps up to FLOOD idle TCP connections open to ``port``, reopening those dropped, as
    fast as they are dropped, from ``source`` (another loopback address than the node's:
    limits are per address; floods from the node's own address are
    test_deploy_flood_own_address.py's)."""

    def __init__(self, port: int, source: str = "127.0.0.2") -> None:
        self.port = port
        self.source = source
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        socks: list[socket.socket] = []
        deadline = time.monotonic() + FLOOD_S
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                alive = []
                for s in socks:
                    if _alive(s):
                        alive.append(s)
                    else:
                        s.close()
                socks = alive
                while len(socks) < FLOOD and self.opened < 20 * FLOOD:
                    try:
                        socks.append(
                            socket.create_connection(
                                ("127.0.0.1", self.port), 2, source_address=(self.source, 0)
                            )
                        )
                        self.opened += 1
                    except OSError:
                        break
                self._stop.wait(0.02)
        finally:
            for s in socks:
                s.close()


def _alive(sock: socket.socket) -> bool:
    try:
        sock.setblocking(False)
        data = sock.recv(4096)  # the server's greeting, or b"" once it closed us
        return data != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def idle_streams(port: int, count: int) -> Iterator[list[grpc.Future]]:
    """``count`` gRPC streams that read the challenge and never say hello."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    calls = []
    hold = threading.Event()

    def never() -> Iterator[bytes]:
        hold.wait(FLOOD_S)
        return
        yield b""  # pragma: no cover

    try:
        for _ in range(count):
            calls.append(channel.stream_stream(METHOD)(never(), timeout=FLOOD_S))
        yield calls
    finally:
        hold.set()
        for call in calls:
            call.cancel()
        channel.close()


def lane_events(federation, action: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [r.detail for r in federation.store.audit_log(limit=10_000) if r.action == action]


@pytest.mark.integration
def test_a_lane_flood_does_not_keep_a_node_off_its_lane(federation) -> None:
    engine = federation.engine(data_listen="127.0.0.1:0", max_pending_per_peer=4, max_pending=8)
    assert engine.data_port
    with Flood(engine.data_port) as flood:
        deadline = time.monotonic() + 10
        while flood.opened < FLOOD and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flood.opened >= FLOOD  # the flood is on before the node comes
        client = federation.client("n0", NodeApp(), engine.port)
        deadline = time.monotonic() + 30
        while not client.lane_open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.lane_open, client.detail
        assert engine.wait_for_nodes(1, timeout_s=10) == 1
    engine.close()  # flushes the last window of counted rejections
    single = lane_events(federation, "node.lane_rejected")
    summaries = [
        d for d in lane_events(federation, "node.rejected_summary") if d["peer"] == "127.0.0.2"
    ]
    assert 1 <= len(single) <= 10  # the burst, one by one
    assert summaries and sum(d["count"] for d in summaries) + len(single) >= FLOOD - 8
    assert "rejected connections from 127.0.0.2" in summaries[0]["summary"]


@pytest.mark.integration
def test_a_flood_of_silent_grpc_streams_does_not_keep_a_node_out(federation) -> None:
    engine = federation.engine(data_listen=None, max_pending_per_peer=4, max_pending=8)
    with idle_streams(engine.port, FLOOD):
        time.sleep(0.5)
        federation.client("n0", NodeApp(), engine.port)
        assert engine.wait_for_nodes(1, timeout_s=30) == 1
    engine.close()
    rejected = lane_events(federation, "node.rejected") + lane_events(
        federation, "node.rejected_summary"
    )
    assert rejected  # the dropped streams are on record


def test_rejections_are_coalesced_never_dropped() -> None:
    now = [0.0]
    written: list[dict] = []
    log = RejectionLog(written.append, burst=3, window_s=60, clock=lambda: now[0])
    for i in range(2000):
        log.record("10.0.0.9", "bad hello", {"peer": f"10.0.0.9:{i}"})
    assert len(written) == 3
    now[0] = 61.0
    log.flush()
    assert written[-1]["count"] == 1997 and written[-1]["peer"] == "10.0.0.9"
    assert "1997 more rejected connections from 10.0.0.9" in written[-1]["summary"]
    log.record("10.0.0.9", "bad hello", {"peer": "x"})  # a new window: written again
    assert len(written) == 5 and log.total == 2001


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("10.1.2.3:80", "10.1.2.3")],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_a_peer_with_many_addresses_gets_one_summary_line() -> None:
    """Red team: each new address used to get its own burst of lines and its own summary,
    so one peer with an IPv6 prefix could print (and record) without bound."""
    now = [0.0]
    written: list[dict] = []
    log = RejectionLog(written.append, burst=2, window_s=60, hosts=4, clock=lambda: now[0])
    for i in range(5000):
        log.record(f"2001:db8::{i:x}", f"not a shoal node: {i}", {"peer": i})
    assert len(written) == 4  # the first 4 addresses, once each
    now[0] = 61.0
    log.flush()
    assert len(written) == 5
    assert written[-1]["count"] == 4996
    assert "4996 rejected connections from 4996 other addresses" in written[-1]["summary"]
    assert log.total == 5000
