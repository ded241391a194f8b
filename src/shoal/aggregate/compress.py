"""Compression for slow links: each node shrinks its update before it leaves, the server
decodes it before reducing.

``Clip(1.0) | RandomRotation() | TopK(0.01) | Quantize(8) | Mean()`` reads like the math:
clip, rotate (a randomized Hadamard transform), keep the largest 1% (with the rest kept at
the node as error feedback for later rounds), quantize what is kept to 8 bits with one scale
per block, then average what the server decoded. The node reads its update through the
runtime's checked accessor, so a compressed update leaves only where its policy lets the
update itself leave. Quantization reuses :class:`shoal.crypto.Quantizer`'s stochastic rounding.

``RandomSubset(0.1)`` keeps the same random 10% of coordinates at every node, drawn from a
public seed the server sends; no positions travel, and it runs inside a secure sum too.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from shoal.aggregate import rules
from shoal.aggregate.stages import Clip, NodeTransform, held_layout
from shoal.core.reduce import clip_rows
from shoal.errors import AggregationError, ConfigError, NotEnoughNodes, TaskError

if TYPE_CHECKING:
    from shoal.core import Gathered, NodeValues

__all__ = [
    "BLOCK",
    "COMPRESS_TASK",
    "Compressor",
    "Quantize",
    "RandomRotation",
    "RandomSubset",
    "TopK",
    "compress_vector",
    "compressed_gather",
    "compression_tasks",
    "decompress_vector",
    "feedback_slot",
    "pack_codes",
    "rotate",
    "subset_positions",
    "subset_size",
    "unpack_codes",
    "unrotate",
]

COMPRESS_TASK = "shoal.aggregate.compress"
EF_STATE = "shoal.aggregate.error_feedback"
BLOCK = 4096  # rotation mixes, and quantization scales, blocks of this many coordinates
_PACKABLE = (1, 2, 4, 8, 16)
_LOSSY = ("rotate", "topk", "subset", "quantize")  # the order they run in


class Compressor(NodeTransform):
    """A node transform that changes what travels; nodes apply it, the server decodes it."""

    compresses: ClassVar[bool] = True

    def node_tasks(self) -> dict[str, Any]:
        return compression_tasks()

    def apply_rows(self, rows: np.ndarray) -> np.ndarray:
        raise ConfigError(
            f"{type(self).__name__} runs at the nodes before their update leaves; aggregate "
            "with a chain such as TopK(0.01) | Mean(), whose reducer fetches compressed updates"
        )


@dataclass(frozen=True)
class Quantize(Compressor):
    """Stochastic rounding to ``bits`` bits (1, 2, 4, 8 or 16) with one float32 scale (the
    block's largest magnitude) per block of coordinates; unbiased. Under SecureSum it sets
    the secure sum's grid instead: each node's input gets ``2**bits - 1`` levels."""

    bits: int = 8
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.bits not in _PACKABLE:
            raise ConfigError(f"Quantize(bits) takes bits in {_PACKABLE}, got {self.bits!r}")

    def spec(self) -> dict[str, Any]:
        return {"quantize": self.bits}


@dataclass(frozen=True)
class TopK(Compressor):
    """Keep the ``fraction`` of coordinates largest in magnitude (indices + values). With
    ``error_feedback`` (default) each node adds what it did not send to its next update."""

    fraction: float
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ConfigError(f"TopK(fraction) needs 0 < fraction <= 1, got {self.fraction!r}")

    def spec(self) -> dict[str, Any]:
        return {"topk": float(self.fraction)}


@dataclass(frozen=True)
class RandomSubset(Compressor):
    """Keep the same ``fraction`` of coordinates at every node: positions drawn from a
    public seed the server draws for each aggregate, so only values travel, and a secure sum
    can mask them (every node sends the same positions). By default the server scales the
    kept values by ``1 / fraction`` (unbiased, noisier). With ``error_feedback`` each node
    sends its values as they are and adds what it did not send to its next update (a round's
    estimate is ``fraction`` of the update in expectation, made whole over rounds): that suits
    nodes that take part in most rounds, since a residual waits until its node's next one."""

    fraction: float
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, (int, float))
            or not 0 < self.fraction <= 1
        ):
            raise ConfigError(
                f"RandomSubset(fraction) needs 0 < fraction <= 1, got {self.fraction!r}"
            )
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(
                f"RandomSubset(error_feedback) is True or False, got {self.error_feedback!r}"
            )

    def spec(self) -> dict[str, Any]:
        return {"subset": float(self.fraction)}


