"""Frames of the deployment protocol: chunked payloads and signed node messages.

A payload of any size travels as a header followed by Chunk frames of at most
``MAX_CHUNK_BYTES``, so no gRPC message ever approaches gRPC's size limits. Chunk frames are
built and read by hand (their layout is fixed by shoal.proto and checked against protobuf in
the tests) because they carry nearly every byte: this avoids two copies per chunk.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.poly1305 import Poly1305
from google.protobuf.message import DecodeError

from shoal.errors import ProtocolError
from shoal.runtime.engine import Buffer
from shoal.runtime.grpc.auth import NONCE_BYTES, KeyShare, ReplyKey, public_key_bytes, sign
from shoal.runtime.grpc.proto import shoal_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "INLINE_MAX_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_FRAME_BYTES",
    "METHOD",
    "PROTOCOL",
    "TO_COORDINATOR_CHUNK",
    "TO_NODE_CHUNK",
    "Assembler",
    "NodeSigner",
    "SharedFrames",
    "chunk_data",
    "chunk_frame",
    "chunk_frames",
    "parse_coordinator_frame",
    "parse_node_frame",
]

METHOD = "/shoal.deploy.v1.Coordinator/Session"
# Both sides speak exactly this version; the pre-release versions before it are gone. In 4,
# replies carry a Poly1305 tag under a key agreed in the signed hello, payloads may travel
# on a bulk lane beside the stream (Welcome.data_port, header `lane`), and a payload of at
# most INLINE_MAX_BYTES rides inside its task or reply header.
PROTOCOL = 4
# Protocol messages (SecAgg keys and shares, small requests) are a few KB: inside the header
# they cost one gRPC message instead of a header plus a lane frame (or a chunk frame), on
# both ends. Larger payloads keep the lane, which never copies them through grpcio.
INLINE_MAX_BYTES = 64 << 10
# Each frame costs Python-side work on both ends (a thread hand-off, a parse, a copy): on
# loopback, 4 MiB chunks took ~15% less CPU per round than 1 MiB; 8 and 16 MiB did no better.
DEFAULT_CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 4 << 20
# The gRPC message cap on both sides: a chunk plus room for headers (task names, details).
MAX_FRAME_BYTES = MAX_CHUNK_BYTES + (64 << 10)

# Tag bytes (field number << 3 | length-delimited) of the `chunk` field of each frame type.
TO_NODE_CHUNK = (4 << 3) | 2  # CoordinatorFrame.chunk = 4
TO_COORDINATOR_CHUNK = (2 << 3) | 2  # NodeFrame.chunk = 2
_DATA_TAG = (1 << 3) | 2  # Chunk.data = 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(buf):
            return None
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    return None


def chunk_frame(tag: int, data: Buffer) -> bytes:
    """The serialized frame (CoordinatorFrame or NodeFrame, per ``tag``) holding one chunk."""
    n = memoryview(data).nbytes
    inner = bytes((_DATA_TAG,)) + _varint(n)
    return b"".join((bytes((tag,)), _varint(len(inner) + n), inner, data))


def chunk_data(raw: bytes, tag: int) -> memoryview | None:
    """The chunk bytes inside serialized frame ``raw``, or None if it is not a plain chunk frame.

    None only means "not the fast path": callers then parse ``raw`` with protobuf.
    """
    if len(raw) < 4 or raw[0] != tag:
        return None
    outer = _read_varint(raw, 1)
    if outer is None or outer[1] + outer[0] != len(raw) or raw[outer[1]] != _DATA_TAG:
        return None
    inner = _read_varint(raw, outer[1] + 1)
    if inner is None or inner[1] + inner[0] != len(raw):
        return None
    return memoryview(raw)[inner[1] :]


def chunk_frames(tag: int, payload: Buffer, chunk_bytes: int) -> Iterator[bytes]:
    view = (
        memoryview(payload).cast("B") if memoryview(payload).format != "B" else memoryview(payload)
    )
    for start in range(0, view.nbytes, chunk_bytes):
        yield chunk_frame(tag, view[start : start + chunk_bytes])


class SharedFrames:
    """The chunk frames of one payload, built once and shared by every node it goes to.

    A broadcast sends the same bytes to many nodes: each frame is serialized on first use and
    dropped once all ``consumers`` have taken it, so memory stays near the spread between the
    fastest and the slowest node rather than a second copy of the payload.
    """

    def __init__(self, payload: Buffer, *, tag: int, chunk_bytes: int, consumers: int) -> None:
        view = memoryview(payload)
        self._view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        self._tag = tag
        self._chunk = chunk_bytes
        self._consumers = consumers
        self.count = -(-self._view.nbytes // chunk_bytes)
        self._frames: dict[int, bytes] = {}
        self._taken: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._view.nbytes

    def take(self, index: int) -> bytes:
        with self._lock:
            frame = self._frames.get(index)
            if frame is None:
                start = index * self._chunk
                frame = chunk_frame(self._tag, self._view[start : start + self._chunk])
                if self._consumers > 1:
                    self._frames[index] = frame
            taken = self._taken.get(index, 0) + 1
            if taken >= self._consumers:
                self._frames.pop(index, None)
                self._taken.pop(index, None)
            else:
                self._taken[index] = taken
            return frame

    def frames(self) -> Iterator[bytes]:
        for index in range(self.count):
            yield self.take(index)


class Assembler:
    """Collects the chunks of one announced payload into a buffer, authenticating them if asked.

    With ``mac`` (see :class:`ReplyKey`), every chunk is fed to it as it arrives, so checking
    the tag at the end costs no second pass over the bytes.
    """

    def __init__(self, size: int, *, mac: Poly1305 | None = None) -> None:
        # np.empty does not touch the pages: a large announced size costs memory only as
        # chunks actually arrive.
        self._buffer = np.empty(size, dtype=np.uint8)
        self.size = size
        self.received = 0
        self._mac = mac

    @property
    def done(self) -> bool:
        return self.received == self.size

    def add(self, data: memoryview) -> bool:
        """Append one chunk; True when the payload is complete."""
        n = data.nbytes
        if self.received + n > self.size:
            raise ProtocolError(
                f"payload overran its announced size of {self.size} bytes; the peer is broken"
            )
        self._buffer[self.received : self.received + n] = np.frombuffer(data, dtype=np.uint8)
        if self._mac is not None:
            self._mac.update(data)
        self.received += n
        return self.received == self.size

    def tag(self) -> bytes:
        """The MAC tag of everything added (once, at the end)."""
        if self._mac is None:
            raise ProtocolError("this payload was not authenticated")
        mac, self._mac = self._mac, None
        return mac.finalize()

    def payload(self) -> memoryview:
        self._buffer.flags.writeable = False
        return self._buffer.data


def parse_node_frame(raw: bytes) -> pb.NodeFrame:
    try:
        return pb.NodeFrame.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(f"malformed frame from node: {exc}") from None


def parse_coordinator_frame(raw: bytes) -> pb.CoordinatorFrame:
    try:
        return pb.CoordinatorFrame.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(f"malformed frame from coordinator: {exc}") from None


def parse_node_message(body: bytes) -> pb.NodeMessage:
    try:
        return pb.NodeMessage.FromString(body)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(f"malformed signed message: {exc}") from None


class NodeSigner:
    """Signs a node's messages for one session (its challenge) with the node's key.

    Timestamps follow the coordinator's clock as announced in the challenge, so a node whose
    clock is off still lands inside the coordinator's replay window. The signer also holds
    the node's key share for the session, and the reply key agreed with
    ``coordinator_share`` (the challenge's): :meth:`hello` announces the share, signed.
    """

    def __init__(
        self,
        *,
        key: Ed25519PrivateKey,
        challenge: bytes,
        server_time_ms: int,
        coordinator_share: bytes = b"",
    ) -> None:
        self.key = key
        self.challenge = challenge
        self.coordinator_share = coordinator_share
        self.share = KeyShare()
        self._offset_ms = server_time_ms - int(time.time() * 1000)
        # Agreed at once, so a bad share (AuthenticationError) fails the handshake.
        self._reply_key = (
            self.share.agree(
                coordinator_share,
                challenge=challenge,
                coordinator_share=coordinator_share,
                node_share=self.share.public,
                node_key=public_key_bytes(key),
            )
            if coordinator_share
            else None
        )

    @property
    def reply_key(self) -> ReplyKey:
        """The session's reply key, agreed with the coordinator's share."""
        if self._reply_key is None:
            raise ProtocolError("this signer has no coordinator key share: it cannot tag replies")
        return self._reply_key

    def message(self) -> pb.NodeMessage:
        return pb.NodeMessage(
            challenge=self.challenge,
            timestamp_ms=int(time.time() * 1000) + self._offset_ms,
            nonce=os.urandom(NONCE_BYTES),
        )

    def hello(self) -> pb.NodeMessage:
        """A hello message with this node's public key and key share (fill in the rest)."""
        message = self.message()
        message.hello.protocol = PROTOCOL
        message.hello.public_key = public_key_bytes(self.key)
        message.hello.key_share = self.share.public
        return message

    def reply_tag(self, message: pb.NodeMessage, data: Buffer) -> bytes:
        """The tag of reply bytes ``data`` announced by ``message`` (before it is signed)."""
        return self.reply_key.tag(message.nonce, data)

    def frame(self, message: pb.NodeMessage) -> bytes:
        """Serialize and sign ``message`` into a NodeFrame."""
        body = message.SerializeToString()
        signed = pb.Signed(body=body, signature=sign(self.key, body))
        return pb.NodeFrame(signed=signed).SerializeToString()
