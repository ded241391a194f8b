"""GrpcEngine: the coordinator side of a real deployment, serving nodes over gRPC.

Nodes dial out to the coordinator and keep one bidirectional stream each (see shoal.proto):
they prove their registered Ed25519 identity, then receive tasks and send back replies and
heartbeats; large payloads travel on each session's bulk lane when it has one.
``dispatch`` keeps the Engine contract as LocalEngine does: one task per node, a deadline
per task, replies in task order, and a disconnect, a late answer or a refused task reported
as the same failure kinds.

This class only assembles the parts and runs the gRPC server; each job is a module:

    config.py     CoordinatorConfig, every setting, checked once
    sessions.py   a node's stream as held here, and the table of live ones
    registry.py   which nodes are admitted (the Store), by key, in which order
    handshake.py  challenge, signed hello, key agreement, welcome
    stream.py     serving a stream: its reader loop, and ending a session
    dispatch.py   sending tasks (inline, bulk lane or chunks), deadlines, cancels
    replies.py    reply bytes back in, checked against the node's signed tag
    bulk.py       the bulk lane's listener, per-session lanes, lane byte counts
    monitor.py    heartbeats, handshake timeouts, revocations
    trail.py      what goes into the audit trail, rejections coalesced
    transport.py  the front door: agrees the transport before gRPC sees a byte
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import fields, replace
from typing import Any

import grpc

from shoal.errors import ConfigError, ProtocolError, TransportError
from shoal.runtime.engine import DispatchResult, Task
from shoal.runtime.grpc.auth import fingerprint
from shoal.runtime.grpc.bans import BanPolicy, Bans
from shoal.runtime.grpc.bulk import BulkLanes
from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.dispatch import Dispatcher
from shoal.runtime.grpc.handshake import Handshake
from shoal.runtime.grpc.lane import parse_address
from shoal.runtime.grpc.limits import PendingLimiter
from shoal.runtime.grpc.monitor import Monitor
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import MAX_FRAME_BYTES
from shoal.runtime.grpc.registry import AdmittedNodes, NodeRegistry
from shoal.runtime.grpc.sessions import NodeSessionInfo, Session, SessionTable
from shoal.runtime.grpc.stream import Streams
from shoal.runtime.grpc.trail import Trail
from shoal.runtime.grpc.transport import FrontDoor

__all__ = ["CoordinatorConfig", "GrpcEngine", "NodeRegistry", "NodeSessionInfo"]

_SERVICE = "shoal.deploy.v1.Coordinator"
_OPTIONS = frozenset(f.name for f in fields(CoordinatorConfig))


class GrpcEngine:
    """Coordinator engine: serves gRPC at ``config.listen`` and runs tasks on connected nodes.

    ``registry`` (a Store) lists the admitted public keys and, when it has ``audit``,
    receives connection and rejection events. ``config`` holds every setting (see
    :class:`CoordinatorConfig`); its fields may also be given as keywords, alone or to
    change a given config.

    >>> engine = GrpcEngine(listen="127.0.0.1:0", registry=store, tls=ServerTLS.from_dir("certs"))
    >>> engine.start().wait_for_nodes(5, timeout_s=60)
    """

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        config: CoordinatorConfig | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigError(
                f"GrpcEngine has no setting {unknown[0]!r}; the settings are CoordinatorConfig's "
                f"fields: {sorted(_OPTIONS)}"
            )
        if config is None:
            if "listen" not in options:
                raise ConfigError("give GrpcEngine listen=HOST:PORT (or config=...)")
            config = CoordinatorConfig(**options)
        elif options:
            config = replace(config, **options)
        self.config = config
        self.registry = registry
        self.coordinator_id = os.urandom(8).hex()
        self._closing = threading.Event()
        self._table = SessionTable()
        self._admitted = AdmittedNodes(registry)
        self._trail = Trail(registry, run_id=config.run_id)
        # One ban list for the front door and the bulk lane: a certificate cut on either is
        # refused on both.
        policy = BanPolicy(
            after=config.ban_after_cuts, window_s=config.ban_window_s, ban_s=config.ban_s
        )
        self._bans = Bans(policy, banned=self._trail.banned)
        self._lanes = BulkLanes(
            config=config,
            table=self._table,
            trail=self._trail,
            bans=self._bans,
            end_session=lambda session, reason: self._streams.end(session, reason),
        )
        self._streams = Streams(
            config=config,
            table=self._table,
            handshake=Handshake(
                config=config, admitted=self._admitted, coordinator_id=self.coordinator_id
            ),
            lanes=self._lanes,
            trail=self._trail,
            closing=self._closing,
        )
        self._dispatcher = Dispatcher(config=config, table=self._table, admitted=self._admitted)
        self._monitor = Monitor(
            config=config,
            table=self._table,
            admitted=self._admitted,
            trail=self._trail,
            end_session=self._streams.end,
            stop=self._closing,
        )
        # Until a node authenticates on it: the TLS/HTTP2 handshake (gRPC's timeout) and
        # then the hello (the monitor's) each take at most handshake_timeout_s; this is the
        # backstop behind both.
        self._door_limiter = PendingLimiter(
            per_peer=config.max_pending_per_peer,
            total=config.max_pending,
            max_age_s=3 * config.handshake_timeout_s,
            grace_s=config.pending_grace_s,
        )
        self._door: FrontDoor | None = None
        self._upstream_dir: str | None = None  # the private directory of gRPC's unix socket
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def data_port(self) -> int:
        """The bulk lane's port (0 when the lane is off)."""
        return self._lanes.port

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> GrpcEngine:
        """Bind and start serving; ``self.port`` is the bound port (useful with port 0)."""
        if self._server is not None:
            return self
        config = self.config
        options = [
            ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
            ("grpc.max_send_message_length", MAX_FRAME_BYTES),
            # Without this, a second coordinator on the same port would silently share it.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # A peer that pings more often than every 10 s while no data flows gets two
            # strikes, then GOAWAY (behind the front door's own frame meter, h2meter.py).
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            # A connection that has not finished its HTTP/2 handshake within this is closed
            # (TLS ends at the front door, within the same time).
            ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout_s * 1000)),
            # A connection with no call open is closed after this. A node always holds its
            # stream open; without it, a plaintext peer that sends HTTP/2's preface and then
            # nothing kept a connection (and two relay threads) forever, unlogged.
            ("grpc.max_connection_idle_ms", int(6 * config.handshake_timeout_s * 1000)),
        ]
        # Room for every node plus every pending stream the limiter allows: a flood of
        # unauthenticated streams is evicted (limits.py), never fills the server.
        slots = config.max_nodes + config.max_pending
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=slots + 8, thread_name_prefix="shoal-session"),
            options=options,
            maximum_concurrent_rpcs=slots,
        )
        handler = grpc.stream_stream_rpc_method_handler(self._streams.serve)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Session": handler}),)
        )
        # Nodes reach gRPC only through the front door, which first tells what each
        # connection speaks (transport.py). gRPC listens on a unix socket in a directory only
        # this user can enter: on a loopback TCP port any local process could flood it around
        # the door's limits (a rapid reset there kept a node out for as long as it ran).
        try:
            host, port = parse_address(config.listen)
        except ProtocolError:
            raise ConfigError(f"listen must be HOST:PORT, got {config.listen!r}") from None
        path: str | None = None
        if hasattr(socket, "AF_UNIX"):
            self._upstream_dir = tempfile.mkdtemp(prefix="shoal-grpc-")  # mode 0700
            path = os.path.join(self._upstream_dir, "grpc.sock")
        address = f"unix:{path}" if path is not None else "127.0.0.1:0"
        # TLS ends at the front door (transport.py), which then reads every frame: gRPC
        # behind it speaks plaintext HTTP/2, and refuses calls that did not come through it.
        tls = None
        if config.tls is not None:
            tls = config.tls.ssl_context()
            tls.set_alpn_protocols(["h2"])  # gRPC clients require HTTP/2 by ALPN
        try:
            upstream = server.add_insecure_port(address)
        except RuntimeError as exc:
            self._remove_upstream_dir()
            raise TransportError(f"cannot open gRPC's own socket ({exc})") from None
        if not upstream:
            self._remove_upstream_dir()
            raise TransportError(f"cannot open gRPC's own socket {address}")
        door = FrontDoor(
            host=host,
            port=port,
            speaks="tls" if config.tls is not None else "plaintext",
            upstream_port=upstream if path is None else 0,
            upstream_path=path,
            mismatch=self._trail.transport_mismatch,
            refused=self._trail.door_refused,
            timeout_s=config.handshake_timeout_s,
            limiter=self._door_limiter,
            tls=tls,
            bans=self._bans,
        )
        self.port = door.port
        try:
            self._lanes.start(door.port)
        except TransportError:
            door.close()
            server.stop(grace=None)
            self._remove_upstream_dir()
            raise
        self._door = self._streams.door = door.start()
        self._admitted.refresh()
        server.start()
        self._server = server
        self._monitor.start()
        return self

    def __enter__(self) -> GrpcEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def finish(self, reason: str = "run finished", *, grace_s: float = 5.0) -> None:
        """Tell every connected node the run is over (they exit) and end their streams."""
        frame = pb.CoordinatorFrame(finish=pb.Finish(reason=reason)).SerializeToString()
        for session in self._table.all_open():
            if session.authenticated:
                session.send(frame)
            session.send(b"")  # marker: end the stream after what is queued
        self._table.wait_empty(grace_s)

    def close(self) -> None:
        """Stop serving; every node still connected is dropped. Idempotent."""
        self._closing.set()
        if self._door is not None:
            self._door.stop_accepting()
        self._lanes.close()
        for session in self._table.all_open():
            self._streams.end(session, "coordinator shut down")
        self._trail.flush(force=True)  # the last window's counts are recorded too
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None
        if self._door is not None:
            self._door.close()
            self._door = None
        self._remove_upstream_dir()
        self._monitor.join(timeout_s=5)

    def _remove_upstream_dir(self) -> None:
        if self._upstream_dir is not None:
            shutil.rmtree(self._upstream_dir, ignore_errors=True)
            self._upstream_dir = None

    # -- the Engine contract -----------------------------------------------------------------

    def node_ids(self) -> Sequence[str]:
        """Connected, authenticated nodes: by partition index (if announced), then by id."""
        return self._table.node_ids()

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        return self._dispatcher.dispatch(tasks, deadline_s=deadline_s)

    # -- what an operator sees ---------------------------------------------------------------

    def sessions(self) -> list[NodeSessionInfo]:
        now = time.monotonic()
        return [_info(s, now) for s in self._table.connected()]

    def wait_for_nodes(self, count: int, *, timeout_s: float) -> int:
        """Block until ``count`` nodes are connected or ``timeout_s`` passes; return how many."""
        return self._table.wait_for(count, timeout_s=timeout_s, stop=self._closing)

    @property
    def lane_bytes(self) -> tuple[int, int]:
        """Payload bytes (sent, received) on bulk lanes so far; the rest went over gRPC."""
        return self._lanes.counts

    @property
    def rejections(self) -> int:
        """Connections refused so far (bad key, signature, replay, malformed frames, lane)."""
        return self._trail.rejections


def _info(session: Session, now: float) -> NodeSessionInfo:
    return NodeSessionInfo(
        node_id=session.node_id,
        peer=session.peer,
        connected_s=now - session.opened,
        partition_index=session.partition_index,
        key_fingerprint=fingerprint(session.public_key),
        lane=session.lane is not None and session.lane.ready,
    )
