"""The node side of federated learning: the ``train`` and ``evaluate`` tasks for a model.

A node's owner builds its NodeApp with :func:`learning_app` from the same model
description the job names; the server sends weights and hyper-parameters, never code.
Payload names: ``w/<name>`` weights in, ``d/<name>`` weight deltas out, ``c/<name>`` and
``dc/<name>`` SCAFFOLD control variates. Asynchronous training (FedBuff) trains with
``buffered`` and releases the delta later, weighted by its staleness, through ``upload``.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import ConfigError, DataError, ReleaseRefused, ShoalError, TaskError
from shoal.learn.hooks import node_hooks
from shoal.learn.model import FitConfig, Model, StatefulOptimizer, Weights
from shoal.learn.names import prefixed, unprefixed
from shoal.privacy import make_rng
from shoal.privacy.accounting import Accountant
from shoal.privacy.guard import DPRequest, NoiseFloor, budget_guard
from shoal.privacy.plans import (
    NoPrivacy,
    PrivacyPlan,
    Releases,
    metrics_vector,
    unclipped_indicator,
)
from shoal.privacy.stages import add_node_noise
from shoal.runtime import SEND_KEY, NodeApp, TaskContext, TaskSpec
from shoal.runtime.request import rule_digest

__all__ = [
    "DOWNLINK_BITS",
    "EVALUATE",
    "STALENESS_FLOOR",
    "TRAIN",
    "UPLOAD",
    "LocalData",
    "buffered_rule",
    "decode_weights",
    "encode_weights",
    "learning_app",
    "learning_tasks",
    "model_app",
    "prefixed",
    "staleness_weight",
    "unprefixed",
]

TRAIN = "shoal.learn.train"
EVALUATE = "shoal.learn.evaluate"
UPLOAD = "shoal.learn.upload"
OPTIMIZER_STATE = "shoal.learn.optimizer_state"
# A personalized model's own layers (FedPer/FedRep): kept in the node's state between rounds,
# never a result field, so no request of the coordinator's can reach them.
PERSONAL_STATE = "shoal.learn.personal"
PENDING_STATE = "shoal.learn.pending"
# The smallest staleness weight a node applies to its own update (the paper's 1/sqrt(1+t)
# at t = 15). The coordinator says how stale an update is; were the weight unbounded, a
# hostile one could weight every other node of a secure sum near zero and read one update
# as the sum. With the floor it can tilt a sum towards one node by at most 1/floor = 4x.
STALENESS_FLOOR = 0.25
MAX_STALENESS = 10_000


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """The weight of an update ``staleness`` versions old (FedBuff's polynomial rule):
    (1 + t)^-a, never below STALENESS_FLOOR. The node computes it for its own update."""
    if staleness < 0:
        raise ConfigError(f"staleness is a count of versions >= 0, got {staleness}")
    return max((1.0 + staleness) ** -exponent, STALENESS_FLOOR)


@dataclass(frozen=True, kw_only=True)
class LocalData:
    """A node's data: what it trains on and, optionally, what it evaluates on."""

    train: Any
    test: Any | None = None


DOWNLINK_BITS = (None, 4, 8, 16, 32)


def encode_weights(weights: Mapping[str, np.ndarray], bits: int | None) -> dict[str, Any]:
    """The broadcast's weight fields: ``w/<name>`` as they are (``bits=None``), as float32
    (32), or quantized to 4, 8 or 16 bits (``wq/codes``, ``wq/scales`` and the ``wq/layout``
    to cut them back; ``shoal.aggregate.compress``'s per-block stochastic rounding)."""
    if bits is None:
        return prefixed("w", weights)
    if bits == 32:
        return prefixed("w", {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    from shoal.aggregate.compress import compress_vector

    vector = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in weights.values()])
    coded = compress_vector(vector, [("quantize", float(bits))], seed=0)
    return {
        "wq/codes": coded["codes"],
        "wq/scales": coded["scales"],
        "wq/bits": bits,
        "wq/layout": [[k, list(np.shape(v))] for k, v in weights.items()],
    }


def decode_weights(payload: Mapping[str, Any]) -> Weights:
    """The weights a broadcast carries, whichever way :func:`encode_weights` sent them."""
    if "wq/codes" not in payload:
        return unprefixed("w", payload)
    from shoal.aggregate.compress import decompress_vector

    bits, layout = payload.get("wq/bits"), payload.get("wq/layout")
    try:
        if bits not in DOWNLINK_BITS[1:-1] or not isinstance(layout, list):
            raise ValueError("wq/bits or wq/layout is malformed")
        shapes = [(str(name), tuple(int(d) for d in shape)) for name, shape in layout]
        if any(d < 0 for _, shape in shapes for d in shape):
            raise ValueError("a negative dimension")
        sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in shapes]
        coded = {"codes": payload.get("wq/codes"), "scales": payload.get("wq/scales")}
        vector = decompress_vector(coded, [("quantize", float(bits))], seed=0, length=sum(sizes))
    except (ValueError, TypeError, ShoalError) as exc:
        raise TaskError(f"the broadcast's quantized weights do not decode: {exc}") from None
    out: Weights = {}
    start = 0
    for (name, shape), size in zip(shapes, sizes):
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    return out


