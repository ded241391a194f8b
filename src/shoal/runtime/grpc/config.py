"""CoordinatorConfig: every setting of a coordinator engine in one frozen value, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ConfigError, ProtocolError
from shoal.runtime.grpc.certs import ServerTLS
from shoal.runtime.grpc.lane import parse_address
from shoal.runtime.grpc.protocol import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from shoal.wire import WireLimits

__all__ = ["CoordinatorConfig"]


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """How a coordinator serves its nodes.

    ``listen`` is the gRPC address (HOST:PORT, port 0 for any free one). TLS is required
    unless ``insecure=True``. ``data_listen`` is where the bulk lane listens (HOST:PORT, same
    TLS as the stream): ``"auto"`` takes the stream's host and its port + 1 (any free port if
    that one is taken or the stream's port is 0), None turns the lane off (every byte then
    goes over gRPC). ``seed`` seeds each task's randomness as LocalEngine does, so a
    deployment repeats a simulation; ``job_digest``, when set, must match the nodes'.

    Liveness: nodes send a heartbeat every ``heartbeat_s``; one silent for ``liveness_s``
    (default three heartbeats and 5 s) is dropped, as is a stream that has not said hello
    within ``handshake_timeout_s``. Signed messages older than ``auth_window_s`` are replays.
    Unauthenticated streams and lane connections are bounded (``max_pending_per_peer`` per
    address, ``max_pending`` in all; the least advanced, at random among equals, dropped
    for a newcomer: see limits.py), and
    authenticated nodes by ``max_nodes``. A peer whose connections the front door cuts for
    flooding ``ban_after_cuts`` times within ``ban_window_s`` is banned for ``ban_s``: its
    certificate refused, or with none its address on probation (bans.py; 0 cuts: never).
    The registry is re-read every
    ``registry_refresh_s`` (revoked nodes are dropped). Audit entries carry ``run_id``.
    """

    listen: str
    data_listen: str | None = "auto"
    tls: ServerTLS | None = None
    insecure: bool = False
    seed: int = 0
    job_digest: str = ""
    heartbeat_s: float = 5.0
    liveness_s: float | None = None
    auth_window_s: float = 60.0
    handshake_timeout_s: float = 5.0
    max_pending_per_peer: int = 16
    max_pending: int = 64
    ban_after_cuts: int = 3
    ban_window_s: float = 60.0
    ban_s: float = 300.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_reply_bytes: int | None = None  # None: the wire's own limit
    max_nodes: int = 1024
    registry_refresh_s: float = 5.0
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.tls is None and not self.insecure:
            raise ConfigError(
                "the coordinator serves over TLS: give tls=ServerTLS.from_dir(DIR) (make one "
                "with `shoal certs`), or insecure=True for a test on a trusted network"
            )
        if self.tls is not None and self.insecure:
            raise ConfigError("give either tls or insecure=True, not both")
        if not 0 < self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(
                f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {self.chunk_bytes}"
            )
        if self.heartbeat_s <= 0 or self.handshake_timeout_s <= 0:
            raise ConfigError("heartbeat_s and handshake_timeout_s must be positive")
        if self.ban_after_cuts < 0 or self.ban_window_s <= 0 or self.ban_s <= 0:
            raise ConfigError(
                "ban_after_cuts must be >= 0 (0: never ban), ban_window_s and ban_s positive; "
                f"got {self.ban_after_cuts}, {self.ban_window_s}, {self.ban_s}"
            )
        if self.max_nodes < 1:
            raise ConfigError(f"max_nodes must be at least 1, got {self.max_nodes}")
        if self.data_listen is not None and self.data_listen != "auto":
            try:
                parse_address(self.data_listen)
            except ProtocolError:
                raise ConfigError(
                    f"data_listen must be HOST:PORT, 'auto' or None, got {self.data_listen!r}"
                ) from None

    @property
    def pending_grace_s(self) -> float:
        """How long an unauthenticated connection's progress protects it (limits.py): a node
        needs milliseconds; an attacker's stalled connections rank as silent after this."""
        return min(1.0, self.handshake_timeout_s)

    @property
    def silent_after_s(self) -> float:
        """How long a connected node may stay silent before it is dropped."""
        return self.liveness_s if self.liveness_s is not None else 3 * self.heartbeat_s + 5.0

    @property
    def reply_limit(self) -> int:
        """The largest reply, in bytes, a node may announce."""
        return self.max_reply_bytes if self.max_reply_bytes is not None else WireLimits().max_bytes
