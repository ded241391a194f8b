"""A flood from the node's own address (127.0.0.1: a NAT, a shared host, an attacker on the
node's machine) at full speed, from another process, against the gRPC port and the bulk
lane at once, never keeps a registered node from its session and its lane; every refused
connection is on record exactly once, coalesced; and a peer that dribbles a valid handshake
one byte at a time is cut off at the handshake deadline."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.runtime import NodeApp
from shoal.runtime.grpc import Backoff, ClientTLS, NodeClient, ServerTLS
from shoal.runtime.grpc.limits import peer_host

SCRIPT = Path(__file__).with_name("flooder.py")
FLOOD_S = 9.0
sys.path.insert(0, str(Path(__file__).parent))
from attackers import attacker, wait  # noqa: E402
from flooder import client_hello  # noqa: E402

pytestmark = pytest.mark.serial  # floods: run alone (make test's second pass)


@contextlib.contextmanager
def flood(
    port: int, mode: str, seconds: float = FLOOD_S, *, until_exit: bool = False
) -> Iterator[dict[str, object]]:
    """A flooder process on ``port``; yields a dict that holds its counts once it stopped
    (``until_exit``: stopped when the block ends, see attackers.attacker)."""
    args = ["--port", str(port), "--mode", mode]
    with attacker(SCRIPT, args, seconds=seconds, until_exit=until_exit) as result:
        yield result


def audit(federation) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Rejections on record: individual rows and the counts in summaries, by peer address."""
    counts: dict[str, int] = {}
    for row in federation.store.audit_log(limit=1_000_000):
        if row.action in ("node.rejected", "node.lane_rejected", "node.transport_mismatch"):
            peer = peer_host(str(row.detail["peer"]))
            counts[peer] = counts.get(peer, 0) + 1
        elif row.action in ("node.rejected_summary", "node.transport_mismatch_summary"):
            counts[row.detail["peer"]] = counts.get(row.detail["peer"], 0) + row.detail["count"]
    return counts


@pytest.mark.integration
@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_a_full_speed_flood_from_the_nodes_own_address_does_not_keep_it_out(
    federation, secure: bool
) -> None:
    server = {"tls": ServerTLS.from_dir(federation.certs)} if secure else {}
    client = {"tls": ClientTLS.from_dir(federation.certs, name="n0")} if secure else {}
    # The default bounds (16 per address, 64 in all). Until the limiter fix these bounds were
    # not applied at all (an empty limiter is falsy: 16 / 256 ran instead), and with 4 / 8
    # actually enforced, a TLS node sharing the flood's address loses most random evictions.
    engine = federation.engine(
        data_listen="127.0.0.1:0", max_pending_per_peer=16, max_pending=64, **server
    )
    door, lanes = engine._door, engine._lanes.server
    assert door is not None and lanes is not None
    with (
        flood(engine.port, "mixed", until_exit=True) as door_flood,
        flood(engine.data_port, "mixed", until_exit=True) as lane_flood,
    ):
        # Both floods are on, and already crowding the bounds, before the node comes.
        assert wait(lambda: door.accepted > 200 and lanes.accepted > 200, 8), (
            door.accepted,
            lanes.accepted,
        )
        started = time.monotonic()
        node = federation.client("n0", NodeApp(), engine.port, **client)
        assert wait(lambda: node.lane_open and list(engine.node_ids()) == ["n0"], 12), node.detail
        took = time.monotonic() - started
        during = (door.accepted, lanes.accepted)
        assert wait(lambda: door.accepted > during[0] + 100, 5)  # the flood went on meanwhile
        assert door_flood["proc"].poll() is None and lane_flood["proc"].poll() is None  # type: ignore[attr-defined]
    print(f"node in after {took:.2f} s; flood: door {door_flood}, lane {lane_flood}")
    assert list(engine.node_ids()) == ["n0"] and node.lane_open  # and it kept both
    # Every flood connection the coordinator accepted is refused and on record, once: the
    # door's and the lane's own counts of what they did not serve equal the rejections.
    opened = int(door_flood["opened"]) + int(lane_flood["opened"])  # type: ignore[call-overload]
    assert wait(lambda: engine.rejections >= 0.95 * opened, 15), (engine.rejections, opened)
    assert wait(
        lambda: engine.rejections == door.accepted - door.served + lanes.accepted - lanes.served,
        10,
    ), (engine.rejections, door.accepted, door.served, lanes.accepted, lanes.served)
    rejections = engine.rejections
    engine.close()  # writes out the last window's counts
    on_record = audit(federation)
    assert set(on_record) == {"127.0.0.1"}, on_record
    assert on_record["127.0.0.1"] == rejections  # coalesced, none dropped
    summaries = [
        r.detail
        for r in federation.store.audit_log(limit=1_000_000)
        if r.action.endswith("summary")
    ]
    assert any("from 127.0.0.1" in d["summary"] for d in summaries)


