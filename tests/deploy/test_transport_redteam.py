"""Red team on the transport agreement and the coordinator's front door.

Each case crashed or misled before its fix: a host name IDNA cannot encode escaped as a
UnicodeError, an unknown answer was explained as a TLS/plaintext mismatch (telling the
operator to flip a flag), port 99999 was "connection refused", and a failure to start a
connection thread ended the front door's accept loop, so no node could connect again.
"""

from __future__ import annotations

import socket
import threading

import pytest

from shoal.errors import TransportError
from shoal.runtime.grpc.transport import AGREEMENT, FrontDoor, agree


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("\u00e9\u202e.example:80", "does not resolve"),  # UnicodeError from the IDNA codec
        ("a" * 300 + ":80", "does not resolve"),  # a label longer than IDNA allows
        ("127.0.0.1:99999", "a port in 1..65535"),
        ("127.0.0.1:0", "a port in 1..65535"),
    ],
)
def test_a_bad_coordinator_address_is_a_transport_error(address: str, match: str) -> None:
    with pytest.raises(TransportError, match=match):
        agree(address, "tls", timeout_s=1)


@pytest.mark.parametrize("speaks", ["tls", "plaintext"])
def test_an_unknown_answer_is_not_explained_as_a_mismatch(speaks: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(100)
                conn.sendall(AGREEMENT + b"\xff\xfequic\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(TransportError, match="unknown transport") as caught:
            agree(f"127.0.0.1:{port}", speaks, timeout_s=5)  # type: ignore[arg-type]
        assert "mismatch" not in str(caught.value)
        thread.join(timeout=10)


def test_the_front_door_survives_running_out_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    refused: list[str] = []
    door = FrontDoor(
        host="127.0.0.1",
        port=0,
        speaks="plaintext",
        upstream_port=1,
        mismatch=lambda host, line: refused.append(line),
        refused=lambda host, reason: refused.append(reason),
        timeout_s=2,
    ).start()
    original = threading.Thread.start
    failed = threading.Event()

    def start(self: threading.Thread) -> None:
        if self.name == "shoal-door" and not failed.is_set():
            failed.set()
            raise RuntimeError("can't start new thread")
        original(self)

    try:
        monkeypatch.setattr(threading.Thread, "start", start)
        with socket.create_connection(("127.0.0.1", door.port)) as first:
            assert failed.wait(10)
            first.settimeout(10)
            assert first.recv(10) == b""  # dropped, not left hanging
        monkeypatch.undo()
        agree(f"127.0.0.1:{door.port}", "plaintext", timeout_s=5)  # the door still answers
        assert any("no thread free" in r for r in refused), refused
    finally:
        monkeypatch.undo()
        door.close()


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + SETTINGS


def test_an_idle_plaintext_http2_connection_is_closed(federation) -> None:  # type: ignore[no-untyped-def]
    """Red team: a peer that sent HTTP/2's preface to an --insecure coordinator and then
    nothing kept its connection, and two relay threads, forever (TLS peers were reaped by
    the handshake timeout). gRPC now closes a connection with no call after 6 handshake
    timeouts."""
    engine = federation.engine(handshake_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", engine.port)) as peer:
        peer.sendall(PREFACE)
        peer.settimeout(20)
        received = b""
        while chunk := peer.recv(4096):  # the server's SETTINGS, its GOAWAY, then the end
            received += chunk
        assert received  # closed by the server, not by the timeout (that raises)


class _AgreeingThen:
    """A port that answers the transport agreement, then is silent or sends garbage."""

    def __init__(self, behaviour: str) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.behaviour = behaviour
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.held.append(conn)
            conn.settimeout(2)
            try:
                head = conn.recv(64)
            except OSError:
                continue
            if head.startswith(AGREEMENT):
                conn.sendall(AGREEMENT + b"plaintext\n")
            elif self.behaviour == "garbage":
                conn.sendall(b"\x00" * 10 + b"garbage" * 100)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize(
    ("behaviour", "meaning"),
    [("silent", "gRPC handshake did not finish"), ("garbage", "did not speak gRPC")],
)
def test_a_port_that_agrees_then_misbehaves_is_explained(
    federation,  # type: ignore[no-untyped-def]
    behaviour: str,
    meaning: str,
) -> None:
    """Red team: a silent peer after the agreement was reported after gRPC's 20 s as "the
    host is unreachable (a firewall drops the packets)", though the host had just answered;
    garbage was gRPC's raw HTTP/2 parse error."""
    from shoal.runtime import NodeApp
    from shoal.runtime.grpc import Backoff, NodeClient

    fake = _AgreeingThen(behaviour)
    reasons: list[str] = []
    done = threading.Event()

    def on_retry(attempt: int, delay: float, reason: str) -> None:
        reasons.append(reason)
        client.stop()
        done.set()

    client = NodeClient(
        app=NodeApp(),
        coordinator=f"127.0.0.1:{fake.port}",
        key=federation.keys["n0"],
        insecure=True,
        backoff=Backoff(initial_s=0.05, max_s=0.1),
        connect_timeout_s=1.0,
        on_retry=on_retry,
    )
    thread = threading.Thread(target=client.run, daemon=True)
    try:
        thread.start()
        assert done.wait(15), "the node gave no reason"
        assert meaning in reasons[0], reasons
    finally:
        client.stop()
        thread.join(timeout=10)
        fake.close()


@pytest.mark.parametrize("address", ["coordinator", "host:http", ":7000", "host:"])
def test_a_node_with_a_malformed_address_fails_at_once(federation, address: str) -> None:  # type: ignore[no-untyped-def]
    """Red team: a typo in --coordinator was retried forever, one line per attempt (a port
    outside 1..65535 is agree()'s to report, on each attempt)."""
    from shoal.errors import ConfigError
    from shoal.runtime import NodeApp
    from shoal.runtime.grpc import NodeClient

    with pytest.raises(ConfigError, match=r"--coordinator: address .* is not HOST:PORT"):
        NodeClient(app=NodeApp(), coordinator=address, key=federation.keys["n0"], insecure=True)
