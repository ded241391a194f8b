"""NodeClient: the node side of a deployment. It dials out, proves its identity, runs tasks.

A node opens one stream to the coordinator (so it works from behind NAT), answers the
coordinator's challenge with a signed hello, then runs the tasks its NodeApp registered,
one at a time, and signs every reply and heartbeat; large payloads travel on a bulk lane beside
the stream when the coordinator offers one (lane.py). When the stream breaks it reconnects
with exponential backoff and jitter; it stops when the coordinator says the run is over.
"""

from __future__ import annotations

import enum
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import shoal
from shoal.errors import (
    AuthenticationError,
    ConfigError,
    PrivacyBudgetExceeded,
    ProtocolError,
    ReleaseRefused,
    TransportError,
    UnknownTask,
    WireError,
)
from shoal.runtime.app import NodeApp, TaskContext
from shoal.runtime.engine import DECLINED_DETAIL
from shoal.runtime.grpc.certs import ClientTLS
from shoal.runtime.grpc.lane import (
    DOWN,
    LANE_MIN_BYTES,
    UP,
    BufferPool,
    LaneSocket,
    connect_lane,
    parse_address,
)
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import (
    DEFAULT_CHUNK_BYTES,
    INLINE_MAX_BYTES,
    MAX_CHUNK_BYTES,
    MAX_FRAME_BYTES,
    METHOD,
    PROTOCOL,
    TO_COORDINATOR_CHUNK,
    TO_NODE_CHUNK,
    Assembler,
    NodeSigner,
    chunk_data,
    chunk_frames,
    parse_coordinator_frame,
)
from shoal.runtime.grpc.transport import agree, mismatch_line
from shoal.runtime.nodestate import NODE_STATE_KEY, NodeState

__all__ = ["Backoff", "NodeClient", "NodeExit", "explain_connect_error"]

log = logging.getLogger("shoal.deploy.node")

_MAX_DETAIL = 4000
# The coordinator refused this node for good: retrying cannot help.
_FATAL = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,  # not a shoal coordinator at that address
}


