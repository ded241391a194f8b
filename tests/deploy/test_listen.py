"""The one listener, accept loop and handler start that the front door and the bulk lane
share."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from shoal.errors import TransportError
from shoal.runtime.grpc.lane import SWEEP_S, LaneServer, incoming, listen, spawn
from shoal.runtime.grpc.transport import FrontDoor


def test_a_port_in_use_is_a_clear_error_naming_the_address_and_what_to_do() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        with pytest.raises(TransportError) as caught:
            listen("127.0.0.1", port, backlog=8, hint="choose another with --port")
    finally:
        taken.close()
    message = str(caught.value)
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert message.endswith("choose another with --port")


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 here")
def test_the_any_v6_address_also_accepts_ipv4_peers() -> None:
    server = listen("::", 0, backlog=8, hint="")
    try:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            peer, _ = server.accept()
            peer.close()
    finally:
        server.close()


class CountingLimiter:
    """Stands in for PendingLimiter: counts the sweeps."""

    def __init__(self) -> None:
        self.sweeps = 0

    def expire(self) -> None:
        self.sweeps += 1


def test_the_accept_loop_yields_connections_sweeps_while_idle_and_ends_on_closing() -> None:
    server = listen("127.0.0.1", 0, backlog=8, hint="")
    limiter = CountingLimiter()
    closing = threading.Event()
    got: list[Any] = []
    loop = threading.Thread(
        target=lambda: got.extend(incoming(server, closing=closing, limiter=limiter))  # type: ignore[arg-type]
    )
    loop.start()
    try:
        with socket.create_connection(server.getsockname(), timeout=5):
            time.sleep(6 * SWEEP_S)  # nobody else connects: accept() must still wake to sweep
    finally:
        closing.set()
        loop.join(timeout=5)
        server.close()
    assert not loop.is_alive()
    assert len(got) == 1
    got[0][0].close()
    assert limiter.sweeps >= 3


def test_the_accept_loop_ends_when_its_listener_is_closed_under_it() -> None:
    server = listen("127.0.0.1", 0, backlog=8, hint="")
    closing = threading.Event()
    done = threading.Event()

    def run() -> None:
        list(incoming(server, closing=closing, limiter=CountingLimiter()))  # type: ignore[arg-type]
        done.set()

    threading.Thread(target=run, daemon=True).start()
    closing.set()
    server.close()
    assert done.wait(5)


def test_spawn_says_false_when_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = threading.Event()
    assert spawn(ran.set, name="shoal-test")
    assert ran.wait(5)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert spawn(ran.set, name="shoal-test") is False


def test_closing_right_after_starting_kills_no_accept_thread() -> None:
    # The front door set its listener's timeout in its accept thread: a close() right after
    # start() closed the socket first, and the thread died of EBADF (199 of 300 here).
    errors: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        for _ in range(100):
            FrontDoor(
                host="127.0.0.1",
                port=0,
                speaks="plaintext",
                upstream_port=1,
                mismatch=lambda host, line: None,
                refused=lambda host, reason: None,
            ).start().close()
            LaneServer(
                host="127.0.0.1",
                port=0,
                context=None,
                token_for=lambda lane_id: None,
                attach=lambda *a: "",
                serve=lambda *a: None,
                rejected=lambda peer, reason: None,
            ).start().close()
    finally:
        threading.excepthook = hook
    assert errors == []
