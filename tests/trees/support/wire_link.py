"""A SecureBoost host reached through the wire codec, for the vertical tree tests.

Every payload and reply crosses :func:`shoal.wire.encode`/``decode`` as it would between
processes, and each request is kept with its reply so a test can read what the guest received.
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
        self.asked: list[dict[str, Any]] = []  # the payload behind each reply in ``sent``

    def __call__(self, method: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        request = decode(encode(dict(payload)))
        reply = decode(encode(dict(self.host.handle(method, request))))
        self.asked.append(request)
        self.sent.append((method, reply))
        return reply