@dataclass(frozen=True)
class RandomRotation(Compressor):
    """A randomized Hadamard transform per block of :data:`BLOCK` coordinates (random signs
    from a seed the server draws for each aggregate), inverted by the server. It preserves
    the L2 norm and spreads a vector's mass evenly, so quantizing after it loses less."""

    error_feedback: ClassVar[bool] = False

    def spec(self) -> dict[str, Any]:
        return {"rotate": 0}  # the server fills in a fresh seed for each aggregate


def compresses(aggregator: Any) -> bool:
    """Whether ``aggregator`` has nodes compress their updates (so maps must not send them)."""
    stages = getattr(aggregator, "stages", (aggregator,))
    return any(getattr(stage, "compresses", False) for stage in stages)


# --------------------------------------------------------------------------------- math


def _block(length: int) -> int:
    return min(BLOCK, 1 << max(0, (length - 1).bit_length()))


def _padded(length: int) -> int:
    block = _block(length)
    return -(-length // block) * block


def _signs(seed: int, length: int) -> np.ndarray:
    bits = np.random.default_rng(seed).integers(0, 2, size=length, dtype=np.int8)
    return (1 - 2 * bits).astype(np.float64)


def _hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of each ``block``-long row of ``x`` (its own
    inverse)."""
    y = x.reshape(-1, block).copy()
    rows = y.shape[0]
    h = 1
    while h < block:
        y = y.reshape(rows, -1, 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack((a + b, a - b), axis=2)
        h *= 2
    return (y.reshape(-1) / math.sqrt(block)).astype(np.float64)


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """``H D x`` per block (zero-padded to whole blocks): norm-preserving, coordinates spread."""
    x = np.asarray(x, dtype=np.float64).ravel()
    padded = np.zeros(_padded(x.size))
    padded[: x.size] = x
    return _hadamard(padded * _signs(seed, padded.size), _block(x.size))


def unrotate(y: np.ndarray, seed: int, length: int) -> np.ndarray:
    """The inverse of :func:`rotate` for a vector of ``length`` coordinates."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.size != _padded(length):
        raise AggregationError(f"a rotated vector of {length} has {_padded(length)} entries")
    return (_hadamard(y, _block(length)) * _signs(seed, y.size))[:length]


def subset_size(length: int, fraction: float) -> int:
    """How many of ``length`` coordinates a :class:`RandomSubset` of ``fraction`` keeps."""
    return min(length, max(1, math.ceil(float(fraction) * length)))


def subset_positions(seed: int, length: int, fraction: float) -> np.ndarray:
    """The sorted positions (int64) a :class:`RandomSubset` keeps: the :func:`subset_size`
    coordinates whose keys are smallest, one 64-bit key per coordinate from an AES-CTR
    keystream (:func:`shoal.crypto.prg.expand`) seeded by ``seed``. The same on every node
    and platform (no NumPy generator whose stream may change between versions); a uniform
    subset, as every order of the keys is equally likely."""
    from shoal.crypto.prg import expand  # same layer group; imported on use (cycle)

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise AggregationError(f"a subset seed is an integer in [0, 2**63), got {seed!r}")
    if length <= 0:
        return np.zeros(0, dtype=np.int64)
    key = hashlib.sha256(b"shoal.aggregate.subset:" + seed.to_bytes(8, "big")).digest()
    keys = expand(key, length, dtype=np.uint64)
    count = subset_size(length, fraction)
    # A stable sort: equal keys (never seen in practice) still give one answer everywhere.
    chosen = np.argsort(keys, kind="stable")[:count]
    return np.sort(chosen).astype(np.int64)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2**bits) packed little-end-first into bytes (uint16 for 16 bits)."""
    if bits == 16:
        return codes.astype("<u2")
    per = 8 // bits
    flat = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    flat[: codes.size] = codes
    grouped = flat.reshape(-1, per)
    out = np.zeros(grouped.shape[0], dtype=np.uint8)
    for i in range(per):
        out |= (grouped[:, i] << (i * bits)).astype(np.uint8)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of :func:`pack_codes`' output."""
    if bits == 16:
        return np.asarray(packed, dtype=np.uint16)[:count].astype(np.int64)
    per = 8 // bits
    p = np.asarray(packed, dtype=np.uint8)
    mask = (1 << bits) - 1
    out = np.stack([(p >> (i * bits)) & mask for i in range(per)], axis=1).reshape(-1)
    return out[:count].astype(np.int64)


