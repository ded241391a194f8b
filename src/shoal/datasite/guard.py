"""Bounds on the datasite's HTTP connections that are not in the middle of a request.

uvicorn closes a connection idle between requests after its keep-alive timeout, but not one
that has sent part of a request's headers (or nothing at all) since it connected: such a
connection stayed open for as long as its peer liked (2,000 of them from one address, each
one line of a request, were all still open after 30 s), one file descriptor each, until the
server could accept no one (slowloris). Here, each connection of the datasite:

- with TLS (``tls``), must finish its TLS handshake within ``header_timeout_s`` of
  connecting: the handshake runs here (``loop.start_tls``), on a connection already counted
  below, not in asyncio's server, which would hand the connection over only once it is done
  (a TLS slowloris, 600 partial ClientHellos, had locked the owner out for 60 s, asyncio's
  handshake timeout, at 512 descriptors);
- must complete a request, its headers and its body, within ``header_timeout_s`` of
  connecting (its TLS handshake included), or of its first byte after a response;
  otherwise it is closed (a request counts as in progress only once all of it is in: a
  body sent slowly, by a token holder from many addresses, had held connections that were
  never closed and filled the bound in all);
- counts against ``per_address`` open connections from its address and ``total`` in all;
  past either, the oldest connection that has no request in progress (of that address, or
  of the address with the most open connections) is closed for the newcomer. A client with
  a request in progress is never closed for another; the newcomer itself goes if every
  other one is busy.

The bound in all is also kept below the process's limit on open files (``RLIMIT_NOFILE``,
read at each connection: an operator may lower it while the server runs), less a reserve
for everything else the server opens. Before, ``total`` (1,024) was above a 512-descriptor
limit: a slowloris from 10 addresses, 60 connections each (below ``per_address``), hit no
bound, the server could accept no one, and the owner waited out the header timeout.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import weakref
from typing import Any

from shoal.datasite._deps import uvicorn

uvicorn()  # a clear error naming the extra when it is missing
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

__all__ = [
    "BACKLOG",
    "HEADER_TIMEOUT_S",
    "PER_ADDRESS",
    "TOTAL",
    "GuardedH11Protocol",
    "bound_in_all",
    "guarded",
]

HEADER_TIMEOUT_S = 10.0
PER_ADDRESS = 64
TOTAL = 1024
# The server's listen backlog. asyncio accepts up to this many connections in one pass
# before any of them is counted here, so they must fit in the reserve below: with uvicorn's
# 2,048, a burst of 600 accepted at once ran the server out of descriptors at a 512 limit
# (asyncio then stops accepting for a second at a time), and the owner waited ~10 s.
BACKLOG = 128
# Descriptors kept for everything but client connections (the database, the listener, a
# request's files and sandbox pipes, and a backlog's burst): a quarter of the limit, at
# least this many.
RESERVED_FDS = BACKLOG + 64

log = logging.getLogger("shoal.datasite")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and connection bounds."""

    header_timeout_s = HEADER_TIMEOUT_S
    per_address = PER_ADDRESS
    total = TOTAL
    tls: ssl.SSLContext | None = None  # set on a subclass (:func:`guarded`) to serve TLS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._open = _open_of(self.server_state)
        self._host = ""
        self._started = False  # uvicorn's protocol has the connection (after any TLS)
        self._early = bytearray()  # what came with the end of the handshake, before that

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls is None:
            self._start(transport)
            return
        # Counted and bounded from its first byte, then TLS on it here.
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self._host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._admit()
        if not transport.is_closing():
            self.loop.create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        assert self.tls is not None
        try:
            tls = await self.loop.start_tls(
                transport,
                self,
                self.tls,
                server_side=True,
                ssl_handshake_timeout=self.header_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError):
            tls = None
        if tls is None or tls.is_closing() or self not in self._open.all:
            self._disarm()
            self._open.discard(self)
            transport.close()
            return
        self._start(tls)

    def _start(self, transport: asyncio.Transport) -> None:
        """Hand the connection to uvicorn's protocol."""
        super().connection_made(transport)
        self._started = True
        if not self._host:
            self._host = str(self.client[0]) if self.client else ""
        if self.tls is None:
            self._admit()
        elif self._early:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)

    def _admit(self) -> None:
        """Count this connection; close the oldest idle one past a bound."""
        self._arm()
        self._open.add(self)
        mine = self._open.by_host[self._host]
        if len(mine) > self.per_address:
            self._make_room(mine)
        if self in self._open.all and len(self._open.all) > bound_in_all(self.total):
            # From the address with the most open connections, not the oldest of all: an
            # attacker on many addresses that opens connections faster than the owner's
            # handshake would otherwise close the owner's (the newest, but idle until its
            # request's headers are in) every time.
            hosts = sorted(self._open.by_host.values(), key=len, reverse=True)
            for among in hosts:
                if self._make_room(among):
                    break

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._open.discard(self)
        if self._started:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._started:
            # asyncio passes on what came with the handshake's last flight before start_tls
            # returns: kept until uvicorn's protocol has the TLS transport.
            self._early += data
            return
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
        """A request is in, all of it, and its response is not complete."""
        cycle = self.cycle
        return (
            self._started
            and cycle is not None
            and not cycle.more_body
            and not cycle.response_complete
        )

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
    def _make_room(among: dict[GuardedH11Protocol, None]) -> bool:
        """Close the oldest connection of ``among`` (oldest first) with no request in
        progress; False if every one is busy."""
        for other in among:
            if not other._busy():
                other._close()
                return True
        return False


def guarded(tls: ssl.SSLContext | None) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (``http=``); with ``tls``, it serves TLS itself
    (give uvicorn no certificate then)."""
    if tls is None:
        return GuardedH11Protocol
    return type("GuardedTlsH11Protocol", (GuardedH11Protocol,), {"tls": tls})


def bound_in_all(total: int) -> int:
    """``total``, or fewer if the process may not open that many files and keep a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return total
    return max(1, min(total, soft - max(RESERVED_FDS, soft // 4)))


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
