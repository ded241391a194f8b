"""The bulk lane: TCP (or mutual TLS) connections beside a node's gRPC stream, for payload bytes.

Headers stay on the signed gRPC stream; the bytes a header announces travel here behind a
minimal frame, sent with ``sendall`` straight from the encoded payload and received with
``recv_into`` straight into their final buffer, never through grpcio's Python message layer.
A lane belongs to one authenticated session (see :func:`proof`) and is one connection per
direction, so no TLS connection is ever read and written by two threads at once.

The coordinator's end of a TLS lane is a :class:`~shoal.runtime.grpc.tlsend.TlsEnd`, as at
the front door, with the door's bounds until the node proves its token: bytes on the wire
and TLS records are counted from the record headers before anything is decrypted
(``PREAUTH_BYTES``, ``PREAUTH_RECORDS``), a cut is recorded with the peer's certificate and
counts toward its ban (bans.py, shared with the door), and a banned certificate is refused
right after its handshake. Python's ``SSLSocket``, used here before, counted nothing: a
certificate holder sent 30,000 key updates in 4 s on one connection.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.poly1305 import Poly1305

from shoal.errors import AuthenticationError, ProtocolError, TransportError
from shoal.runtime.engine import Buffer
from shoal.runtime.grpc.auth import LANE_ID_BYTES
from shoal.runtime.grpc.bans import Bans
from shoal.runtime.grpc.limits import (
    PREAUTH_BYTES,
    PREAUTH_RECORDS,
    PREFIX,
    PROBATION_BYTES,
    PROVEN,
    SILENT,
    DropReason,
    PendingLimiter,
    peer_host,
)
from shoal.runtime.grpc.tlsend import BULK_READ_BYTES, Overspent, TlsEnd, naming, preauth_check

__all__ = [
    "DOWN",
    "LANE_MIN_BYTES",
    "MAX_TASK_ID_BYTES",
    "UP",
    "BufferPool",
    "LaneServer",
    "LaneSocket",
    "connect_lane",
    "parse_address",
    "peek",
    "proof",
]

_MAGIC = b"SHL1"
_NONCE_BYTES = 32
_PROOF_BYTES = 32
# The direction payloads take on a lane connection: coordinator to node, node to coordinator.
DOWN = b"D"
UP = b"U"
# Coordinator -> node on accept: magic, nonce. Node -> coordinator: magic, direction, lane
# id, proof. Coordinator -> node when admitted: "OK", its own proof (the node then knows the
# connection leads to the coordinator of its session, even without TLS). The node sends its
# magic, direction and lane id at once, before the greeting (the bytes on the wire are the
# same): a connection that names a live session's lane id the moment it is accepted is one
# no flood can displace (limits.py).
_GREETING_BYTES = len(_MAGIC) + _NONCE_BYTES
_PREFIX_BYTES = len(_MAGIC) + 1 + LANE_ID_BYTES
_HELLO_BYTES = _PREFIX_BYTES + _PROOF_BYTES
_TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record
SWEEP_S = 0.25  # how often an accept loop drops connections past their deadline
_ACCEPT = b"OK"
_ACCEPT_BYTES = len(_ACCEPT) + _PROOF_BYTES
# A frame: kind, task id length, payload size (64 bits: payloads over 4 GB are fine), task id.
_FRAME = struct.Struct("!BHQ")
_PAYLOAD = 1
MAX_TASK_ID_BYTES = 4096
# Payloads below this stay on the gRPC stream. Measured on loopback (one node, median of a
# task round trip), the lane was faster at every size than chunk frames after the header,
# even 64 bytes (1.7 vs 2.1 ms; 4 KiB: 1.2 vs 2.0 ms; 1 MiB: 2.8 vs 4.2 ms): on the stream
# a payload costs a gRPC message of its own. Payloads up to protocol.INLINE_MAX_BYTES ride
# inside the header itself instead, which beats both.
LANE_MIN_BYTES = 1
# At most this much per recv_into / sendall call (some socket layers take at most 2**31 - 1
# bytes per call); on loopback, capping calls at 1 MiB instead took ~30% longer per 40 MB.
_IO_BLOCK = 16 << 20
# Received bytes go through the MAC in pieces of at least this much, while still in cache:
# TLS hands over one 16 KiB record per call, and a MAC call per record costs GIL hand-offs.
_MAC_BLOCK = 1 << 20


def proof(token: bytes, nonce: bytes, role: bytes, direction: bytes) -> bytes:
    """HMAC-SHA256 proving that ``role`` (node or coordinator) holds ``token``, for ``nonce``
    and a connection carrying payloads in ``direction``."""
    message = b"shoal-deploy-v1 lane " + role + b"\x00" + direction + nonce
    return hmac.digest(token, message, "sha256")


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; an optional ``dns:///``) -> (host, port)."""
    text = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ProtocolError(f"address {address[:200]!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def listen(host: str, port: int, *, backlog: int, hint: str) -> socket.socket:
    """A listening TCP socket; ``"::"`` serves IPv4 peers too, as gRPC's listener on it does.

    TransportError (naming the address and ``hint``, what to do) when the port cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    dualstack = host == "::" and socket.has_dualstack_ipv6()
    try:
        listener = socket.create_server(
            (host, port), family=family, backlog=backlog, dualstack_ipv6=dualstack
        )
    except OSError as exc:
        raise TransportError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); {hint}"
        ) from None
    # accept() wakes to sweep even when nobody connects. Set here, before any thread uses the
    # socket: set in the accept thread, a close() right after start() could close it first
    # (EBADF in that thread).
    listener.settimeout(SWEEP_S)
    return listener


def incoming(
    listener: socket.socket, *, closing: threading.Event, limiter: PendingLimiter
) -> Iterator[tuple[socket.socket, Any]]:
    """The connections ``listener`` accepts until ``closing`` is set, sweeping ``limiter``'s
    pending connections past their deadline every SWEEP_S. An accept error while open (e.g.
    no file descriptor left) waits 50 ms instead of spinning."""
    swept = time.monotonic()
    while not closing.is_set():
        if time.monotonic() - swept >= SWEEP_S:
            swept = time.monotonic()
            limiter.expire()
        try:
            connection = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if closing.is_set():
                return
            time.sleep(0.05)
            continue
        yield connection


def spawn(target: Callable[..., None], *args: Any, name: str) -> bool:
    """Start a daemon thread; False when the process has no thread left (a flood holds them),
    after a 50 ms pause, so that the caller drops one connection and its accept loop, and
    every node after, goes on (an escaped error would end it)."""
    try:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
    except RuntimeError:
        time.sleep(0.05)
        return False
    return True


def _unreferenced(buffers: Sequence[np.ndarray], index: int) -> bool:
    # Only the pool holds the buffer when the count is the baseline (its slot in the pool,
    # `buffer` and getrefcount's argument); every view, memoryview or decoded array still
    # alive adds one, since each keeps its base alive.
    buffer = buffers[index]
    return sys.getrefcount(buffer) == _BASELINE


# Measured on the very code path above, with a buffer nothing else holds.
_BASELINE = 0
_probe = deque([np.empty(1, dtype=np.uint8)])
while not _unreferenced(_probe, 0):
    _BASELINE += 1
del _probe


class BufferPool:
    """Receive buffers reused once nothing outside the pool references them any more.

    A round receives payloads of the same sizes again and again: a fresh buffer costs the
    kernel a page-zeroing pass over every byte (on loopback, a third of the coordinator's
    CPU per round), a reused one nothing. The pool keeps a buffer it handed out (up to
    ``max_bytes`` in all) and gives it out again only when its reference count shows that
    no payload view, decoded array or reply still points into it, so a caller never sees
    its bytes change.

    Buffers of one size wait in a ring, the longest handed out first: a round releases its
    payloads together, so the first one checked is almost always free (a scan over every
    kept buffer per payload had cost the coordinator ~3 ms per reply with 100 nodes).
    """

    def __init__(self, *, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._rings: dict[int, deque[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        """A writable uint8 buffer of ``size`` bytes (contents undefined)."""
        with self._lock:
            ring = self._rings.get(size) or deque()
            for _ in range(len(ring)):
                free = _unreferenced(ring, 0)
                ring.rotate(-1)  # checked: to the back, free (now handed out) or not
                if free:
                    buffer = ring[-1]
                    buffer.flags.writeable = True
                    return buffer
            if self._bytes + size > self.max_bytes:
                self._evict(self._bytes + size - self.max_bytes)
            # np.empty leaves pages untouched until they are written.
            buffer = np.empty(size, dtype=np.uint8)
            if self._bytes + size <= self.max_bytes:
                self._rings.setdefault(size, deque()).append(buffer)
                self._bytes += size
            return buffer

    def _evict(self, needed: int) -> None:
        """Forget free buffers (of other sizes: none of this one is free) until ``needed``
        bytes are released or none is left."""
        for size in list(self._rings):
            ring = self._rings[size]
            for _ in range(len(ring)):
                if needed <= 0:
                    return
                if _unreferenced(ring, 0):
                    ring.popleft()
                    self._bytes -= size
                    needed -= size
                else:
                    ring.rotate(-1)
            if not ring:
                del self._rings[size]


def _byte_view(payload: Buffer) -> memoryview:
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class LaneSocket:
    """One authenticated lane connection: frames out with sendall, or in with recv_into.

    After the handshake one thread sends on it, or one thread receives on it, never both;
    ``close`` from any thread wakes that one.
    """

    def __init__(self, sock: socket.socket | TlsEnd, *, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer
        self._send_lock = threading.Lock()
        self._head = bytearray(_FRAME.size)
        self.closed = False

    # -- sending ---------------------------------------------------------------------------

    def send(self, task_id: str, payload: Buffer) -> None:
        """Send one frame: ``payload``'s bytes, zero-copy, announced as belonging to ``task_id``."""
        name = task_id.encode("utf-8")
        if len(name) > MAX_TASK_ID_BYTES:
            raise ProtocolError(f"task id of {len(name)} bytes is over {MAX_TASK_ID_BYTES}")
        view = _byte_view(payload)
        size = view.nbytes
        with self._send_lock:
            try:
                self.sock.sendall(_FRAME.pack(_PAYLOAD, len(name), size) + name)
                for start in range(0, size, _IO_BLOCK):
                    self.sock.sendall(view[start : start + _IO_BLOCK])
            except OSError as exc:
                raise TransportError(f"bulk lane to {self.peer or 'peer'} failed: {exc}") from None

    # -- receiving -------------------------------------------------------------------------

    def _recv_exact(self, view: memoryview, mac: Poly1305 | None = None) -> None:
        got, macced, size = 0, 0, view.nbytes
        try:
            while got < size:
                n = self.sock.recv_into(view[got : got + min(size - got, _IO_BLOCK)])
                if n == 0:
                    raise TransportError("the bulk lane closed in the middle of a frame")
                got += n
                if mac is not None and (got - macced >= _MAC_BLOCK or got == size):
                    mac.update(view[macced:got])
                    macced = got
        except OSError as exc:
            raise TransportError(f"bulk lane from {self.peer or 'peer'} failed: {exc}") from None

    def read_head(self) -> tuple[str, int]:
        """The next frame's (task id, payload size). TransportError once the lane is closed."""
        view = memoryview(self._head)
        try:
            n = self.sock.recv_into(view)
        except OSError as exc:
            raise TransportError(f"bulk lane from {self.peer or 'peer'} failed: {exc}") from None
        if n == 0:
            raise TransportError("the bulk lane was closed")
        if n < _FRAME.size:
            self._recv_exact(view[n:])
        kind, name_bytes, size = _FRAME.unpack(self._head)
        if kind != _PAYLOAD:
            raise ProtocolError(f"unknown bulk lane frame kind {kind}: the peer is broken")
        if name_bytes > MAX_TASK_ID_BYTES:
            raise ProtocolError(f"bulk lane frame names a task id of {name_bytes} bytes")
        name = bytearray(name_bytes)
        self._recv_exact(memoryview(name))
        try:
            return name.decode("utf-8"), size
        except UnicodeDecodeError:
            raise ProtocolError("bulk lane frame with a task id that is not UTF-8") from None

    def read_payload(
        self, size: int, *, mac: Poly1305 | None = None, pool: BufferPool | None = None
    ) -> memoryview:
        """Receive a frame's ``size`` payload bytes (already checked by the caller) into a
        buffer of its own (from ``pool`` if given), feeding ``mac`` as they arrive."""
        # np.empty leaves pages untouched until recv_into writes them.
        buffer = pool.take(size) if pool is not None else np.empty(size, dtype=np.uint8)
        self._recv_exact(buffer.data, mac)
        buffer.flags.writeable = False
        return buffer.data

    def drain(self, size: int) -> None:
        """Read and drop a frame's payload (refused, cancelled or late), in constant memory."""
        scratch = memoryview(bytearray(min(size, 1 << 20)))
        left = size
        while left:
            n = min(left, scratch.nbytes)
            self._recv_exact(scratch[:n])
            left -= n

    def close(self) -> None:
        self.closed = True
        # The plain socket's shutdown, also for TLS: it wakes a thread blocked in recv
        # without tearing the TLS object out from under it.
        raw = self.sock.raw if isinstance(self.sock, TlsEnd) else self.sock
        with contextlib.suppress(OSError):
            socket.socket.shutdown(raw, socket.SHUT_RDWR)
        self.sock.close()


def _recv_fixed(sock: socket.socket | TlsEnd, size: int, deadline: float) -> bytes:
    """Exactly ``size`` bytes before ``deadline`` (handshakes only: they are a few dozen bytes)."""
    out = bytearray(size)
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        n = sock.recv_into(memoryview(out)[got:])
        if not n:
            raise ConnectionError("connection closed during the bulk lane handshake")
        got += n
    return bytes(out)


def connect_lane(
    *,
    host: str,
    port: int,
    lane_id: bytes,
    token: bytes,
    direction: bytes,
    context: ssl.SSLContext | None,
    server_name: str | None = None,
    timeout_s: float = 10.0,
) -> LaneSocket:
    """Open the node's end of one direction (DOWN or UP) of a session's lane, proving the
    session's lane token.

    Raises TransportError if the coordinator cannot be reached or refuses, AuthenticationError
    if the other end does not prove the same token (not this session's coordinator).
    """
    deadline = time.monotonic() + timeout_s
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise TransportError(f"cannot open the bulk lane to {host}:{port}: {exc}") from None
    sock: socket.socket = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=server_name or host)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(_MAGIC + direction + lane_id)  # first: it ranks this connection (above)
        greeting = _recv_fixed(sock, _GREETING_BYTES, deadline)
        if not greeting.startswith(_MAGIC):
            raise TransportError(f"{host}:{port} is not a shoal bulk lane")
        nonce = greeting[len(_MAGIC) :]
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(proof(token, nonce, b"node", direction))
        answer = _recv_fixed(sock, _ACCEPT_BYTES, deadline)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise TransportError(
            f"the bulk lane handshake with {host}:{port} failed: {exc or type(exc).__name__}"
        ) from None
    except TransportError:
        sock.close()
        raise
    if not answer.startswith(_ACCEPT) or not hmac.compare_digest(
        answer[len(_ACCEPT) :], proof(token, nonce, b"coordinator", direction)
    ):
        sock.close()
        raise AuthenticationError(
            f"the bulk lane at {host}:{port} did not prove this session's key; not using it"
        )
    sock.settimeout(None)
    return LaneSocket(sock, peer=f"{host}:{port}")


