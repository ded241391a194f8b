"""A SecureBoost host reached through the wire codec, for the vertical tree tests.

Every payload and reply crosses :func:`shoal.wire.encode`/``decode`` as it would between
processes, and the replies are kept so a test can read what the guest received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.trees.vertical import HostParty
from shoal.wire import decode, encode


class Wire:
    """A host reached through the wire codec, recording everything it sends the guest."""

    def __init__(self, host: HostParty) -> None:
        self.host = host
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, method: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        reply = decode(encode(dict(self.host.handle(method, decode(encode(dict(payload)))))))
        self.sent.append((method, reply))
        return reply
