"""The coordinator's half of the bulk lane (see lane.py for the connections themselves).

Each authenticated session may open a lane: one connection down (task payloads, sent by a
writer thread in the order their headers entered the stream) and one up (reply bytes, read
by the session's reader right after their header). The lane listener, its limiter of
unauthenticated connections, and the count of bytes that took the lane live here; the bans
(bans.py) are the front door's own, so a certificate cut on either port is refused on both.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
from collections.abc import Callable

from cryptography.hazmat.primitives.poly1305 import Poly1305

from shoal.errors import ProtocolError, TransportError
from shoal.runtime.engine import Buffer
from shoal.runtime.grpc.bans import Bans
from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.lane import DOWN, BufferPool, LaneServer, LaneSocket, parse_address
from shoal.runtime.grpc.limits import PendingLimiter
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.sessions import Session, SessionTable
from shoal.runtime.grpc.trail import Trail

__all__ = ["BulkLanes", "SessionLane"]

log = logging.getLogger("shoal.deploy")


class SessionLane:
    """A session's authenticated bulk lane: one connection per direction.

    Task payloads go ``down``, queued for the lane's writer thread in the order their
    headers enter the stream; a reply's bytes come ``up`` and are read by the session's
    reader right after their header. So the two connections never need to agree on more
    than that order (each frame's task id and size are still checked against its header),
    and no TLS connection is read and written by two threads.
    """

    def __init__(self) -> None:
        self.down: LaneSocket | None = None
        self.up: LaneSocket | None = None
        self.out: queue.SimpleQueue[tuple[str, Buffer] | None] = queue.SimpleQueue()
        self.closed = threading.Event()

    @property
    def ready(self) -> bool:
        return self.down is not None and self.up is not None and not self.closed.is_set()

    def close(self) -> None:
        self.closed.set()
        self.out.put(None)
        for sock in (self.down, self.up):
            if sock is not None:
                sock.close()

    def watch(self, sock: LaneSocket) -> bool:
        """Block until the lane is closed here (False) or ``sock`` hung up by the peer (True).

        Nothing reads an idle connection, so a node (or a middlebox) dropping it would
        otherwise go unnoticed until the next payload; polling for a hang-up reads no bytes.
        """
        hangup = getattr(select, "POLLRDHUP", 0)
        if not hangup or not hasattr(select, "poll"):
            self.closed.wait()
            return False
        poller = select.poll()
        try:
            poller.register(sock.sock.fileno(), hangup | select.POLLHUP | select.POLLERR)
        except (ValueError, OSError):  # already closed here
            return False
        while not self.closed.is_set():
            if poller.poll(1000) and not self.closed.is_set():
                return True
        return False


class BulkLanes:
    """Listens for lane connections and binds each to its session.

    ``end_session(session, reason)`` is called when a lane in use breaks: the session cannot
    go on without the bytes it announced.
    """

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        table: SessionTable,
        trail: Trail,
        end_session: Callable[[Session, str], None],
        bans: Bans | None = None,
    ) -> None:
        self.config = config
        self.table = table
        self.trail = trail
        self.bans = bans
        self.end_session = end_session
        self.server: LaneServer | None = None
        self.port = 0
        self._limiter = PendingLimiter(
            per_peer=config.max_pending_per_peer,
            total=config.max_pending,
            max_age_s=config.handshake_timeout_s,
            grace_s=config.pending_grace_s,
        )
        self._lock = threading.Lock()
        self._bytes = [0, 0]  # payload bytes sent, received on lanes
        # Replies of one round are the sizes of the last round's: their buffers come back.
        self._pool = BufferPool()

    @property
    def counts(self) -> tuple[int, int]:
        """Payload bytes (sent, received) on lanes so far."""
        with self._lock:
            return self._bytes[0], self._bytes[1]

    def start(self, stream_port: int) -> None:
        """Listen (unless the lane is off); ``stream_port`` is the gRPC port bound."""
        config = self.config
        if config.data_listen is None:
            return
        if config.data_listen == "auto":
            try:
                host = parse_address(config.listen)[0]
            except ProtocolError:
                host = "0.0.0.0"
            port = stream_port + 1 if stream_port and _port_of(config.listen) else 0
        else:
            host, port = parse_address(config.data_listen)
        context = config.tls.ssl_context() if config.tls is not None else None

        def lane_server(port: int) -> LaneServer:
            return LaneServer(
                host=host,
                port=port,
                context=context,
                token_for=self._token,
                attach=self._attach,
                serve=self._serve,
                rejected=self.trail.lane_rejected,
                timeout_s=config.handshake_timeout_s,
                limiter=self._limiter,
                bans=self.bans,
            )

        try:
            server = lane_server(port)
        except TransportError as exc:
            if config.data_listen != "auto" or port == 0:
                raise
            # Nodes learn the lane's port from the welcome: any free port works for them.
            log.warning("%s; the bulk lane takes a free port instead", exc)
            server = lane_server(0)
        self.server = server.start()
        self.port = server.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- binding connections to sessions -----------------------------------------------------

    def _token(self, lane_id: bytes) -> bytes | None:
        session = self.table.by_lane(lane_id)
        return session.lane_token if session is not None and not session.closed else None

    def _attach(self, lane_id: bytes, direction: bytes, sock: LaneSocket) -> str:
        """Give an authenticated connection to its session's lane (before the node hears it
        is accepted, so the node never announces a reply on a lane the coordinator does not
        know yet); returns why not, or ""."""
        session = self.table.by_lane(lane_id)
        if session is None:
            return "its session ended during the lane handshake"
        with session.lock:
            if session.closed:
                return "its session ended during the lane handshake"
            lane = session.lane = session.lane or SessionLane()
            if (lane.down if direction == DOWN else lane.up) is not None:
                return "the session's bulk lane already has that connection"
            if direction == DOWN:
                lane.down = sock
            else:
                lane.up = sock
        return ""

    def _serve(self, lane_id: bytes, direction: bytes, sock: LaneSocket) -> None:
        """An attached connection (runs on its own thread until the lane closes)."""
        session = self.table.by_lane(lane_id)
        lane = session.lane if session is not None else None
        if session is None or lane is None or sock not in (lane.down, lane.up):
            return  # the session ended meanwhile and closed the lane
        if direction == DOWN:
            log.info("node %s opened its bulk lane from %s", session.node_id, sock.peer)
            threading.Thread(
                target=self._write,
                args=(session, lane, sock),
                name=f"shoal-lane-writer-{session.id}",
                daemon=True,
            ).start()
        if not (sock.closed or lane.watch(sock)):
            return
        with session.lock:
            complete = lane.down is not None and lane.up is not None
            if not complete:  # never used: the node gave up opening the other half
                lane.down = None if lane.down is sock else lane.down
                lane.up = None if lane.up is sock else lane.up
        if complete:
            self.end_session(session, "the node's bulk lane hung up")

    # -- moving bytes ------------------------------------------------------------------------

    def _write(self, session: Session, lane: SessionLane, sock: LaneSocket) -> None:
        while True:
            item = lane.out.get()
            if item is None or session.closed:
                return
            try:
                sock.send(*item)
                with self._lock:
                    self._bytes[0] += memoryview(item[1]).nbytes
            except (TransportError, ProtocolError) as exc:
                self.end_session(session, f"bulk lane lost: {exc}")
                return

    def receive(
        self, sock: LaneSocket, header: pb.ReplyHeader, mac: Poly1305 | None
    ) -> memoryview | None:
        """A reply's bytes, read right after its header (on the session's reader thread).

        The lane frame's task id and size are checked against the header before a byte of
        payload is read; with no ``mac`` (late, cancelled or failed) the bytes are only
        drained. Raises ProtocolError or TransportError.
        """
        task_id, size = sock.read_head()
        # The size was bounded by the reply limit when the signed header arrived.
        if task_id != header.task_id or size != header.size:
            raise ProtocolError(
                f"bulk lane frame ({task_id[:100]!r}, {size} bytes) does not match the "
                f"reply header ({header.task_id[:100]!r}, {header.size} bytes)"
            )
        if mac is None:
            sock.drain(size)
            return None
        payload = sock.read_payload(size, mac=mac, pool=self._pool)
        with self._lock:
            self._bytes[1] += size
        return payload


def _port_of(address: str) -> int:
    try:
        return parse_address(address)[1]
    except ProtocolError:
        return 0
