"""Counting a connection's HTTP/2 frames on the front door's relay, to cut floods.

gRPC's own HTTP/2 server answers every SETTINGS and PING, and starts a call for every
HEADERS frame, however fast they come: one connection could send hundreds of thousands a
second (many calls, rapid reset, CVE-2023-44487; a SETTINGS and PING flood) without ever
opening a second connection for the front door's limiter to count. The relay sees every
byte a peer sends (TLS ends at the front door, tlsend.py), so it reads each frame's 9-byte
header (never its payload, never HPACK) and cuts a connection that sends more of a kind in
one second than any node does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FrameLimits", "FrameMeter"]

_PREFACE_BYTES = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER_BYTES = 9
_HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 1, 2, 3, 4, 6, 9


@dataclass(frozen=True, kw_only=True)
class FrameLimits:
    """Frames one connection may send in one second. A node opens one call per session
    (a HEADERS frame, perhaps a CONTINUATION) and sends a SETTINGS, its acknowledgements
    and a keepalive or flow-control PING now and then: these are far above that."""

    calls: int = 32  # HEADERS and CONTINUATION
    resets: int = 32  # RST_STREAM
    control: int = 128  # SETTINGS, PING, PRIORITY


class FrameMeter:
    """Feed it what a peer sends, in order, from the connection's first byte (HTTP/2's
    preface); :meth:`feed` returns why the connection must be cut, or None."""

    def __init__(
        self, limits: FrameLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or FrameLimits()
        self._clock = clock
        self._skip = _PREFACE_BYTES  # bytes of the current frame's payload still to pass
        self._head = bytearray()  # a frame header split between two reads
        self._window = clock()
        self._calls = self._resets = self._control = 0
        self.frames = 0  # every frame seen, for tests

    def feed(self, data: bytes | memoryview) -> str | None:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window = now
            self._calls = self._resets = self._control = 0
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            if self._skip:
                step = min(self._skip, end - at)
                self._skip -= step
                at += step
                continue
            need = _HEADER_BYTES - len(self._head)
            if self._head or end - at < _HEADER_BYTES:
                self._head += view[at : at + need]
                at += min(need, end - at)
                if len(self._head) < _HEADER_BYTES:
                    break
                header = bytes(self._head)
                self._head.clear()
            else:
                header = bytes(view[at : at + _HEADER_BYTES])
                at += _HEADER_BYTES
            self._skip = int.from_bytes(header[:3], "big")
            self._count(header[3])
        return self._verdict()

    def _count(self, kind: int) -> None:
        self.frames += 1
        if kind in (_HEADERS, _CONTINUATION):
            self._calls += 1
        elif kind == _RST_STREAM:
            self._resets += 1
        elif kind in (_SETTINGS, _PING, _PRIORITY):
            self._control += 1

    def _verdict(self) -> str | None:
        limits = self.limits
        if self._calls > limits.calls:
            return f"cut: more than {limits.calls} HTTP/2 HEADERS frames (calls) in one second"
        if self._resets > limits.resets:
            return (
                f"cut: more than {limits.resets} HTTP/2 RST_STREAM frames in one second "
                "(rapid reset)"
            )
        if self._control > limits.control:
            return (
                f"cut: more than {limits.control} HTTP/2 SETTINGS, PING or PRIORITY frames in "
                "one second"
            )
        return None