class LaneServer:
    """The coordinator's lane listener: accepts, authenticates, hands each lane to ``serve``.

    ``token_for(lane_id)`` gives the token of the live session with that id (or None);
    ``attach(lane_id, direction, lane)`` hands an authenticated connection to its session
    (or says why not) before the node is told it is accepted; ``serve(lane_id, direction,
    lane)`` then runs on the connection's thread for as long as it lives.
    Unauthenticated connections get ``timeout_s`` to prove a token, however slowly their
    bytes come (a deadline on every read; the limiter's own, swept by the accept loop, as the
    backstop), and are bounded by ``limiter`` per address and in total. Their progress ranks
    them when one must go (limits.py): SILENT, PREFIX (the lane's magic and a direction, or a
    TLS ClientHello's first byte), PROVEN (a live session's lane id, or a TLS handshake with
    a certificate of the federation's CA). Each refusal is reported to ``rejected(peer,
    reason)``, once. With TLS, until the node proves its token a connection may send at
    most ``preauth_bytes`` on the wire (``PROBATION_BYTES`` from an address on probation)
    and ``preauth_records`` TLS records, as at the front door; one more and it is cut, the
    cut counted against its certificate (or address) in ``bans``.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        token_for: Callable[[bytes], bytes | None],
        attach: Callable[[bytes, bytes, LaneSocket], str],
        serve: Callable[[bytes, bytes, LaneSocket], None],
        rejected: Callable[[str, str], None],
        timeout_s: float = 5.0,
        limiter: PendingLimiter | None = None,
        bans: Bans | None = None,
        preauth_bytes: int = PREAUTH_BYTES,
        preauth_records: int = PREAUTH_RECORDS,
    ) -> None:
        self._listener = listen(
            host,
            port,
            backlog=128,
            hint="the bulk lane's port is in use? Choose another with data_listen / --data-port",
        )
        self.port: int = self._listener.getsockname()[1]
        self._context = context
        self._token_for = token_for
        self._attach = attach
        self._serve = serve
        self._rejected = rejected
        self._timeout_s = timeout_s
        # "is not None": an empty limiter is falsy (it has a length), and "or" swapped the
        # configured one for a default one with higher bounds.
        self._limiter = limiter if limiter is not None else PendingLimiter(max_age_s=timeout_s)
        self._bans = bans if bans is not None else Bans()
        self._preauth_bytes = preauth_bytes
        self._preauth_records = preauth_records
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="shoal-lane-accept", daemon=True)
        self.accepted = 0  # connections accepted, and those of them that authenticated
        self.served = 0
        # With TLS: the most TLS records and wire bytes a connection that then authenticated
        # sent before it did (a node's margin under the bounds).
        self.preauth_peak = (0, 0)
        self._counting = threading.Lock()

    def start(self) -> LaneServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        for conn, address in incoming(self._listener, closing=self._closing, limiter=self._limiter):
            self.accepted += 1
            peer = _peer(address)
            pending = _PendingConn(conn)
            level = self._level_of(peek(conn, _PREFIX_BYTES))
            ticket = self._limiter.admit(peer_host(peer), pending.drop, level=level)
            if ticket is None:
                conn.close()
                self._rejected(peer, _REFUSED)
                continue
            if not spawn(self._connection, pending, peer, ticket, name="shoal-lane"):
                self._limiter.done(ticket)
                conn.close()
                self._rejected(peer, "dropped: the coordinator has no thread free")

    def _level_of(self, head: bytes) -> int:
        """How far the first bytes of a connection are along a real lane handshake."""
        if self._context is not None:
            return PREFIX if head[:1] == bytes([_TLS_HANDSHAKE]) else SILENT
        return _hello_level(head, self._token_for)

    def _connection(self, pending: _PendingConn, peer: str, ticket: int) -> None:
        try:
            authenticated = self._authenticate(pending, peer, ticket)
        finally:
            self._limiter.done(ticket)
        if authenticated is None:
            return
        lane_id, direction, lane = authenticated
        try:
            self._serve(lane_id, direction, lane)
        finally:
            lane.close()

    def _authenticate(
        self, pending: _PendingConn, peer: str, ticket: int
    ) -> tuple[bytes, bytes, LaneSocket] | None:
        conn = pending.sock
        host = peer_host(peer)
        deadline = time.monotonic() + self._timeout_s
        sock: socket.socket | TlsEnd = conn
        state = _Progress()
        reason = ""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._timeout_s)
            if self._context is not None:
                sock = self._tls(self._context, conn, host, state, deadline)
                self._limiter.advance(ticket, PROVEN)  # a certificate of the federation's CA
            nonce = os.urandom(_NONCE_BYTES)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(_MAGIC + nonce)
            head = _recv_fixed(sock, _PREFIX_BYTES, deadline)
            start = len(_MAGIC) + 1
            direction = head[len(_MAGIC) : start]
            lane_id = head[start:]
            token = None
            if not head.startswith(_MAGIC) or direction not in (DOWN, UP):
                reason = "not a shoal bulk lane hello"
            elif (token := self._token_for(lane_id)) is None:
                reason = "no live session has this lane id (stale or forged)"
            else:
                self._limiter.advance(ticket, PROVEN)
                sent = _recv_fixed(sock, _PROOF_BYTES, deadline)
                if not hmac.compare_digest(sent, proof(token, nonce, b"node", direction)):
                    reason = "wrong lane token: the connection is not bound to the session"
                else:
                    state.authenticated = True  # no more budget: the node is accountable
                    if isinstance(sock, TlsEnd):
                        if direction == UP:  # replies come in here, many MiB at a time
                            sock.read_bytes = BULK_READ_BYTES
                        with self._counting:
                            self.preauth_peak = (
                                max(self.preauth_peak[0], sock.records),
                                max(self.preauth_peak[1], sock.raw_bytes),
                            )
                    self._limiter.done(ticket)  # authenticated: no longer anyone's to drop
                    if pending.dropped:  # dropped in the same instant: the peer saw it
                        raise ConnectionError("dropped")
                    sock.settimeout(None)
                    lane = LaneSocket(sock, peer=peer)
                    reason = self._attach(lane_id, direction, lane)
                    if not reason:
                        sock.settimeout(max(deadline - time.monotonic(), 0.001))
                        try:
                            accept = _ACCEPT + proof(token, nonce, b"coordinator", direction)
                            sock.sendall(accept)
                        finally:
                            sock.settimeout(None)
                        with self._counting:
                            self.served += 1
                        return lane_id, direction, lane
        except Overspent as exc:  # the wire's budget (tlsend.preauth_check): a flood
            reason = str(exc)
            state.cut = True
        except _Refused as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"no lane authentication within {self._timeout_s:g} s"
        except ssl.SSLError as exc:
            reason = f"TLS handshake failed ({exc.reason or exc})"
        except OSError as exc:
            reason = f"connection failed during authentication ({exc or type(exc).__name__})"
        if pending.dropped == "expired":
            reason = f"no lane authentication within {self._timeout_s:g} s"
        elif pending.dropped:
            reason = _EVICTED
        if not self._closing.is_set():  # first: once closed, the peer may look at once
            self._rejected(peer, naming(reason, state.identity))
        if state.cut:
            self._bans.strike(host, state.identity, record=not self._closing.is_set())
        # Read what already came (a hello refused by its first bytes has more behind them):
        # closing with unread bytes would reset the connection instead of ending it.
        with contextlib.suppress(OSError, ValueError):
            conn.setblocking(False)
            conn.recv(_HELLO_BYTES)
        conn.close()
        return None

    def _tls(
        self,
        context: ssl.SSLContext,
        conn: socket.socket,
        host: str,
        state: _Progress,
        deadline: float,
    ) -> TlsEnd:
        """The TLS handshake, bounded as at the front door: by ``deadline``, and in bytes on
        the wire and TLS records until the node authenticates (``state.authenticated``).
        Raises Overspent (a cut), _Refused (a banned certificate), ssl.SSLError,
        TimeoutError or ConnectionError."""
        budget = self._preauth_bytes
        if self._bans.on_probation(host):
            budget = min(budget, PROBATION_BYTES)
        check = preauth_check(
            budget=budget,
            records=self._preauth_records,
            authenticated=lambda: state.authenticated,
        )
        end = TlsEnd(conn, context, check=check)
        end.handshake(b"", deadline)
        state.identity = end.identity()
        refusal = self._bans.refusal(state.identity)
        if refusal is not None:
            raise _Refused(refusal)
        end.check_now()  # what came behind the handshake, now charged to the certificate
        return end


class _Progress:
    """How far a lane connection got: the certificate it showed, whether it authenticated,
    and whether it was cut for what it sent."""

    def __init__(self) -> None:
        self.identity = ""
        self.authenticated = False
        self.cut = False


class _Refused(ConnectionError):
    """A connection refused after its TLS handshake (its certificate is banned)."""


_REFUSED = (
    "refused: too many pending connections from this address, none of them less far along "
    "its handshake than this one"
)
_EVICTED = (
    "dropped while unauthenticated, for a connection at least as far along its handshake "
    "(too many pending)"
)


class _PendingConn:
    """An accepted lane connection and why the limiter dropped it, if it did."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dropped: DropReason | None = None

    def drop(self, why: DropReason) -> None:
        """Wake this connection's handshake with an error (it is reported once, by its thread)."""
        self.dropped = why
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def peek(sock: socket.socket, size: int) -> bytes:
    """The bytes already waiting on a fresh connection, left there; b"" if none yet."""
    try:
        sock.setblocking(False)
        try:
            return sock.recv(size, socket.MSG_PEEK)
        finally:
            sock.setblocking(True)
    except OSError:  # BlockingIOError: nothing yet; anything else: the thread will see it
        return b""


def _hello_level(head: bytes, token_for: Callable[[bytes], bytes | None]) -> int:
    """The level of a plaintext lane connection whose first bytes are ``head``."""
    n = min(len(head), len(_MAGIC))
    if not head or head[:n] != _MAGIC[:n]:
        return SILENT
    if len(head) > len(_MAGIC) and head[len(_MAGIC) : len(_MAGIC) + 1] not in (DOWN, UP):
        return SILENT
    if len(head) >= _PREFIX_BYTES and token_for(head[len(_MAGIC) + 1 : _PREFIX_BYTES]):
        return PROVEN
    return PREFIX


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)
