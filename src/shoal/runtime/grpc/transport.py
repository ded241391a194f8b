"""Transport agreement: the coordinator's front door, and the node's question before gRPC.

The coordinator's public port is served by a front door, not by gRPC itself. It reads the
first bytes of each connection and tells what the peer speaks:

- ``SHOAL-TRANSPORT/1 tls`` (or ``plaintext``) and a newline: a node asking, before anything
  else, which transport this coordinator speaks (:func:`agree`). The door answers with its own
  line and closes; both sides print one line naming a mismatch and its fix.
- a TLS record (first byte 0x16) or HTTP/2's preface (``PRI * HTTP/2.0``): a gRPC client. If
  it speaks what the coordinator speaks, the connection is relayed to gRPC; if not, it is
  closed with one line per address (coalesced), instead of gRPC's own handshake errors.
- anything else: closed, and recorded the same way.

TLS ends here, at the door (tlsend.py), with the federation's CA required of the peer; gRPC
behind it speaks plaintext HTTP/2. So the relay reads every connection's frames in the clear,
TLS or not: it meters them (h2meter.py) and bounds the bytes a connection may send before a
node authenticates on it (``preauth_bytes``). While TLS ended in gRPC, a holder of a
federation certificate could send a rapid reset the relay could not read, and gRPC queued its
calls ahead of a node's (the node stayed out). A cut TLS connection is recorded with the
peer's certificate (its common name and a digest). With TLS the budget also counts the bytes
on the wire and bounds the TLS records (``preauth_records``), before decryption: records
that decrypt to little or nothing cost the server work without spending decrypted bytes.
A peer cut again and again is banned (bans.py): its certificate refused after the
handshake, or with none its address on probation (``PROBATION_BYTES`` before a node
authenticates).

gRPC itself listens on a unix socket in a private (0700) directory, not on a loopback TCP port:
no other local user's process can reach it around the door's limits (a rapid reset on a
loopback port kept a node out for as long as it ran). Each relay binds its own end to a name
in that directory, so gRPC's view of the peer (``unix:<that name>``) maps back to the node.
Where no unix sockets exist, gRPC listens on a loopback port, in plaintext: a call that did
not come through the door is refused (``Streams.serve``).

The agreement is unauthenticated on purpose: it only explains a failure. A node never changes
its transport because of the answer, so a forged answer can stop a node, never downgrade it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from shoal.errors import ProtocolError, TransportError
from shoal.runtime.grpc.bans import Bans
from shoal.runtime.grpc.h2meter import FrameMeter
from shoal.runtime.grpc.lane import incoming, listen, parse_address, peek, spawn
from shoal.runtime.grpc.limits import (
    CALL,
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
from shoal.runtime.grpc.tlsend import Overspent, TlsEnd, naming, preauth_check

__all__ = [
    "AGREEMENT",
    "PREAUTH_BYTES",
    "PREAUTH_RECORDS",
    "PROBATION_BYTES",
    "FrontDoor",
    "agree",
    "classify",
    "mismatch_line",
    "parse_host_port",
]

Transport = Literal["tls", "plaintext"]

AGREEMENT = b"SHOAL-TRANSPORT/1 "
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TLS_HANDSHAKE = 0x16  # a TLS record of type handshake: a ClientHello
_MAX_LINE = 64
_RELAY_BLOCK = 1 << 16  # per direction and node: the relay holds 128 KiB per node
_ENDED_KEPT = 1024  # ended relays whose peer is still known (FrontDoor.peer_of)
# Calls gRPC may open on one relayed connection in one second: a node opens one per session.
# More is a flood of calls on a connection the door's limiter counts once; the frame meter
# (h2meter.py) bounds HEADERS frames too, and this counts the calls gRPC actually starts.
_CALLS_PER_S = 16


def mismatch_line(*, side: Literal["node", "coordinator"], coordinator: str, peer: str = "") -> str:
    """The one line each side prints when the node and the coordinator speak differently.

    ``coordinator`` is what the coordinator speaks; the node speaks the other one.
    """
    if side == "node":
        if coordinator == "tls":
            return (
                "transport mismatch: the coordinator speaks TLS but this node runs --insecure "
                "(plaintext): start this node with --certs DIR (the federation's certificates), "
                "or the coordinator with --insecure"
            )
        return (
            "transport mismatch: the coordinator runs --insecure (plaintext) but this node "
            "speaks TLS: start this node with --insecure too, or the coordinator with --certs DIR"
        )
    if coordinator == "tls":
        return (
            f"transport mismatch with {peer}: it speaks plaintext (a node started with "
            "--insecure) but this coordinator speaks TLS: start that node with --certs DIR, "
            "or this coordinator with --insecure"
        )
    return (
        f"transport mismatch with {peer}: it speaks TLS but this coordinator runs --insecure "
        "(plaintext): start that node with --insecure too, or this coordinator with --certs DIR"
    )


def classify(head: bytes) -> str | None:
    """What the first bytes of a connection speak: 'tls', 'plaintext' (HTTP/2), 'agree' (the
    agreement line), 'unknown', or None while they are a prefix of more than that."""
    if not head:
        return None
    if head[0] == _TLS_HANDSHAKE:
        return "tls"
    for prefix, kind in ((AGREEMENT, "agree"), (_HTTP2_PREFACE, "plaintext")):
        n = min(len(head), len(prefix))
        if head[:n] == prefix[:n]:
            if kind == "agree":
                return kind if b"\n" in head[len(prefix) :] else None
            return kind if n == len(prefix) else None
    return "unknown"


def agree(address: str, speaks: Transport, *, timeout_s: float = 5.0) -> None:
    """Ask the coordinator at ``address`` which transport it speaks, before any gRPC.

    Returns if it speaks ``speaks``; raises TransportError saying what is wrong and what to do
    otherwise (a mismatch, nothing listening, an unreachable host, not a shoal coordinator).
    """
    try:
        host, port = parse_host_port(address)
    except ProtocolError as exc:
        raise TransportError(f"{exc}: give --coordinator as HOST:PORT") from None
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise TransportError(
            "connection refused: nothing listens there (is the coordinator running, on this "
            "host and port?)"
        ) from None
    except (socket.gaierror, UnicodeError):  # UnicodeError: not a valid (IDNA) host name
        raise TransportError(
            f"the coordinator's host name {host[:80]!r} does not resolve (check --coordinator)"
        ) from None
    except TimeoutError:
        raise TransportError(
            f"the coordinator's host is unreachable (no answer within {timeout_s:g} s: a wrong "
            "address, or a firewall drops the packets)"
        ) from None
    except OSError as exc:
        raise TransportError(
            f"the coordinator's host is unreachable ({exc.strerror or exc}: a wrong address, "
            "or no route to it)"
        ) from None
    with sock:
        try:
            sock.sendall(AGREEMENT + speaks.encode() + b"\n")
            reply = _read_line(sock, time.monotonic() + timeout_s)
        except (OSError, TimeoutError):
            reply = b""
    if not reply.startswith(AGREEMENT):
        raise TransportError(
            f"{address} did not answer shoal's transport agreement: is it a shoal coordinator "
            "(of this version), and is nothing between (a proxy that ends TLS) changing the bytes?"
        )
    theirs = reply[len(AGREEMENT) :].strip().decode("ascii", "replace")
    if theirs not in ("tls", "plaintext"):
        # not a mismatch to explain: naming one would tell the operator to change a flag
        raise TransportError(
            f"{address} answered shoal's transport agreement with an unknown transport "
            f"{theirs[:16]!r}: is it a shoal coordinator of this version?"
        )
    if theirs != speaks:
        raise TransportError(
            mismatch_line(side="node", coordinator="tls" if theirs == "tls" else "plaintext")
        )


def parse_host_port(address: str) -> tuple[str, int]:
    """(host, port) of an address to dial: :func:`~shoal.runtime.grpc.lane.parse_address`,
    and a port one can connect to (0 only means "any" when listening)."""
    host, port = parse_address(address)
    if not 0 < port < 65536:
        raise ProtocolError(f"address {address[:200]!r} is not HOST:PORT (a port in 1..65535)")
    return host, port


def _read_line(sock: socket.socket, deadline: float, head: bytes = b"") -> bytes:
    out = bytearray(head)
    while b"\n" not in out and len(out) <= _MAX_LINE:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        data = sock.recv(_MAX_LINE)
        if not data:
            break
        out += data
    return bytes(out)


def _grpc_peer(address: object) -> str:
    """A socket address in gRPC's peer form: 'ipv4:1.2.3.4:5' or 'ipv6:[::1]:5'."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        if ":" in host:
            return f"ipv6:[{host}]:{address[1]}"
        return f"ipv4:{host}:{address[1]}"
    return str(address)


