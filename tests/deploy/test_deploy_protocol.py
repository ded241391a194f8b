"""Frames, keys, replay guard and certificates of the deployment protocol (no network)."""

from __future__ import annotations

import itertools
import os
import stat

import numpy as np
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import AuthenticationError, ConfigError, ProtocolError
from shoal.runtime.grpc import ReplayGuard, load_private_key, load_public_key, make_certs
from shoal.runtime.grpc.auth import (
    KeyShare,
    ReplyKey,
    public_key_bytes,
    sign,
    verify,
    write_key_pair,
)
from shoal.runtime.grpc.certs import ClientTLS, ServerTLS
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import (
    TO_COORDINATOR_CHUNK,
    TO_NODE_CHUNK,
    Assembler,
    NodeSigner,
    SharedFrames,
    chunk_data,
    chunk_frame,
    chunk_frames,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=70_000))
def test_hand_built_chunk_frames_are_valid_protobuf(data: bytes) -> None:
    to_node = chunk_frame(TO_NODE_CHUNK, data)
    assert pb.CoordinatorFrame.FromString(to_node).chunk.data == data
    assert to_node == pb.CoordinatorFrame(chunk=pb.Chunk(data=data)).SerializeToString()
    to_coordinator = chunk_frame(TO_COORDINATOR_CHUNK, data)
    assert pb.NodeFrame.FromString(to_coordinator).chunk.data == data
    view = chunk_data(to_coordinator, TO_COORDINATOR_CHUNK)
    assert view is not None and bytes(view) == data
    assert chunk_data(to_coordinator, TO_NODE_CHUNK) is None  # wrong direction: no fast path


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_chunk_fast_path_never_misreads_other_bytes(raw: bytes) -> None:
    view = chunk_data(raw, TO_COORDINATOR_CHUNK)
    if view is None:
        return
    # Whatever the fast path accepts, protobuf reads as exactly that chunk.
    assert pb.NodeFrame.FromString(raw).chunk.data == bytes(view)


def test_other_frames_do_not_take_the_fast_path() -> None:
    signed = pb.NodeFrame(signed=pb.Signed(body=b"x" * 10, signature=b"y" * 64))
    assert chunk_data(signed.SerializeToString(), TO_COORDINATOR_CHUNK) is None


def test_chunking_covers_the_payload_exactly() -> None:
    payload = np.arange(10_000, dtype=np.uint8).tobytes() * 3
    frames = list(chunk_frames(TO_NODE_CHUNK, payload, 4096))
    assert len(frames) == -(-len(payload) // 4096)
    joined = b"".join(pb.CoordinatorFrame.FromString(f).chunk.data for f in frames)
    assert joined == payload


def test_shared_frames_build_each_frame_once_and_release_it() -> None:
    payload = os.urandom(10_000)
    shared = SharedFrames(payload, tag=TO_NODE_CHUNK, chunk_bytes=3000, consumers=3)
    first = list(shared.frames())
    second = list(shared.frames())
    assert all(a is b for a, b in zip(first, second))  # same objects: serialized once
    third = list(shared.frames())
    assert [bytes(f) for f in third] == [bytes(f) for f in first]
    assert not shared._frames  # all consumers took every frame: nothing is held


def test_assembler_checks_size_and_authenticates() -> None:
    data = os.urandom(5000)
    key = ReplyKey(os.urandom(32))
    nonce = os.urandom(16)
    assembler = Assembler(len(data), mac=key.mac(nonce))
    assert not assembler.add(memoryview(data[:2000]))
    assert assembler.add(memoryview(data[2000:]))
    assert bytes(assembler.payload()) == data
    assert assembler.tag() == key.tag(nonce, data)
    with pytest.raises(ProtocolError, match="overran"):
        Assembler(10).add(memoryview(b"x" * 11))
    with pytest.raises(ProtocolError, match="not authenticated"):
        Assembler(0).tag()


def _agreed(tmp_path) -> tuple[NodeSigner, KeyShare, bytes, bytes]:
    """A node's signer and the coordinator's share for one session, as a handshake makes."""
    _, _, key = write_key_pair(tmp_path / "n.key")
    coordinator = KeyShare()
    challenge = os.urandom(32)
    signer = NodeSigner(
        key=key, challenge=challenge, server_time_ms=0, coordinator_share=coordinator.public
    )
    return signer, coordinator, challenge, public_key_bytes(key)


def test_both_sides_agree_on_the_reply_key(tmp_path) -> None:
    signer, coordinator, challenge, node_key = _agreed(tmp_path)
    hello = signer.hello().hello
    assert hello.key_share == signer.share.public and hello.public_key == node_key

    def coordinator_key(**changes: bytes) -> ReplyKey:
        seen = {
            "challenge": challenge,
            "coordinator_share": coordinator.public,
            "node_share": hello.key_share,
            "node_key": node_key,
        }
        seen.update(changes)
        return coordinator.agree(hello.key_share, **seen)

    message = signer.message()
    data = os.urandom(3000)
    tag = signer.reply_tag(message, data)
    assert len(tag) == 16
    assert coordinator_key().tag(message.nonce, data) == tag
    # Any other bytes, nonce, session or identity gives another tag.
    assert coordinator_key().tag(message.nonce, data[:-1] + bytes([data[-1] ^ 1])) != tag
    assert coordinator_key().tag(os.urandom(16), data) != tag
    assert coordinator_key(challenge=os.urandom(32)).tag(message.nonce, data) != tag
    assert coordinator_key(node_key=os.urandom(32)).tag(message.nonce, data) != tag
    assert coordinator_key(coordinator_share=KeyShare().public).tag(message.nonce, data) != tag
    # Someone in the middle who swaps in its own share cannot reach the same key.
    middle = KeyShare().agree(
        hello.key_share,
        challenge=challenge,
        coordinator_share=coordinator.public,
        node_share=hello.key_share,
        node_key=node_key,
    )
    assert middle.tag(message.nonce, data) != tag


def test_bad_key_shares_are_refused(tmp_path) -> None:
    _, _, key = write_key_pair(tmp_path / "n.key")
    for share in (b"short", bytes(32)):  # wrong length; the all-zero (low-order) point
        with pytest.raises(AuthenticationError, match="key share"):
            NodeSigner(key=key, challenge=b"c" * 32, server_time_ms=0, coordinator_share=share)
    with pytest.raises(ProtocolError, match="no coordinator key share"):
        _ = NodeSigner(key=key, challenge=b"c" * 32, server_time_ms=0).reply_key
    with pytest.raises(AuthenticationError, match="nonce"):
        ReplyKey(os.urandom(32)).mac(b"short")


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_chunked_tag_equals_whole_tag(data: bytes, cuts: list[int]) -> None:
    key = ReplyKey(b"k" * 32)
    nonce = b"n" * 16
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    assembler = Assembler(len(data), mac=key.mac(nonce))
    for start, end in itertools.pairwise(bounds):
        assembler.add(memoryview(data[start:end]))
    assert assembler.tag() == key.tag(nonce, data)


def test_key_pair_files(tmp_path) -> None:
    private, public, key = write_key_pair(tmp_path / "n0.key")
    assert public == tmp_path / "n0.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_public_key(public) == public_key_bytes(key)
    assert public_key_bytes(load_private_key(private)) == public_key_bytes(key)
    with pytest.raises(ConfigError, match="already exists"):
        write_key_pair(tmp_path / "n0.key")
    with pytest.raises(ConfigError, match="PRIVATE key"):
        load_public_key(private)
    private.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(private)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "junk.pub")


