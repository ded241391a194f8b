"""Federated optimization algorithms, each a few lines against the Federated Core API.

Every algorithm samples nodes, broadcasts the weights, maps the ``train`` task, aggregates
the deltas (with any aggregator chain: robust, clipped, secure, noised) and updates its
server state. FedAvg (McMahan et al. 2017), FedProx (Li et al. 2020), FedAvgM (Hsu et al.
2019), FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021), SCAFFOLD (Karimireddy et al. 2020).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from shoal.aggregate import Mean, Sum
from shoal.core import Aggregator, Federation, NodeValues
from shoal.errors import ConfigError
from shoal.learn.model import Weights
from shoal.learn.privacy import ExampleDP, NodeDP
from shoal.learn.tasks import TRAIN, prefixed, unprefixed
from shoal.privacy.stages import GaussianNoise

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "RoundResult",
    "Scaffold",
    "ServerState",
]


@dataclass(frozen=True, kw_only=True)
class ServerState:
    """Everything the server carries between rounds; checkpoints as named arrays."""

    round: int
    weights: Weights
    slots: Mapping[str, Weights] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)  # JSON: privacy participation, ...

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = prefixed("weights", self.weights)
        for slot, values in self.slots.items():
            arrays.update(prefixed(f"slot.{slot}", values))
        return arrays

    @classmethod
    def from_arrays(
        cls, round_num: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
    ) -> ServerState:
        slots: dict[str, Weights] = {}
        for key, value in arrays.items():
            head, _, name = key.partition("/")
            if head.startswith("slot."):
                slots.setdefault(head[len("slot.") :], {})[name] = np.array(value)
        return cls(
            round=round_num, weights=unprefixed("weights", arrays), slots=slots, meta=meta or {}
        )


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    state: ServerState
    train_loss: float
    participants: tuple[str, ...]
    failures: Mapping[str, str]
    epsilon: float | None = None
    delta: float | None = None


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """FedAvg's shape; subclasses change what nodes are told and how the server steps."""

    name: ClassVar[str] = "fedavg"
    rounds: int = 10
    nodes_per_round: int = 10
    local_epochs: int = 1
    lr: float = 0.1
    batch_size: int = 32
    max_steps: int | None = None
    server_lr: float = 1.0
    aggregator: Aggregator | None = None  # default: mean weighted by examples
    keep_optimizer_state: bool = False  # nodes keep momentum/Adam state between rounds
    privacy: ExampleDP | NodeDP | None = None  # differential privacy, accounted every round

    def __post_init__(self) -> None:
        for key in ("rounds", "nodes_per_round", "local_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{self.name}: {key} must be at least 1")
        if not self.lr > 0 or not self.server_lr > 0:
            raise ConfigError(f"{self.name}: lr and server_lr must be positive")

    def node_tasks(self) -> dict[str, Any]:
        """Tasks every node must install besides train/evaluate (e.g. a secure sum's)."""
        tasks: dict[str, Any] = {}
        for part in (self.aggregator, self.privacy):
            node_tasks = getattr(part, "node_tasks", None)
            if node_tasks is not None:
                tasks.update(node_tasks())
        return tasks

    def init(self, weights: Weights) -> ServerState:
        return ServerState(round=0, weights={k: np.array(v, float) for k, v in weights.items()})

    def node_params(self, state: ServerState) -> dict[str, Any]:
        return {}

    def server_update(
        self, state: ServerState, delta: Weights, out: NodeValues, fed: Federation
    ) -> ServerState:
        weights = {k: w + self.server_lr * delta[k] for k, w in state.weights.items()}
        return ServerState(round=state.round + 1, weights=weights, slots=state.slots)

    def round(self, fed: Federation, state: ServerState, *, seed: int | None = None) -> RoundResult:
        privacy = self.privacy
        nodes = len(fed.node_ids)
        node_rate = min(1.0, self.nodes_per_round / max(nodes, 1))
        if isinstance(privacy, NodeDP):
            # Amplification by sampling holds for Poisson sampling, so DP-FedAvg samples so.
            group = fed.sample_poisson(node_rate, seed=seed)
        elif isinstance(privacy, ExampleDP) and privacy.distributed:
            group = fed.all()  # one DP-SGD step over the whole federation's data
        else:
            group = fed.sample(self.nodes_per_round, seed=seed)
        extra = self.node_params(state)
        clip = state.meta.get("dp_clip") if isinstance(privacy, NodeDP) else None
        if isinstance(privacy, NodeDP):
            extra["dp"] = privacy.request(nodes=nodes, per_round=self.nodes_per_round, clip=clip)
        elif privacy is not None:
            extra["dp"] = privacy.request(nodes=nodes, per_round=self.nodes_per_round)
        if privacy is not None:
            extra["dp"] = extra["dp"].to_json()
        weights = group.broadcast(
            **prefixed("w", state.weights),
            epochs=self.local_epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            seed=seed,
            keep_optimizer_state=self.keep_optimizer_state,
            **extra,
        )
        fields = [f"d/{name}" for name in state.weights]
        planned = None
        if isinstance(privacy, NodeDP):
            # DP-FedAvg divides by the expected count, a public number, not the group's size
            planned = privacy.aggregator(
                nodes=nodes, per_round=self.nodes_per_round, lr=self.lr, clip=clip
            )
        elif privacy is not None:
            planned = privacy.aggregator(nodes=nodes, per_round=len(group), lr=self.lr)
        aggregator: Aggregator = planned or self.aggregator or Mean()
        plain_mean = privacy is None and type(aggregator) is Mean
        if plain_mean:
            # FedAvg's default aggregates deltas and loss in the clear with one weighted mean,
            # so the nodes may as well send them with their receipts: no second round trip.
            fields.append("loss")
            out = group.map(TRAIN, weights, send=[*fields, "n"])
        else:
            out = group.map(TRAIN, weights)
        # Under DP nothing data-dependent leaves a node un-noised: no example counts as
        # weights, no training loss.
        example_weights = None if privacy is not None else out["n"]
        aggregated = out.select(*fields).aggregate(aggregator, weights=example_weights)
        if not isinstance(aggregated, dict):  # a single-array model comes back unnamed
            aggregated = {fields[0]: aggregated}
        delta = unprefixed("d", aggregated)
        if privacy is not None:
            loss = float("nan")
        elif plain_mean:
            loss = float(aggregated["loss"])
        else:
            loss = float(out["loss"].mean(weights=out["n"]))
        new_state = self.server_update(state, delta, out, fed)
        meta = dict(new_state.meta or state.meta)
        spent = None
        if privacy is not None:
            participation = dict(meta.get("dp_participation", {}))
            for node in out.node_ids:
                participation[node] = participation.get(node, 0) + 1
            meta["dp_participation"] = participation
            spent = privacy.spent(
                participation=participation, rounds=new_state.round, node_rate=node_rate
            )
            meta["epsilon"] = spent
            if isinstance(privacy, NodeDP) and privacy.target_quantile is not None:
                meta["dp_clip"] = self._adapt_clip(privacy, out, clip or privacy.clip)
        new_state = replace(new_state, meta=meta)
        failures = {node: f"{f.kind.value}: {f.detail}" for node, f in out.failures.items()}
        for node, reason in out.exclusions.items():
            failures.setdefault(node, f"excluded: {reason}")
        return RoundResult(
            state=new_state,
            train_loss=loss,
            participants=tuple(n for n in out.node_ids if n not in out.exclusions),
            failures=failures,
            epsilon=spent,
            delta=privacy.delta if privacy is not None else None,
        )

    def _adapt_clip(self, privacy: NodeDP, out: NodeValues, clip: float) -> float:
        """Andrew et al.: the noised fraction of updates that fitted under the clip."""
        expected = float(self.nodes_per_round)
        centred = out["dp_unclipped"].aggregate(
            Sum() | GaussianNoise(privacy.count_noise_std(expected))
        )
        return privacy.next_clip(clip, float(centred) / expected + 0.5)