@pytest.mark.integration
def test_a_flood_of_unauthenticated_grpc_calls_from_the_nodes_address(federation) -> None:
    """The strongest flood an outsider can make on a plaintext coordinator: complete HTTP/2
    connections, each with a call open that never says hello, as fast as one process can."""
    engine = federation.engine(data_listen=None, max_pending_per_peer=4, max_pending=8)
    door = engine._door
    assert door is not None
    with flood(engine.port, "calls", until_exit=True) as attack:
        assert wait(lambda: engine.rejections > 20, 8), engine.rejections
        started = time.monotonic()
        federation.client("n0", NodeApp(), engine.port)
        assert engine.wait_for_nodes(1, timeout_s=15) == 1
        took = time.monotonic() - started
        assert attack["proc"].poll() is None  # type: ignore[attr-defined]
    print(f"node in after {took:.2f} s; flood {attack}")
    assert int(attack["opened"]) > 20  # type: ignore[call-overload]


# -- slow dribble ----------------------------------------------------------------------------


def dribble(port: int, data: bytes, *, every_s: float, limit_s: float) -> float:
    """Send ``data`` one byte every ``every_s``; the seconds until the coordinator hung up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.monotonic()
    try:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            sock.settimeout(every_s)
            try:
                while True:
                    if sock.recv(4096) == b"":
                        return time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                return time.monotonic() - started
            if time.monotonic() - started > limit_s:
                break
        return float("inf")
    finally:
        sock.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("port_kind", "secure"),
    [("door", False), ("door", True), ("lane", False), ("lane", True)],
    ids=["door-plaintext", "door-tls", "lane-plaintext", "lane-tls"],
)
def test_a_valid_handshake_dribbled_one_byte_at_a_time_hits_the_deadline(
    federation, port_kind: str, secure: bool
) -> None:
    server = {"tls": ServerTLS.from_dir(federation.certs)} if secure else {}
    engine = federation.engine(data_listen="127.0.0.1:0", handshake_timeout_s=1.0, **server)
    if secure:
        data = client_hello()
    elif port_kind == "door":
        data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64
    else:
        data = b"SHL1D" + os.urandom(16 + 32)
    port = engine.port if port_kind == "door" else engine.data_port
    # 0.2 s per byte: every read is answered well within the timeout, so only a deadline on
    # the whole handshake ends it (and the refusal must be on record: before, the door did
    # not record a relayed connection that gRPC's handshake timeout closed).
    hung_up = dribble(port, data, every_s=0.2, limit_s=8.0)
    assert hung_up < 4.0, hung_up  # the 1 s deadline, the sweep and the relay's 3x backstop
    assert wait(lambda: engine.rejections == 1, 5), engine.rejections
    engine.close()
    assert audit(federation) == {"127.0.0.1": 1}  # on record, once


# -- a node a WAN away, behind the flood's address -------------------------------------------


class SlowLink:
    """The node's path to the coordinator across a WAN, through the flood's address: the node
    dials 127.0.0.3 and the link reaches the coordinator from 127.0.0.1, ``delay_s`` later
    each way. A connection reaches the coordinator when its first bytes would (right behind
    its TCP handshake), so the node's handshakes take round trips as over a real network."""

    def __init__(self, ports: list[int], delay_s: float) -> None:
        self.delay_s = delay_s
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []  # every connection, closed by close()
        self._listeners: list[socket.socket] = []
        try:
            for port in ports:
                self._listeners.append(socket.create_server(("127.0.0.3", port)))
        except OSError:
            self.close()
            raise
        for listener, port in zip(self._listeners, ports, strict=True):
            threading.Thread(target=self._accept, args=(listener, port), daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        for sock in self._listeners + self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket, port: int) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self._socks.append(conn)
            threading.Thread(target=self._link, args=(conn, port), daemon=True).start()

    def _link(self, conn: socket.socket, port: int) -> None:
        time.sleep(self.delay_s)  # the SYN on its way
        try:
            up = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.1", 0))
        except OSError:
            return
        self._socks.append(up)
        for src, dst in ((conn, up), (up, conn)):
            threading.Thread(target=self._carry, args=(src, dst), daemon=True).start()

    def _carry(self, src: socket.socket, dst: socket.socket) -> None:
        line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def deliver() -> None:
            while True:
                due, data = line.get()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            line.put((time.monotonic() + self.delay_s, data))
            if not data:
                return


