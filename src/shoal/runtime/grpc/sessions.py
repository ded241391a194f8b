"""A node's stream as the coordinator holds it (Session), and the table of live sessions.

A session's writer is its gRPC handler thread, fed through ``out``; its reader is a thread of
its own. The table knows every open stream, the authenticated ones by node id and by bulk
lane id, and wakes whoever waits for nodes to come or go.
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from shoal.runtime.grpc.auth import KeyShare, ReplyKey

if TYPE_CHECKING:
    from shoal.runtime.grpc.bulk import SessionLane
    from shoal.runtime.grpc.pending import Pending
    from shoal.runtime.grpc.replies import Inbound

__all__ = ["Abort", "NodeSessionInfo", "Session", "SessionAbort", "SessionTable", "natural"]


@dataclass(frozen=True, kw_only=True)
class NodeSessionInfo:
    """A connected node, as the coordinator sees it."""

    node_id: str
    peer: str
    connected_s: float
    partition_index: int | None
    key_fingerprint: str
    lane: bool = False  # whether its bulk lane is open


class SessionAbort(Exception):
    """End a node's session with a gRPC status (raised inside the session's reader)."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Abort:
    """Queued for a session's writer: end the stream with this status."""

    code: grpc.StatusCode
    detail: str


class Session:
    """One node's stream: the writer is the gRPC handler thread, the reader its own thread."""

    _ids = itertools.count(1)

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.id = next(self._ids)
        self.context = context
        self.peer = context.peer()
        self.via = self.peer  # gRPC's own view of the peer (the front door's relay)
        self.challenge = os.urandom(32)
        self.share = KeyShare()
        self.reply_key: ReplyKey | None = None
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.out: queue.SimpleQueue[bytes | Iterable[bytes] | Abort | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.pending: dict[str, Pending] = {}
        self.inbound: Inbound | None = None
        self.node_id = ""
        self.public_key = b""
        self.claimed_key = b""
        self.partition_index: int | None = None
        self.authenticated = False
        self.closed = False
        self.lane_id = b""
        self.lane_token = b""
        self.lane: SessionLane | None = None
        self.ticket: int | None = None  # in the engine's limiter of unauthenticated streams
        self.end_reason: str | None = None  # set by abort(reason=...), used by Streams.end
        # Keeps a task's header (stream) and payload (lane) in the same order on both.
        self.send_lock = threading.Lock()

    def send(self, item: bytes | Iterable[bytes]) -> None:
        self.out.put(item)

    def abort(self, code: grpc.StatusCode, detail: str, *, reason: str | None = None) -> None:
        """End the stream with ``code``; ``reason``, if given, is why the session ended
        (whoever ends it first: the aborted stream's own end races the caller's)."""
        if reason is not None:
            self.end_reason = reason
        self.out.put(Abort(code, detail))

    def add_pending(self, pending: Pending) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.pending[pending.wire_id] = pending
            return True

    def pop_pending(self, wire_id: str) -> Pending | None:
        with self.lock:
            return self.pending.pop(wire_id, None)


@functools.lru_cache(maxsize=1 << 16)
def natural(text: str) -> tuple[Any, ...]:
    """Sort key putting n2 before n10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


class SessionTable:
    """Every live stream; the authenticated ones by node id and by bulk lane id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._open: set[Session] = set()  # every live stream, authenticated or not
        self._by_node: dict[str, Session] = {}  # authenticated
        self._by_lane: dict[bytes, Session] = {}

    def add(self, session: Session) -> None:
        with self.lock:
            self._open.add(session)

    def admit(self, session: Session, *, max_nodes: int) -> Session | None:
        """Mark ``session`` authenticated as its node; returns the session it replaces.

        Raises SessionAbort when ``max_nodes`` other nodes are connected.
        """
        with self.lock:
            previous = self._by_node.get(session.node_id)
            if len(self._by_node) >= max_nodes and previous is None:
                raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many nodes")
            session.authenticated = True
            self._by_node[session.node_id] = session
            self._by_lane[session.lane_id] = session
            self.changed.notify_all()
        return previous

    def remove(self, session: Session) -> None:
        with self.changed:
            self._open.discard(session)
            if session.authenticated and self._by_node.get(session.node_id) is session:
                del self._by_node[session.node_id]
            if self._by_lane.get(session.lane_id) is session:
                del self._by_lane[session.lane_id]
            self.changed.notify_all()

    def get(self, node_id: str) -> Session | None:
        with self.lock:
            return self._by_node.get(node_id)

    def by_lane(self, lane_id: bytes) -> Session | None:
        with self.lock:
            return self._by_lane.get(lane_id)

    def all_open(self) -> list[Session]:
        with self.lock:
            return list(self._open)

    def connected(self) -> list[Session]:
        """Authenticated sessions (a closing one may still be among them)."""
        with self.lock:
            return list(self._by_node.values())

    def node_ids(self) -> tuple[str, ...]:
        """Connected nodes: by partition index (if announced), then by id."""
        sessions = [s for s in self.connected() if not s.closed]
        sessions.sort(
            key=lambda s: (s.partition_index is None, s.partition_index or 0, natural(s.node_id))
        )
        return tuple(s.node_id for s in sessions)

    def wait_for(self, count: int, *, timeout_s: float, stop: threading.Event) -> int:
        """Block until ``count`` nodes are connected, ``timeout_s`` passes or ``stop`` is set."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                connected = sum(1 for s in self._by_node.values() if not s.closed)
                remaining = deadline - time.monotonic()
                if connected >= count or remaining <= 0 or stop.is_set():
                    return connected
                self.changed.wait(min(remaining, 0.5))

    def wait_empty(self, timeout_s: float) -> None:
        """Block until every stream has ended or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while self._open and time.monotonic() < deadline:
                self.changed.wait(0.05)
