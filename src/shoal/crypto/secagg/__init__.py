"""SecAgg+: secure aggregation with sparse neighbour graphs (Bell et al., CCS'20).

The server learns the sum, modulo 2**bits, of the quantized inputs of the nodes that sent a
masked input, and nothing else about any single input. It builds on Bonawitz et al. (CCS'17):
each node masks its input with a self-mask PRG(b) and pairwise masks PRG(s_ij) shared with
its neighbours; the pairwise masks cancel in the sum, and the server rebuilds, from Shamir
shares held by neighbours, the self-masks of survivors and the pairwise keys of dropped nodes.

Threat model
    * Server: honest-but-curious for privacy (it follows the message flow but may look at
      everything it receives). Nodes additionally defend against a server that lies about
      who dropped: a node reveals, per peer, either the self-mask share or the masking-key
      share, never both (also across repeated requests), and ``threshold > degree / 2``
      means no server can gather ``threshold`` shares of both kinds for one node. Nodes
      check the parameters themselves (threshold, degree, minimum survivors) and refuse an
      unmask request with fewer survivors than the round's minimum.
    * Nodes: up to ``threshold - 1`` of a node's neighbours may collude with the server
      without learning its input. Nodes are trusted to send well-formed values: SecAgg
      hides inputs, it does not bound them (clip and quantize before, see ``Quantizer``).
    * Not covered: an actively malicious server that also forges messages between nodes,
      unless nodes have identity keys: with a ``KeyAuthority`` each node signs the keys it
      advertises and checks its peers' signatures (the datasite's federated requests do);
      there is no consistency round. Transport authentication is the runtime's job (TLS,
      node certificates).

Parameters and trade-offs
    * ``degree`` k: neighbours per node. Node cost is k + 1 mask expansions of the vector
      and O(k) key agreements; the full graph (k = n - 1) is used for small n. Sparse
      graphs make cost O(log n) per node instead of O(n).
    * ``threshold`` t, with k/2 < t <= k: larger t resists more colluding neighbours,
      smaller t tolerates more dropouts.
    * ``max_dropouts`` D: failures tolerated across all phases. With the default worst-case
      guarantee, t <= k - D (so k >= 2D + 1); with ``max_failure_probability`` p > 0, random
      dropouts may leave a node with fewer than t share holders with probability <= p
      (union bound), which permits Bell et al.'s logarithmic degree.
    * ``bits``: the modulus 2**bits; ``Quantizer`` picks a grid so that the sum of n
      inputs never wraps, so more nodes cost resolution.

Beyond tolerance, or with corrupted shares (checked against commitments and public keys),
the server raises ProtocolError and returns no result: never a silently wrong sum.
"""

from __future__ import annotations

from shoal.crypto.secagg.aggregate import SecureSum, secure_sum_tasks
from shoal.crypto.secagg.inmemory import PHASES, run_secagg_in_memory
from shoal.crypto.secagg.messages import (
    AdvertiseReply,
    AdvertiseRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    parse_replies,
)
from shoal.crypto.secagg.node import NodePhase, SecAggNode
from shoal.crypto.secagg.params import SecAggParams, failure_probability_bound
from shoal.crypto.secagg.server import SecAggServer, ServerPhase
from shoal.crypto.secagg.tasks import (
    ADVERTISE_TASK,
    MASKED_INPUT_TASK,
    SHARE_TASK,
    UNMASK_TASK,
    KeyAuthority,
    input_context,
    quantizer_for,
    secagg_tasks,
    signed_keys,
)

__all__ = [
    "ADVERTISE_TASK",
    "MASKED_INPUT_TASK",
    "PHASES",
    "SHARE_TASK",
    "UNMASK_TASK",
    "AdvertiseReply",
    "AdvertiseRequest",
    "KeyAuthority",
    "MaskedInputReply",
    "MaskedInputRequest",
    "NodePhase",
    "SecAggNode",
    "SecAggParams",
    "SecAggServer",
    "SecureSum",
    "ServerPhase",
    "ShareKeysReply",
    "ShareKeysRequest",
    "UnmaskReply",
    "UnmaskRequest",
    "failure_probability_bound",
    "input_context",
    "parse_replies",
    "quantizer_for",
    "run_secagg_in_memory",
    "secagg_tasks",
    "secure_sum_tasks",
    "signed_keys",
]
