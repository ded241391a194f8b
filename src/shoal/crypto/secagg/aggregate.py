"""SecureSum: the SecAgg+ protocol as an aggregation stage of the Core API.

``values.aggregate(Clip(1.0) | SecureSum() | Mean())`` runs the four SecAgg+ phases as
node tasks. Each node reads the value it kept from the map, applies the chain's node
transforms (clipping) itself, quantizes, masks and uploads; the server learns only the sum
of the survivors. Nodes that drop out before their masked input arrives are excluded, up to
the tolerance; one that drops out at unmasking, after it, is in the sum and is not excluded.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shoal.aggregate import Clip, NodeTransform, Reduced, Reducer, held_layout, rules
from shoal.aggregate.compress import (
    feedback_slot,
    rotate,
    subset_positions,
    subset_size,
    unrotate,
)
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
    PreparedInput,
    input_context,
    quantizer_for,
    secagg_tasks,
)
from shoal.errors import AggregationError, ConfigError, ProtocolError, TaskError
from shoal.privacy.stages import add_node_noise

__all__ = ["SecureSum", "secure_sum_tasks"]


def _held_vector(ctx: Any, payload: Mapping[str, Any], group: int) -> np.ndarray | PreparedInput:
    """The node's kept fields, flattened and concatenated, clipped (and noised) as the
    chain asks; read through the runtime's checked accessor, which refuses fields whose
    policy forbids a secure sum and noised fields with less noise than was charged.

    ``group`` is the number of participants in the SecAgg+ parameters this node validated.
    A ``noise_total_std`` transform (distributed noise) becomes this node's share of it for
    that group, so the shares add up to the total over the real group, not a claimed one.
    A ``subset`` keeps the public positions its seed picks; with error feedback the node adds
    its residual before the first lossy step and keeps, in its own state, what it did not
    send (including what the secure sum's range would have cut off).
    """
    from shoal.runtime import read_held  # the runtime is a lower layer: import on use

    handle, fields = payload.get("handle"), payload.get("fields")
    if not isinstance(handle, str) or not isinstance(fields, list) or not fields:
        raise TaskError(f"{MASKED_INPUT_TASK} needs 'handle' and a list of 'fields'")
    transforms = _node_transforms(payload.get("transforms", []), group)
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
    subset = next((v for k, v in transforms if k == "subset"), None)
    if subset is None or not subset.error_feedback:
        for kind, value in transforms:
            vector = NODE_TRANSFORMS[kind](vector, value)
        return vector
    return _with_feedback(ctx, payload, vector, transforms, handle, [str(f) for f in fields])


def _with_feedback(
    ctx: Any,
    payload: Mapping[str, Any],
    vector: np.ndarray,
    transforms: Sequence[tuple[str, Any]],
    handle: str,
    fields: list[str],
) -> PreparedInput:
    """A subset with error feedback: the node adds its residual before the first lossy step
    and, once its input is masked, keeps what it did not send (including what the secure
    sum's range cut off); if masking fails it keeps all of it, so no update is lost."""
    if any(k == "noise_std" for k, _ in transforms):
        raise TaskError(
            "error feedback would release earlier rounds' residuals on top of a noised "
            "update, beyond the clip bound its noise was calibrated for: refusing"
        )
    value_range = payload.get("clip")
    if isinstance(value_range, bool) or not isinstance(value_range, (int, float)):
        raise TaskError("a secure sum with error feedback needs its numeric 'clip'")
    memory, key = feedback_slot(ctx, handle, fields, vector.size)
    original = vector.size
    lossy = next(i for i, (k, _) in enumerate(transforms) if k in _LOSSY)
    before = vector
    for i, (kind, value) in enumerate(transforms):
        if i == lossy:
            before = vector.astype(np.float64) + memory.get(key, 0.0)
            vector = before
        vector = NODE_TRANSFORMS[kind](vector, value)
    # The grid cuts values beyond the range: cut them here so the residual keeps them.
    vector = np.clip(vector, -float(value_range), float(value_range))
    sent = _sent(vector, transforms, original)

    def settle(masked: bool) -> None:
        memory[key] = before - sent if masked else before

    return PreparedInput(value=vector, settle=settle)


def _sent(vector: np.ndarray, transforms: Sequence[tuple[str, Any]], length: int) -> np.ndarray:
    """What a subset's kept values stand for in the node's own coordinates (unscaled)."""
    rotation = next((int(v) for k, v in transforms if k == "rotate"), None)
    spec = next(v for k, v in transforms if k == "subset")
    full = len(rotate(np.zeros(length), 0)) if rotation is not None else length
    dense = np.zeros(full)
    dense[subset_positions(spec.seed, full, spec.fraction)] = vector
    return unrotate(dense, rotation, length) if rotation is not None else dense


@dataclass(frozen=True)
class _Subset:
    """A subset transform as a node checked it: the same public positions at every node."""

    fraction: float
    seed: int
    error_feedback: bool


def _subset_spec(value: Any) -> _Subset:
    if not isinstance(value, Mapping) or set(value) != {"fraction", "seed", "error_feedback"}:
        raise TaskError(
            f"a subset transform is {{'fraction', 'seed', 'error_feedback'}}, got {value!r}"
        )
    fraction, seed, feedback = value["fraction"], value["seed"], value["error_feedback"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TaskError(f"a subset's fraction must be a number, got {fraction!r}")
    if not 0 < fraction <= 1:
        raise TaskError(f"a subset's fraction must lie in (0, 1], got {fraction!r}")
    # The wire may carry the seed as a float: any integer below 2**52 survives that.
    if isinstance(seed, bool) or not isinstance(seed, (int, float)):
        raise TaskError(f"a subset's seed must be an integer, got {seed!r}")
    if not (float(seed).is_integer() and 0 <= seed < 2**52):
        raise TaskError(f"a subset's seed must be an integer in [0, 2**52), got {seed!r}")
    if not isinstance(feedback, bool):
        raise TaskError(f"a subset's error_feedback must be true or false, got {feedback!r}")
    return _Subset(fraction=float(fraction), seed=int(seed), error_feedback=feedback)


def _node_transforms(raw: Any, group: int) -> list[tuple[str, Any]]:
    """The chain's node transforms, in order, as this node checks them: known kinds, sane
    values, rotation before the subset, each of those at most once."""
    if not isinstance(raw, list):
        raise TaskError(f"'transforms' must be a list, got {type(raw).__name__}")
    transforms: list[tuple[str, Any]] = []
    for spec in raw:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise TaskError(f"malformed node transform {spec!r}")
        ((kind, value),) = spec.items()
        if kind == "subset":
            transforms.append((kind, _subset_spec(value)))
            continue
        known = kind in NODE_TRANSFORMS or kind == TOTAL_NOISE
        if not known or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TaskError(
                f"node transform {spec!r} is not one this node applies "
                f"(it knows {sorted([*NODE_TRANSFORMS, TOTAL_NOISE])})"
            )
        if kind == TOTAL_NOISE:
            kind, value = "noise_std", float(value) / np.sqrt(max(group, 1))
        transforms.append((kind, float(value)))
    _check_secure_order([k for k, _ in transforms], TaskError)
    return transforms


def _check_secure_order(kinds: Sequence[str], error: type[Exception]) -> None:
    moves = [k for k in kinds if k in ("rotate", "subset")]
    if len(set(moves)) != len(moves) or moves not in (
        [],
        ["rotate"],
        ["subset"],
        ["rotate", "subset"],
    ):
        raise error(
            "under a secure sum RandomRotation comes before RandomSubset, each at most once; "
            f"got {list(kinds)}"
        )


def _effective_noise(transforms: Sequence[tuple[str, Any]]) -> tuple[float | None, float]:
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


def _subset(vector: np.ndarray, spec: _Subset) -> np.ndarray:
    # The positions come from the public seed alone: the same at every node of the sum.
    return np.asarray(vector)[subset_positions(spec.seed, vector.size, spec.fraction)]


# What a node applies before masking, by the key of the stage's spec().
NODE_TRANSFORMS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "clip_l2": _clip,
    "noise_std": add_node_noise,
    "rotate": _rotate,
    "quantize": _grid_only,
    "subset": _subset,
}
# The steps after which a value is no longer the node's update in its own coordinates.
_LOSSY = ("rotate", "subset")
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
        # A fresh public rotation and subset per sum (seeds below 2**52 survive the JSON
        # float), the same for every node: they are bound into the round's parameters.
        seed, subset_seed = secrets.randbits(52), secrets.randbits(52)
        transforms: list[dict[str, Any]] = []
        subset: dict[str, Any] | None = None
        for stage in pre:
            spec = stage.spec()
            if "rotate" in spec:
                spec = {"rotate": seed}
            elif "subset" in spec:
                subset = {
                    "fraction": float(spec["subset"]),
                    "seed": subset_seed,
                    "error_feedback": bool(getattr(stage, "error_feedback", False)),
                }
                spec = {"subset": subset}
            transforms.append(spec)
        kinds = [next(iter(t)) for t in transforms]
        _check_secure_order(kinds, ConfigError)
        noised = TOTAL_NOISE in kinds or "noise_std" in kinds
        if subset is not None and subset["error_feedback"] and noised:
            raise ConfigError(
                "RandomSubset's error feedback releases earlier rounds' residuals on top of a "
                "noised update, beyond the clip bound the noise was calibrated for; use "
                "RandomSubset(fraction, error_feedback=False) with DistributedNoise"
            )
        rotated = "rotate" in kinds
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
        full = len(rotate(np.zeros(length), 0)) if rotated else length
        # Under a subset only its positions are masked and summed: fraction * full entries.
        vector_length = subset_size(full, subset["fraction"]) if subset else full
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
        if subset is not None:
            dense = np.zeros(full)
            positions = subset_positions(subset_seed, full, subset["fraction"])
            # Without error feedback, 1/fraction makes the estimate unbiased (E = the sum).
            dense[positions] = vector * (1.0 if subset["error_feedback"] else full / vector.size)
            vector = dense
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
                "with RandomRotation(), RandomSubset(fraction) (the same public positions at "
                "every node) and Quantize(bits)"
            )
        try:
            keys = set(stage.spec())
        except NotImplementedError:
            keys = set()
        if not keys or not keys <= {*NODE_TRANSFORMS, TOTAL_NOISE}:
            raise ConfigError(
                f"{type(stage).__name__} cannot run inside a secure sum: nodes apply only "
                f"{sorted([*NODE_TRANSFORMS, TOTAL_NOISE])} (Clip, DistributedNoise, "
                "RandomRotation, RandomSubset, Quantize) before masking"
            )
        if isinstance(stage, Clip):
            norm = stage.l2 if norm is None else min(norm, stage.l2)
    return norm
