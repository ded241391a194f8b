"""The handshake: the coordinator's challenge, the node's signed hello, the welcome.

A node proves its registered Ed25519 key by signing a hello bound to this session's
challenge, fresh (within the replay window, with an unused nonce); the hello also carries
its half of a key agreement, from which both sides derive the session's reply key (which
tags every reply's bytes) and its bulk lane credentials. Every later signed message is
checked the same way.
"""

from __future__ import annotations

import hmac
import time

import grpc

from shoal.errors import AuthenticationError, ProtocolError
from shoal.runtime.grpc.auth import ReplayGuard, verify
from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import PROTOCOL, parse_node_message
from shoal.runtime.grpc.registry import AdmittedNodes
from shoal.runtime.grpc.sessions import Session, SessionAbort
from shoal.runtime.store import NodeRecord

__all__ = ["Handshake", "claimed_key"]


class Handshake:
    """Opens sessions for admitted nodes; raises SessionAbort for anyone else."""

    def __init__(
        self, *, config: CoordinatorConfig, admitted: AdmittedNodes, coordinator_id: str
    ) -> None:
        self.config = config
        self.admitted = admitted
        self.coordinator_id = coordinator_id
        self._guard = ReplayGuard(window_s=config.auth_window_s)

    def challenge(self, session: Session) -> bytes:
        """The first frame of every stream."""
        challenge = pb.Challenge(
            protocol=PROTOCOL,
            coordinator_id=self.coordinator_id,
            challenge=session.challenge,
            server_time_ms=int(time.time() * 1000),
            key_share=session.share.public,
        )
        return pb.CoordinatorFrame(challenge=challenge).SerializeToString()

    def hello(self, session: Session, signed: pb.Signed) -> NodeRecord:
        """Check a node's hello and fill in ``session``'s identity and keys."""
        try:
            try:
                claimed = parse_node_message(signed.body)
            except ProtocolError as exc:
                raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            if claimed.WhichOneof("kind") != "hello":
                raise SessionAbort(
                    grpc.StatusCode.UNAUTHENTICATED, "the first message must be a signed hello"
                )
            record = self.admitted.lookup(claimed.hello.public_key)
            hello = self.open_signed(session, signed, record.public_key).hello
            if hello.protocol != PROTOCOL:
                raise SessionAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node speaks protocol {hello.protocol}, this coordinator {PROTOCOL}; "
                    "run the same shoal version on both sides",
                )
            digest = self.config.job_digest
            if digest and hello.job_digest and hello.job_digest != digest:
                raise SessionAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node was started for job {hello.job_digest[:12]}, this coordinator runs "
                    f"job {digest[:12]}; give both the same job file",
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
                raise SessionAbort(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        except SessionAbort:
            session.claimed_key = claimed_key(signed)
            raise
        session.reply_key = reply_key
        session.lane_id, session.lane_token = reply_key.lane()
        session.node_id = record.node_id
        session.public_key = record.public_key
        if hello.HasField("partition_index") and 0 <= hello.partition_index < 1 << 31:
            session.partition_index = int(hello.partition_index)
        return record

    def welcome(self, node_id: str, *, data_port: int) -> bytes:
        """The coordinator's answer to an accepted hello: the session's settings."""
        welcome = pb.Welcome(
            node_id=node_id,
            job_digest=self.config.job_digest,
            heartbeat_s=self.config.heartbeat_s,
            chunk_bytes=self.config.chunk_bytes,
            max_reply_bytes=self.config.reply_limit,
            data_port=data_port,
        )
        return pb.CoordinatorFrame(welcome=welcome).SerializeToString()

    def open_signed(self, session: Session, signed: pb.Signed, public_key: bytes) -> pb.NodeMessage:
        """Verify signature, session binding, freshness and nonce of a signed message."""
        if not verify(public_key, signed.body, signed.signature):
            raise SessionAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "bad signature: the message was not signed by the node's registered key "
                "(impersonation or tampering)",
            )
        try:
            message = parse_node_message(signed.body)
        except ProtocolError as exc:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not hmac.compare_digest(message.challenge, session.challenge):
            raise SessionAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "message belongs to another session (replayed from an earlier connection)",
            )
        try:
            self._guard.check(
                timestamp_ms=message.timestamp_ms, nonce=message.nonce, scope=public_key
            )
        except AuthenticationError as exc:
            raise SessionAbort(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        return message


def claimed_key(signed: pb.Signed) -> bytes:
    """The public key a (possibly forged) hello claims, for the rejection record."""
    try:
        message = parse_node_message(signed.body)
    except ProtocolError:
        return b""
    return bytes(message.hello.public_key) if message.WhichOneof("kind") == "hello" else b""