def _quantizer(bits: int) -> Any:
    from shoal.crypto.quantize import Quantizer  # same layer group; imported on use (cycle)

    return Quantizer(clip=1.0, max_inputs=1, bits=bits)


def _quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed codes, float32 scale per block): each block divided by its largest magnitude,
    then rounded stochastically onto the quantizer's grid over [-1, 1]."""
    blocks = -(-x.size // BLOCK)
    padded = np.zeros(blocks * BLOCK)
    padded[: x.size] = x
    view = padded.reshape(blocks, BLOCK)
    scales = np.abs(view).max(axis=1).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    codes = _quantizer(bits).quantize((view / safe[:, None]).ravel()[: x.size])
    return pack_codes(codes, bits), scales


def _dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, count: int) -> np.ndarray:
    codes = unpack_codes(packed, bits, count)
    values = _quantizer(bits).dequantize(codes.astype(np.uint64))
    per_coordinate = np.repeat(scales.astype(np.float64), BLOCK)[:count]
    result: np.ndarray = values * per_coordinate
    return result


def compress_vector(
    x: np.ndarray, steps: Sequence[tuple[str, float]], *, seed: int
) -> dict[str, Any]:
    """Apply the lossy ``steps`` (``rotate``, ``topk`` or ``subset``, ``quantize``, in that
    order) to ``x``; the result is what a node sends, with array fields ``index`` (TopK's
    positions; a subset's are public), ``values`` or ``codes`` and ``scales``."""
    v = np.asarray(x, dtype=np.float64).ravel()
    out: dict[str, Any] = {}
    for kind, value in steps:
        if kind == "rotate":
            v = rotate(v, seed)
        elif kind == "topk":
            k = max(1, math.ceil(float(value) * v.size))
            index = np.sort(np.argpartition(np.abs(v), v.size - k)[v.size - k :])
            out["index"] = index.astype(np.uint32)
            v = v[index]
        elif kind == "subset":
            v = v[subset_positions(seed, v.size, value)]
        elif kind == "quantize":
            out["codes"], out["scales"] = _quantize(v, int(value))
            return out
        else:
            raise ConfigError(f"unknown compression step {kind!r}")
    out["values"] = v.astype(np.float32)
    return out


