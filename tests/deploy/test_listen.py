"""The one listener both the front door and the bulk lane open."""

from __future__ import annotations

import socket

import pytest

from shoal.errors import TransportError
from shoal.runtime.grpc.lane import listen


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
