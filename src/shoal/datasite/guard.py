"""Bounds on the datasite's HTTP connections that are not in the middle of a request.

uvicorn closes a connection idle between requests after its keep-alive timeout, but not one
that has sent part of a request's headers (or nothing at all) since it connected: such a
connection stayed open for as long as its peer liked (2,000 of them from one address, each
one line of a request, were all still open after 30 s), one file descriptor each, until the
server could accept no one (slowloris). Here, each connection of the datasite:

- must complete a request's headers within ``header_timeout_s`` of connecting, or of its
  first byte after a response; otherwise it is closed;
- counts against ``per_address`` open connections from its address and ``total`` in all;
  past either, the oldest connection that has no request in progress (of that address, or
  of all) is closed for the newcomer. A client with a request in progress is never
  closed for another; the newcomer itself goes if every other one is busy.

Not covered: a connection still in its TLS handshake. The protocol sees a connection only
once its handshake is done, so until then only asyncio's handshake timeout (60 s) bounds it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from shoal.datasite._deps import uvicorn

uvicorn()  # a clear error naming the extra when it is missing
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

__all__ = ["HEADER_TIMEOUT_S", "PER_ADDRESS", "TOTAL", "GuardedH11Protocol"]

HEADER_TIMEOUT_S = 10.0
PER_ADDRESS = 64
TOTAL = 1024

log = logging.getLogger("shoal.datasite")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and connection bounds."""

    header_timeout_s = HEADER_TIMEOUT_S
    per_address = PER_ADDRESS
    total = TOTAL

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._open = _open_of(self.server_state)
        self._host = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._host = str(self.client[0]) if self.client else ""
        self._arm()
        self._open.add(self)
        mine = self._open.by_host[self._host]
        if len(mine) > self.per_address:
            self._make_room(mine)
        if self in self._open.all and len(self._open.all) > self.total:
            self._make_room(self._open.all)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._open.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._busy():
            self._disarm()
        else:
            self._arm()  # bytes of a request whose headers are not complete yet

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._busy():
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies

    # -- helpers ---------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self._busy() and not self.transport.is_closing():
            log.info("closed a connection from %s: no request within %g s", self._host,
                     self.header_timeout_s)  # fmt: skip
            self._close()

    def _close(self) -> None:
        self._open.discard(self)  # at once: it no longer counts against the bounds
        self.transport.close()

    @staticmethod
    def _make_room(among: dict[GuardedH11Protocol, None]) -> None:
        """Close the oldest connection of ``among`` (oldest first) with no request in
        progress."""
        for other in among:
            if not other._busy():
                other._close()
                return


class _Open:
    """A server's open connections, oldest first: all, and by address."""

    def __init__(self) -> None:
        self.all: dict[GuardedH11Protocol, None] = {}
        self.by_host: dict[str, dict[GuardedH11Protocol, None]] = {}

    def add(self, protocol: GuardedH11Protocol) -> None:
        self.all[protocol] = None
        self.by_host.setdefault(protocol._host, {})[protocol] = None

    def discard(self, protocol: GuardedH11Protocol) -> None:
        if self.all.pop(protocol, 0) is None:
            mine = self.by_host[protocol._host]
            del mine[protocol]
            if not mine:
                del self.by_host[protocol._host]


_SERVERS: weakref.WeakKeyDictionary[Any, _Open] = weakref.WeakKeyDictionary()


def _open_of(server_state: Any) -> _Open:
    """The open connections of the server that ``server_state`` belongs to."""
    if server_state not in _SERVERS:
        _SERVERS[server_state] = _Open()
    return _SERVERS[server_state]
