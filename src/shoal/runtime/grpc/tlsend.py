"""The server's end of a node's TLS connection, held by the front door's relay.

TLS ends at the front door, not in gRPC, so the relay sees each connection's HTTP/2 frames
in the clear and can meter them (h2meter.py) and bound what an unauthenticated peer sends:
while TLS ended in gRPC, a holder of a federation certificate could send a rapid reset the
relay could not read, and gRPC queued its calls ahead of a node's. It also names the peer's
certificate, so a connection cut for flooding is recorded against it.

What arrives is counted before it is decrypted (``raw_bytes``, ``records``) and shown to
``check`` after every read from the socket, which may end the connection: a peer's empty or
one-byte TLS records, key updates and the like cost the server a record's work each while
they decrypt to nothing or next to nothing, so a budget of decrypted bytes alone let a
connection send them without end (transport.py bounds both before authentication).

One thread reads the connection while another writes it (the relay's two directions). An
``ssl.SSLSocket`` must not be used so: both threads would run OpenSSL on one connection at
once. Here the TLS state is an ``ssl.SSLObject`` over memory buffers, driven under a lock,
and only the raw socket blocks, outside it.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Overspent", "RecordCounter", "TlsEnd"]

_READ_BYTES = 1 << 16
_RECORD_HEADER = 5  # content type, version (2 bytes), length (2 bytes)


class Overspent(ConnectionError):
    """``check`` said the connection must end; its reason is the message."""


class RecordCounter:
    """Counts the TLS records in a byte stream fed in pieces of any size, from each record's
    5-byte header (its length; the payload is skipped, never read)."""

    def __init__(self) -> None:
        self.records = 0
        self._skip = 0  # bytes of the current record still to pass
        self._head = bytearray()  # a record header split between two pieces

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            if self._skip:
                step = min(self._skip, end - at)
                self._skip -= step
                at += step
                continue
            take = min(_RECORD_HEADER - len(self._head), end - at)
            self._head += view[at : at + take]
            at += take
            if len(self._head) == _RECORD_HEADER:
                self.records += 1
                self._skip = int.from_bytes(self._head[3:5], "big")
                self._head.clear()


class TlsEnd:
    """TLS over ``raw`` (as the server, or with ``server_side=False`` as a client of
    ``server_hostname``): :meth:`handshake` first, then :meth:`recv_into` on one thread and
    :meth:`sendall` on another."""

    def __init__(
        self,
        raw: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
        check: Callable[[int, int], str | None] | None = None,
    ) -> None:
        self.raw = raw
        # (raw bytes, records) received so far -> why to end the connection, or None.
        self.check = check
        self.raw_bytes = 0
        self._records = RecordCounter()
        self.family = raw.family
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._lock = threading.Lock()  # the TLS state
        self._sending = threading.Lock()  # records go out in the order they were made

    def handshake(self, head: bytes, deadline: float) -> None:
        """Complete the handshake, ``head`` being what the peer already sent (a server's
        peer speaks first). Raises
        ``ssl.SSLError`` (the alert is sent first), TimeoutError or ConnectionError
        (:class:`Overspent` if ``check`` ended it while the handshake wanted more).

        What arrives is counted, and shown to ``check`` only while the handshake still
        wants more: a read may also hold what the peer sent right behind its Finished, and a
        budget that ends there must be charged to the certificate the handshake then shows
        (the caller asks :meth:`check_now` once it has the peer's identity)."""
        self._count(head, check=False)
        self._in.write(head)
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.check_now()
                self._flush()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("TLS handshake timed out") from None
                self.raw.settimeout(remaining)
                data = self.raw.recv(_READ_BYTES)
                if not data:
                    raise ConnectionResetError("closed during the TLS handshake") from None
                self._count(data, check=False)
                self._in.write(data)
            except ssl.SSLError:
                self._flush()  # the alert: the peer learns why
                raise
        self._flush()

    def identity(self) -> str:
        """The peer's certificate: its subject's common name and a digest of it."""
        with self._lock:
            der = self._tls.getpeercert(binary_form=True) or b""
            cert: dict[str, Any] = dict(self._tls.getpeercert() or {})
        names = [
            pair[1] for rdn in cert.get("subject", ()) for pair in rdn if pair[0] == "commonName"
        ]
        digest = hashlib.sha256(der).hexdigest()[:16]
        return f"CN={names[0] if names else '?'} sha256:{digest}"

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        """Decrypted bytes into ``buffer``; 0 once the peer has closed. Raises
        :class:`Overspent` when ``check`` ends the connection (before what it read is
        decrypted)."""
        view = memoryview(buffer)
        while True:
            with self._lock:
                try:
                    n = int(self._tls.read(len(view), view))  # an int when given a buffer
                except ssl.SSLWantReadError:
                    n = -1
                except ssl.SSLZeroReturnError:
                    return 0
                pending = self._out.pending
            if pending:  # what reading made (a session ticket, a key update's answer)
                self._flush()
            if n >= 0:
                return n
            data = self.raw.recv(_READ_BYTES)
            if not data:
                return 0
            self._count(data)
            with self._lock:
                self._in.write(data)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            with self._lock:
                view = memoryview(data)
                while view:
                    view = view[self._tls.write(view) :]
                records = self._out.read()
            self.raw.sendall(records)

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.raw.setsockopt(level, option, value)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def check_now(self) -> None:
        """Raise :class:`Overspent` if ``check`` ends the connection for what came so far."""
        if self.check is not None:
            reason = self.check(self.raw_bytes, self.records)
            if reason is not None:
                raise Overspent(reason)

    def _count(self, data: bytes, *, check: bool = True) -> None:
        """Count ``data``'s bytes and the records that start in it, then ask ``check``."""
        self.raw_bytes += len(data)
        self._records.feed(data)
        if check:
            self.check_now()

    @property
    def records(self) -> int:
        """TLS records received so far (their headers; the handshake's included)."""
        return self._records.records

    def _flush(self) -> None:
        with self._sending:
            with self._lock:
                records = self._out.read()
            if records:
                self.raw.sendall(records)
