"""Serving one node's stream: the challenge, the hello, then a reader loop of signed
messages and reply bytes. Ending a session fails its tasks in flight and closes its lane.

The gRPC handler thread is the stream's writer (it yields what the session queues); the
session's reader runs on a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from shoal.errors import ProtocolError
from shoal.runtime.engine import FailureKind
from shoal.runtime.grpc.bulk import BulkLanes
from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.handshake import Handshake
from shoal.runtime.grpc.limits import CALL, DropReason, PendingLimiter, peer_host
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import TO_COORDINATOR_CHUNK, chunk_data, parse_node_frame
from shoal.runtime.grpc.replies import ReplyReader
from shoal.runtime.grpc.sessions import Abort, Session, SessionAbort, SessionTable
from shoal.runtime.grpc.trail import Trail
from shoal.runtime.grpc.transport import FrontDoor

__all__ = ["Streams"]

log = logging.getLogger("shoal.deploy")


class Streams:
    """Serves every node's stream (``serve`` is the gRPC handler) and ends sessions."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        table: SessionTable,
        handshake: Handshake,
        lanes: BulkLanes,
        trail: Trail,
        closing: threading.Event,
    ) -> None:
        self.config = config
        self.table = table
        self.handshake = handshake
        self.lanes = lanes
        self.trail = trail
        self.closing = closing
        # The front door relays every connection to gRPC's private socket: it knows the peer.
        self.door: FrontDoor | None = None
        self.replies = ReplyReader(max_reply_bytes=config.reply_limit, lanes=lanes, trail=trail)
        # Unauthenticated streams: bounded per address and in total (see limits.py).
        self._limiter = PendingLimiter(
            per_peer=config.max_pending_per_peer,
            total=config.max_pending,
            grace_s=config.pending_grace_s,
        )

    def serve(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """One node's stream (runs on a gRPC worker thread, which writes; a reader reads)."""
        if self.closing.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is shutting down")
        session = Session(context)
        level: int | None = CALL
        if self.door is not None:
            # gRPC shares one connection among channels to the same target, so several calls
            # may share it: each is bounded by this limiter, the connection by the door's.
            session.peer = self.door.peer_of(session.via)
            level = self.door.call_opened(session.via)
        if level is None:
            # Cut for a flood of calls, or not through the front door (a local process on
            # gRPC's own socket: a process of this user): either way no node.
            self.trail.rejected(session.peer, _NOT_RELAYED)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _NOT_RELAYED)
            return  # abort raises; this is for the type checker
        ticket = self._limiter.admit(
            peer_host(session.peer), lambda why: self._evict(session, why), level=level
        )
        if ticket is None:
            self.trail.rejected(session.peer, _REFUSED)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _REFUSED)
        session.ticket = ticket
        self.table.add(session)
        if not context.add_callback(lambda: self.end(session, "stream ended")):
            # The call ended before its handler ran (a peer that opens calls and cancels
            # them at once: rapid reset): nothing would ever end the session, and this
            # thread, one of gRPC's pool, would wait for the hello timeout.
            self.end(session, "cancelled before it started")
            return
        yield self.handshake.challenge(session)
        threading.Thread(
            target=self._read,
            args=(session, request_iterator),
            name=f"shoal-reader-{session.id}",
            daemon=True,
        ).start()
        while True:
            item = session.out.get()
            if item is None or item == b"":
                return
            if isinstance(item, Abort):
                context.abort(item.code, item.detail)
                return
            if isinstance(item, bytes):
                yield item
                continue
            for frame in item:
                if session.closed:
                    return
                yield frame

    def end(self, session: Session, reason: str) -> None:
        """End ``session``: its tasks in flight fail as DROPPED, its lane closes."""
        reason = session.end_reason or reason
        with session.lock:
            if session.closed:
                return
            session.closed = True
            pending = list(session.pending.values())
            session.pending.clear()
            lane, session.lane = session.lane, None
            # A reply whose header came but whose bytes had not all arrived.
            inbound, session.inbound = session.inbound, None
        if lane is not None:
            lane.close()
        if inbound is not None and inbound.pending is not None:
            pending.append(inbound.pending)
        for p in pending:
            p.fail(FailureKind.DROPPED, f"node disconnected: {reason}")
        session.out.put(None)
        if session.authenticated:
            log.info("node %s disconnected: %s", session.node_id, reason)
            if not self.closing.is_set():
                self.trail.record("node.disconnected", session.node_id, reason=reason[:500])
        self._limiter.done(session.ticket)
        self.table.remove(session)  # last: finish() waits for this, so the entry is written

    def _evict(self, session: Session, why: DropReason) -> None:
        """Drop an unauthenticated stream to make room for another one (see limits.py)."""
        if session.authenticated:
            return
        self.trail.rejected(session.peer, "dropped while unauthenticated, for another stream")
        self.end(session, "dropped for another stream")
        session.context.cancel()

    # -- the reader ----------------------------------------------------------------------------

    def _read(self, session: Session, request_iterator: Iterator[bytes]) -> None:
        reason = "node closed the stream"
        try:
            for raw in request_iterator:
                session.last_seen = time.monotonic()
                self._on_frame(session, raw)
                if session.closed:
                    return
        except SessionAbort as exc:
            reason = exc.detail
            # Recorded before the peer is told: once a refusal is seen, it is on the record.
            if session.authenticated:
                log.warning("session of node %s aborted: %s", session.node_id, exc.detail)
                self.trail.record("node.session_aborted", session.node_id, reason=exc.detail[:500])
            else:
                self.trail.rejected(session.peer, exc.detail, claimed_key=session.claimed_key)
            session.abort(exc.code, exc.detail)
        except Exception as exc:  # the stream broke: whatever it was, this node is gone
            reason = f"stream failed ({type(exc).__name__})"
        self.end(session, reason)

    def _on_frame(self, session: Session, raw: bytes) -> None:
        inbound = session.inbound
        if inbound is not None:
            data = chunk_data(raw, TO_COORDINATOR_CHUNK)
            if data is None:
                frame = _parse(raw)
                if frame.WhichOneof("kind") != "chunk":
                    raise SessionAbort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"expected {inbound.remaining} more reply bytes, got another frame",
                    )
                data = memoryview(frame.chunk.data)
            self.replies.on_chunk(session, inbound, data)
            return
        frame = _parse(raw)
        if frame.WhichOneof("kind") != "signed":
            raise SessionAbort(
                grpc.StatusCode.INVALID_ARGUMENT, "a chunk arrived that no reply announced"
            )
        if not session.authenticated:
            self._on_hello(session, frame.signed)
            return
        message = self.handshake.open_signed(session, frame.signed, session.public_key)
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            return
        if kind == "reply":
            self.replies.on_header(session, message.reply, message.nonce)
            return
        if kind == "goodbye":
            self.end(session, f"node said goodbye: {message.goodbye.reason[:200]}")
            session.out.put(None)
            return
        raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind!r} message")

    def _on_hello(self, session: Session, signed: pb.Signed) -> None:
        record = self.handshake.hello(session, signed)
        previous = self.table.admit(session, max_nodes=self.config.max_nodes)
        self._limiter.done(session.ticket)
        if self.door is not None:
            self.door.authenticated(session.via)
        if previous is not None:
            self.end(previous, "replaced by a new connection from the same node")
            previous.out.put(None)
        session.send(self.handshake.welcome(record.node_id, data_port=self.lanes.port))
        log.info("node %s connected from %s", record.node_id, session.peer)
        self.trail.record(
            "node.connected",
            record.node_id,
            peer=session.peer,
            partition_index=session.partition_index,
        )


_REFUSED = (
    "refused: too many unauthenticated streams from this address, none of them less far "
    "along than this one (one of its equals was chosen at random to go, and it was this one)"
)
_NOT_RELAYED = (
    "refused: a call on a connection cut for opening too many, or that did not come through "
    "the coordinator's port"
)


def _parse(raw: bytes) -> pb.NodeFrame:
    try:
        return parse_node_frame(raw)
    except ProtocolError as exc:
        raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