class NodeExit(str, enum.Enum):
    """Why :meth:`NodeClient.run` returned."""

    FINISHED = "finished"  # the coordinator said the run is over
    IDLE = "idle"  # no task for max_idle_s seconds
    STOPPED = "stopped"  # stop() was called
    REJECTED = "rejected"  # the coordinator refused this node (unregistered, revoked, wrong job)


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Reconnect delays: ``initial_s * 2**attempt`` capped at ``max_s``, with jitter.

    Each delay is drawn uniformly from [d/2, d], so nodes cut off together (a coordinator
    restart) do not all knock again in the same instant.
    """

    initial_s: float = 0.5
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ConfigError("backoff needs 0 < initial_s <= max_s")

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.max_s, self.initial_s * 2 ** min(attempt, 32))
        return rng.uniform(cap / 2, cap)


# The bulk lane's own retries within a session (jittered, 0.05 s doubling up to 1 s: at most
# ~4 s in all) before its payloads fall back to the gRPC stream for the session.
_LANE_ATTEMPTS = 8
_LANE_BACKOFF = Backoff(initial_s=0.05, max_s=1.0)


class _Rejected(Exception):
    pass


# gRPC's connection errors, as the words its details carry, and what they mean to an
# operator. Checked in order; the first match explains the failure.
_CONNECT_ERRORS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("WRONG_VERSION_NUMBER", "wrong version number", "packet length too long"),
        mismatch_line(side="node", coordinator="plaintext"),
    ),
    (
        ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "unable to get local issuer"),
        "the coordinator's certificate is not signed by this node's CA: --certs holds a "
        "different federation's ca.pem (copy the coordinator's ca.pem)",
    ),
    (
        ("not in peer certificate", "Peer name", "hostname mismatch", "does not match"),
        "the coordinator's certificate does not name the host dialled: add it with "
        "`shoal certs --host NAME`, or pass --server-name",
    ),
    (
        ("Connection refused",),
        "connection refused: nothing listens there (is the coordinator running, on this "
        "host and port?)",
    ),
    (
        ("Network is unreachable", "No route to host"),
        "the coordinator's host is unreachable (a wrong address, or a firewall drops the packets)",
    ),
    (
        # gRPC is dialled only after the transport agreement was answered on the same port:
        # a timeout now is not an unreachable host but a handshake nobody finished
        ("Timeout occurred", "Deadline", "timed out"),
        "the coordinator answered shoal's transport agreement, but its gRPC handshake did not "
        "finish within the connect timeout (an overloaded coordinator, or something between "
        "that holds the connection)",
    ),
    (
        ("Failed parsing HTTP/2", "Expected SETTINGS frame"),
        "the coordinator answered shoal's transport agreement, but then did not speak gRPC "
        "(something between rewrites the connection, or another service shares the port)",
    ),
    (
        ("DNS resolution failed", "Name or service not known", "not resolve"),
        "the coordinator's host name does not resolve (check --coordinator)",
    ),
    (
        (
            "Socket closed",
            "Connection reset",
            "failed to receive server preface",
            "Broken pipe",
            "End of TCP stream",
            "Connection closed",
        ),
        "the coordinator closed the connection at once (a proxy between that expects "
        "another transport, or the coordinator is shutting down)",
    ),
)


def explain_connect_error(details: str) -> str | None:
    """What a failed gRPC connection means, from its details text (None if not known)."""
    lowered = details.lower()
    for needles, meaning in _CONNECT_ERRORS:
        if any(n.lower() in lowered for n in needles):
            return meaning
    return None


@dataclass
class _Incoming:
    header: pb.TaskHeader
    assembler: Assembler | None  # None: the bytes are drained and the task refused (or on the lane)
    refusal: str
    remaining: int
    lane: bool = False  # the bytes come on the bulk lane, read by the worker


class NodeClient:
    """Serve ``app``'s tasks on ``data`` to the coordinator at ``coordinator`` (HOST:PORT).

    ``key`` is the node's Ed25519 identity (registered at the coordinator); ``tls`` the
    federation CA and this node's certificate, or ``insecure=True`` for plaintext (testing
    only). ``partition_index`` tells the coordinator which simulated node this one stands
    for, so a deployment can repeat a simulation exactly. ``job_digest``, when given, must
    match the coordinator's job. ``lane=False`` keeps every byte on the gRPC stream even if
    the coordinator offers a bulk lane (for a network that lets only one port through).
    ``connect_timeout_s`` bounds the transport agreement and gRPC's connection attempt (a
    port that accepts and then says nothing is reported after it, not gRPC's 20 s).
    ``node_state`` holds the owner's privacy ledger and the node's audit log (durable with
    :func:`shoal.runtime.open_node_state`; in memory by default).
    """

    def __init__(
        self,
        *,
        app: NodeApp,
        coordinator: str,
        key: Ed25519PrivateKey,
        data: Any = None,
        tls: ClientTLS | None = None,
        insecure: bool = False,
        partition_index: int | None = None,
        job_digest: str = "",
        backoff: Backoff | None = None,
        max_idle_s: float | None = None,
        seed: int | None = None,
        lane: bool = True,
        on_retry: Callable[[int, float, str], None] | None = None,
        node_state: NodeState | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if tls is None and not insecure:
            raise ConfigError(
                "a node connects over TLS: give tls=ClientTLS.from_dir(DIR), or insecure=True "
                "for a test on a trusted network"
            )
        if tls is not None and insecure:
            raise ConfigError("give either tls or insecure=True, not both")
        if max_idle_s is not None and max_idle_s <= 0:
            raise ConfigError(f"max_idle_s must be positive, got {max_idle_s}")
        if connect_timeout_s <= 0:
            raise ConfigError(f"connect_timeout_s must be positive, got {connect_timeout_s}")
        try:  # a typo in the address is not worth retrying forever (the port's range is
            # agree()'s to check: a client built but never run may name port 0)
            parse_address(coordinator)
        except ProtocolError as exc:
            raise ConfigError(f"--coordinator: {exc}") from None
        # gRPC's own connect timeout is 20 s; a node says why it cannot connect within seconds
        self.connect_timeout_s = connect_timeout_s
        self.app = app
        self.coordinator = coordinator
        self.key = key
        self.data = data
        self.tls = tls
        self.partition_index = partition_index
        self.job_digest = job_digest
        self.backoff = backoff or Backoff()
        self.max_idle_s = max_idle_s
        self.use_lane = lane
        self.lane_open = False  # whether the current session's bulk lane is up
        self.node_id: str | None = None
        self.state: dict[str, Any] = {}  # persists across tasks and reconnections
        # The owner's ledger and audit log: durable when given (shoal node --state).
        self.node_state = node_state if node_state is not None else NodeState()
        self.state[NODE_STATE_KEY] = self.node_state
        self.tasks_done = 0
        self.tasks_failed = 0  # ended in an error (not a refusal or a budget decline)
        self.last_failure = ""
        self.on_retry = on_retry  # (attempt, delay_s, reason) before each reconnection
        self.sessions = 0
        self.detail = ""  # why the last session ended
        self._seed = seed
        self._rng = random.SystemRandom()
        self._stop = threading.Event()
        self._call: Any = None
        self._last_activity = time.monotonic()
        # Session settings, from the coordinator's welcome.
        self._chunk_bytes = DEFAULT_CHUNK_BYTES
        self._max_reply = 0
        self._heartbeat_s = 5.0
        self._data_port = 0
        self._lane_pool = BufferPool()  # task buffers come back once a task lets go of them

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def _idle(self) -> bool:
        return (
            self.max_idle_s is not None and time.monotonic() - self._last_activity > self.max_idle_s
        )

    def run(self) -> NodeExit:
        """Serve until the run finishes, the node idles out, is stopped or is refused."""
        attempt = 0
        self._last_activity = time.monotonic()
        while True:
            if self._stop.is_set():
                return NodeExit.STOPPED
            welcomed = [False]
            try:
                outcome = self._session(welcomed)
            except _Rejected as exc:
                self.detail = str(exc)
                log.info("coordinator refused this node: %s", exc)  # the caller reports it
                return NodeExit.REJECTED
            if outcome is not None:
                return outcome
            if welcomed[0]:
                attempt = 0
            if self._stop.is_set():
                return NodeExit.STOPPED
            if self._idle():
                return NodeExit.IDLE
            delay = self.backoff.delay(attempt, self._rng)
            attempt += 1
            log.info("reconnecting in %.1f s (%s)", delay, self.detail)
            if self.on_retry is not None:
                self.on_retry(attempt, delay, self.detail)
            if self._stop.wait(delay):
                return NodeExit.STOPPED

    # -- one session -----------------------------------------------------------------------

    def _channel(self) -> grpc.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
            ("grpc.max_send_message_length", MAX_FRAME_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.enable_retries", 0),
            # A connection of its own, not one shared with other channels to the same
            # coordinator in this process: the coordinator ranks a connection's first
            # unauthenticated call above its others (transport.FrontDoor.call_opened).
            ("grpc.use_local_subchannel_pool", 1),
            # also gRPC's connect timeout: a port that accepts and says nothing fails in seconds
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout_s * 1000)),
        ]
        if self.tls is None:
            return grpc.insecure_channel(self.coordinator, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.secure_channel(self.coordinator, self.tls.credentials(), options=options)

    def _session(self, welcomed: list[bool]) -> NodeExit | None:
        """One connection; returns an exit reason, or None to reconnect."""
        out: queue.SimpleQueue[bytes | Iterable[bytes] | None] = queue.SimpleQueue()

        def requests() -> Iterator[bytes]:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, bytes):
                    yield item
                else:
                    yield from item

        # Agree on the transport before anything else: a mismatch is then one clear line,
        # not a TLS error from gRPC (see transport.py).
        try:
            speaks: Literal["tls", "plaintext"] = "tls" if self.tls is not None else "plaintext"
            agree(self.coordinator, speaks, timeout_s=self.connect_timeout_s)
        except TransportError as exc:
            self.detail = str(exc)
            return None
        channel = self._channel()
        stop_threads = threading.Event()
        work: queue.SimpleQueue[_Incoming | tuple[_Incoming, memoryview] | None] = (
            queue.SimpleQueue()
        )
        threads: list[threading.Thread] = []
        lanes: list[LaneSocket] = []
        try:
            stub = channel.stream_stream(METHOD)
            call = stub(requests())
            self._call = call
            if self._stop.is_set():
                call.cancel()
            responses = iter(call)
            signer = self._handshake(responses, out)
            welcomed[0] = True
            self.sessions += 1
            self._last_activity = time.monotonic()
            cancelled: set[str] = set()
            threads = [
                threading.Thread(
                    target=self._beat,
                    args=(out, signer, stop_threads, call),
                    name="shoal-node-heartbeat",
                    daemon=True,
                )
            ]
            threads[0].start()  # first: heartbeats go on while the lane connects
            lanes = self._open_lane(signer)
            down, up = lanes if lanes else (None, None)
            self.lane_open = bool(lanes)
            threads.append(
                threading.Thread(
                    target=self._work,
                    args=(work, out, signer, cancelled, call, up),
                    name="shoal-node-worker",
                    daemon=True,
                )
            )
            threads[1].start()
            return self._receive(responses, work, cancelled, down)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in _FATAL or (code == grpc.StatusCode.UNAUTHENTICATED and not welcomed[0]):
                raise _Rejected(details or code.name) from None
            explained = explain_connect_error(details) if not welcomed[0] else None
            self.detail = explained or f"{code.name}: {details}"
            if code == grpc.StatusCode.CANCELLED and self._idle():
                return NodeExit.IDLE
            return None
        except (ProtocolError, TransportError) as exc:  # TransportError: the bulk lane broke
            self.detail = str(exc)
            if not self._stop.is_set():
                log.warning("%s, reconnecting", exc)
            return None
        except StopIteration:  # the coordinator ended the stream during the handshake
            self.detail = "the coordinator closed the stream"
            return None
        finally:
            stop_threads.set()
            work.put(None)
            out.put(None)
            self._call = None
            self.lane_open = False
            for lane in lanes:
                lane.close()
            channel.close()
            for thread in threads:
                thread.join(timeout=5)

    def _handshake(
        self, responses: Iterator[bytes], out: queue.SimpleQueue[bytes | Iterable[bytes] | None]
    ) -> NodeSigner:
        first = parse_coordinator_frame(next(responses))
        if first.WhichOneof("kind") != "challenge" or len(first.challenge.challenge) < 16:
            raise ProtocolError("the coordinator did not open with a challenge")
        challenge = first.challenge
        if challenge.protocol != PROTOCOL:
            raise _Rejected(
                f"coordinator speaks protocol {challenge.protocol}, this node {PROTOCOL}; "
                "run the same shoal version on both sides"
            )
        try:
            signer = NodeSigner(
                key=self.key,
                challenge=challenge.challenge,
                server_time_ms=challenge.server_time_ms,
                coordinator_share=challenge.key_share,
            )
        except AuthenticationError as exc:
            raise ProtocolError(f"the coordinator's challenge is unusable: {exc}") from None
        message = signer.hello()
        hello = message.hello
        hello.tasks.extend(self.app.task_names)
        hello.job_digest = self.job_digest
        hello.software = f"shoal {shoal.__version__}"
        if self.partition_index is not None:
            hello.partition_index = self.partition_index
        out.put(signer.frame(message))
        second = parse_coordinator_frame(next(responses))
        if second.WhichOneof("kind") != "welcome":
            raise ProtocolError("the coordinator did not answer the hello with a welcome")
        welcome = second.welcome
        if self.job_digest and welcome.job_digest and welcome.job_digest != self.job_digest:
            raise _Rejected(
                f"the coordinator runs job {welcome.job_digest[:12]}, this node was started for "
                f"job {self.job_digest[:12]}; give both the same job file"
            )
        if not 0 < welcome.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ProtocolError(f"coordinator asked for chunks of {welcome.chunk_bytes} bytes")
        self.node_id = welcome.node_id
        self._chunk_bytes = welcome.chunk_bytes or DEFAULT_CHUNK_BYTES
        self._max_reply = welcome.max_reply_bytes
        self._heartbeat_s = welcome.heartbeat_s if welcome.heartbeat_s > 0 else 5.0
        self._data_port = welcome.data_port
        log.info("connected to %s as node %s", self.coordinator, self.node_id)
        return signer

    def _receive(
        self,
        responses: Iterator[bytes],
        work: queue.SimpleQueue[_Incoming | tuple[_Incoming, memoryview] | None],
        cancelled: set[str],
        lane: LaneSocket | None,
    ) -> NodeExit | None:
        incoming: _Incoming | None = None
        for raw in responses:
            if incoming is not None:
                data = chunk_data(raw, TO_NODE_CHUNK)
                if data is None:
                    frame = parse_coordinator_frame(raw)
                    if frame.WhichOneof("kind") != "chunk":
                        raise ProtocolError("a task's payload was cut short by another frame")
                    data = memoryview(frame.chunk.data)
                if data.nbytes > incoming.remaining:
                    raise ProtocolError("a task's payload overran its announced size")
                incoming.remaining -= data.nbytes
                if incoming.assembler is not None:
                    incoming.assembler.add(data)
                if incoming.remaining == 0:
                    self._queue(incoming, work)
                    incoming = None
                continue
            frame = parse_coordinator_frame(raw)
            kind = frame.WhichOneof("kind")
            if kind == "task":
                self._last_activity = time.monotonic()
                incoming = self._announce(frame.task)
                if incoming.lane:
                    # Read here, right after the header: the size was checked against this
                    # node's limits first, and a refused task's bytes are drained, not kept.
                    payload = self._lane_payload(incoming, lane, keep=not incoming.refusal)
                    work.put(incoming if payload is None else (incoming, payload))
                    incoming = payload = None  # held only by the worker now
                elif frame.task.HasField("inline"):
                    payload = None if incoming.refusal else memoryview(frame.task.inline)
                    work.put(incoming if payload is None else (incoming, payload))
                    incoming = payload = None
                elif incoming.remaining == 0:
                    self._queue(incoming, work)
                    incoming = None
            elif kind == "cancel":
                cancelled.add(frame.cancel.task_id)
            elif kind == "finish":
                log.info("the coordinator finished the run: %s", frame.finish.reason)
                return NodeExit.FINISHED
            else:
                raise ProtocolError(f"unexpected {kind!r} frame from the coordinator")
        self.detail = "the coordinator closed the stream"
        return None

    def _announce(self, header: pb.TaskHeader) -> _Incoming:
        """Check a task before its bytes arrive: known name, size within the node's limits."""
        refusal = ""
        if header.name not in self.app.task_names:
            registered = sorted(t for t in self.app.task_names if not t.startswith("shoal."))
            refusal = (  # the words NodeApp uses, so a simulation reads the same
                f"node {self.node_id or ''!r} has no task named {header.name[:100]!r}; it runs "
                f"only {registered}"
            )
        elif header.size > self.app.limits.max_bytes:
            refusal = (
                f"task payload of {header.size} bytes exceeds this node's limit of "
                f"{self.app.limits.max_bytes}"
            )
        if header.HasField("inline"):  # the bytes came with the header
            if header.lane or len(header.inline) != header.size:
                raise ProtocolError(
                    f"a task header carries {len(header.inline)} inline bytes but announces "
                    f"{header.size}{' on the bulk lane' if header.lane else ''}"
                )
            return _Incoming(header=header, assembler=None, refusal=refusal, remaining=0)
        if header.lane:  # the bytes come on the lane
            return _Incoming(header=header, assembler=None, refusal=refusal, remaining=0, lane=True)
        assembler = None if refusal else Assembler(header.size)
        return _Incoming(header=header, assembler=assembler, refusal=refusal, remaining=header.size)

    @staticmethod
    def _queue(
        incoming: _Incoming,
        work: queue.SimpleQueue[_Incoming | tuple[_Incoming, memoryview] | None],
    ) -> None:
        if incoming.assembler is None:
            work.put(incoming)
        else:
            work.put((incoming, incoming.assembler.payload()))

    # -- worker threads --------------------------------------------------------------------

    def _open_lane(self, signer: NodeSigner) -> list[LaneSocket]:
        """The session's bulk lane (down, up), or [] (then every byte goes over the stream)."""
        if not self._data_port or not self.use_lane:
            return []
        lane_id, token = signer.reply_key.lane()
        opened: list[LaneSocket] = []
        try:
            host = parse_address(self.coordinator)[0]
            context = self.tls.ssl_context() if self.tls is not None else None
            for direction in (DOWN, UP):
                for attempt in itertools.count():
                    try:
                        opened.append(
                            connect_lane(
                                host=host,
                                port=self._data_port,
                                lane_id=lane_id,
                                token=token,
                                direction=direction,
                                context=context,
                                server_name=self.tls.server_name if self.tls else None,
                            )
                        )
                        break
                    except AuthenticationError:
                        raise  # not this session's coordinator: trying again cannot help
                    except TransportError as exc:
                        # A coordinator under a flood drops pending connections at random
                        # among equals (limits.py): another attempt soon is likely to pass.
                        if attempt + 1 >= _LANE_ATTEMPTS or self._stop.is_set():
                            raise
                        delay = _LANE_BACKOFF.delay(attempt, self._rng)
                        log.info(
                            "bulk lane attempt %d: %s; again in %.2f s", attempt + 1, exc, delay
                        )
                        if self._stop.wait(delay):
                            raise
        except (TransportError, ProtocolError, ConfigError) as exc:
            log.warning("no bulk lane (%s); payloads go over the gRPC stream", exc)
            for sock in opened:  # a half-open lane is never used; the coordinator drops it
                sock.close()
            return []
        log.info("bulk lane open to port %d", self._data_port)
        return opened

    def _work(
        self,
        work: queue.SimpleQueue[_Incoming | tuple[_Incoming, memoryview] | None],
        out: queue.SimpleQueue[bytes | Iterable[bytes] | None],
        signer: NodeSigner,
        cancelled: set[str],
        call: Any,
        lane: LaneSocket | None,
    ) -> None:
        try:
            self._work_loop(work, out, signer, cancelled, lane)
        except (TransportError, ProtocolError) as exc:
            if self._call is call and not self._stop.is_set():  # not just the session ending
                log.warning("bulk lane failed, reconnecting: %s", exc)
            self.lane_open = False
            call.cancel()  # the session cannot go on without the bytes it announced

    def _lane_payload(
        self, incoming: _Incoming, lane: LaneSocket | None, *, keep: bool
    ) -> memoryview | None:
        """Read (or, if not ``keep``, drain) a task's bytes from the lane, checked first."""
        header = incoming.header
        if lane is None:
            raise ProtocolError("the coordinator sent a task on a bulk lane this node has not")
        task_id, size = lane.read_head()
        if task_id != header.task_id or size != header.size:
            raise ProtocolError(
                f"bulk lane frame ({task_id[:100]!r}, {size} bytes) does not match the task "
                f"header ({header.task_id[:100]!r}, {header.size} bytes)"
            )
        if not keep:
            lane.drain(size)
            return None
        return lane.read_payload(size, pool=self._lane_pool)

    def _work_loop(
        self,
        work: queue.SimpleQueue[_Incoming | tuple[_Incoming, memoryview] | None],
        out: queue.SimpleQueue[bytes | Iterable[bytes] | None],
        signer: NodeSigner,
        cancelled: set[str],
        lane: LaneSocket | None,
    ) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            self._serve_task(item, out, signer, cancelled, lane)
            del item  # nothing here holds the payload while waiting: its buffer can come back

    def _serve_task(
        self,
        item: _Incoming | tuple[_Incoming, memoryview],
        out: queue.SimpleQueue[bytes | Iterable[bytes] | None],
        signer: NodeSigner,
        cancelled: set[str],
        lane: LaneSocket | None,
    ) -> None:
        incoming, payload = item if isinstance(item, tuple) else (item, None)
        header = incoming.header
        if header.task_id in cancelled:
            cancelled.discard(header.task_id)
            return
        start = time.perf_counter()
        if payload is None:
            status, detail, result = pb.REJECTED, incoming.refusal, memoryview(b"")
            self.node_state.audit(  # refused before its bytes were read (unknown, too big)
                "refused",
                task=header.name[:200],
                task_id=header.task_id.split(":", 1)[-1][:200],
                error="UnknownTask" if "no task named" in detail else "WireError",
                reason=detail[:1000],
            )
        else:
            status, detail, result = self._run_task(header, payload)
        self.tasks_done += 1
        self._last_activity = time.monotonic()
        if self._max_reply and result.nbytes > self._max_reply:
            status, detail, result = (
                pb.ERROR,
                f"the result is {result.nbytes} bytes, over the coordinator's limit of "
                f"{self._max_reply}",
                memoryview(b""),
            )
        message = signer.message()
        reply = message.reply
        reply.task_id = header.task_id
        reply.status = status
        reply.detail = detail[:_MAX_DETAIL]
        reply.size = result.nbytes
        reply.tag = signer.reply_tag(message, result)
        reply.elapsed_s = time.perf_counter() - start
        if 0 < result.nbytes <= INLINE_MAX_BYTES:
            reply.inline = result.tobytes()
            out.put(signer.frame(message))
            return
        if lane is not None and result.nbytes >= LANE_MIN_BYTES:
            reply.lane = True
            out.put(signer.frame(message))
            lane.send(header.task_id, result)
            return
        frames = chunk_frames(TO_COORDINATOR_CHUNK, result, self._chunk_bytes)
        out.put(itertools.chain((signer.frame(message),), frames))

    def _run_task(
        self, header: pb.TaskHeader, payload: memoryview
    ) -> tuple[pb.Status, str, memoryview]:
        # The coordinator numbers its dispatches into the wire id; tasks see the plain id.
        task_id = header.task_id.split(":", 1)[-1]
        seed: tuple[int, ...] | int | None = tuple(header.seed) if header.seed else self._seed
        ctx = TaskContext(
            node_id=self.node_id or "",
            data=self.data,
            state=self.state,
            task_id=task_id,
            seed=seed,
        )
        keep_as = header.keep_as if header.HasField("keep_as") else None
        try:
            result = self.app.handle(ctx, header.name, payload, keep_as=keep_as)
        except PrivacyBudgetExceeded as exc:
            log.info("declined task %s: %s", header.name, exc)  # the full reason stays here
            return pb.DECLINED, DECLINED_DETAIL, memoryview(b"")
        except (UnknownTask, WireError, ReleaseRefused) as exc:
            return pb.REJECTED, str(exc), memoryview(b"")
        except Exception as exc:  # any task failure is reported, never fatal to the node
            reason = str(exc) or type(exc).__name__
            self.tasks_failed += 1
            self.last_failure = reason
            log.warning("task %s failed: %s", header.name, reason)
            return pb.ERROR, reason, memoryview(b"")
        view = memoryview(result)
        return pb.OK, "", view if view.format == "B" and view.ndim == 1 else view.cast("B")

    def _beat(
        self,
        out: queue.SimpleQueue[bytes | Iterable[bytes] | None],
        signer: NodeSigner,
        stop: threading.Event,
        call: Any,
    ) -> None:
        tick = min(1.0, self._heartbeat_s)
        last = time.monotonic()
        while not stop.wait(tick):
            if self._idle():
                log.info("no task for %.0f s: leaving", self.max_idle_s or 0)
                call.cancel()
                return
            if time.monotonic() - last < self._heartbeat_s:
                continue
            last = time.monotonic()
            message = signer.message()
            message.heartbeat.tasks_done = self.tasks_done
            out.put(signer.frame(message))
