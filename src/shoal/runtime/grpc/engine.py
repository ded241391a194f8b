"""GrpcEngine: the coordinator side of a real deployment, serving nodes over gRPC.

Nodes dial out to the coordinator and keep one bidirectional stream each (see shoal.proto):
they prove their registered Ed25519 identity, then receive tasks and send back replies and
heartbeats; large payloads travel on each session's bulk lane (lane.py) when it has one.
``dispatch`` behaves as LocalEngine's does: one task per node, a deadline per task, replies in
task order, and a disconnect, a late answer or a refused task reported as the same failure
kinds.
"""

from __future__ import annotations

import functools
import hmac
import itertools
import logging
import os
import queue
import re
import select
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from shoal.errors import (
    AuthenticationError,
    ConfigError,
    ProtocolError,
    ShoalError,
    TransportError,
)
from shoal.runtime.engine import Buffer, DispatchResult, Failure, FailureKind, Reply, Task
from shoal.runtime.grpc.auth import KeyShare, ReplayGuard, ReplyKey, fingerprint, verify
from shoal.runtime.grpc.certs import ServerTLS
from shoal.runtime.grpc.lane import (
    DOWN,
    LANE_MIN_BYTES,
    BufferPool,
    LaneServer,
    LaneSocket,
    parse_address,
)
from shoal.runtime.grpc.limits import PendingLimiter, RejectionLog, peer_host
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import (
    DEFAULT_CHUNK_BYTES,
    INLINE_MAX_BYTES,
    MAX_CHUNK_BYTES,
    MAX_FRAME_BYTES,
    MIN_PROTOCOL,
    PROTOCOL,
    TO_COORDINATOR_CHUNK,
    TO_NODE_CHUNK,
    Assembler,
    SharedFrames,
    chunk_data,
    parse_node_frame,
    parse_node_message,
)
from shoal.runtime.grpc.transport import FrontDoor
from shoal.runtime.store import NodeRecord
from shoal.wire import WireLimits

__all__ = ["GrpcEngine", "NodeRegistry", "NodeSessionInfo"]

log = logging.getLogger("shoal.deploy")

_SERVICE = "shoal.deploy.v1.Coordinator"
_MAX_DETAIL = 4000
_STATUS_KIND = {
    pb.ERROR: FailureKind.ERROR,
    pb.REJECTED: FailureKind.REJECTED,
    pb.DECLINED: FailureKind.DECLINED,
}


class NodeRegistry(Protocol):
    """Where admitted nodes' public keys live (the Store implements it)."""

    def list_nodes(self, *, include_revoked: bool = True) -> list[NodeRecord]: ...