def test_signatures_bind_key_and_bytes(tmp_path) -> None:
    _, _, key = write_key_pair(tmp_path / "a.key")
    _, _, other = write_key_pair(tmp_path / "b.key")
    signature = sign(key, b"body")
    assert verify(public_key_bytes(key), b"body", signature)
    assert not verify(public_key_bytes(key), b"bodY", signature)
    assert not verify(public_key_bytes(other), b"body", signature)
    assert not verify(public_key_bytes(key), b"body", signature[:-1])


def test_node_signer_follows_the_coordinator_clock(tmp_path) -> None:
    _, _, key = write_key_pair(tmp_path / "a.key")
    signer = NodeSigner(key=key, challenge=b"c" * 32, server_time_ms=1_000)
    message = signer.message()
    assert abs(message.timestamp_ms - 1_000) < 5_000
    assert message.challenge == b"c" * 32 and len(message.nonce) == 16
    frame = pb.NodeFrame.FromString(signer.frame(message))
    assert verify(public_key_bytes(key), frame.signed.body, frame.signed.signature)


def test_replay_guard() -> None:
    now = [1_000.0]
    guard = ReplayGuard(window_s=30, clock=lambda: now[0])
    nonce = os.urandom(16)
    guard.check(timestamp_ms=1_000_000, nonce=nonce, scope=b"k1")
    with pytest.raises(AuthenticationError, match="already used"):
        guard.check(timestamp_ms=1_000_000, nonce=nonce, scope=b"k1")
    guard.check(timestamp_ms=1_000_000, nonce=nonce, scope=b"k2")  # another key's namespace
    with pytest.raises(AuthenticationError, match="away from"):
        guard.check(timestamp_ms=900_000, nonce=os.urandom(16))
    with pytest.raises(AuthenticationError, match="16 random bytes"):
        guard.check(timestamp_ms=1_000_000, nonce=b"short")
    now[0] += 100  # past twice the window: old nonces are forgotten, old timestamps refused
    guard.check(timestamp_ms=1_100_000, nonce=os.urandom(16))
    assert len(guard) == 1


def test_certificates(tmp_path) -> None:
    files = make_certs(tmp_path, nodes=["n0", "n1"], hosts=["coord.example.org", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.coordinator.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example.org" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {
        "127.0.0.1",
        "10.0.0.7",
    }
    node = x509.load_pem_x509_certificate(files.nodes["n0"].read_bytes())
    node.verify_directly_issued_by(ca)
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    # A later call reuses the CA for a node that joins later.
    again = make_certs(tmp_path, nodes=["n2"])
    assert again.ca.read_bytes() == files.ca.read_bytes()
    assert x509.load_pem_x509_certificate(again.nodes["n2"].read_bytes()).issuer == ca.subject
    assert ServerTLS.from_dir(tmp_path).client_ca == files.ca.read_bytes()
    assert ClientTLS.from_dir(tmp_path, name="n1").certificate is not None
    with pytest.raises(ConfigError, match="no certificate for node 'nx'"):
        ClientTLS.from_dir(tmp_path, name="nx")
    with pytest.raises(ConfigError, match="shoal certs"):
        ServerTLS.from_dir(tmp_path / "missing")
    with pytest.raises(ConfigError, match="certificate name"):
        make_certs(tmp_path, nodes=["../evil"])