def _rng(ctx: TaskContext, seed: Any) -> np.random.Generator:
    """Randomness from the round's seed and the node's name when the server sends a seed.

    It depends on neither the engine nor how many tasks ran before, so a resumed run and a
    deployment draw exactly what the uninterrupted simulation drew. The PCG64 state and
    stream come straight from a SHA-256 of (seed, node): building a fresh generator through
    a SeedSequence cost ~10 us a task, several percent of a small node's training.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return ctx.rng
    # The digest's first 16 bytes (little-endian) are the state, the last 16 the stream.
    bits = int.from_bytes(
        hashlib.sha256(b"%d/%s" % (seed, ctx.node_id.encode())).digest(), "little"
    )
    # One generator per worker thread, reseeded for each task (a task runs to its end on
    # its thread before the next one starts there), and one state dict for it to read.
    found: tuple[np.random.Generator, dict[str, Any], dict[str, Any]] | None = getattr(
        _THREAD, "generator", None
    )
    if found is None:
        inner: dict[str, Any] = {"state": 0, "inc": 1}
        outer = {"bit_generator": "PCG64", "state": inner, "has_uint32": 0, "uinteger": 0}
        found = _THREAD.generator = (np.random.Generator(np.random.PCG64()), outer, inner)
    generator, state, inner = found
    inner["state"] = bits & _LOW_128
    inner["inc"] = (bits >> 128) | 1  # PCG streams need an odd increment
    generator.bit_generator.state = state
    return generator


_LOW_128 = (1 << 128) - 1


_THREAD = threading.local()


@functools.lru_cache(maxsize=64)
def _plain_config(
    epochs: int, batch_size: int, lr: float, max_steps: Any, track_loss: bool
) -> FitConfig:
    return FitConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, track_loss=track_loss
    )


def _stateful(net: Model) -> StatefulOptimizer | None:
    # Not isinstance(net, StatefulOptimizer): a runtime Protocol check costs ~16 us a task.
    if callable(getattr(net, "optimizer_state", None)) and callable(
        getattr(net, "load_optimizer_state", None)
    ):
        return net  # type: ignore[return-value]
    return None


def _personal(net: Model, ctx: TaskContext) -> Any:
    """Install this node's personal layers into ``net`` (a PartialModel with any); return it."""
    if not getattr(net, "personal_names", None):
        return None
    net.load_personal_weights(ctx.state.get(PERSONAL_STATE))  # type: ignore[attr-defined]
    return net


def _split(data: Any) -> tuple[Any, Any]:
    if isinstance(data, LocalData):
        return data.train, data.test if data.test is not None else data.train
    return data, data


