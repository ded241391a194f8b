"""The server's end of a node's TLS connection: the front door's relay and the bulk lane.

TLS ends at the front door, not in gRPC, so the relay sees each connection's HTTP/2 frames
in the clear and can meter them (h2meter.py) and bound what an unauthenticated peer sends:
while TLS ended in gRPC, a holder of a federation certificate could send a rapid reset the
relay could not read, and gRPC queued its calls ahead of a node's. It also names the peer's
certificate, so a connection cut for flooding is recorded against it.

What arrives is counted before it is decrypted (``raw_bytes``, ``records``) and shown to
``check`` after every read from the socket, which may end the connection: a peer's empty or
one-byte TLS records, key updates and the like cost the server a record's work each while
they decrypt to nothing or next to nothing, so a budget of decrypted bytes alone let a
connection send them without end. :func:`preauth_check` is the bound both the door
(transport.py) and the bulk lane (lane.py) put on a connection until a node authenticates
on it; before, the lane ran Python's own ``SSLSocket``, which counts nothing, and took
30,000 key updates in 4 s on one connection.

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

__all__ = ["BULK_READ_BYTES", "Overspent", "RecordCounter", "TlsEnd", "naming", "preauth_check"]

_READ_BYTES = 1 << 16
# Raw reads for a connection that carries bulk bytes in (the lane's up direction once
# authenticated): every byte is copied into OpenSSL's memory buffer and out again, and
# fewer, larger reads cut the coordinator's CPU per 40 MB round trip from +41% over an
# SSLSocket's to +23% (benchmarks/lane_tls.py, load 5-8).
BULK_READ_BYTES = 1 << 18
_RECORD_HEADER = 5  # content type, version (2 bytes), length (2 bytes)
# Plaintext encrypted per write into the memory buffer, then sent: a lane sends payloads of
# many MiB in one call, which would otherwise sit encrypted in memory whole before a byte left.
_WRITE_BYTES = 1 << 18


class Overspent(ConnectionError):
    """``check`` said the connection must end; its reason is the message."""


def preauth_check(
    *, budget: int, records: int, authenticated: Callable[[], bool]
) -> Callable[[int, int], str | None]:
    """A ``check`` for :class:`TlsEnd`: until ``authenticated()``, at most ``budget`` bytes
    on the wire and ``records`` TLS records (limits.PREAUTH_BYTES, PREAUTH_RECORDS)."""

    def check(raw_bytes: int, received: int) -> str | None:
        if authenticated():
            return None
        if received > records:  # first: where both are past, tiny records name the flood
            return f"cut: sent more than {records} TLS records before a node authenticated on it"
        if raw_bytes > budget:
            return (
                f"cut: sent more than {budget} bytes before a node authenticated on it "
                "(counted on the wire, TLS records)"
            )
        return None

    return check


def naming(reason: str, identity: str) -> str:
    """A refusal, with the peer's certificate (:meth:`TlsEnd.identity`) when it showed one."""
    return f"{reason} (certificate {identity})" if identity else reason


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

    def copy(self) -> RecordCounter:
        twin = RecordCounter()
        twin.records, twin._skip, twin._head = self.records, self._skip, bytearray(self._head)
        return twin

    def step(self, view: memoryview) -> int:
        """Feed ``view`` up to the end of the record under way (all of it, if that record
        goes on past it); the bytes fed."""
        at, end = 0, len(view)
        if not self._skip:
            at = min(_RECORD_HEADER - len(self._head), end)
            self._head += view[:at]
            if len(self._head) < _RECORD_HEADER:
                return at
            self.records += 1
            self._skip = int.from_bytes(self._head[3:5], "big")
            self._head.clear()
        taken = min(self._skip, end - at)
        self._skip -= taken
        return at + taken


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
        self.read_bytes = _READ_BYTES  # per raw read; BULK_READ_BYTES for bulk bytes
        self._scratch = bytearray()  # raw reads land here (one reader thread), made at need
        self._held = b""  # records past ``check``'s bound, counted, not given to OpenSSL
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

        What arrives is counted record by record, and OpenSSL is given only the records
        ``check`` lets through; the rest is held back. If the handshake then wants more, the
        connection ends (:class:`Overspent`): before, a read's worth of records went into
        OpenSSL before ``check`` saw them (512 one-byte records of a ClientHello got a
        ServerHello made, its key exchange and signature, before the cut). If it completes,
        what was held back (sent right behind the peer's Finished) goes in, undecrypted, and
        is charged to the certificate the handshake showed: the caller asks
        :meth:`check_now` once it has the peer's identity."""
        held = self._admit(head)
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if held:
                    self.check_now()  # past the bound, and the handshake wants more
                self._flush()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("TLS handshake timed out") from None
                self.raw.settimeout(remaining)
                data = self.raw.recv(_READ_BYTES)
                if not data:
                    raise ConnectionResetError("closed during the TLS handshake") from None
                held = self._admit(data)
            except ssl.SSLError:
                self._flush()  # the alert: the peer learns why
                raise
        if held:
            with self._lock:
                self._in.write(held)
        self._flush()

    def _admit(self, data: bytes) -> bytes:
        """Count ``data`` and give OpenSSL its records up to the first one ``check`` objects
        to; the rest (from that record's first byte here) is returned, counted, not given."""
        view = memoryview(data)
        at, end = 0, len(view)
        while at < end:
            taken = self._records.step(view[at:])
            self.raw_bytes += taken
            if self.check is not None and self.check(self.raw_bytes, self.records) is not None:
                self.raw_bytes += end - at - taken
                self._records.feed(view[at + taken :])
                break
            at += taken
        with self._lock:
            self._in.write(view[:at])
        return bytes(view[at:])

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
        :class:`Overspent` when ``check`` ends the connection: a read that crosses its bound
        gives OpenSSL the records before the one that crossed it (what the peer sent within
        the bound is decrypted and read, so a flood its frames show is named by them, not by
        the bound, however much one read took), and the connection ends when OpenSSL wants
        more."""
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
            if self._held:
                self.check_now()  # still past the bound: everything within it was read
                held, self._held = self._held, b""  # a node authenticated meanwhile
                with self._lock:
                    self._in.write(held)
                continue
            if len(self._scratch) != self.read_bytes:
                self._scratch = bytearray(self.read_bytes)
            got = self.raw.recv_into(self._scratch)
            if not got:
                return 0
            data = memoryview(self._scratch)[:got]
            counted, raw_bytes = self._records.copy(), self.raw_bytes
            self._count(data, check=False)
            if self.check is not None and self.check(self.raw_bytes, self.records) is not None:
                # Counted again record by record, to find the first past the bound.
                self._records, self.raw_bytes = counted, raw_bytes
                self._held = self._admit(bytes(data))
                continue
            with self._lock:
                self._in.write(data)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._sending:
            while True:
                with self._lock:
                    piece = view[:_WRITE_BYTES]
                    while piece:
                        piece = piece[self._tls.write(piece) :]
                    records = self._out.read()
                self.raw.sendall(records)
                view = view[_WRITE_BYTES:]
                if not view:
                    return

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.raw.setsockopt(level, option, value)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()

    def check_now(self) -> None:
        """Raise :class:`Overspent` if ``check`` ends the connection for what came so far."""
        if self.check is not None:
            reason = self.check(self.raw_bytes, self.records)
            if reason is not None:
                raise Overspent(reason)

    def _count(self, data: bytes | memoryview, *, check: bool = True) -> None:
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