class _Audit(Protocol):
    def audit(
        self,
        *,
        actor: str,
        action: str,
        detail: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> object: ...


@dataclass(frozen=True, kw_only=True)
class NodeSessionInfo:
    """A connected node, as the coordinator sees it."""

    node_id: str
    peer: str
    connected_s: float
    partition_index: int | None
    key_fingerprint: str
    lane: bool = False  # whether its bulk lane is open


class _SessionAbort(Exception):
    """End a node's session with a gRPC status (raised inside the session's reader)."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    detail: str


class _Waiter:
    """The outcomes of one dispatch; the first outcome for a node wins."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.outcomes: dict[str, Reply | Failure] = {}

    def resolve(self, node_id: str, outcome: Reply | Failure) -> bool:
        with self.cond:
            if node_id in self.outcomes:
                return False
            self.outcomes[node_id] = outcome
            self.cond.notify_all()
            return True


@dataclass(frozen=True, kw_only=True)
class _Pending:
    task: Task
    wire_id: str
    waiter: _Waiter
    started: float

    def fail(self, kind: FailureKind, detail: str) -> bool:
        failure = Failure(
            node_id=self.task.node_id,
            task_id=self.task.task_id,
            kind=kind,
            detail=detail[:_MAX_DETAIL],
        )
        return self.waiter.resolve(self.task.node_id, failure)


class _Inbound:
    """A reply whose bytes are arriving; ``pending`` None means its bytes are discarded.

    Chunks from the stream go to ``assembler``; bytes from the lane are read in one go
    right after the header (``_lane_receive``), which feeds ``mac`` itself.
    """

    def __init__(
        self,
        header: pb.ReplyHeader,
        pending: _Pending | None,
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


class _Lane:
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


class _Session:
    """One node's stream: the writer is the gRPC handler thread, the reader its own thread."""

    _ids = itertools.count(1)

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.id = next(self._ids)
        self.context = context
        self.peer = context.peer()
        self.challenge = os.urandom(32)
        self.share = KeyShare()
        self.reply_key: ReplyKey | None = None
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.out: queue.SimpleQueue[bytes | Iterable[bytes] | _Abort | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.pending: dict[str, _Pending] = {}
        self.inbound: _Inbound | None = None
        self.node_id = ""
        self.public_key = b""
        self.claimed_key = b""
        self.partition_index: int | None = None
        self.authenticated = False
        self.closed = False
        self.lane_id = b""
        self.lane_token = b""
        self.lane: _Lane | None = None
        self.protocol = 0  # agreed in the hello
        self.ticket = -1  # in the engine's limiter of unauthenticated streams
        # Keeps a task's header (stream) and payload (lane) in the same order on both.
        self.send_lock = threading.Lock()

    def send(self, item: bytes | Iterable[bytes]) -> None:
        self.out.put(item)

    def abort(self, code: grpc.StatusCode, detail: str) -> None:
        self.out.put(_Abort(code, detail))

    def add_pending(self, pending: _Pending) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.pending[pending.wire_id] = pending
            return True

    def pop_pending(self, wire_id: str) -> _Pending | None:
        with self.lock:
            return self.pending.pop(wire_id, None)


@functools.lru_cache(maxsize=1 << 16)
def _natural(text: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


class GrpcEngine:
    """Coordinator engine: serves gRPC at ``listen`` and runs tasks on connected nodes.

    ``registry`` (a Store) lists the admitted public keys and, when it has ``audit``, receives
    connection and rejection events. TLS is required unless ``insecure=True``. ``seed`` seeds
    each task's randomness as LocalEngine does, so a deployment repeats a simulation.

    ``data_listen`` is where the bulk lane listens (HOST:PORT, same TLS as the stream):
    ``"auto"`` takes the stream's host and its port + 1 (any free port if that one is taken
    or the stream's port is 0), None turns the lane off (every byte then goes over gRPC).

    >>> engine = GrpcEngine(listen="127.0.0.1:0", registry=store, tls=ServerTLS.from_dir("certs"))
    >>> engine.start().wait_for_nodes(5, timeout_s=60)
    """

    def __init__(
        self,
        *,
        listen: str,
        registry: NodeRegistry,
        data_listen: str | None = "auto",
        tls: ServerTLS | None = None,
        insecure: bool = False,
        seed: int = 0,
        job_digest: str = "",
        heartbeat_s: float = 5.0,
        liveness_s: float | None = None,
        auth_window_s: float = 60.0,
        handshake_timeout_s: float = 5.0,
        max_pending_per_peer: int = 16,
        max_pending: int = 64,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_reply_bytes: int | None = None,
        max_nodes: int = 1024,
        registry_refresh_s: float = 5.0,
        run_id: str | None = None,
    ) -> None:
        if tls is None and not insecure:
            raise ConfigError(
                "the coordinator serves over TLS: give tls=ServerTLS.from_dir(DIR) (make one "
                "with `shoal certs`), or insecure=True for a test on a trusted network"
            )
        if tls is not None and insecure:
            raise ConfigError("give either tls or insecure=True, not both")
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        if heartbeat_s <= 0 or handshake_timeout_s <= 0:
            raise ConfigError("heartbeat_s and handshake_timeout_s must be positive")
        if max_nodes < 1:
            raise ConfigError(f"max_nodes must be at least 1, got {max_nodes}")
        if data_listen is not None and data_listen != "auto":
            try:
                parse_address(data_listen)
            except ProtocolError:
                raise ConfigError(
                    f"data_listen must be HOST:PORT, 'auto' or None, got {data_listen!r}"
                ) from None
        self.listen = listen
        self.data_listen = data_listen
        self.registry = registry
        self.tls = tls
        self.seed = seed
        self.job_digest = job_digest
        self.heartbeat_s = heartbeat_s
        self.liveness_s = liveness_s if liveness_s is not None else 3 * heartbeat_s + 5.0
        self.handshake_timeout_s = handshake_timeout_s
        # Unauthenticated streams and lane connections: bounded per address and in total,
        # the oldest dropped for a newcomer (see limits.py).
        self.max_pending = max_pending
        self._stream_limiter = PendingLimiter(per_peer=max_pending_per_peer, total=max_pending)
        self._lane_limiter = PendingLimiter(per_peer=max_pending_per_peer, total=max_pending)
        self._rejection_log = RejectionLog(self._write_rejection)
        # A node on the wrong transport retries: one line per address, then a count a minute.
        self._mismatch_log = RejectionLog(self._write_mismatch, burst=1)
        self._door_limiter = PendingLimiter(per_peer=max_pending_per_peer, total=max_pending)
        self._door: FrontDoor | None = None
        self.chunk_bytes = chunk_bytes
        self.max_reply_bytes = (
            max_reply_bytes if max_reply_bytes is not None else WireLimits().max_bytes
        )
        self.max_nodes = max_nodes
        self.registry_refresh_s = registry_refresh_s
        self.run_id = run_id
        self.coordinator_id = os.urandom(8).hex()
        self._guard = ReplayGuard(window_s=auth_window_s)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}  # authenticated, by node id
        self._open: set[_Session] = set()  # every live stream, authenticated or not
        self._registry_ids: frozenset[str] = frozenset()
        self._registry_order: dict[str, int] = {}  # node id -> its place in natural order
        self._dispatches = 0
        self._dispatch_lock = threading.Lock()
        self._closing = threading.Event()
        self._server: grpc.Server | None = None
        self._monitor: threading.Thread | None = None
        self._rejections = 0
        self._lane_server: LaneServer | None = None
        self._lane_ids: dict[bytes, _Session] = {}
        self._lane_bytes = [0, 0]  # payload bytes sent, received on lanes
        # Replies of one round are the sizes of the last round's: their buffers come back.
        self._lane_pool = BufferPool()
        self.port = 0
        self.data_port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> GrpcEngine:
        """Bind and start serving; ``self.port`` is the bound port (useful with port 0)."""
        if self._server is not None:
            return self
        options = [
            ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
            ("grpc.max_send_message_length", MAX_FRAME_BYTES),
            # Without this, a second coordinator on the same port would silently share it.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            # A connection that has not finished its TLS/HTTP2 handshake within this is closed.
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
        ]
        # Room for every node plus every pending stream the limiter allows: a flood of
        # unauthenticated streams is evicted oldest-first, never fills the server.
        slots = self.max_nodes + self.max_pending
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=slots + 8, thread_name_prefix="shoal-session"),
            options=options,
            maximum_concurrent_rpcs=slots,
        )
        handler = grpc.stream_stream_rpc_method_handler(self._serve)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Session": handler}),)
        )
        # gRPC listens on loopback only; nodes reach it through the front door, which first
        # tells what each connection speaks (transport.py).
        try:
            host, port = parse_address(self.listen)
        except ProtocolError:
            raise ConfigError(f"listen must be HOST:PORT, got {self.listen!r}") from None
        try:
            if self.tls is not None:
                upstream = server.add_secure_port("127.0.0.1:0", self.tls.credentials())
            else:
                upstream = server.add_insecure_port("127.0.0.1:0")
        except RuntimeError as exc:
            raise TransportError(f"cannot open gRPC's loopback port ({exc})") from None
        if not upstream:
            raise TransportError("cannot open gRPC's loopback port")
        door = FrontDoor(
            host=host,
            port=port,
            speaks="tls" if self.tls is not None else "plaintext",
            upstream_port=upstream,
            mismatch=self._transport_mismatch,
            refused=self._door_refused,
            timeout_s=self.handshake_timeout_s,
            limiter=self._door_limiter,
        )
        self.port = door.port
        try:
            self._lane_server = self._start_lane()
        except TransportError:
            door.close()
            server.stop(grace=None)
            raise
        self._door = door.start()
        self.data_port = self._lane_server.port if self._lane_server is not None else 0
        self._refresh_registry()
        server.start()
        self._server = server
        self._monitor = threading.Thread(target=self._watch, name="shoal-monitor", daemon=True)
        self._monitor.start()
        return self

    def _start_lane(self) -> LaneServer | None:
        if self.data_listen is None:
            return None
        if self.data_listen == "auto":
            try:
                host = parse_address(self.listen)[0]
            except ProtocolError:
                host = "0.0.0.0"
            port = self.port + 1 if self.port and _port_of(self.listen) else 0
        else:
            host, port = parse_address(self.data_listen)
        context = self.tls.ssl_context() if self.tls is not None else None

        def lane_server(port: int) -> LaneServer:
            return LaneServer(
                host=host,
                port=port,
                context=context,
                token_for=self._lane_token,
                attach=self._attach_lane,
                serve=self._serve_lane,
                rejected=self._lane_rejected,
                timeout_s=self.handshake_timeout_s,
                limiter=self._lane_limiter,
            )

        try:
            server = lane_server(port)
        except TransportError as exc:
            if self.data_listen != "auto" or port == 0:
                raise
            # Nodes learn the lane's port from the welcome: any free port works for them.
            log.warning("%s; the bulk lane takes a free port instead", exc)
            server = lane_server(0)
        return server.start()

    def __enter__(self) -> GrpcEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def finish(self, reason: str = "run finished", *, grace_s: float = 5.0) -> None:
        """Tell every connected node the run is over (they exit) and end their streams."""
        frame = pb.CoordinatorFrame(finish=pb.Finish(reason=reason)).SerializeToString()
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            if session.authenticated:
                session.send(frame)
            session.send(b"")  # marker: end the stream after what is queued
        deadline = time.monotonic() + grace_s
        with self._changed:
            while self._open and time.monotonic() < deadline:
                self._changed.wait(0.05)

    def close(self) -> None:
        """Stop serving; every node still connected is dropped."""
        self._closing.set()
        if self._door is not None:
            self._door.stop_accepting()
        if self._lane_server is not None:
            self._lane_server.close()
            self._lane_server = None
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            self._close_session(session, "coordinator shut down")
        self._rejection_log.flush(force=True)  # the last window's counts are recorded too
        self._mismatch_log.flush(force=True)
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None
        if self._door is not None:
            self._door.close()
            self._door = None
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None

    # -- the Engine contract ---------------------------------------------------------------

    def node_ids(self) -> Sequence[str]:
        """Connected, authenticated nodes: by partition index (if announced), then by id."""
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.closed]
        sessions.sort(
            key=lambda s: (
                s.partition_index is None,
                s.partition_index or 0,
                _natural(s.node_id),
            )
        )
        return tuple(s.node_id for s in sessions)

    def sessions(self) -> list[NodeSessionInfo]:
        now = time.monotonic()
        with self._lock:
            sessions = list(self._sessions.values())
        return [
            NodeSessionInfo(
                node_id=s.node_id,
                peer=s.peer,
                connected_s=now - s.opened,
                partition_index=s.partition_index,
                key_fingerprint=fingerprint(s.public_key),
                lane=s.lane is not None and s.lane.ready,
            )
            for s in sessions
        ]

    def wait_for_nodes(self, count: int, *, timeout_s: float) -> int:
        """Block until ``count`` nodes are connected or ``timeout_s`` passes; return how many."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                connected = sum(1 for s in self._sessions.values() if not s.closed)
                remaining = deadline - time.monotonic()
                if connected >= count or remaining <= 0 or self._closing.is_set():
                    return connected
                self._changed.wait(min(remaining, 0.5))

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        if deadline_s <= 0:
            raise ConfigError(f"deadline_s must be positive, got {deadline_s}")
        seen: set[str] = set()
        for task in tasks:
            if task.node_id in seen:
                raise ConfigError(f"node {task.node_id!r} got two tasks in one dispatch")
            seen.add(task.node_id)
        unknown = [t.node_id for t in tasks if t.node_id not in self._registry_ids]
        if unknown:
            self._refresh_registry()
            unknown = [n for n in unknown if n not in self._registry_ids]
            if unknown:
                raise ConfigError(f"no node {unknown[0]!r} in this federation's registry")
        with self._dispatch_lock:
            self._dispatches += 1
            number = self._dispatches
        waiter = _Waiter()
        started = time.monotonic()
        targets: list[tuple[Task, _Session, _Pending]] = []
        for task in tasks:
            with self._lock:
                session = self._sessions.get(task.node_id)
            pending = _Pending(
                task=task, wire_id=f"{number}:{task.task_id}", waiter=waiter, started=started
            )
            if session is None or not session.add_pending(pending):
                pending.fail(FailureKind.DROPPED, "node is not connected")
                continue
            targets.append((task, session, pending))
        # Small payloads ride inside their header. Larger ones go on the lane of each session
        # that has one: the same encoded bytes are sent to every node from one buffer,
        # without a copy. The rest follow their header as chunk frames.
        sizes = [memoryview(task.payload).nbytes for task, _, _ in targets]
        inline = [
            session.protocol >= 4 and 0 < size <= INLINE_MAX_BYTES
            for (_, session, _), size in zip(targets, sizes)
        ]
        lanes = [
            session.lane
            if not small
            and session.lane is not None
            and session.lane.ready
            and size >= LANE_MIN_BYTES
            else None
            for (_, session, _), size, small in zip(targets, sizes, inline)
        ]
        consumers = Counter(
            id(task.payload)
            for (task, _, _), lane, small in zip(targets, lanes, inline)
            if lane is None and not small
        )
        shared: dict[int, SharedFrames] = {}
        for (task, session, pending), lane, size, small in zip(targets, lanes, sizes, inline):
            header = pb.TaskHeader(
                task_id=pending.wire_id,
                name=task.name,
                size=size,
                seed=[self.seed, self._index(session), number],
                deadline_s=deadline_s,
                lane=lane is not None,
            )
            if task.keep_as is not None:
                header.keep_as = task.keep_as
            if small:
                header.inline = bytes(task.payload)
            head = pb.CoordinatorFrame(task=header).SerializeToString()
            if small:
                session.send(head)
                continue
            if lane is not None:
                with session.send_lock:
                    session.send(head)
                    lane.out.put((pending.wire_id, task.payload))
                continue
            frames = shared.get(id(task.payload))
            if frames is None:
                frames = SharedFrames(
                    task.payload,
                    tag=TO_NODE_CHUNK,
                    chunk_bytes=self.chunk_bytes,
                    consumers=consumers[id(task.payload)],
                )
                shared[id(task.payload)] = frames
            with session.send_lock:
                session.send(itertools.chain((head,), frames.frames()))
        del shared, lanes
        deadline = started + deadline_s
        with waiter.cond:
            while len(waiter.outcomes) < len(tasks):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiter.cond.wait(remaining)
        for _, session, pending in targets:
            if pending.fail(FailureKind.TIMEOUT, f"no answer within {deadline_s} s"):
                session.pop_pending(pending.wire_id)
                cancel = pb.CoordinatorFrame(cancel=pb.Cancel(task_id=pending.wire_id))
                session.send(cancel.SerializeToString())
        replies: dict[str, Reply] = {}
        failures: dict[str, Failure] = {}
        for task in tasks:  # task order, whatever the arrival order: sums stay reproducible
            outcome = waiter.outcomes[task.node_id]
            if isinstance(outcome, Reply):
                replies[task.node_id] = outcome
            else:
                failures[task.node_id] = outcome
        return DispatchResult(replies=replies, failures=failures)

    def _index(self, session: _Session) -> int:
        if session.partition_index is not None:
            return session.partition_index
        order = self._registry_order
        return order.get(session.node_id, len(order))

    # -- serving ---------------------------------------------------------------------------

    def _serve(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """One node's stream (runs on a gRPC worker thread, which writes; a reader reads)."""
        if self._closing.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is shutting down")
        session = _Session(context)
        if self._door is not None:
            session.peer = self._door.peer_of(session.peer)
        with self._lock:
            self._open.add(session)
        session.ticket = self._stream_limiter.admit(
            peer_host(session.peer), lambda: self._evict(session)
        )
        context.add_callback(lambda: self._close_session(session, "stream ended"))
        challenge = pb.Challenge(
            protocol=PROTOCOL,
            coordinator_id=self.coordinator_id,
            challenge=session.challenge,
            server_time_ms=int(time.time() * 1000),
            key_share=session.share.public,
        )
        yield pb.CoordinatorFrame(challenge=challenge).SerializeToString()
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
            if isinstance(item, _Abort):
                context.abort(item.code, item.detail)
                return
            if isinstance(item, bytes):
                yield item
                continue
            for frame in item:
                if session.closed:
                    return
                yield frame

    def _read(self, session: _Session, request_iterator: Iterator[bytes]) -> None:
        reason = "node closed the stream"
        try:
            for raw in request_iterator:
                session.last_seen = time.monotonic()
                self._on_frame(session, raw)
                if session.closed:
                    return
        except _SessionAbort as exc:
            reason = exc.detail
            # Recorded before the peer is told: once a refusal is seen, it is on the record.
            if session.authenticated:
                log.warning("session of node %s aborted: %s", session.node_id, exc.detail)
                self._audit("node.session_aborted", session.node_id, reason=exc.detail[:500])
            else:
                self._rejected(session, exc.detail, claimed_key=session.claimed_key)
            session.abort(exc.code, exc.detail)
        except Exception as exc:  # the stream broke: whatever it was, this node is gone
            reason = f"stream failed ({type(exc).__name__})"
        self._close_session(session, reason)

    def _on_frame(self, session: _Session, raw: bytes) -> None:
        inbound = session.inbound
        if inbound is not None:
            data = chunk_data(raw, TO_COORDINATOR_CHUNK)
            if data is None:
                frame = self._parse(raw)
                if frame.WhichOneof("kind") != "chunk":
                    raise _SessionAbort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"expected {inbound.remaining} more reply bytes, got another frame",
                    )
                data = memoryview(frame.chunk.data)
            self._on_chunk(session, inbound, data)
            return
        frame = self._parse(raw)
        if frame.WhichOneof("kind") != "signed":
            raise _SessionAbort(
                grpc.StatusCode.INVALID_ARGUMENT, "a chunk arrived that no reply announced"
            )
        if not session.authenticated:
            self._on_hello(session, frame.signed)
            return
        message = self._open_signed(session, frame.signed, session.public_key)
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            return
        if kind == "reply":
            self._on_reply(session, message.reply, message.nonce)
            return
        if kind == "goodbye":
            self._close_session(session, f"node said goodbye: {message.goodbye.reason[:200]}")
            session.out.put(None)
            return
        raise _SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind!r} message")

    @staticmethod
    def _parse(raw: bytes) -> pb.NodeFrame:
        try:
            return parse_node_frame(raw)
        except ProtocolError as exc:
            raise _SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _open_signed(
        self, session: _Session, signed: pb.Signed, public_key: bytes
    ) -> pb.NodeMessage:
        """Verify signature, session binding, freshness and nonce of a signed message."""
        if not verify(public_key, signed.body, signed.signature):
            raise _SessionAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "bad signature: the message was not signed by the node's registered key "
                "(impersonation or tampering)",
            )
        try:
            message = parse_node_message(signed.body)
        except ProtocolError as exc:
            raise _SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not hmac.compare_digest(message.challenge, session.challenge):
            raise _SessionAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "message belongs to another session (replayed from an earlier connection)",
            )
        try:
            self._guard.check(
                timestamp_ms=message.timestamp_ms, nonce=message.nonce, scope=public_key
            )
        except AuthenticationError as exc:
            raise _SessionAbort(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        return message

    def _on_hello(self, session: _Session, signed: pb.Signed) -> None:
        try:
            try:
                claimed = parse_node_message(signed.body)
            except ProtocolError as exc:
                raise _SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            if claimed.WhichOneof("kind") != "hello":
                raise _SessionAbort(
                    grpc.StatusCode.UNAUTHENTICATED, "the first message must be a signed hello"
                )
            record = self._lookup(claimed.hello.public_key)
            message = self._open_signed(session, signed, record.public_key)
            hello = message.hello
            if not MIN_PROTOCOL <= hello.protocol <= PROTOCOL:
                raise _SessionAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node speaks protocol {hello.protocol}, this coordinator "
                    f"{MIN_PROTOCOL}..{PROTOCOL}; run the same shoal version on both sides",
                )
            if self.job_digest and hello.job_digest and hello.job_digest != self.job_digest:
                raise _SessionAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node was started for job {hello.job_digest[:12]}, this coordinator runs "
                    f"job {self.job_digest[:12]}; give both the same job file",
                )
            try:
                reply_key = session.share.agree(
                    hello.key_share,
                    challenge=session.challenge,
                    coordinator_share=session.share.public,
                    node_share=hello.key_share,
                    node_key=record.public_key,
                )
            except AuthenticationError as exc:
                raise _SessionAbort(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        except _SessionAbort:
            session.claimed_key = _key_of(signed)
            raise
        session.reply_key = reply_key
        session.protocol = hello.protocol
        session.lane_id, session.lane_token = reply_key.lane()
        session.node_id = record.node_id
        session.public_key = record.public_key
        if hello.HasField("partition_index") and 0 <= hello.partition_index < 1 << 31:
            session.partition_index = int(hello.partition_index)
        with self._lock:
            previous = self._sessions.get(record.node_id)
            if len(self._sessions) >= self.max_nodes and previous is None:
                raise _SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many nodes")
            session.authenticated = True
            self._stream_limiter.done(session.ticket)
            self._sessions[record.node_id] = session
            self._lane_ids[session.lane_id] = session
            self._changed.notify_all()
        if previous is not None:
            self._close_session(previous, "replaced by a new connection from the same node")
            previous.out.put(None)
        welcome = pb.Welcome(
            node_id=record.node_id,
            job_digest=self.job_digest,
            heartbeat_s=self.heartbeat_s,
            chunk_bytes=self.chunk_bytes,
            max_reply_bytes=self.max_reply_bytes,
            # A protocol 2 node knows no lane: it would ignore the field anyway.
            data_port=self.data_port if hello.protocol >= 3 else 0,
        )
        session.send(pb.CoordinatorFrame(welcome=welcome).SerializeToString())
        log.info("node %s connected from %s", record.node_id, session.peer)
        self._audit(
            "node.connected",
            record.node_id,
            peer=session.peer,
            partition_index=session.partition_index,
        )

    def _lookup(self, public_key: bytes) -> NodeRecord:
        records = self.registry.list_nodes(include_revoked=True)
        self._set_registry(r.node_id for r in records if not r.revoked)
        for record in records:
            if hmac.compare_digest(record.public_key, public_key):
                if record.revoked:
                    raise _SessionAbort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"node {record.node_id!r} has been revoked",
                    )
                return record
        raise _SessionAbort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"public key {fingerprint(public_key)} is not registered with this coordinator; "
            "its operator admits a node with `shoal nodes add NODE.pub`",
        )

    def _on_reply(self, session: _Session, header: pb.ReplyHeader, nonce: bytes) -> None:
        pending = session.pop_pending(header.task_id)
        if header.size > self.max_reply_bytes:
            if pending is not None:
                pending.fail(
                    FailureKind.INVALID,
                    f"reply of {header.size} bytes exceeds the limit of {self.max_reply_bytes}",
                )
            raise _SessionAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reply of {header.size} bytes exceeds the limit of {self.max_reply_bytes}",
            )
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
                raise _SessionAbort(
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
            lane = session.lane
            if lane is None or lane.up is None:
                if pending is not None:
                    pending.fail(FailureKind.INVALID, "reply announced on a missing bulk lane")
                raise _SessionAbort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "a reply was announced on a bulk lane this session does not have",
                )
            inbound = _Inbound(header, pending, session.reply_key, nonce, lane=True)
            try:
                self._lane_receive(session, lane.up, inbound)
            finally:  # whatever went wrong, the task fails now, not at its deadline
                if pending is not None:
                    pending.fail(FailureKind.DROPPED, "the bulk lane broke during the reply")
            return
        inbound = _Inbound(header, pending, session.reply_key, nonce)
        if header.size:
            session.inbound = inbound
        else:
            self._complete(session, inbound)

    def _on_chunk(self, session: _Session, inbound: _Inbound, data: memoryview) -> None:
        n = data.nbytes
        if n > inbound.remaining:
            raise _SessionAbort(
                grpc.StatusCode.INVALID_ARGUMENT, "reply overran its announced size"
            )
        inbound.remaining -= n
        if inbound.assembler is not None:
            inbound.assembler.add(data)
        if inbound.remaining == 0:
            session.inbound = None
            self._complete(session, inbound)

    def _complete(self, session: _Session, inbound: _Inbound) -> None:
        if inbound.pending is None:
            return  # late, cancelled or failed: its bytes were only drained
        assembler = inbound.assembler
        assert assembler is not None
        self._deliver(
            session, inbound.pending, inbound.header, assembler.tag(), assembler.payload()
        )

    def _deliver(
        self,
        session: _Session,
        pending: _Pending,
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
            self._audit("node.tampered_reply", session.node_id, peer=session.peer)
            raise _SessionAbort(
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

    def _close_session(self, session: _Session, reason: str) -> None:
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
            if not self._closing.is_set():
                self._audit("node.disconnected", session.node_id, reason=reason[:500])
        self._stream_limiter.done(session.ticket)
        with self._changed:  # last: finish() waits for this, so the audit entry is written
            self._open.discard(session)
            if session.authenticated and self._sessions.get(session.node_id) is session:
                del self._sessions[session.node_id]
            if self._lane_ids.get(session.lane_id) is session:
                del self._lane_ids[session.lane_id]
            self._changed.notify_all()

    # -- the bulk lane ---------------------------------------------------------------------

    def _lane_token(self, lane_id: bytes) -> bytes | None:
        with self._lock:
            session = self._lane_ids.get(lane_id)
        return session.lane_token if session is not None and not session.closed else None

    def _attach_lane(self, lane_id: bytes, direction: bytes, sock: LaneSocket) -> str:
        """Give an authenticated connection to its session's lane (before the node hears it
        is accepted, so the node never announces a reply on a lane the coordinator does not
        know yet); returns why not, or ""."""
        with self._lock:
            session = self._lane_ids.get(lane_id)
        if session is None:
            return "its session ended during the lane handshake"
        with session.lock:
            if session.closed:
                return "its session ended during the lane handshake"
            lane = session.lane = session.lane or _Lane()
            if (lane.down if direction == DOWN else lane.up) is not None:
                return "the session's bulk lane already has that connection"
            if direction == DOWN:
                lane.down = sock
            else:
                lane.up = sock
        return ""

    def _serve_lane(self, lane_id: bytes, direction: bytes, sock: LaneSocket) -> None:
        """An attached connection (runs on its own thread until the lane closes)."""
        with self._lock:
            session = self._lane_ids.get(lane_id)
        lane = session.lane if session is not None else None
        if session is None or lane is None or sock not in (lane.down, lane.up):
            return  # the session ended meanwhile and closed the lane
        if direction == DOWN:
            log.info("node %s opened its bulk lane from %s", session.node_id, sock.peer)
            threading.Thread(
                target=self._lane_write,
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
            self._close_session(session, "the node's bulk lane hung up")

    def _lane_write(self, session: _Session, lane: _Lane, sock: LaneSocket) -> None:
        while True:
            item = lane.out.get()
            if item is None or session.closed:
                return
            try:
                sock.send(*item)
                with self._lock:
                    self._lane_bytes[0] += memoryview(item[1]).nbytes
            except (TransportError, ProtocolError) as exc:
                self._close_session(session, f"bulk lane lost: {exc}")
                return

    def _lane_receive(self, session: _Session, lane: LaneSocket, inbound: _Inbound) -> None:
        """Read a reply's bytes from the lane, right after its header (on the reader thread)."""
        header, pending = inbound.header, inbound.pending
        try:
            task_id, size = lane.read_head()
            # Checked before a byte of payload is read or a buffer allocated; the size was
            # bounded by max_reply_bytes when the signed header arrived.
            if task_id != header.task_id or size != header.size:
                raise ProtocolError(
                    f"bulk lane frame ({task_id[:100]!r}, {size} bytes) does not match the "
                    f"reply header ({header.task_id[:100]!r}, {header.size} bytes)"
                )
            if pending is None or inbound.mac is None:
                lane.drain(size)  # late, cancelled or failed: only drained
                return
            payload = lane.read_payload(size, mac=inbound.mac, pool=self._lane_pool)
        except ProtocolError as exc:
            if pending is not None:
                pending.fail(FailureKind.INVALID, str(exc))
            raise _SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except TransportError as exc:
            raise _SessionAbort(grpc.StatusCode.UNAVAILABLE, f"bulk lane lost: {exc}") from None
        with self._lock:
            self._lane_bytes[1] += size
        self._deliver(session, pending, header, inbound.mac.finalize(), payload)

    def _lane_rejected(self, peer: str, reason: str) -> None:
        self._rejections += 1
        self._rejection_log.record(
            peer_host(peer),
            reason,
            {"action": "node.lane_rejected", "peer": peer, "reason": reason[:500]},
        )

    def _transport_mismatch(self, host: str, line: str) -> None:
        self._rejections += 1
        self._mismatch_log.record(
            host, line, {"action": "node.transport_mismatch", "peer": host, "reason": line}
        )

    def _write_mismatch(self, detail: dict[str, Any]) -> None:
        action = detail.pop("action", "node.transport_mismatch")
        if "summary" in detail:
            detail["summary"] = detail["summary"].replace(
                "rejected connections", "connections on the wrong transport"
            )
            log.warning("%s", detail["summary"])
            self._audit("node.transport_mismatch_summary", "unknown", **detail)
            return
        log.warning("%s", detail["reason"])
        self._audit(action, "unknown", **detail)

    def _door_refused(self, host: str, reason: str) -> None:
        self._rejections += 1
        self._rejection_log.record(
            host, reason, {"action": "node.rejected", "peer": host, "reason": reason[:500]}
        )

    def _evict(self, session: _Session) -> None:
        """Drop an unauthenticated stream to make room for a newer one (see limits.py)."""
        if session.authenticated:
            return
        self._rejected(
            session, "dropped while unauthenticated, for a newer connection", claimed_key=b""
        )
        self._close_session(session, "dropped for a newer connection")
        session.context.cancel()

    def _write_rejection(self, detail: dict[str, Any]) -> None:
        action = detail.pop("action", "node.rejected")
        if "summary" in detail:
            log.warning("%s (%s)", detail["summary"], detail["reason"])
            self._audit("node.rejected_summary", "unknown", **detail)
            return
        what = "bulk lane connection" if action == "node.lane_rejected" else "connection"
        log.warning("rejected %s from %s: %s", what, detail.get("peer"), detail.get("reason"))
        self._audit(action, "unknown", **detail)

    # -- housekeeping ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Drop silent nodes, unfinished handshakes and revoked nodes."""
        tick = min(1.0, self.heartbeat_s / 2, self.registry_refresh_s)
        last_registry = time.monotonic()
        while not self._closing.wait(tick):
            self._rejection_log.flush()
            self._mismatch_log.flush()
            now = time.monotonic()
            with self._lock:
                sessions = list(self._open)
            for s in sessions:
                if not s.authenticated and now - s.opened > self.handshake_timeout_s:
                    self._rejected(s, "no hello within the handshake timeout", claimed_key=b"")
                    self._close_session(s, "handshake timed out")
                    s.context.cancel()
                elif s.authenticated and now - s.last_seen > self.liveness_s:
                    self._close_session(s, f"silent for {now - s.last_seen:.0f} s")
                    s.context.cancel()
            if now - last_registry > self.registry_refresh_s:
                last_registry = now
                self._refresh_registry()
                with self._lock:
                    evicted = [
                        s for s in self._sessions.values() if s.node_id not in self._registry_ids
                    ]
                for s in evicted:
                    s.abort(grpc.StatusCode.PERMISSION_DENIED, "node was revoked")
                    self._close_session(s, "revoked")

    def _refresh_registry(self) -> None:
        try:
            records = self.registry.list_nodes(include_revoked=False)
        except ShoalError as exc:
            log.warning("cannot read the node registry: %s", exc)
            return
        self._set_registry(r.node_id for r in records)

    def _set_registry(self, node_ids: Iterable[str]) -> None:
        ids = frozenset(node_ids)
        if ids != self._registry_ids:  # sorting is the costly part: redo it only on a change
            order = {v: i for i, v in enumerate(sorted(ids, key=_natural))}
            self._registry_ids, self._registry_order = ids, order

    def _rejected(self, session: _Session, reason: str, *, claimed_key: bytes) -> None:
        self._rejections += 1
        # Coalesced per address: a flood of bad connections is counted, not written out
        # one fsync at a time, and none goes unrecorded.
        self._rejection_log.record(
            peer_host(session.peer),
            reason,
            {
                "action": "node.rejected",
                "peer": session.peer,
                "reason": reason[:500],
                "key": fingerprint(claimed_key) if claimed_key else "",
            },
        )

    def _audit(self, action: str, actor: str, **detail: Any) -> None:
        audit = getattr(self.registry, "audit", None)
        if audit is None:
            return
        try:
            audit(actor=actor or "unknown", action=action, detail=detail, run_id=self.run_id)
        except ShoalError as exc:
            log.warning("cannot write the audit log: %s", exc)

    @property
    def lane_bytes(self) -> tuple[int, int]:
        """Payload bytes (sent, received) on bulk lanes so far; the rest went over gRPC."""
        with self._lock:
            return self._lane_bytes[0], self._lane_bytes[1]

    @property
    def rejections(self) -> int:
        """Connections refused so far (bad key, signature, replay, malformed frames, lane)."""
        return self._rejections


def _port_of(address: str) -> int:
    try:
        return parse_address(address)[1]
    except ProtocolError:
        return 0


def _key_of(signed: pb.Signed) -> bytes:
    try:
        message = parse_node_message(signed.body)
    except ProtocolError:
        return b""
    return bytes(message.hello.public_key) if message.WhichOneof("kind") == "hello" else b""
