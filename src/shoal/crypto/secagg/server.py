"""The server's side of SecAgg+ as a pure state machine: one method per phase, no I/O.

Each ``collect_*`` method takes the replies that arrived (missing nodes have dropped out),
drops replies that are malformed or inconsistent (recorded in ``rejected``), and returns the
next phase's request for each remaining node. ``finish`` removes the masks and returns the
exact sum, modulo 2**bits, of the inputs of the nodes that sent a masked input.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import numpy as np

from shoal.crypto import shamir
from shoal.crypto.keys import KEY_BYTES, public_from_private
from shoal.crypto.prg import SEED_BYTES, add_masks
from shoal.crypto.secagg.messages import (
    SIGNATURE_BYTES,
    AdvertiseReply,
    AdvertiseRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from shoal.crypto.secagg.node import CIPHERTEXT_BYTES, b_commitment, mask_seeds, reduce_bits
from shoal.crypto.secagg.params import SecAggParams
from shoal.errors import NotEnoughNodes, ProtocolError

__all__ = ["SecAggServer", "ServerPhase"]


class ServerPhase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


class SecAggServer:
    """One SecAgg+ round at the server. It never sees an input, only masked vectors."""

    def __init__(self, *, params: SecAggParams) -> None:
        self.params = params
        self.phase = ServerPhase.ADVERTISE
        self.rejected: dict[str, str] = {}
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # U1: node -> (c_public, s_public)
        self._ciphertexts: dict[str, dict[str, bytes]] = {}  # U2: sender -> receiver -> blob
        self._commitments: dict[str, bytes] = {}
        self._total: np.ndarray | None = None
        self._survivors: tuple[str, ...] = ()  # U3
        self._dropped: tuple[str, ...] = ()  # U2 - U3
        self.result: np.ndarray | None = None

    # -- public views ----------------------------------------------------------------------

    @property
    def survivors(self) -> tuple[str, ...]:
        """Nodes whose inputs are in the sum (known once masked inputs are collected)."""
        return self._survivors

    @property
    def dropped(self) -> tuple[str, ...]:
        """Nodes that shared keys but sent no (valid) masked input."""
        return self._dropped

    # -- phase 0 ---------------------------------------------------------------------------

    def advertise_request(self) -> AdvertiseRequest:
        """The same request for every node in ``params.nodes``."""
        self._check_phase(ServerPhase.ADVERTISE, "advertise_request")
        return AdvertiseRequest(params=self.params)

    def collect_keys(self, replies: Mapping[str, AdvertiseReply]) -> dict[str, ShareKeysRequest]:
        """Record public keys; send each node those of its neighbours that advertised."""
        self._check_phase(ServerPhase.ADVERTISE, "collect_keys")
        params = self.params
        valid: dict[str, tuple[bytes, bytes]] = {}
        signatures: dict[str, bytes] = {}
        for node, reply in self._expected(replies, params.nodes, AdvertiseReply):
            valid[node] = (reply.c_public, reply.s_public)
            if reply.signature:
                signatures[node] = reply.signature
        # A key seen twice means a replayed or copied key: trust neither holder.
        seen: dict[bytes, list[str]] = {}
        for node, (c, s) in valid.items():
            for key in (c, s):
                seen.setdefault(key, []).append(node)
        for holders in seen.values():
            if len(holders) > 1:
                for node in holders:
                    if valid.pop(node, None) is not None:
                        self.rejected[node] = "advertised a public key that another node also used"
        self._keys = {v: valid[v] for v in params.nodes if v in valid}
        self._require(len(self._keys), "advertised keys")
        requests = {}
        for v in self._keys:
            peers = tuple(u for u in params.graph[v] if u in self._keys)
            requests[v] = ShareKeysRequest(
                round_id=params.round_id,
                peers=peers,
                c_publics=tuple(self._keys[u][0] for u in peers),
                s_publics=tuple(self._keys[u][1] for u in peers),
                # Relayed, never checked here: the peers check them against identity keys
                # they hold (the server is the party they guard against).
                signatures=(
                    tuple(signatures.get(u, bytes(SIGNATURE_BYTES)) for u in peers)
                    if signatures
                    else ()
                ),
            )
        self.phase = ServerPhase.SHARE_KEYS
        return requests

    # -- phase 1 ---------------------------------------------------------------------------

    def collect_shares(
        self, replies: Mapping[str, ShareKeysReply]
    ) -> dict[str, MaskedInputRequest]:
        """Route each encrypted share to its recipient."""
        self._check_phase(ServerPhase.SHARE_KEYS, "collect_shares")
        params = self.params
        for node, reply in self._expected(replies, tuple(self._keys), ShareKeysReply):
            expected = tuple(u for u in params.graph[node] if u in self._keys)
            if set(reply.recipients) != set(expected) or len(reply.recipients) != len(expected):
                self._reject(node, "addressed shares to nodes other than its online neighbours")
            elif any(len(c) != CIPHERTEXT_BYTES for c in reply.ciphertexts):
                self._reject(node, f"sent ciphertexts that are not {CIPHERTEXT_BYTES} bytes")
            else:
                self._ciphertexts[node] = dict(zip(reply.recipients, reply.ciphertexts))
                self._commitments[node] = reply.b_commitment
        self._require(len(self._ciphertexts), "shared keys")
        requests = {}
        for v in self._ciphertexts:
            senders = tuple(u for u in params.graph[v] if u in self._ciphertexts)
            requests[v] = MaskedInputRequest(
                round_id=params.round_id,
                senders=senders,
                ciphertexts=tuple(self._ciphertexts[u][v] for u in senders),
            )
        self.phase = ServerPhase.MASKED_INPUT
        return requests

    # -- phase 2 ---------------------------------------------------------------------------

    def collect_masked(self, replies: Mapping[str, MaskedInputReply]) -> dict[str, UnmaskRequest]:
        """Add up the masked inputs; tell survivors who survived and who dropped."""
        self._check_phase(ServerPhase.MASKED_INPUT, "collect_masked")
        params = self.params
        total = np.zeros(params.vector_length, dtype=params.dtype)
        survivors = []
        for node, reply in self._expected(replies, tuple(self._ciphertexts), MaskedInputReply):
            masked = reply.masked
            if masked.shape != (params.vector_length,) or masked.dtype != params.dtype:
                self._reject(
                    node,
                    f"sent a masked vector of shape {masked.shape} and dtype {masked.dtype}, "
                    f"not ({params.vector_length},) {params.dtype}",
                )
            elif params.bits < 8 * params.dtype.itemsize and int(masked.max()) >> params.bits:
                self._reject(node, f"sent values outside [0, 2**{params.bits})")
            else:
                np.add(total, masked, out=total)
                survivors.append(node)
        self._require(len(survivors), "sent masked inputs")
        alive = set(survivors)
        self._survivors = tuple(v for v in params.nodes if v in alive)
        self._dropped = tuple(v for v in self._ciphertexts if v not in alive)
        self._total = total
        self.phase = ServerPhase.UNMASK
        request = UnmaskRequest(
            round_id=params.round_id, survivors=self._survivors, dropped=self._dropped
        )
        return {v: request for v in self._survivors}

    # -- phase 3 ---------------------------------------------------------------------------

    def finish(self, replies: Mapping[str, UnmaskReply]) -> np.ndarray:
        """Rebuild survivors' self-masks and dropped nodes' mask keys; return the exact sum."""
        self._check_phase(ServerPhase.UNMASK, "finish")
        params = self.params
        alive, gone = set(self._survivors), set(self._dropped)
        b_shares: dict[str, list[shamir.Share]] = {v: [] for v in self._survivors}
        s_shares: dict[str, list[shamir.Share]] = {v: [] for v in self._dropped}
        answered = 0
        for node, reply in self._expected(replies, self._survivors, UnmaskReply):
            held = [u for u in params.graph[node] if u in self._ciphertexts]
            if set(reply.b_peers) != {u for u in held if u in alive} or set(reply.s_peers) != {
                u for u in held if u in gone
            }:
                self._reject(node, "revealed shares for other peers than it was asked for")
                continue
            x = params.index[node] + 1
            try:
                parsed_b = [
                    (u, shamir.Share.from_bytes(x, s))
                    for u, s in zip(reply.b_peers, reply.b_shares)
                ]
                parsed_s = [
                    (u, shamir.Share.from_bytes(x, s))
                    for u, s in zip(reply.s_peers, reply.s_shares)
                ]
            except ProtocolError as exc:
                self._reject(node, f"sent a malformed share: {exc}")
                continue
            if any(len(s.ys) != shamir.num_chunks(KEY_BYTES) for _, s in parsed_b + parsed_s):
                self._reject(node, "sent shares of the wrong size")
                continue
            for u, share in parsed_b:
                b_shares[u].append(share)
            for u, share in parsed_s:
                s_shares[u].append(share)
            answered += 1
        self._require(answered, "answered the unmask request")
        assert self._total is not None
        total = self._total.copy()
        masks: list[tuple[bytes, int]] = []
        for v in self._survivors:
            b = self._rebuild(b_shares[v], v, "self-mask seed", SEED_BYTES)
            if b_commitment(params, v, b) != self._commitments[v]:
                raise ProtocolError(
                    f"the self-mask seed rebuilt for {v!r} does not match its commitment: a "
                    "share was corrupted; no result"
                )
            masks.append((b, -1))
        for u in self._dropped:
            partners = [v for v in params.graph[u] if v in alive]
            if not partners:
                continue  # its pairwise masks never entered the sum
            s_private = self._rebuild(s_shares[u], u, "masking key", KEY_BYTES)
            if public_from_private(s_private) != self._keys[u][1]:
                raise ProtocolError(
                    f"the masking key rebuilt for dropped node {u!r} does not match its public "
                    "key: a share was corrupted; no result"
                )
            iu = params.index[u]
            seeds = mask_seeds(params, u, s_private, [(v, self._keys[v][1]) for v in partners])
            # v added +mask if its index is lower than u's, so undo with the opposite sign
            masks += [(seed, -1 if params.index[v] < iu else 1) for v, seed in zip(partners, seeds)]
        add_masks(total, masks)
        reduce_bits(total, params.bits)
        self.result = total
        self.phase = ServerPhase.DONE
        return total

    # -- helpers ---------------------------------------------------------------------------

    def _rebuild(self, shares: list[shamir.Share], node: str, what: str, length: int) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            raise NotEnoughNodes(
                f"only {len(shares)} neighbours of {node!r} revealed shares of its {what}, "
                f"below threshold {t}: the masks cannot be removed; no result"
            )
        shares = sorted(shares, key=lambda s: s.x)
        return shamir.combine(shares, threshold=t, length=length)

    def _check_phase(self, phase: ServerPhase, step: str) -> None:
        if self.phase is not phase:
            raise ProtocolError(
                f"the SecAgg server cannot run {step} in phase {self.phase.value!r}; "
                f"it expects {phase.value!r}"
            )

    def _expected(
        self, replies: Mapping[str, Any], asked: tuple[str, ...], kind: type[Any]
    ) -> list[tuple[str, Any]]:
        """Replies from nodes that were asked, of the right type and round, in node order."""
        out = []
        for node in asked:
            reply: Any = replies.get(node)
            if reply is None:
                continue
            if not isinstance(reply, kind):
                self._reject(node, f"sent a {type(reply).__name__}, not a {kind.__name__}")
            elif reply.round_id != self.params.round_id:
                self._reject(node, f"answered for round {reply.round_id!r}")
            elif reply.node_id != node:
                self._reject(node, f"answered under the name {reply.node_id!r}")
            else:
                out.append((node, reply))
        asked_set = set(asked)
        for node in replies:
            if node not in asked_set:
                self.rejected.setdefault(node, "answered without being asked")
        return out

    def _reject(self, node: str, reason: str) -> None:
        self.rejected[node] = reason

    def _require(self, alive: int, what: str) -> None:
        if len(self.params.nodes) - alive > self.params.max_dropouts:
            raise NotEnoughNodes(
                f"only {alive} of {len(self.params.nodes)} nodes {what}; the round tolerates "
                f"{self.params.max_dropouts} dropouts (needs {self.params.min_survivors}); no "
                "result"
            )