@dataclass(frozen=True, kw_only=True)
class FedAvg(Algorithm):
    name: ClassVar[str] = "fedavg"


@dataclass(frozen=True, kw_only=True)
class FedProx(Algorithm):
    """FedAvg with a proximal term (mu/2)||w - w_global||^2 in every node's objective."""

    name: ClassVar[str] = "fedprox"
    mu: float = 0.01

    def node_params(self, state: ServerState) -> dict[str, Any]:
        return {"prox_mu": self.mu}


@dataclass(frozen=True, kw_only=True)
class FedAvgM(Algorithm):
    """FedAvg with server momentum: v = beta v + delta; w += server_lr v."""

    name: ClassVar[str] = "fedavgm"
    momentum: float = 0.9

    def server_update(
        self, state: ServerState, delta: Weights, out: NodeValues, fed: Federation
    ) -> ServerState:
        v = state.slots.get("momentum") or {k: np.zeros_like(w) for k, w in delta.items()}
        v = {k: self.momentum * v[k] + delta[k] for k in delta}
        weights = {k: w + self.server_lr * v[k] for k, w in state.weights.items()}
        return ServerState(round=state.round + 1, weights=weights, slots={"momentum": v})


@dataclass(frozen=True, kw_only=True)
class FedOpt(Algorithm):
    """Adaptive server optimizers on the pseudo-gradient (the mean delta)."""

    name: ClassVar[str] = "fedadam"
    server_lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2

    def server_update(
        self, state: ServerState, delta: Weights, out: NodeValues, fed: Federation
    ) -> ServerState:
        zeros = {k: np.zeros_like(d) for k, d in delta.items()}
        m = state.slots.get("m") or zeros
        v = state.slots.get("v") or {k: np.full_like(d, self.tau**2) for k, d in delta.items()}
        m = {k: self.beta1 * m[k] + (1 - self.beta1) * delta[k] for k in delta}
        v = {k: self.second_moment(v[k], delta[k] ** 2) for k in delta}
        weights = {
            k: w + self.server_lr * m[k] / (np.sqrt(v[k]) + self.tau)
            for k, w in state.weights.items()
        }
        return ServerState(round=state.round + 1, weights=weights, slots={"m": m, "v": v})