def learning_tasks(
    model: Model, *, releases: Releases | None = None, floor: NoiseFloor | None = None
) -> dict[str, TaskSpec]:
    """Train/evaluate tasks for ``model``; each worker thread gets its own model instance.

    ``releases`` (a privacy plan's ``release()``) is how each result field may leave the
    node; by default, as without privacy: in the clear. With ``floor`` (a DP plan's) the
    evaluate task releases only the bounded metrics vector, noised as the guard that charged
    it bound (``ctx.noise``), whatever the request says.
    """
    releases = releases or NoPrivacy().release()
    local = threading.local()

    def instance() -> Model:
        if not hasattr(local, "model"):
            local.model = model.clone()
        result: Model = local.model
        return result

    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        train_data, _ = _split(ctx.data)
        if train_data is None or len(train_data) == 0:
            raise DataError(f"node {ctx.node_id} has no training data")
        weights = decode_weights(payload)
        buffered = payload.get("buffered")
        terms = None if buffered is None else _buffer_terms(buffered)  # before any work
        net = instance()
        personal = _personal(net, ctx)
        net.set_weights(weights)
        hooks = node_hooks(ctx, payload, weights)
        request = DPRequest.from_payload(payload)
        local_dp = None
        if request is not None and request.level == "example":
            if not getattr(net, "supports_dp", False):
                # Training without the noise the ledger counts would be a silent privacy
                # failure, so a model must say it implements FitConfig.dp.
                raise ConfigError(
                    f"{type(net).__name__} does not implement DP-SGD; example-level privacy "
                    "needs softmax_regression or a PyTorch model (mlp, cnn)"
                )
            if hooks.hooks:
                raise ConfigError(
                    "DP-SGD's noised step takes no FedProx or SCAFFOLD gradient term; train "
                    "with example-level privacy under fedavg, fedavgm or a FedOpt algorithm"
                )
            local_dp = request.local()
        epochs = int(payload.get("epochs", 1))
        batch_size = int(payload.get("batch_size", 32))
        lr = float(payload.get("lr", 0.1))
        max_steps = payload.get("max_steps")
        track_loss = bool(payload.get("track_loss", False))
        if hooks.hooks or local_dp is not None:
            config = FitConfig(
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                max_steps=max_steps,
                hooks=hooks.hooks,
                dp=local_dp,
                track_loss=track_loss,
            )
        else:  # the same few settings at every node of a round: build the config once
            config = _plain_config(epochs, batch_size, lr, max_steps, track_loss)
        # Optimizer state (momentum, Adam moments) never leaves the node; keeping it between
        # rounds is opt-in because it can be twice the model's size at every node.
        keep_optimizer = bool(payload.get("keep_optimizer_state", False))
        optimizer = _stateful(net)
        if optimizer is not None:
            saved = ctx.state.get(OPTIMIZER_STATE) if keep_optimizer else None
            optimizer.load_optimizer_state(saved)
        # DP-SGD's example sampling and noise must be secret from the server: fresh OS
        # entropy, never the round seed nor ctx.rng (a deployment's coordinator seeds that).
        rng = make_rng(None) if local_dp is not None else _rng(ctx, payload.get("seed"))
        result = net.fit(train_data, config=config, rng=rng)
        if optimizer is not None and keep_optimizer:
            ctx.state[OPTIMIZER_STATE] = optimizer.optimizer_state()
        if personal is not None:
            ctx.state[PERSONAL_STATE] = personal.personal_weights()
        new = net.get_weights()
        # In the model's own dtype: a float32 network's update travels as float32, not as
        # the float64 that subtracting the server's float64 weights would give.
        delta = {k: (new[k] - weights[k]).astype(new[k].dtype, copy=False) for k in weights}
        out: dict[str, Any] = prefixed("d", delta)
        out.update(n=result.examples, steps=result.steps)
        if result.loss == result.loss:  # NaN when nobody asked for it (FitConfig.track_loss)
            out["loss"] = result.loss
        if terms is not None:
            if hooks.hooks:
                raise ConfigError("buffered (asynchronous) training takes no gradient hooks")
            # The delta waits here, never in the kept result, so that exactly one copy of it
            # can ever leave: the one upload takes, weighted by its staleness.
            ctx.state[PENDING_STATE] = _Pending(
                delta=out,
                version=terms[0],
                noise=ctx.noise,
                spec=terms[1],
                request=buffered_rule(payload),
            )
            public = {"n": result.examples, "steps": result.steps}
            if "loss" in out:
                public["loss"] = out["loss"]
            return public
        if request is not None and request.level == "node":
            out["dp_unclipped"] = unclipped_indicator(delta, request.clip)
        out.update(hooks.finish(ctx, weights=weights, new=new, steps=result.steps, lr=config.lr))
        return out

    def upload(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        """Release the pending delta once, times the staleness weight the node computes."""
        pending = ctx.state.pop(PENDING_STATE, None)
        if not isinstance(pending, _Pending):
            raise DataError(
                f"node {ctx.node_id} holds no pending update (never trained buffered, or "
                "already uploaded it)"
            )
        version = payload.get("version")
        if type(version) is not int or version < pending.version:
            raise ConfigError(
                f"upload needs the server's model version, an int >= {pending.version} (the "
                f"version this update trained on), got {version!r}"
            )
        staleness = version - pending.version
        limit = int(pending.spec["max_staleness"])
        if staleness > limit:
            raise ConfigError(
                f"the update is {staleness} versions stale, more than the {limit} it was "
                "trained under; the node does not release it"
            )
        weight = staleness_weight(staleness, float(pending.spec["exponent"]))
        ctx.noise = pending.noise  # the privacy charge made for training binds the release
        # The upload is the training's value: a secure sum checks the training request.
        ctx.request = pending.request
        return {k: v * weight for k, v in pending.delta.items() if k.startswith("d/")}

    def evaluate(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        _, test_data = _split(ctx.data)
        if test_data is None or len(test_data) == 0:
            raise DataError(f"node {ctx.node_id} has no evaluation data")
        net = instance()
        _personal(net, ctx)  # a node evaluates its own personalized model
        net.set_weights(unprefixed("w", payload))
        metrics = net.evaluate(test_data)
        if floor is not None:
            binding = ctx.noise
            if binding is None:
                raise ReleaseRefused(
                    "federated evaluation under the node's DP plan needs a charge to its "
                    "ledger first; install the plan's guard (learning_app does)"
                )
            vector = metrics_vector(accuracy=metrics["accuracy"], loss=metrics["loss"])
            # Local plans: the node adds the full charged noise here. Secure plans: its share
            # inside the secure sum (checked there). Central plans: the server adds it.
            noised = add_node_noise(vector, binding.std) if binding.applied else vector
            return {"metrics": noised}
        if payload.get("private"):
            # Only a bounded vector, for a private aggregate; noised here when the plan asks.
            vector = metrics_vector(accuracy=metrics["accuracy"], loss=metrics["loss"])
            std = float(payload.get("noise_std", 0.0) or 0.0)
            return {"metrics": add_node_noise(vector, std) if std > 0 else vector}
        return {**{k: float(v) for k, v in metrics.items()}, "n": len(test_data)}

    return {
        TRAIN: TaskSpec(train, releases.train()),
        EVALUATE: TaskSpec(evaluate, releases.evaluate()),
        # The same policy as train's: an uploaded delta leaves only as a train delta may.
        UPLOAD: TaskSpec(upload, releases.train()),
    }


@dataclass(frozen=True, kw_only=True)
class _Pending:
    """A buffered update waiting at its node for upload (never itself released)."""

    delta: dict[str, Any]
    version: int
    noise: Any
    spec: Mapping[str, Any]
    request: str  # buffered_rule of the training request


# What differs between the training requests of one FedBuff run: the model version's weights
# (however encoded), the round's seed and the version number. Nodes of one buffer trained on
# different versions, so the digest a secure sum of the buffer fixes leaves these out.
_VERSIONED = ("w/", "wq/")


def buffered_rule(payload: Mapping[str, Any]) -> str:
    """The digest of a buffered training request without its version-specific parts: every
    update of one secure sum over a FedBuff buffer must come from the same rule (learning
    rate, epochs, batch size, step cap, DP request, staleness terms), whichever model
    version it trained on (runtime/request.py)."""
    rule = {
        k: v
        for k, v in payload.items()
        if not k.startswith(_VERSIONED) and k not in ("seed", SEND_KEY)
    }
    buffered = rule.get("buffered")
    if isinstance(buffered, Mapping):
        rule["buffered"] = {k: v for k, v in buffered.items() if k != "version"}
    try:
        return rule_digest(TRAIN, rule)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a buffered training request holds a non-JSON setting: {exc}") from None


def _buffer_terms(buffered: Any) -> tuple[int, dict[str, Any]]:
    """Check a buffered-training request: the model version it trains on, and the request."""
    if not isinstance(buffered, Mapping):
        raise ConfigError("'buffered' must be {'version', 'max_staleness', 'exponent'}")
    version, limit, exponent = (
        buffered.get("version"),
        buffered.get("max_staleness"),
        buffered.get("exponent"),
    )
    if type(version) is not int or version < 0:
        raise ConfigError(f"'buffered.version' must be an int >= 0, got {version!r}")
    if type(limit) is not int or not 0 <= limit <= MAX_STALENESS:
        raise ConfigError(
            f"'buffered.max_staleness' must be an int in [0, {MAX_STALENESS}], got {limit!r}"
        )
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise ConfigError(f"'buffered.exponent' must be a number in [0, 1], got {exponent!r}")
    if not 0.0 <= float(exponent) <= 1.0:
        raise ConfigError(f"'buffered.exponent' must be in [0, 1], got {exponent!r}")
    return version, dict(buffered)


def learning_app(
    model: Model,
    *,
    app: NodeApp | None = None,
    plan: PrivacyPlan | None = None,
    max_epsilon: float | None = None,
    max_delta: float = 1e-5,
    accountant: Accountant = "rdp",
) -> NodeApp:
    """A NodeApp that trains and evaluates ``model`` (or adds those tasks to ``app``).

    ``plan`` is the privacy plan of the job this node holds: the tasks' release policies
    follow from it (under a secure plan, updates and control variates leave only into the
    secure sum; losses, counts and raw metrics never), and under DP so does the noise
    floor: a request for less noise than the plan is refused, and every training request
    and federated evaluation is charged to this node's own ledger before it runs.
    ``max_epsilon`` (at ``max_delta``) is the owner's limit on that ledger. Install
    ``plan.node_tasks()`` too (an algorithm's ``node_tasks()``: the secure sum's protocol).
    """
    app = app or NodeApp()
    plan = plan or NoPrivacy()
    floor = plan.floor()
    app.install(learning_tasks(model, releases=plan.release(), floor=floor))
    if floor is not None or max_epsilon is not None:
        app.add_guard(
            budget_guard(
                max_epsilon=max_epsilon,
                max_delta=max_delta,
                tasks={TRAIN},
                evaluate={EVALUATE},
                floor=floor,
                accountant=accountant,
            )
        )
    return app


def model_app(*, model: str, features: int, classes: int, **options: Any) -> NodeApp:
    """A NodeApp training the registered model ``model`` (FedAvg-style, no privacy plan).

    Made to be a RayEngine's app recipe, built on each worker:
    ``Recipe(target="shoal.learn.tasks:model_app", options={"model": "softmax_regression",
    "features": 64, "classes": 10})``.
    """
    from shoal.learn.registry import build_model

    return learning_app(build_model(model, features=features, classes=classes, **options))
