"""The node's side of SecAgg+ as a pure state machine: one method per phase, no I/O.

Each method takes the server's request (a message), checks it against everything the node
already knows, and returns the reply. Anything inconsistent raises ProtocolError and leaves
the node's secrets unrevealed; phases run once each, in order.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.crypto import shamir
from shoal.crypto.keys import (
    AEAD_OVERHEAD,
    KEY_BYTES,
    KeyPair,
    agree_many,
    decrypt,
    derive_key,
    encrypt,
)
from shoal.crypto.prg import SEED_BYTES, add_masks
from shoal.crypto.secagg.messages import (
    AdvertiseReply,
    AdvertiseRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from shoal.crypto.secagg.params import SecAggParams, json_strings
from shoal.errors import AggregationError, ProtocolError

__all__ = [
    "CIPHERTEXT_BYTES",
    "SHARE_BYTES",
    "NodePhase",
    "SecAggNode",
    "b_commitment",
    "mask_seeds",
    "reduce_bits",
    "share_associated_data",
]

_INDEX = 4  # bytes for each node index in a share plaintext
SHARE_BYTES = shamir.ELEMENT_BYTES * shamir.num_chunks(KEY_BYTES)  # one share of a 32-byte key
_PLAINTEXT_BYTES = 2 * _INDEX + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = AEAD_OVERHEAD + _PLAINTEXT_BYTES


class NodePhase(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"


def share_associated_data(params: SecAggParams, sender: str, receiver: str) -> bytes:
    """AEAD associated data: a ciphertext opens only for this sender, receiver and round."""
    return json_strings("secagg/share", params.round_id, sender, receiver)


def b_commitment(params: SecAggParams, node: str, b: bytes) -> bytes:
    """Hash commitment to a self-mask seed, so the server can check what it rebuilt."""
    tag = json_strings("secagg/b", params.round_id, node)
    return hashlib.sha256(tag + b"\x00" + b).digest()


def mask_seeds(
    params: SecAggParams, node: str, private: bytes, peers: Sequence[tuple[str, bytes]]
) -> list[bytes]:
    """Pairwise mask seeds of ``node`` with each ``(peer, peer_s_public)``, the same from both
    ends of each pair."""
    shared = agree_many(private, [pk for _, pk in peers])
    return [
        derive_key(z, purpose="secagg/mask-seed", context=params.pair_context(node, p))
        for z, (p, _) in zip(shared, peers)
    ]


@dataclass
class _Peer:
    c_public: bytes
    s_public: bytes
    enc_key: bytes = field(default=b"", repr=False)
    mask_seed: bytes = field(default=b"", repr=False)
    s_share: bytes | None = None  # what this peer entrusted to us, once decrypted
    b_share: bytes | None = None


@dataclass
class SecAggNode:
    """One node's SecAgg+ session. Create it when the server's advertise request arrives."""

    node_id: str
    params: SecAggParams | None = None
    phase: NodePhase = NodePhase.NEW
    c_keys: KeyPair | None = field(default=None, repr=False)
    s_keys: KeyPair | None = field(default=None, repr=False)
    b: bytes | None = field(default=None, repr=False)
    peers: dict[str, _Peer] = field(default_factory=dict, repr=False)
    masked_with: tuple[str, ...] = ()
    revealed: dict[str, str] = field(default_factory=dict)

    # -- phase 0 ---------------------------------------------------------------------------

    def advertise(self, request: AdvertiseRequest) -> AdvertiseReply:
        """Check the round's parameters and publish two fresh public keys."""
        self._check_phase(NodePhase.NEW, "advertise")
        params = request.params
        if self.node_id not in params.index:
            raise ProtocolError(
                f"node {self.node_id!r} was asked to join round {params.round_id} but is not "
                "among its participants"
            )
        self.params = params
        self.c_keys, self.s_keys = KeyPair.generate(), KeyPair.generate()
        self.phase = NodePhase.ADVERTISED
        return AdvertiseReply(
            round_id=params.round_id,
            node_id=self.node_id,
            c_public=self.c_keys.public,
            s_public=self.s_keys.public,
        )

    # -- phase 1 ---------------------------------------------------------------------------

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Shamir-share the masking key and a fresh self-mask seed among the neighbours."""
        params = self._expect(NodePhase.ADVERTISED, "share_keys", request.round_id)
        assert self.c_keys is not None and self.s_keys is not None
        own = set(params.neighbours(self.node_id))
        if len(request.c_publics) != len(request.peers) or len(request.s_publics) != len(
            request.peers
        ):
            raise ProtocolError("share_keys request: one pair of public keys per peer expected")
        stray = [p for p in request.peers if p not in own]
        if stray:
            raise ProtocolError(
                f"share_keys request lists {stray}, who are not neighbours of {self.node_id!r}"
            )
        if len(set(request.peers)) != len(request.peers):
            raise ProtocolError("share_keys request lists a peer twice")
        if len(request.peers) < params.threshold:
            raise ProtocolError(
                f"only {len(request.peers)} neighbours of {self.node_id!r} are online, fewer "
                f"than threshold {params.threshold}: its secrets could never be rebuilt"
            )
        keys = [*request.c_publics, *request.s_publics, self.c_keys.public, self.s_keys.public]
        if any(len(k) != KEY_BYTES for k in keys) or len(set(keys)) != len(keys):
            raise ProtocolError(
                "share_keys request repeats a public key (or returns ours): refuse, a key may "
                "have been substituted"
            )
        peers = sorted(request.peers, key=params.index.__getitem__)
        given = {p: (c, s) for p, c, s in zip(request.peers, request.c_publics, request.s_publics)}
        # Both agreements now, so that a bad key of either kind is refused before sharing.
        shared = agree_many(self.c_keys.private, [given[p][0] for p in peers])
        seeds = mask_seeds(
            params, self.node_id, self.s_keys.private, [(p, given[p][1]) for p in peers]
        )
        self.peers = {
            p: _Peer(
                c_public=given[p][0],
                s_public=given[p][1],
                enc_key=derive_key(
                    z,
                    purpose="secagg/share-encryption",
                    context=params.pair_context(self.node_id, p),
                ),
                mask_seed=seed,
            )
            for p, z, seed in zip(peers, shared, seeds)
        }
        self.b = os.urandom(SEED_BYTES)
        xs = [params.index[p] + 1 for p in peers]
        s_shares = shamir.split(self.s_keys.private, threshold=params.threshold, xs=xs)
        b_shares = shamir.split(self.b, threshold=params.threshold, xs=xs)
        me = params.index[self.node_id]
        ciphertexts = []
        for p, s_share, b_share in zip(peers, s_shares, b_shares):
            plaintext = (
                me.to_bytes(_INDEX, "big")
                + params.index[p].to_bytes(_INDEX, "big")
                + s_share.to_bytes()
                + b_share.to_bytes()
            )
            ciphertexts.append(
                encrypt(
                    self.peers[p].enc_key,
                    plaintext,
                    associated_data=share_associated_data(params, self.node_id, p),
                )
            )
        self.phase = NodePhase.SHARED
        return ShareKeysReply(
            round_id=params.round_id,
            node_id=self.node_id,
            recipients=tuple(peers),
            ciphertexts=tuple(ciphertexts),
            b_commitment=b_commitment(params, self.node_id, self.b),
        )

    # -- phase 2 ---------------------------------------------------------------------------

    def masked_input(self, request: MaskedInputRequest, x: Any) -> MaskedInputReply:
        """Store the shares entrusted to us and send ``x`` masked, modulo 2**bits.

        ``x`` holds integers in [0, 2**bits) (quantize real values first). Runs once: two
        inputs masked alike would reveal their difference.
        """
        params = self._expect(NodePhase.SHARED, "masked_input", request.round_id)
        assert self.s_keys is not None and self.c_keys is not None and self.b is not None
        vector = _check_input(x, params)
        if len(request.ciphertexts) != len(request.senders):
            raise ProtocolError("masked_input request: one ciphertext per sender expected")
        if len(set(request.senders)) != len(request.senders):
            raise ProtocolError("masked_input request lists a sender twice")
        stray = [u for u in request.senders if u not in self.peers]
        if stray:
            raise ProtocolError(
                f"masked_input request carries shares from {stray}, whose keys "
                f"{self.node_id!r} was never given in this round"
            )
        if len(request.senders) < params.threshold:
            raise ProtocolError(
                f"only {len(request.senders)} neighbours of {self.node_id!r} shared keys, fewer "
                f"than threshold {params.threshold}: its masks could never be removed"
            )
        me = params.index[self.node_id]
        opened: dict[str, tuple[bytes, bytes]] = {}
        for u, blob in zip(request.senders, request.ciphertexts):
            plaintext = decrypt(
                self.peers[u].enc_key,
                blob,
                associated_data=share_associated_data(params, u, self.node_id),
            )
            if len(plaintext) != _PLAINTEXT_BYTES:
                raise ProtocolError(f"the share from {u!r} has the wrong length")
            sender = int.from_bytes(plaintext[:_INDEX], "big")
            receiver = int.from_bytes(plaintext[_INDEX : 2 * _INDEX], "big")
            if sender != params.index[u] or receiver != me:
                raise ProtocolError(f"the share from {u!r} was addressed to another pair")
            s_share = plaintext[2 * _INDEX : 2 * _INDEX + SHARE_BYTES]
            b_share = plaintext[2 * _INDEX + SHARE_BYTES :]
            for share in (s_share, b_share):
                shamir.Share.from_bytes(me + 1, share)  # reject malformed shares now
            opened[u] = (s_share, b_share)
        # All checks passed: only now commit to state and compute.
        for u, (s_share, b_share) in opened.items():
            self.peers[u].s_share, self.peers[u].b_share = s_share, b_share
        senders = sorted(request.senders, key=params.index.__getitem__)
        masked = vector  # our own copy of x
        add_masks(
            masked,
            [(self.b, 1)]
            + [(self.peers[u].mask_seed, 1 if me < params.index[u] else -1) for u in senders],
        )
        reduce_bits(masked, params.bits)
        self.masked_with = tuple(senders)
        self.phase = NodePhase.MASKED
        return MaskedInputReply(round_id=params.round_id, node_id=self.node_id, masked=masked)

    # -- phase 3 ---------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal, per neighbour, the self-mask share if it survived or the key share if not.

        Never both for the same peer, in this call or across calls: with either kind alone
        the server learns nothing about that peer's input.
        """
        params = self._expect(NodePhase.MASKED, "unmask", request.round_id)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise ProtocolError("unmask request lists a node twice")
        both = survivors & dropped
        if both:
            raise ProtocolError(
                f"unmask request names {sorted(both)} both surviving and dropped: refusing to "
                "reveal both kinds of share for the same peer"
            )
        unknown = (survivors | dropped) - set(params.index)
        if unknown:
            raise ProtocolError(f"unmask request names non-participants {sorted(unknown)}")
        if self.node_id not in survivors:
            raise ProtocolError(
                f"unmask request says {self.node_id!r} dropped, yet asks it to unmask"
            )
        if len(survivors) < params.min_survivors:
            raise ProtocolError(
                f"only {len(survivors)} survivors, below the round's minimum of "
                f"{params.min_survivors}: refusing to unmask a sum of so few inputs"
            )
        neighbours = set(params.neighbours(self.node_id))
        listed = (survivors | dropped) & neighbours
        mine = set(self.masked_with)
        if listed != mine:
            raise ProtocolError(
                "unmask request disagrees with the shares this node holds: neighbours "
                f"{sorted(mine ^ listed)} are listed without having shared keys, or vice versa"
            )
        decision = {u: ("b" if u in survivors else "s") for u in self.masked_with}
        clash = [u for u, kind in decision.items() if self.revealed.get(u, kind) != kind]
        if clash:
            raise ProtocolError(
                f"already revealed the other kind of share for {clash}: refusing to reveal both"
            )
        self.revealed.update(decision)
        b_peers = tuple(u for u in self.masked_with if decision[u] == "b")
        s_peers = tuple(u for u in self.masked_with if decision[u] == "s")
        b_shares = tuple(self.peers[u].b_share or b"" for u in b_peers)
        s_shares = tuple(self.peers[u].s_share or b"" for u in s_peers)
        return UnmaskReply(
            round_id=params.round_id,
            node_id=self.node_id,
            b_peers=b_peers,
            b_shares=b_shares,
            s_peers=s_peers,
            s_shares=s_shares,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _check_phase(self, phase: NodePhase, step: str) -> None:
        if self.phase is not phase:
            raise ProtocolError(
                f"node {self.node_id!r} cannot run {step} now: its SecAgg session is in phase "
                f"{self.phase.value!r} (each phase runs once, in order)"
            )

    def _expect(self, phase: NodePhase, step: str, round_id: str) -> SecAggParams:
        # unmask leaves the phase at MASKED, so a lost unmask reply can be asked for again
        self._check_phase(phase, step)
        assert self.params is not None
        if round_id != self.params.round_id:
            raise ProtocolError(
                f"{step} request is for round {round_id!r}, but this session is round "
                f"{self.params.round_id!r}"
            )
        return self.params


def reduce_bits(values: np.ndarray, bits: int) -> None:
    if bits < 8 * values.dtype.itemsize:
        np.bitwise_and(values, values.dtype.type((1 << bits) - 1), out=values)


def _check_input(x: Any, params: SecAggParams) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != params.vector_length:
        raise AggregationError(
            f"the secure-sum input must be a vector of length {params.vector_length}, got "
            f"shape {arr.shape}"
        )
    if arr.dtype.kind not in "ui":
        raise AggregationError(
            f"the secure-sum input must hold integers in [0, 2**{params.bits}), got dtype "
            f"{arr.dtype}; quantize real values first (shoal.crypto.Quantizer)"
        )
    fits = arr.dtype.kind == "u" and 8 * arr.dtype.itemsize <= params.bits
    if arr.size and not fits and (int(arr.min()) < 0 or int(arr.max()) >> params.bits):
        raise AggregationError(f"the secure-sum input must lie in [0, 2**{params.bits})")
    return np.array(arr, dtype=params.dtype)  # a copy: it is masked in place
