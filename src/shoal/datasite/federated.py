"""Federated requests: the same code at several datasites, combined by SecAgg+ only.

The scientist submits one request (same code hash) to each datasite with the policy
``secure-sum``, naming every participating site and its Ed25519 identity key; each owner
approves on their own; each site runs the code in its sandbox and holds the array. The
scientist's client then plays the SecAgg+ server (``shoal.crypto.secagg``) over HTTPS: each
site clips its array to the agreed L2 norm, optionally adds its share of Gaussian noise
(charged to its ledger first), quantizes and masks it, and answers exactly one round. The
scientist learns the sum and nothing else. Sites sign their SecAgg keys with their identity
key and check their peers' signatures, so a scientist cannot stand in for another site.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.errors import ConfigError, ProtocolError
from shoal.runtime.audit import canonical

if TYPE_CHECKING:
    from shoal.datasite.client import Datasite, RemoteRequest

__all__ = [
    "FederatedRequest",
    "SiteIdentity",
    "check_federation",
    "submit_federated",
]

IDENTITY_FILE = "identity.key"
SIGNATURE = "identity_signature"
PEER_SIGNATURES = "peer_signatures"


class SiteIdentity:
    """A datasite's name and Ed25519 key: it signs the SecAgg keys the site publishes."""

    def __init__(self, *, name: str, key: Ed25519PrivateKey) -> None:
        self.name = name
        self._key = key

    @classmethod
    def load_or_create(cls, directory: str | Path, name: str) -> SiteIdentity:
        path = Path(directory) / IDENTITY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{path} is not an Ed25519 key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.touch(mode=0o600)
            path.write_bytes(pem)
        return cls(name=name, key=key)

    @property
    def public_hex(self) -> str:
        return self._key.public_key().public_bytes_raw().hex()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def advertised(round_id: str, node: str, c_public: bytes, s_public: bytes) -> bytes:
    """The bytes a site signs: which round, which site, which two public keys."""
    return canonical(
        {"round": round_id, "node": node, "c": c_public.hex(), "s": s_public.hex()}
    ).encode()


def verify(public_hex: str, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_federation(value: Any, *, me: str, my_key: str) -> dict[str, Any]:
    """The federation part of a ``secure-sum`` policy, checked; this site must be in it."""
    if not isinstance(value, Mapping):
        raise ConfigError("a secure-sum policy needs a federation: sites, shape, clip")
    sites = value.get("sites")
    if not isinstance(sites, Mapping) or len(sites) < 3:
        raise ConfigError(
            "federation.sites must map at least 3 site names to their identity keys (with two, "
            "the sum would reveal each input to the other)"
        )
    for name, key in sites.items():
        if not isinstance(name, str) or not isinstance(key, str) or len(key) != 64:
            raise ConfigError("federation.sites maps names to 64-hex-digit Ed25519 keys")
    if sites.get(me) != my_key:
        raise ConfigError(
            f"this datasite ({me!r}, key {my_key[:16]}...) is not among federation.sites with "
            "its own key; take the keys from each site's /api/identity"
        )
    shape = value.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        or math.prod(shape) > 1 << 20
    ):
        raise ConfigError("federation.shape is a list of positive ints (at most 2**20 numbers)")
    clip = value.get("clip")
    noise = value.get("noise_multiplier", 0.0)
    for label, number, low in (("clip", clip, 0.0), ("noise_multiplier", noise, -1e-300)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"federation.{label} must be a number")
        if not (math.isfinite(number) and number > low):
            raise ConfigError(
                f"federation.{label} must be finite and {'> 0' if low == 0 else '>= 0'}"
            )
    extra = set(value) - {"sites", "shape", "clip", "noise_multiplier"}
    if extra:
        raise ConfigError(f"unknown federation fields {sorted(extra)}")
    return {
        "sites": {k: sites[k] for k in sorted(sites)},
        "shape": list(shape),
        "clip": float(clip),  # type: ignore[arg-type]
        "noise_multiplier": float(noise),
    }


def noise_share_std(federation: Mapping[str, Any]) -> float:
    """Each site's Gaussian std so that the sum over all sites has std z * clip."""
    from shoal.privacy import distributed_noise_std

    total = float(federation["noise_multiplier"]) * float(federation["clip"])
    return distributed_noise_std(total_std=total, nodes=len(federation["sites"]))


