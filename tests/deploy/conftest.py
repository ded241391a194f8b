"""Fixtures for deployment tests: a registry of node keys, certificates, and a raw client
that speaks the wire protocol by hand (to play a misbehaving node)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.runtime import NodeApp, Store
from shoal.runtime.grpc import (
    Backoff,
    ClientTLS,
    GrpcEngine,
    NodeClient,
    make_certs,
    public_key_bytes,
    write_key_pair,
)
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import METHOD, NodeSigner, parse_coordinator_frame


@dataclass
class Federation:
    """Keys n0..n{k-1} registered in ``store``; certificates for them (and 'rogue') in ``certs``."""

    root: Path
    store: Store
    certs: Path
    keys: dict[str, Ed25519PrivateKey]
    engines: list[GrpcEngine] = field(default_factory=list)
    clients: list[tuple[NodeClient, threading.Thread]] = field(default_factory=list)

    def engine(self, **options: Any) -> GrpcEngine:
        options.setdefault("listen", "127.0.0.1:0")
        options.setdefault("insecure", "tls" not in options)
        engine = GrpcEngine(registry=self.store, **options).start()
        self.engines.append(engine)
        return engine

    def client(
        self, name: str, app: NodeApp, port: int, *, start: bool = True, **options: Any
    ) -> NodeClient:
        options.setdefault("insecure", "tls" not in options)
        options.setdefault("backoff", Backoff(initial_s=0.05, max_s=0.3))
        key = options.pop("key", None) or self.keys[name]
        client = NodeClient(app=app, coordinator=f"127.0.0.1:{port}", key=key, **options)
        thread = threading.Thread(target=client.run, daemon=True)
        self.clients.append((client, thread))
        if start:
            thread.start()
        return client

    def close(self) -> None:
        for client, _ in self.clients:
            client.stop()
        for engine in self.engines:
            engine.close()
        for _, thread in self.clients:
            if thread.ident is not None:
                thread.join(timeout=10)
        self.store.close()


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    store = Store(tmp_path / "fl.db")
    keys = {}
    for i in range(5):
        name = f"n{i}"
        _, _, key = write_key_pair(tmp_path / f"{name}.key")
        store.add_node(node_id=name, public_key=public_key_bytes(key))
        keys[name] = key
    make_certs(tmp_path / "certs", nodes=[*keys, "rogue"])
    fed = Federation(root=tmp_path, store=store, certs=tmp_path / "certs", keys=keys)
    try:
        yield fed
    finally:
        fed.close()


class RawSession:
    """One hand-driven stream to a coordinator: send any bytes, read any frame."""

    def __init__(self, target: str, *, tls: ClientTLS | None = None, timeout: float = 120) -> None:
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        options: list[tuple[str, int]] = [
            ("grpc.max_send_message_length", 64 << 20),
            # A connection of its own, as a node has: gRPC otherwise shares one among
            # channels to the same target, and a session the front door cuts (a byte budget
            # passed before the hello) took the next session's call down with it.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self.call = self.channel.stream_stream(METHOD)(self._requests(), timeout=timeout)
        self._responses = iter(self.call)
        first = self.recv()
        assert first.WhichOneof("kind") == "challenge"
        self.challenge = first.challenge
        self._signers: dict[int, NodeSigner] = {}

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def send(self, raw: bytes) -> None:
        self._out.put(raw)

    def recv_raw(self) -> bytes:
        raw: bytes = next(self._responses)
        return raw

    def recv(self) -> pb.CoordinatorFrame:
        return parse_coordinator_frame(self.recv_raw())

    def signer(self, key: Ed25519PrivateKey) -> NodeSigner:
        """This session's signer for ``key`` (one per key: its key share is in the hello)."""
        found = self._signers.get(id(key))
        if found is None:
            found = NodeSigner(
                key=key,
                challenge=self.challenge.challenge,
                server_time_ms=self.challenge.server_time_ms,
                coordinator_share=self.challenge.key_share,
            )
            self._signers[id(key)] = found
        return found

    def hello(
        self, key: Ed25519PrivateKey, signer: NodeSigner | None = None, **fields: Any
    ) -> bytes:
        """A signed hello frame for ``key`` (``signer`` may belong to another key: forgery)."""
        signer = signer or self.signer(key)
        message = signer.hello()
        message.hello.public_key = public_key_bytes(key)
        message.hello.tasks.extend(["echo"])
        for name, value in fields.items():
            setattr(message.hello, name, value)
        return signer.frame(message)

    def refused(self) -> tuple[grpc.StatusCode, str]:
        """Read until the coordinator ends the stream; return its status."""
        try:
            while True:
                self.recv_raw()
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        except StopIteration:
            return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def raw_session() -> Iterator[Any]:
    sessions: list[RawSession] = []

    def open_session(target: str, *, tls: ClientTLS | None = None) -> RawSession:
        session = RawSession(target, tls=tls)
        sessions.append(session)
        return session

    try:
        yield open_session
    finally:
        for session in sessions:
            session.close()