def decompress_vector(
    payload: Mapping[str, Any],
    steps: Sequence[tuple[str, float]],
    *,
    seed: int,
    length: int,
    unbiased: bool = False,
) -> np.ndarray:
    """The vector of ``length`` coordinates a node's :func:`compress_vector` output stands
    for; anything malformed (a hostile or broken node) is an AggregationError. With
    ``unbiased`` a subset's values are scaled by ``1 / fraction`` (exactly ``full / kept``)."""
    kinds = [kind for kind, _ in steps]
    full = _padded(length) if "rotate" in kinds else length
    positions = None
    if "subset" in kinds:
        positions = subset_positions(seed, full, dict(steps)["subset"])
    if "topk" in kinds:
        topk = dict(steps)["topk"]
        count = max(1, math.ceil(float(topk) * full))
        index = _array(payload, "index", "u", (count,))
        increasing = (np.diff(index.astype(np.int64)) > 0).all()
        if index.size and (int(index.max()) >= full or not increasing):
            raise AggregationError(f"'index' must be {count} increasing positions below {full}")
    elif positions is not None:
        count = positions.size
    else:
        count = full
    if "quantize" in kinds:
        bits = int(dict(steps)["quantize"])
        per = 1 if bits == 16 else 8 // bits
        packed = _array(payload, "codes", "u", (-(-count // per),))
        scales = _array(payload, "scales", "f", (-(-count // BLOCK),))
        if not rules.all_finite(scales) or (scales < 0).any():
            raise AggregationError("'scales' must be finite and non-negative")
        values = _dequantize(packed, scales, bits, count)
    else:
        values = _array(payload, "values", "f", (count,)).astype(np.float64)
        if not rules.all_finite(values):
            raise AggregationError("'values' hold NaN or infinity")
    if "topk" in kinds:
        dense = np.zeros(full)
        dense[index.astype(np.int64)] = values
        values = dense
    if positions is not None:
        dense = np.zeros(full)
        dense[positions] = values * (full / positions.size if unbiased else 1.0)
        values = dense
    if "rotate" in kinds:
        return unrotate(values, seed, length)
    return values


def _array(payload: Mapping[str, Any], key: str, kinds: str, shape: tuple[int, ...]) -> np.ndarray:
    value = payload.get(key)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds or value.shape != shape:
        got = type(value).__name__
        if isinstance(value, np.ndarray):
            got = f"{value.dtype} {value.shape}"
        raise AggregationError(f"'{key}' must be an array of shape {shape}, got {got}")
    return value


# ------------------------------------------------------------------------- node side


def _steps(raw: Any) -> tuple[list[tuple[str, float]], bool]:
    """The node's check of the server's plan: known steps, sane values, a possible order."""
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{COMPRESS_TASK} needs a non-empty list of 'steps'")
    steps: list[tuple[str, float]] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or item[0] not in ("clip_l2", *_LOSSY)
            or isinstance(item[1], bool)
            or not isinstance(item[1], (int, float))
            or not math.isfinite(item[1])
        ):
            raise TaskError(f"malformed compression step {item!r}")
        steps.append((str(item[0]), float(item[1])))
    _check_order([k for k, _ in steps], TaskError)
    for kind, value in steps:
        if kind == "clip_l2" and value <= 0:
            raise TaskError("clip_l2 must be positive")
        if kind in ("topk", "subset") and not 0 < value <= 1:
            raise TaskError(f"{kind} must be a fraction in (0, 1]")
        if kind == "quantize" and int(value) not in _PACKABLE:
            raise TaskError(f"quantize takes bits in {_PACKABLE}")
    lossy = [k for k, _ in steps if k != "clip_l2"]
    return steps, bool(lossy)


def _check_order(kinds: Sequence[str], error: type[Exception]) -> None:
    lossy = [k for k in kinds if k != "clip_l2"]
    if len(set(lossy)) != len(lossy) or lossy != sorted(lossy, key=_LOSSY.index):
        raise error(
            "compression steps run in the order RandomRotation, TopK or RandomSubset, "
            f"Quantize, each at most once; got {list(kinds)}"
        )
    if "topk" in lossy and "subset" in lossy:
        raise error("TopK and RandomSubset both choose coordinates: use one of them")
    first = next((i for i, k in enumerate(kinds) if k != "clip_l2"), len(kinds))
    if "clip_l2" in kinds[first:]:
        raise error("Clip must come before the compression stages, not after them")


def feedback_slot(
    ctx: Any, handle: str, fields: Sequence[str], size: int
) -> tuple[dict[str, Any], str]:
    """Where a node keeps the residual of ``fields`` (``size`` coordinates) in its own state,
    never released: ``(memory, key)``, ``memory[key]`` the residual if any. Claims the slot
    for ``handle``: one update is compressed with error feedback once, whatever the chain
    (plain or secure), since a second compression would add its residual twice."""
    key = hashlib.sha256(repr((list(fields), size)).encode()).hexdigest()[:16]
    memory: dict[str, Any] = ctx.state.setdefault(EF_STATE, {})
    if memory.get(f"{key}/handle") == handle:
        raise TaskError(
            "this update was already compressed with error feedback; a second "
            "compression of it would count its residual twice"
        )
    memory[f"{key}/handle"] = handle
    return memory, key


@functools.cache
def compression_tasks() -> dict[str, Any]:
    """The node-side task that compresses a kept update (installed by the chain; one
    function for every chain, so installing it twice is a no-op)."""
    from shoal.runtime import TaskSpec, read_held  # a lower layer: import on use

    def compress(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        handle, fields = payload.get("handle"), payload.get("fields")
        weight = payload.get("weight")
        seed = payload.get("seed", 0)
        if not isinstance(handle, str) or not isinstance(fields, list) or not fields:
            raise TaskError(f"{COMPRESS_TASK} needs 'handle' and a list of 'fields'")
        if not all(isinstance(f, str) for f in fields) or not (
            weight is None or isinstance(weight, str)
        ):
            raise TaskError("'fields' and 'weight' must name fields")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise TaskError("'seed' must be a non-negative integer")
        steps, _ = _steps(payload.get("steps"))
        feedback = bool(payload.get("error_feedback", False))
        wanted = fields + ([weight] if weight is not None and weight not in fields else [])
        # The policy check: a compressed update leaves only where the update may leave.
        kept = read_held(ctx, handle, wanted, use="clear")
        parts = [rules.as_float(kept[f]).astype(np.float64).ravel() for f in fields]
        vector = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if not rules.all_finite(vector):
            raise TaskError("the node's update holds NaN or infinity")
        first = next((i for i, (k, _) in enumerate(steps) if k != "clip_l2"), len(steps))
        for _, bound in steps[:first]:
            vector = clip_rows(vector.reshape(1, -1), bound)[0][0]
        lossy = steps[first:]
        if feedback:
            memory, key = feedback_slot(ctx, handle, fields, vector.size)
            if key in memory:
                vector = vector + memory[key]
        out = compress_vector(vector, lossy, seed=seed)
        if feedback:
            # What the server will decode, subtracted: the residual waits at the node.
            sent = decompress_vector(out, lossy, seed=seed, length=vector.size)
            memory[key] = vector - sent
        if weight is not None:
            out["weight"] = kept[weight]
        return out

    return {COMPRESS_TASK: TaskSpec(compress, {"*": "clear"})}


# ----------------------------------------------------------------------- server side


def compressed_gather(
    values: NodeValues,
    weights: NodeValues | None,
    pre: Sequence[NodeTransform],
    *,
    min_nodes: int | None = None,
) -> Gathered:
    """Have each node compress its value as ``pre`` says and decode the replies: a
    :class:`~shoal.core.Gathered` for a plain reducer. Nodes whose reply does not decode are
    excluded with the reason."""
    from shoal.core import Gathered

    steps: list[tuple[str, float]] = []
    for stage in pre:
        spec = _node_spec(stage)
        ((kind, value),) = spec.items()
        steps.append((kind, float(value)))
    _check_order([k for k, _ in steps], ConfigError)
    seed = secrets.randbits(62)
    feedback = any(getattr(stage, "error_feedback", False) for stage in pre)
    weight_field = None
    if weights is not None:
        if weights.handle != values.handle or len(weights.field_names) != 1:
            raise AggregationError("weights must be one field of the same map, e.g. out['n']")
        weight_field = weights.field_names[0]
    layout, holders, excluded = held_layout(values)
    fields = [name for name, _, _ in layout]
    length = sum(math.prod(shape) for _, shape, _ in layout)
    request = {
        "handle": values.handle,
        "fields": fields,
        "weight": weight_field,
        "steps": [[k, v] for k, v in steps],
        "seed": seed,
        "error_feedback": feedback,
    }
    # One seed, public and the same for every node: a subset keeps the same positions at all.
    replies, failures = values.federation.request(holders, COMPRESS_TASK, common=request)
    for node, failure in failures.items():
        excluded[node] = f"compressed fetch: {failure.kind.value}: {failure.detail}"
    lossy = [(k, v) for k, v in steps if k != "clip_l2"]
    rows: list[np.ndarray] = []
    kept: list[str] = []
    weight_values: list[float] = []
    for node in holders:
        reply = replies.get(node)
        if reply is None:
            continue
        try:
            row = decompress_vector(reply, lossy, seed=seed, length=length, unbiased=not feedback)
            weight = 1.0
            if weight_field is not None:
                w = reply.get("weight")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                    raise AggregationError(f"weight {w!r} is not a non-negative number")
                weight = float(w)
                if not math.isfinite(weight):
                    raise AggregationError("the weight is not finite")
        except AggregationError as exc:
            excluded[node] = f"compressed reply: {exc}"
            continue
        rows.append(row)
        kept.append(node)
        weight_values.append(weight)
    if excluded:
        values.record_exclusions(excluded)
    needed = values.federation.min_nodes if min_nodes is None else min_nodes
    if len(rows) < max(needed, 1):
        raise NotEnoughNodes(
            f"only {len(rows)} node(s) gave a valid compressed value, fewer than the minimum "
            f"of {needed}; excluded: {dict(list(excluded.items())[:3])}"
        )
    if weight_field is not None and sum(weight_values) <= 0:
        raise AggregationError("the weights of the valid nodes sum to zero")
    return Gathered(
        node_ids=tuple(kept),
        rows=np.stack(rows),
        weights=np.asarray(weight_values) if weight_field is not None else None,
        layout=tuple((name, shape, "<f8") for name, shape, _ in layout),
        excluded=excluded,
    )


def _node_spec(stage: NodeTransform) -> dict[str, Any]:
    try:
        spec = stage.spec()
    except NotImplementedError:
        spec = {}
    if len(spec) != 1 or next(iter(spec)) not in ("clip_l2", *_LOSSY):
        raise ConfigError(
            f"{type(stage).__name__} cannot run before compression: nodes apply only Clip, "
            "RandomRotation, TopK, RandomSubset and Quantize to an update they compress "
            "(NormBound needs each update's exact norm at the server)"
        )
    if isinstance(stage, Clip):
        return {"clip_l2": stage.l2}
    return spec