def quantizer(federation: Mapping[str, Any], bits: int) -> Any:
    """The grid every site and the scientist share: room for the clipped array and its noise."""
    from shoal.crypto.secagg import quantizer_for

    span = float(federation["clip"]) + 8.0 * noise_share_std(federation)
    return quantizer_for(span, nodes=len(federation["sites"]), bits=bits)


class SecAggSessions:
    """The site's side: one SecAgg+ session per request, one round ever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[int, Any] = {}

    def advertise(
        self,
        rid: int,
        identity: SiteIdentity,
        federation: Mapping[str, Any],
        payload: dict[str, Any],
    ) -> dict[str, Any]:
        from shoal.crypto.secagg import AdvertiseRequest, SecAggNode

        request = AdvertiseRequest.from_dict(payload)
        params = request.params
        if sorted(params.nodes) != sorted(federation["sites"]):
            raise ProtocolError(
                f"the round's participants {sorted(params.nodes)} are not the approved "
                f"federation {sorted(federation['sites'])}"
            )
        if params.max_dropouts != 0 or params.vector_length != math.prod(federation["shape"]):
            raise ProtocolError(
                "a federated request's round has every approved site (max_dropouts 0) and the "
                "agreed vector length"
            )
        with self._lock:
            if rid in self._nodes:
                raise ProtocolError(
                    f"request {rid} has joined a secure sum already; a site takes part in one"
                )
            node = SecAggNode(node_id=identity.name)
            self._nodes[rid] = node
        reply = node.advertise(request)
        out = reply.to_dict()
        signature = identity.sign(
            advertised(reply.round_id, reply.node_id, reply.c_public, reply.s_public)
        )
        out[SIGNATURE] = np.frombuffer(signature, dtype=np.uint8).copy()
        return out

    def node(self, rid: int) -> Any:
        with self._lock:
            node = self._nodes.get(rid)
        if node is None:
            raise ProtocolError(f"request {rid} has no SecAgg session: advertise first")
        return node

    def share_keys(
        self, rid: int, federation: Mapping[str, Any], payload: dict[str, Any]
    ) -> dict[str, Any]:
        from shoal.crypto.secagg import ShareKeysRequest

        request = ShareKeysRequest.from_dict(payload)
        signatures = np.asarray(payload.get(PEER_SIGNATURES, np.zeros((0, 64), np.uint8)))
        if signatures.shape != (len(request.peers), 64) or signatures.dtype != np.uint8:
            raise ProtocolError("share_keys needs one 64-byte identity signature per peer")
        for i, peer in enumerate(request.peers):
            key = federation["sites"].get(peer)
            message = advertised(request.round_id, peer, request.c_publics[i], request.s_publics[i])
            if key is None or not verify(key, signatures[i].tobytes(), message):
                raise ProtocolError(
                    f"the keys given for peer {peer!r} are not signed by its identity key: "
                    "refusing to share secrets with it"
                )
        return dict(self.node(rid).share_keys(request).to_dict())

    def masked_input(self, rid: int, payload: dict[str, Any], vector: np.ndarray) -> dict[str, Any]:
        from shoal.crypto.secagg import MaskedInputRequest

        request = MaskedInputRequest.from_dict(payload)
        return dict(self.node(rid).masked_input(request, vector).to_dict())

    def unmask(self, rid: int, payload: dict[str, Any]) -> dict[str, Any]:
        from shoal.crypto.secagg import UnmaskRequest

        return dict(self.node(rid).unmask(UnmaskRequest.from_dict(payload)).to_dict())


def prepare_input(
    result: np.ndarray, federation: Mapping[str, Any], *, bits: int, rng: Any = None
) -> np.ndarray:
    """Clip the site's array to the agreed L2 norm, add its noise share, quantize it."""
    from shoal.privacy import make_rng

    x = np.asarray(result, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(x))
    clip = float(federation["clip"])
    if norm > clip:
        x = x * (clip / norm)
    std = noise_share_std(federation)
    generator = make_rng(rng)
    if std > 0:
        x = x + generator.normal(0.0, std, size=x.shape)
    return np.asarray(quantizer(federation, bits).quantize(x, rng=generator))


# -- the scientist's side --------------------------------------------------------------------


