"""Real deployment over gRPC: GrpcEngine (coordinator), NodeClient (node), keys and TLS.

The coordinator serves; nodes dial out, authenticate with registered Ed25519 keys, pull
tasks and push replies on one stream each. TLS (mutual, from ``shoal certs``) is on unless
plaintext is asked for explicitly.
"""

from __future__ import annotations

from shoal.runtime.grpc.auth import (
    ReplayGuard,
    fingerprint,
    load_private_key,
    load_public_key,
    public_key_bytes,
    write_key_pair,
)
from shoal.runtime.grpc.certs import CertFiles, ClientTLS, ServerTLS, make_certs
from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.engine import GrpcEngine, NodeRegistry, NodeSessionInfo
from shoal.runtime.grpc.node import Backoff, NodeClient, NodeExit

__all__ = [
    "Backoff",
    "CertFiles",
    "ClientTLS",
    "CoordinatorConfig",
    "GrpcEngine",
    "NodeClient",
    "NodeExit",
    "NodeRegistry",
    "NodeSessionInfo",
    "ReplayGuard",
    "ServerTLS",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "make_certs",
    "public_key_bytes",
    "write_key_pair",
]