@dataclass(frozen=True, kw_only=True)
class FedAdam(FedOpt):
    name: ClassVar[str] = "fedadam"


@dataclass(frozen=True, kw_only=True)
class FedYogi(FedOpt):
    name: ClassVar[str] = "fedyogi"

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        result: np.ndarray = v - (1 - self.beta2) * d2 * np.sign(v - d2)
        return result


@dataclass(frozen=True, kw_only=True)
class FedAdagrad(FedOpt):
    name: ClassVar[str] = "fedadagrad"

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v + d2


@dataclass(frozen=True, kw_only=True)
class Scaffold(Algorithm):
    """SCAFFOLD: control variates correct each node's drift from the global direction."""

    name: ClassVar[str] = "scaffold"

    def node_params(self, state: ServerState) -> dict[str, Any]:
        c = state.slots.get("c") or {k: np.zeros_like(w) for k, w in state.weights.items()}
        return prefixed("c", c)

    def server_update(
        self, state: ServerState, delta: Weights, out: NodeValues, fed: Federation
    ) -> ServerState:
        c = state.slots.get("c") or {k: np.zeros_like(w) for k, w in state.weights.items()}
        fields = [f"dc/{name}" for name in c]
        mean_dc = out.select(*fields).mean()
        if not isinstance(mean_dc, dict):
            mean_dc = {fields[0]: mean_dc}
        share = len(out) / max(len(fed.node_ids), 1)
        c = {k: c[k] + share * unprefixed("dc", mean_dc)[k] for k in c}
        weights = {k: w + self.server_lr * delta[k] for k, w in state.weights.items()}
        return ServerState(round=state.round + 1, weights=weights, slots={"c": c})


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold)
}