class FederatedRequest:
    """The same request at every site; ``result()`` runs the secure sum when all are ready."""

    def __init__(self, requests: Mapping[str, RemoteRequest], federation: Mapping[str, Any]):
        self.requests = dict(requests)
        self.federation = dict(federation)

    @property
    def status(self) -> dict[str, str]:
        return {name: r.status for name, r in self.requests.items()}

    @property
    def code_hash(self) -> str:
        hashes = {r.code_hash for r in self.requests.values()}
        if len(hashes) != 1:
            raise ProtocolError(f"the sites hold different code hashes: {sorted(hashes)}")
        return hashes.pop()

    def result(self, *, timeout: float = 300.0, bits: int = 32) -> np.ndarray:
        """Wait until every site has run the code, then combine the arrays with SecAgg+."""
        from shoal.crypto.secagg import (
            AdvertiseReply,
            MaskedInputReply,
            SecAggParams,
            SecAggServer,
            ShareKeysReply,
            UnmaskReply,
        )
        from shoal.errors import ReleaseRefused
        from shoal.wire import decode, encode

        for name, request in self.requests.items():
            state = request.wait(
                (
                    "succeeded",
                    "denied",
                    "failed",
                    "timeout",
                    "out-of-memory",
                    "withheld",
                    "released",
                ),
                timeout=timeout,
            )
            if state != "succeeded":
                raise ReleaseRefused(
                    f"site {name!r} ended {state}: {request.info.get('reason') or ''}; the "
                    "secure sum needs every approved site"
                )
        names = sorted(self.requests)
        length = math.prod(self.federation["shape"])
        params = SecAggParams.create(names, vector_length=length, max_dropouts=0, bits=bits)
        server = SecAggServer(params=params)

        def call(name: str, phase: str, payload: Mapping[str, Any]) -> dict[str, Any]:
            request = self.requests[name]
            data = request.site.call_bytes(
                "POST", f"/api/requests/{request.id}/secagg/{phase}", bytes(encode(dict(payload)))
            )
            return decode(data)

        advertise = server.advertise_request().to_dict()
        replies0 = {v: call(v, "advertise", advertise) for v in names}
        signatures = {v: np.asarray(r.pop(SIGNATURE)) for v, r in replies0.items()}
        requests1 = server.collect_keys(
            {v: AdvertiseReply.from_dict(r) for v, r in replies0.items()}
        )
        replies1 = {}
        for v, req in requests1.items():
            body = req.to_dict()
            body[PEER_SIGNATURES] = np.stack([signatures[p] for p in req.peers])
            replies1[v] = ShareKeysReply.from_dict(call(v, "share_keys", body))
        requests2 = server.collect_shares(replies1)
        replies2 = {
            v: MaskedInputReply.from_dict(call(v, "masked_input", req.to_dict()))
            for v, req in requests2.items()
        }
        requests3 = server.collect_masked(replies2)
        replies3 = {
            v: UnmaskReply.from_dict(call(v, "unmask", req.to_dict()))
            for v, req in requests3.items()
        }
        total = server.finish(replies3)
        q = quantizer(self.federation, bits)
        combined = q.dequantize_sum(total, count=len(names))
        return np.asarray(combined).reshape(self.federation["shape"])


def submit_federated(
    sites: Sequence[Datasite],
    fn: Any,
    *,
    assets: Sequence[str],
    shape: Sequence[int],
    clip: float,
    noise_multiplier: float = 0.0,
    params: Mapping[str, Any] | None = None,
    entrypoint: str | None = None,
    name: str | None = None,
) -> FederatedRequest:
    """Submit ``fn`` to every site under one code hash. ``fn`` returns ``{"result": array}``
    of ``shape``; each site clips it to L2 norm ``clip`` before the secure sum; with
    ``noise_multiplier`` z the sum carries Gaussian noise of std z * clip, added in shares by
    the sites and charged to each site's ledger."""
    identities = {}
    for site in sites:
        got = site.call("GET", "/api/identity")
        identities[str(got["name"])] = (site, str(got["public_key"]))
    if len(identities) != len(sites):
        raise ConfigError("two of the sites have the same name")
    federation = {
        "sites": {n: k for n, (_, k) in sorted(identities.items())},
        "shape": [int(d) for d in shape],
        "clip": float(clip),
        "noise_multiplier": float(noise_multiplier),
    }
    policy = {"kind": "secure-sum", "federation": federation}
    requests = {
        n: site.submit(
            fn, assets=assets, params=params, policy=policy, entrypoint=entrypoint, name=name
        )
        for n, (site, _) in identities.items()
    }
    out = FederatedRequest(requests, federation)
    out.code_hash  # noqa: B018 (checks that every site computed the same hash)
    return out