def _engine_behind_a_link(federation: Any, *, delay_s: float) -> tuple[Any, SlowLink]:
    """An engine and a SlowLink listening on 127.0.0.3 at the engine's port numbers. Those
    are free on 127.0.0.1, but on 127.0.0.3 the same number can still be held by an earlier
    flood's source port (EADDRINUSE, once in a suite run): then the engine takes new ports."""
    for attempt in range(5):
        engine = federation.engine(data_listen="127.0.0.1:0", max_pending_per_peer=4, max_pending=8)
        try:
            return engine, SlowLink([engine.port, engine.data_port], delay_s=delay_s)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == 4:
                raise
            federation.engines.remove(engine)
            engine.close()
    raise AssertionError("unreachable")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["silent", "garbage", "lane"])
def test_a_node_a_wan_away_gets_its_lane_through_a_flood_from_its_own_address(
    federation, mode: str
) -> None:
    """With 150 ms each way, the node's handshakes take round trips while the flood, from its
    own address, fills the lane's bounds many times over. What the flood sends (nothing,
    garbage, the lane's magic with a forged lane id) is less than the node's first bytes
    show (a live session's lane id), so however fast it comes it cannot displace the node:
    before, the oldest pending connection went first, and the node's, waiting a round trip
    for the coordinator's greeting, was always the oldest."""
    engine, link = _engine_behind_a_link(federation, delay_s=0.15)
    try:
        with flood(engine.data_port, mode, seconds=10.0, until_exit=True) as attack:
            assert wait(lambda: engine.rejections > 200, 6), engine.rejections
            node = NodeClient(
                app=NodeApp(),
                coordinator=f"127.0.0.3:{engine.port}",
                key=federation.keys["n0"],
                insecure=True,
                backoff=Backoff(initial_s=0.05, max_s=0.3),
            )
            thread = threading.Thread(target=node.run, daemon=True)
            federation.clients.append((node, thread))
            started = time.monotonic()
            thread.start()
            assert wait(lambda: node.lane_open, 10), node.detail
            took = time.monotonic() - started
            assert attack["proc"].poll() is None  # type: ignore[attr-defined]
        print(f"lane open after {took:.2f} s; flood {attack}")
    finally:
        link.close()


@pytest.mark.integration
def test_unauthenticated_connections_hold_bounded_threads(federation) -> None:
    """A peer that sends HTTP/2's preface (or a ClientHello) and stops is relayed to gRPC:
    two threads and two 64 KiB buffers. Those relays stay counted as pending until a node
    authenticates on them, so a flood of them holds at most the limiter's count, not one per
    connection until gRPC's idle timeout (before: thousands of threads within seconds)."""
    engine = federation.engine(data_listen=None, max_pending_per_peer=4, max_pending=8)
    peak = 0
    with flood(engine.port, "h2", seconds=4.0) as attack:
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            names = [t.name for t in threading.enumerate()]
            peak = max(peak, sum(n in ("shoal-door", "shoal-relay") for n in names))
            time.sleep(0.01)
    print(f"peak {peak} door and relay threads; flood {attack}")
    assert int(attack["opened"]) > 500  # type: ignore[call-overload]
    # 8 pending connections, each with its door thread and its relay thread, and the
    # threads of those just dropped, still ending (42 at most in our runs; before, 801:
    # two per connection the flood held open, 400 of them).
    assert peak <= 100, peak
