"""SecureSum: the SecAgg+ protocol as an aggregation stage of the Core API.

``values.aggregate(Clip(1.0) | SecureSum() | Mean())`` runs the four SecAgg+ phases as
node tasks. Each node reads the value it kept from the map, applies the chain's node
transforms (clipping) itself, quantizes, masks and uploads; the server learns only the sum
of the survivors. Nodes that drop out before their masked input arrives are excluded, up to
the tolerance; one that drops out at unmasking, after it, is in the sum and is not excluded.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shoal.aggregate import Clip, NodeTransform, Reduced, Reducer, held_layout, rules
from shoal.aggregate.compress import rotate, unrotate
from shoal.core import NodeValues
from shoal.core.reduce import clip_rows
from shoal.crypto.secagg.messages import (
    AdvertiseReply,
    MaskedInputReply,
    ShareKeysReply,
    UnmaskReply,
    parse_replies,
)
from shoal.crypto.secagg.params import SecAggParams
from shoal.crypto.secagg.server import SecAggServer
from shoal.crypto.secagg.tasks import (
    ADVERTISE_TASK,
    MASKED_INPUT_TASK,
    SHARE_TASK,
    UNMASK_TASK,
    KeyAuthority,
    input_context,
    quantizer_for,
    secagg_tasks,
)
from shoal.errors import AggregationError, ConfigError, ProtocolError, TaskError
from shoal.privacy.stages import add_node_noise

__all__ = ["SecureSum", "secure_sum_tasks"]


def _held_vector(ctx: Any, payload: Mapping[str, Any], group: int) -> np.ndarray:
    """The node's kept fields, flattened and concatenated, clipped (and noised) as the
    chain asks; read through the runtime's checked accessor, which refuses fields whose
    policy forbids a secure sum and noised fields with less noise than was charged.

    ``group`` is the number of participants in the SecAgg+ parameters this node validated.
    A ``noise_total_std`` transform (distributed noise) becomes this node's share of it for
    that group, so the shares add up to the total over the real group, not a claimed one.
    """
    from shoal.runtime import read_held  # the runtime is a lower layer: import on use

    handle, fields = payload.get("handle"), payload.get("fields")
    if not isinstance(handle, str) or not isinstance(fields, list) or not fields:
        raise TaskError(f"{MASKED_INPUT_TASK} needs 'handle' and a list of 'fields'")
    transforms: list[tuple[str, float]] = []
    for spec in payload.get("transforms", []):  # the chain's node transforms, in order
        if not isinstance(spec, dict) or len(spec) != 1:
            raise TaskError(f"malformed node transform {spec!r}")
        ((kind, value),) = spec.items()
        known = kind in NODE_TRANSFORMS or kind == TOTAL_NOISE
        if not known or not isinstance(value, (int, float)) or value < 0:
            raise TaskError(
                f"node transform {spec!r} is not one this node applies "
                f"(it knows {sorted([*NODE_TRANSFORMS, TOTAL_NOISE])})"
            )
        if kind == TOTAL_NOISE:
            kind, value = "noise_std", float(value) / np.sqrt(max(group, 1))
        transforms.append((kind, float(value)))
    clip, noise_std = _effective_noise(transforms)
    request = payload.get("request")
    kept = read_held(
        ctx,
        handle,
        fields,
        use="secure",
        clip=clip,
        noise_std=noise_std,
        group=group,
        request=request if isinstance(request, str) else None,
    )
    parts = [rules.as_float(kept[f]).ravel() for f in fields]  # float32 stays float32
    vector = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if not rules.all_finite(vector):
        raise TaskError("the node's value holds NaN or infinity; it cannot join a secure sum")
    for kind, value in transforms:
        vector = NODE_TRANSFORMS[kind](vector, value)
    return vector


def _effective_noise(transforms: Sequence[tuple[str, float]]) -> tuple[float | None, float]:
    """The clip bound in force before any noise, and the total noise std after the last clip
    (a clip after noise would shrink the noise, so such a chain counts as no noise)."""
    clip: float | None = None
    variance = 0.0
    for kind, value in transforms:
        if kind == "clip_l2":
            clip = value if clip is None else min(clip, value)
            variance = 0.0
        elif kind == "noise_std":
            variance += value * value
    return clip, float(np.sqrt(variance))


def _clip(vector: np.ndarray, norm_bound: float) -> np.ndarray:
    clipped, _ = clip_rows(vector.reshape(1, -1), norm_bound)  # the library's one L2 clip
    return clipped[0]


def _rotate(vector: np.ndarray, seed: float) -> np.ndarray:
    return rotate(vector, int(seed))  # norm-preserving: a clip before it still bounds it


def _grid_only(vector: np.ndarray, bits: float) -> np.ndarray:
    return vector  # Quantize(bits) sets the secure sum's grid; the masked input task rounds


# What a node applies before masking, by the key of the stage's spec().
NODE_TRANSFORMS = {
    "clip_l2": _clip,
    "noise_std": add_node_noise,
    "rotate": _rotate,
    "quantize": _grid_only,
}
# Distributed noise stated as the total the sum must carry: each node adds its share for
# the group it sees (privacy/stages.py DistributedNoise.spec).
TOTAL_NOISE = "noise_total_std"


def secure_sum_tasks(*, authority: KeyAuthority | None = None) -> dict[str, Any]:
    """The node-side tasks a NodeApp installs to take part in secure sums (with
    ``authority``, SecAgg+ keys signed and checked with identity keys)."""
    return secagg_tasks(get_input=_held_vector, authority=authority)


@dataclass(frozen=True)
class SecureSum(Reducer):
    """The sum of the nodes' values, computed with SecAgg+ so the server sees no single one.

    ``value_range`` bounds each coordinate for quantization; with a ``Clip(c)`` before this
    stage it defaults to ``c`` (a clipped vector has no coordinate beyond its norm).
    The sum is unweighted: weighting would need a public bound on every weight, so each
    surviving node counts once, as in DP-FedAvg. ``dropout_fraction`` of the nodes may fail
    across the phases; ``max_failure_probability > 0`` allows the sparse O(log n) graph.
    ``degree`` fixes the neighbours per node (the full graph when fewer nodes take part),
    checked against the tolerance; by default the smallest safe one is chosen.
    """

    private: ClassVar[bool] = True
    weighted: ClassVar[bool] = False  # unweighted: see above

    value_range: float | None = None
    bits: int = 32
    dropout_fraction: float = 0.1
    max_failure_probability: float = 0.0
    degree: int | None = None

    def node_tasks(self) -> dict[str, Any]:
        return secure_sum_tasks()

    def reduce(
        self, values: NodeValues, weights: NodeValues | None, pre: Sequence[NodeTransform]
    ) -> Reduced:
        clip_l2 = _clip_norm(pre)
        # A fresh public rotation per sum (seeds below 2**52 survive the JSON float).
        seed = secrets.randbits(52)
        transforms = [
            {"rotate": seed} if "rotate" in stage.spec() else stage.spec() for stage in pre
        ]
        rotated = any("rotate" in t for t in transforms)
        grid = [int(t["quantize"]) for t in transforms if "quantize" in t]
        value_range = self.value_range if self.value_range is not None else clip_l2
        if value_range is None:
            raise ConfigError(
                "SecureSum needs a value range to quantize: put Clip(c) before it or pass "
                "SecureSum(value_range=...)"
            )
        layout, holders, excluded = held_layout(values)
        federation = values.federation
        needed = max(federation.min_nodes, 1)
        if len(holders) < needed:
            raise AggregationError(f"only {len(holders)} node(s) hold a value for a secure sum")
        length = sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in layout)
        vector_length = len(rotate(np.zeros(length), 0)) if rotated else length
        bits = _modulus_bits(grid[0], len(holders)) if grid else self.bits
        extra = {
            "handle": values.handle,
            "fields": [name for name, _, _ in layout],
            "clip": float(value_range),
            "transforms": transforms,
        }
        if values.request is not None:
            # Every participant's value must come from this one request (checked at each).
            extra["request"] = values.request
        params = SecAggParams.create(
            holders,
            vector_length=vector_length,
            dropout_fraction=self.dropout_fraction,
            bits=bits,
            max_failure_probability=self.max_failure_probability,
            degree=None if self.degree is None else min(self.degree, len(holders) - 1),
            # Every node reads and prepares its input as the parameters say (checked there).
            context=input_context(extra),
        )
        server = SecAggServer(params=params)

        def phase(task: str, kind: type[Any], per_node: Mapping[str, Any]) -> dict[str, Any]:
            requests = list(per_node.values())
            if requests and all(r is requests[0] for r in requests):
                # One request for everyone (advertise, unmask): encode it once, not per node.
                replies, failures = federation.request(list(per_node), task, common=requests[0])
            else:
                replies, failures = federation.request(list(per_node), task, per_node=per_node)
            parsed, malformed = parse_replies(kind, replies)
            for node, failure in failures.items():
                excluded[node] = f"secure sum ({task}): {failure.kind.value}: {failure.detail}"
            for node, reason in malformed.items():
                excluded[node] = f"secure sum ({task}): malformed reply: {reason}"
            return parsed

        advertise = server.advertise_request().to_dict()
        keys = phase(ADVERTISE_TASK, AdvertiseReply, dict.fromkeys(holders, advertise))
        share_requests = server.collect_keys(keys)
        shares = phase(
            SHARE_TASK, ShareKeysReply, {v: r.to_dict() for v, r in share_requests.items()}
        )
        masked_requests = server.collect_shares(shares)
        masked = phase(
            MASKED_INPUT_TASK,
            MaskedInputReply,
            {v: {**r.to_dict(), **extra} for v, r in masked_requests.items()},
        )
        unmask_requests = server.collect_masked(masked)
        unmask_dicts: dict[int, dict[str, Any]] = {}  # the same request object, one dict
        unmasked = phase(
            UNMASK_TASK,
            UnmaskReply,
            {v: unmask_dicts.setdefault(id(r), r.to_dict()) for v, r in unmask_requests.items()},
        )
        total = server.finish(unmasked)
        survivors = server.survivors
        if len(survivors) < needed:
            raise ProtocolError(
                f"{len(survivors)} node(s) completed the secure sum, fewer than the minimum "
                f"of {needed}"
            )
        for node, reason in server.rejected.items():
            excluded.setdefault(node, f"secure sum: {reason}")
        # A survivor's masked input is in the sum, whatever happened to it at unmasking (a
        # dropout, a bad reply): it is no exclusion. Callers count the nodes in the aggregate
        # as the holders minus the exclusions (participants, SCAFFOLD's share, DP-FedBuff's
        # participation), so an exclusion here would undercount them.
        for node in survivors:
            excluded.pop(node, None)
        quantizer = quantizer_for(float(value_range), nodes=len(params.nodes), bits=bits)
        vector = quantizer.dequantize_sum(total, count=len(survivors))
        if rotated:
            vector = unrotate(vector, seed, length)
        return Reduced(
            vector=np.asarray(vector, dtype=np.float64),
            count=len(survivors),
            weight=float(len(survivors)),
            averaged=False,
            layout=layout,
            node_ids=tuple(survivors),
            excluded=excluded,
        )


def _modulus_bits(grid_bits: int, nodes: int) -> int:
    """The fewest bits whose modulus sums ``nodes`` inputs of ``2**grid_bits - 1`` levels."""
    need = (2**grid_bits - 1) * nodes
    return max(need.bit_length(), 1)


def _clip_norm(pre: Sequence[NodeTransform]) -> float | None:
    """The tightest clip bound in the chain; every stage must be one nodes can apply."""
    norm: float | None = None
    for stage in pre:
        if stage.compresses and "topk" in stage.spec():
            raise ConfigError(
                "TopK cannot run inside a secure sum: each node would keep different "
                "coordinates, and masking needs the same vector positions at every node (so "
                "the masked vector would be full length anyway). Under SecureSum compress "
                "with RandomRotation() and Quantize(bits)"
            )
        try:
            keys = set(stage.spec())
        except NotImplementedError:
            keys = set()
        if not keys or not keys <= {*NODE_TRANSFORMS, TOTAL_NOISE}:
            raise ConfigError(
                f"{type(stage).__name__} cannot run inside a secure sum: nodes apply only "
                f"{sorted([*NODE_TRANSFORMS, TOTAL_NOISE])} (Clip, DistributedNoise) before "
                "masking"
            )
        if isinstance(stage, Clip):
            norm = stage.l2 if norm is None else min(norm, stage.l2)
    return norm