class FrontDoor:
    """The coordinator's listener: classifies each connection, relays gRPC, explains the rest.

    ``speaks`` is the coordinator's transport (with "tls", ``tls`` is the server's context,
    which requires a certificate of the federation's CA: TLS ends here); matching connections
    are relayed to gRPC, which speaks plaintext HTTP/2 behind the door, at the
    unix socket ``upstream_path`` (its directory private to this process's user; each relay
    binds a name there), or where no unix sockets exist at 127.0.0.1:``upstream_port``.
    ``mismatch(host, line)`` is called for a peer that speaks the other transport,
    ``refused(host, reason)`` for one that speaks neither (both coalesce).
    Connections that have not shown their first bytes within ``timeout_s`` are closed. Every
    connection is bounded by ``limiter`` until a node authenticates on it (:meth:`authenticated`)
    or it ends, relayed or not: so unauthenticated connections hold at most the limiter's
    count of threads and relay buffers, each for at most its ``max_age_s``. Their progress
    ranks them when one must go (limits.py): SILENT, PREFIX (the first bytes of a ClientHello,
    HTTP/2's preface or the agreement), then once gRPC opens a call on the connection CALL
    (plaintext) or PROVEN (TLS: gRPC required a certificate of the federation's CA).
    :meth:`peer_of` maps gRPC's view of a relayed connection (a loopback address) back to
    the node's own address.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        speaks: Transport,
        upstream_port: int = 0,
        upstream_path: str | None = None,
        mismatch: Callable[[str, str], None],
        refused: Callable[[str, str], None],
        timeout_s: float = 5.0,
        limiter: PendingLimiter | None = None,
        tls: ssl.SSLContext | None = None,
        preauth_bytes: int = PREAUTH_BYTES,
        preauth_records: int = PREAUTH_RECORDS,
        bans: Bans | None = None,
    ) -> None:
        if (tls is None) != (speaks == "plaintext"):
            raise ValueError("give a TLS context exactly when the door speaks TLS")
        self._listener = listen(host, port, backlog=512, hint="is another process using the port?")
        self.port: int = self._listener.getsockname()[1]
        self.speaks = speaks
        self._tls = tls
        self._preauth_bytes = preauth_bytes
        self._preauth_records = preauth_records
        # Peers cut again and again (bans.py): certificates refused, addresses on probation,
        # whether the door or the bulk lane cut them.
        self._bans = bans if bans is not None else Bans()
        self._upstream = ("127.0.0.1", upstream_port)
        self._upstream_path = upstream_path
        self._relay_names = itertools.count()
        self._mismatch = mismatch
        self._refused = refused
        self._timeout_s = timeout_s
        # "is not None": an empty limiter is falsy (it has a length), and "or" swapped the
        # configured one for a default one with bounds 16 and 256 (256 relays where
        # max_pending said 64).
        self._limiter = limiter if limiter is not None else PendingLimiter(max_age_s=3 * timeout_s)
        self._lock = threading.Lock()
        # The relay's end as gRPC names it (after its last ':': a path, or a loopback port)
        # -> the connection.
        self._relayed: dict[str, _DoorConn] = {}
        # The last relays that ended, by the same name -> the peer: gRPC may still start
        # calls it had read from one (a cut flood's), and their refusals name the peer.
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._open: set[socket.socket] = set()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="shoal-door", daemon=True)
        self.accepted = 0  # connections accepted, and those of them served (not refused)
        self.served = 0

    def start(self) -> FrontDoor:
        self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """Take no new connections; those relayed already go on until :meth:`close`."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop_accepting()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _shutdown(sock)

    def peer_of(self, grpc_peer: str) -> str:
        """The node's address behind a relayed connection, as gRPC would have named it."""
        conn = self._conn_of(grpc_peer)
        if conn is not None:
            return conn.peer
        with self._lock:  # a call gRPC queued before the door ended its connection
            return self._ended.get(grpc_peer.rsplit(":", 1)[-1], grpc_peer)

    def call_opened(self, grpc_peer: str) -> int | None:
        """gRPC opened a call on a relayed connection: the rank the call earns among pending
        calls (limits.py), or None if it came on no relayed connection or on one cut for
        opening too many (the caller refuses it).

        The first call on a connection ranks as the connection does (PROVEN with TLS: a
        federation certificate; CALL in plaintext); every later unauthenticated one ranks
        SILENT, even once the first has ended: many calls on one connection cannot outrank a
        node's one call, however fast they come (a node opens one connection per attempt).
        A call on a connection where a node authenticated is PROVEN.
        """
        conn = self._conn_of(grpc_peer)
        if conn is None:
            return None  # not through the front door: only a local process can do that
        now = time.monotonic()
        with self._lock:
            self.served += not conn.called
            conn.called = True
            if now - conn.window >= 1.0:
                conn.window, conn.calls = now, 0
            conn.calls += 1
            flood = conn.calls > _CALLS_PER_S
            # The connection's first call ever, not "none other pending": calls opened and
            # reset at once (rapid reset) each found none pending, so each ranked as the
            # connection, and a certificate holder's flood of them evicted a node's call.
            first = not conn.ranked
            conn.ranked = True
        if flood:
            conn.cut(f"cut: more than {_CALLS_PER_S} calls opened on one connection in a second")
            return None
        level = PROVEN if self.speaks == "tls" else CALL
        self._limiter.advance(conn.ticket, level)
        if conn.authenticated:
            return PROVEN
        return level if first else SILENT

    def authenticated(self, grpc_peer: str) -> None:
        """A node authenticated on a relayed connection: it is no longer pending."""
        conn = self._conn_of(grpc_peer)
        if conn is not None:
            with self._lock:
                conn.authenticated = True
            self._limiter.done(conn.ticket)

    def _conn_of(self, grpc_peer: str) -> _DoorConn | None:
        with self._lock:
            return self._relayed.get(grpc_peer.rsplit(":", 1)[-1])

    # -- serving ---------------------------------------------------------------------------

    def _accept(self) -> None:
        for sock, address in incoming(self._listener, closing=self._closing, limiter=self._limiter):
            self.accepted += 1
            peer = _grpc_peer(address)
            host = peer_host(peer)
            conn = _DoorConn(sock, peer)
            level = _level_of(peek(sock, len(_HTTP2_PREFACE)))
            ticket = self._limiter.admit(host, conn.drop, level=level)
            if ticket is None:
                sock.close()
                self._refused(host, _REFUSED)
                continue
            conn.ticket = ticket
            if not spawn(self._connection, conn, name="shoal-door"):
                self._limiter.done(ticket)
                sock.close()
                self._refused(host, "dropped: the coordinator has no thread free")

    def _connection(self, conn: _DoorConn) -> None:
        host = peer_host(conn.peer)
        with self._lock:
            self._open.add(conn.sock)
        # Every connection is either served (an agreement that matched, a relay on which gRPC
        # opened a call: the stream's own refusals are stream.py's) or recorded once.
        refusal: str | None = None
        mismatch = False
        settled = False
        try:
            try:
                head, kind = self._first_bytes(conn.sock)
                if kind != self.speaks:
                    self._limiter.done(conn.ticket)  # not relayed: no longer pending
                if conn.dropped:
                    pass  # recorded below
                elif kind == "agree":
                    refusal, mismatch = self._verdict(host, head)
                    if refusal is not None:
                        # Recorded before the answer goes out: a peer that reads it, and then
                        # a close() of this engine, must find the record.
                        self._settle(conn, host, refusal, mismatch)
                        settled = True
                    self._answer(conn.sock)
                elif kind == self.speaks:
                    self._limiter.advance(conn.ticket, PREFIX)
                    refusal = self._relay(conn, head)
                    if refusal is None and not conn.called:
                        refusal = "closed before its HTTP/2 handshake finished and opened a call"
                elif kind in ("tls", "plaintext"):
                    refusal = mismatch_line(side="coordinator", coordinator=self.speaks, peer=host)
                    mismatch = True
                elif kind == "unknown":
                    refusal = f"not a shoal node: its first bytes were {head[:16]!r}"
                else:
                    refusal = f"sent only {head[:16]!r} within {self._timeout_s:g} s"
            except OSError as exc:
                refusal = f"connection failed before a node spoke ({exc.strerror or exc})"
            finally:
                self._limiter.done(conn.ticket)
                with self._lock:
                    self._open.discard(conn.sock)
            # Recorded before the socket closes: a peer that sees the close, and then a
            # close() of this engine, must find the record (closing skips recording).
            if not settled:
                self._settle(conn, host, refusal, mismatch)
        finally:
            conn.sock.close()

    def _settle(self, conn: _DoorConn, host: str, refusal: str | None, mismatch: bool) -> None:
        """Count a served connection or record a refused one, once."""
        if conn.dropped == "cut":
            # Recorded even if a call was served on it (then no longer counted served): a
            # node does not flood.
            if conn.called:
                with self._lock:
                    self.served -= 1
            if not self._closing.is_set():
                self._refused(host, naming(conn.cut_reason, conn.identity))
            self._bans.strike(host, conn.identity, record=not self._closing.is_set())
            return
        if conn.dropped == "evicted":
            refusal, mismatch = _EVICTED, False
        elif conn.dropped == "expired":
            refusal, mismatch = "not authenticated within the handshake deadline", False
        if refusal is None or self._closing.is_set():
            if refusal is None and not conn.called:  # a relay counted at its call
                with self._lock:
                    self.served += 1
            return
        if mismatch:
            self._mismatch(host, refusal)
        else:
            self._refused(host, naming(refusal, conn.identity))

    def _budget(self, host: str) -> int:
        """Bytes a connection from ``host`` may send before a node authenticates on it."""
        if self._bans.on_probation(host):
            return min(self._preauth_bytes, PROBATION_BYTES)
        return self._preauth_bytes

    def _first_bytes(self, conn: socket.socket) -> tuple[bytes, str | None]:
        deadline = time.monotonic() + self._timeout_s
        head = b""
        kind: str | None = None
        while kind is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.settimeout(remaining)
            try:
                data = conn.recv(_MAX_LINE)
            except TimeoutError:
                break
            if not data:
                break
            head += data
            kind = classify(head)
            if kind is None and len(head) > 2 * _MAX_LINE:
                kind = "unknown"
        return head, kind

    def _verdict(self, host: str, head: bytes) -> tuple[str | None, bool]:
        """The refusal an agreement earns (and whether it is a mismatch), or None."""
        claim = head[len(AGREEMENT) :].split(b"\n", 1)[0].strip()
        if claim not in (b"tls", b"plaintext"):
            return f"asked to agree on an unknown transport {claim[:16]!r}", False
        if claim.decode() != self.speaks:
            return mismatch_line(side="coordinator", coordinator=self.speaks, peer=host), True
        return None, False

    def _answer(self, conn: socket.socket) -> None:
        """Tell the peer which transport this coordinator speaks."""
        conn.settimeout(self._timeout_s)
        conn.sendall(AGREEMENT + self.speaks.encode() + b"\n")

    def _connect_upstream(self) -> tuple[socket.socket, str]:
        """A connection to gRPC, and the name gRPC gives its peer (after the last ':')."""
        if self._upstream_path is None:
            upstream = socket.create_connection(self._upstream, timeout=self._timeout_s)
            return upstream, str(upstream.getsockname()[1])
        # A name of our own in gRPC's private directory: gRPC reports it as the peer. It is
        # unlinked once connected (the socket keeps its name); the directory is not writable
        # by anyone else, so no one can take the name first.
        name = os.path.join(os.path.dirname(self._upstream_path), f"r{next(self._relay_names)}")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            upstream.bind(name)
            try:
                upstream.settimeout(self._timeout_s)
                upstream.connect(self._upstream_path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(name)
        except OSError:
            upstream.close()
            raise
        return upstream, name

    def _relay(self, conn: _DoorConn, head: bytes) -> str | None:
        """Relay a connection to gRPC (after its TLS handshake, with TLS); the refusal it
        earned before reaching gRPC, if any."""
        peer: socket.socket | TlsEnd = conn.sock
        budget = self._budget(peer_host(conn.peer))
        if self._tls is not None:
            check = preauth_check(
                budget=budget,
                records=self._preauth_records,
                authenticated=lambda: conn.authenticated,
            )
            end = TlsEnd(conn.sock, self._tls, check=check)
            try:
                end.handshake(head, time.monotonic() + self._timeout_s)
            except ssl.SSLError as exc:
                return f"TLS handshake failed ({exc.reason or exc})"
            except TimeoutError:
                return f"no TLS handshake within {self._timeout_s:g} s"
            except Overspent as exc:
                conn.cut(str(exc))
                return None
            conn.identity = end.identity()
            refusal = self._bans.refusal(conn.identity)
            if refusal is not None:
                return refusal
            try:
                end.check_now()  # what came behind the handshake, now charged to the certificate
            except Overspent as exc:
                conn.cut(str(exc))
                return None
            self._limiter.advance(conn.ticket, PROVEN)  # a certificate of the federation's CA
            peer, head = end, b""
        try:
            upstream, local = self._connect_upstream()
        except OSError:
            return None  # gRPC is shutting down
        with self._lock:
            self._open.add(upstream)
            self._relayed[local] = conn
            conn.upstream = upstream
        if conn.dropped:  # dropped while the upstream was being opened
            _shutdown(upstream)
        try:
            for sock in (conn.sock, upstream):
                sock.settimeout(None)
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # gRPC never half-closes: once it ends, the node's side is ended in full, so a
            # peer that stops reading cannot keep this relay alive.
            back = threading.Thread(
                target=_pump, args=(upstream, peer, True), name="shoal-relay", daemon=True
            )
            back.start()
            self._inbound(conn, peer, upstream, head, budget)
            back.join()
        finally:
            with self._lock:
                self._open.discard(upstream)
                self._relayed.pop(local, None)
                self._ended[local] = conn.peer
                if len(self._ended) > _ENDED_KEPT:
                    self._ended.popitem(last=False)
            upstream.close()
        return None

    def _inbound(
        self,
        conn: _DoorConn,
        src: socket.socket | TlsEnd,
        dst: socket.socket,
        head: bytes,
        limit: int,
    ) -> None:
        """Copy what the peer sends to gRPC: its frames metered, and at most ``limit`` bytes
        of them before a node authenticates on the connection (with TLS, the wire's bytes
        and records are bounded too: tlsend.preauth_check)."""
        meter = FrameMeter()
        budget = limit
        buffer = bytearray(_RELAY_BLOCK)
        view = memoryview(buffer)
        n = len(head)
        view[:n] = head
        try:
            while True:
                if n:
                    # The meter first: a flood is named by its kind where it is one.
                    flood = meter.feed(view[:n])
                    if flood is not None:
                        conn.cut(flood)
                        return
                    if not conn.authenticated:
                        budget -= n
                        if budget < 0:
                            conn.cut(
                                f"cut: sent more than {limit} bytes before a node "
                                "authenticated on it"
                            )
                            return
                    dst.sendall(view[:n])
                n = src.recv_into(buffer)
                if not n:
                    break
        except Overspent as exc:  # the TLS wire's budget (tlsend.preauth_check)
            conn.cut(str(exc))
            return
        except OSError:
            _shutdown(src)  # a reset: end both directions
            _shutdown(dst)
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


_REFUSED = (
    "refused: too many pending connections from this address, none of them less far along "
    "its handshake than this one"
)
_EVICTED = (
    "dropped while unauthenticated, for a connection at least as far along its handshake "
    "(too many pending)"
)


class _DoorConn:
    """A connection at the front door: its peer, its limiter ticket (until a node
    authenticates on it), its relay's upstream, and why the limiter dropped it, if it did."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.ticket: int | None = None
        self.upstream: socket.socket | None = None
        self.called = False  # gRPC opened a call on it (its refusals are then stream.py's)
        self.dropped: DropReason | None = None
        self.cut_reason = ""
        self.authenticated = False  # a node authenticated on it
        self.identity = ""  # with TLS: the peer's certificate (tlsend.TlsEnd.identity)
        self.ranked = False  # its first call came (and ranked as the connection)
        self.window = 0.0  # start of the current second, and calls opened in it
        self.calls = 0

    def cut(self, reason: str) -> None:
        """End a connection that floods (too many calls or frames in a second)."""
        if self.dropped is None:
            self.cut_reason = reason
            self.drop("cut")

    def drop(self, why: DropReason) -> None:
        if self.dropped is None or why == "cut":
            self.dropped = why
        _shutdown(self.sock)
        upstream = self.upstream
        if upstream is not None:
            _shutdown(upstream)


def _level_of(head: bytes) -> int:
    """How far the first bytes of a connection are along a handshake a node would make."""
    if not head:
        return SILENT
    return SILENT if classify(head) == "unknown" else PREFIX


def _pump(src: socket.socket, dst: socket.socket | TlsEnd, full: bool) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends; then end ``dst``'s sending side (or all of
    ``dst`` with ``full``)."""
    buffer = bytearray(_RELAY_BLOCK)
    view = memoryview(buffer)
    try:
        while True:
            n = src.recv_into(buffer)
            if not n:
                break
            dst.sendall(view[:n])
    except OSError:
        _shutdown(src)  # a reset: end both directions
        _shutdown(dst)
        return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_RDWR if full else socket.SHUT_WR)


def _shutdown(sock: socket.socket | TlsEnd) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
