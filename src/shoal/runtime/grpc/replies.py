"""Replies coming back: a signed header, then its bytes (inside the header, as stream chunks,
or on the bulk lane), authenticated by the tag the node signed before the dispatch sees them.

A reply for a task that is no longer waited for (late, cancelled, failed) is drained, not
kept. Anything inconsistent ends the session: a node that lies about sizes or tags is not
trusted with the next task either.
"""

from __future__ import annotations

import hmac
import time

import grpc

from shoal.errors import ProtocolError, TransportError
from shoal.runtime.engine import FailureKind, Reply
from shoal.runtime.grpc.auth import ReplyKey
from shoal.runtime.grpc.bulk import BulkLanes
from shoal.runtime.grpc.pending import Pending
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import Assembler
from shoal.runtime.grpc.sessions import Session, SessionAbort
from shoal.runtime.grpc.trail import Trail

__all__ = ["Inbound", "ReplyReader"]

_STATUS_KIND = {
    pb.ERROR: FailureKind.ERROR,
    pb.REJECTED: FailureKind.REJECTED,
    pb.DECLINED: FailureKind.DECLINED,
}


class Inbound:
    """A reply whose bytes are arriving; ``pending`` None means its bytes are discarded.

    Chunks from the stream go to ``assembler``; bytes from the lane are read in one go
    right after the header, fed to ``mac`` as they come.
    """

    def __init__(
        self,
        header: pb.ReplyHeader,
        pending: Pending | None,
        key: ReplyKey,
        nonce: bytes,
        *,
        lane: bool = False,
    ) -> None:
        self.header = header
        self.pending = pending
        self.mac = key.mac(nonce) if pending is not None else None
        self.assembler = (
            Assembler(header.size, mac=self.mac) if pending is not None and not lane else None
        )
        self.remaining = header.size


class ReplyReader:
    """Turns a session's reply frames into its pending tasks' outcomes (on its reader thread)."""

    def __init__(self, *, max_reply_bytes: int, lanes: BulkLanes, trail: Trail) -> None:
        self.max_reply_bytes = max_reply_bytes
        self.lanes = lanes
        self.trail = trail

    def on_header(self, session: Session, header: pb.ReplyHeader, nonce: bytes) -> None:
        pending = session.pop_pending(header.task_id)
        if header.size > self.max_reply_bytes:
            detail = f"reply of {header.size} bytes exceeds the limit of {self.max_reply_bytes}"
            if pending is not None:
                pending.fail(FailureKind.INVALID, detail)
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)
        if pending is not None and header.status != pb.OK:
            kind = _STATUS_KIND.get(header.status, FailureKind.ERROR)
            pending.fail(kind, header.detail or kind.value)
            pending = None
        assert session.reply_key is not None  # set by the hello, before any reply
        if header.HasField("inline"):
            if header.lane or len(header.inline) != header.size:
                if pending is not None:
                    pending.fail(
                        FailureKind.INVALID, "the reply's inline bytes do not match its header"
                    )
                raise SessionAbort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a reply header carries {len(header.inline)} inline bytes but announces "
                    f"{header.size}{' on the bulk lane' if header.lane else ''}",
                )
            if pending is not None:
                payload = memoryview(header.inline)
                tag = session.reply_key.tag(nonce, payload)
                self._deliver(session, pending, header, tag, payload)
            return
        if header.lane and header.size:
            self._from_lane(session, Inbound(header, pending, session.reply_key, nonce, lane=True))
            return
        inbound = Inbound(header, pending, session.reply_key, nonce)
        if header.size:
            session.inbound = inbound
        else:
            self._complete(session, inbound)

    def on_chunk(self, session: Session, inbound: Inbound, data: memoryview) -> None:
        n = data.nbytes
        if n > inbound.remaining:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, "reply overran its announced size")
        inbound.remaining -= n
        if inbound.assembler is not None:
            inbound.assembler.add(data)
        if inbound.remaining == 0:
            session.inbound = None
            self._complete(session, inbound)

    def _from_lane(self, session: Session, inbound: Inbound) -> None:
        pending = inbound.pending
        lane = session.lane
        if lane is None or lane.up is None:
            if pending is not None:
                pending.fail(FailureKind.INVALID, "reply announced on a missing bulk lane")
            raise SessionAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a reply was announced on a bulk lane this session does not have",
            )
        try:
            try:
                payload = self.lanes.receive(lane.up, inbound.header, inbound.mac)
            except ProtocolError as exc:
                if pending is not None:
                    pending.fail(FailureKind.INVALID, str(exc))
                raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except TransportError as exc:
                raise SessionAbort(grpc.StatusCode.UNAVAILABLE, f"bulk lane lost: {exc}") from None
            if pending is not None and inbound.mac is not None and payload is not None:
                self._deliver(session, pending, inbound.header, inbound.mac.finalize(), payload)
        finally:  # whatever went wrong, the task fails now, not at its deadline
            if pending is not None:
                pending.fail(FailureKind.DROPPED, "the bulk lane broke during the reply")

    def _complete(self, session: Session, inbound: Inbound) -> None:
        if inbound.pending is None:
            return  # late, cancelled or failed: its bytes were only drained
        assembler = inbound.assembler
        assert assembler is not None
        self._deliver(
            session, inbound.pending, inbound.header, assembler.tag(), assembler.payload()
        )

    def _deliver(
        self,
        session: Session,
        pending: Pending,
        header: pb.ReplyHeader,
        tag: bytes,
        payload: memoryview,
    ) -> None:
        """Resolve ``pending`` with ``payload`` if ``tag`` is the one the node signed."""
        if not hmac.compare_digest(tag, header.tag):
            pending.fail(
                FailureKind.INVALID,
                "reply bytes do not match the tag the node signed (tampered in transit?)",
            )
            self.trail.record("node.tampered_reply", session.node_id, peer=session.peer)
            raise SessionAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "reply bytes do not match their signed tag; closing the session",
            )
        reply = Reply(
            node_id=pending.task.node_id,
            task_id=pending.task.task_id,
            payload=payload,
            elapsed_s=time.monotonic() - pending.started,
        )
        pending.waiter.resolve(pending.task.node_id, reply)
