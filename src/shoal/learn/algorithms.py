"""Federated optimization algorithms, each a few lines against the Federated Core API.

Every algorithm samples nodes, broadcasts the weights, maps the ``train`` task, aggregates
the deltas (with any aggregator chain: robust, clipped, secure, noised) and updates its
server state. FedAvg (McMahan et al. 2017), FedProx (Li et al. 2020), FedAvgM (Hsu et al.
2019), FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021), SCAFFOLD (Karimireddy et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from shoal.aggregate import Mean, compresses
from shoal.core import Aggregator, Federation, NodeValues
from shoal.errors import ConfigError
from shoal.learn.model import Weights
from shoal.learn.tasks import DOWNLINK_BITS, TRAIN, encode_weights, prefixed, unprefixed
from shoal.privacy.plans import NoPrivacy, PrivacyPlan, RoundPlan

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
    "scheduled_lr",
]

LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(lr: float, *, schedule: str, final: float, round_num: int, rounds: int) -> float:
    """The client learning rate for training round ``round_num`` (1-based) of ``rounds``:
    ``lr`` throughout ("constant"), or a half cosine from ``lr`` in round 1 to
    ``lr * final`` in the last round ("cosine"; beyond the last round it stays there)."""
    if schedule == "constant" or rounds <= 1:
        return lr
    t = min(max((round_num - 1) / (rounds - 1), 0.0), 1.0)
    return lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)))


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
    """FedAvg's shape; subclasses change what nodes are told and how the server steps.

    Privacy is the plan's business (``shoal.privacy.plans``): which nodes train, what they
    are told, which aggregate their updates go through and what the run spent. Everything
    a node releases goes through that one aggregate, unless the plan declares it public.
    """

    name: ClassVar[str] = "fedavg"
    hooks: ClassVar[bool] = False  # adds a gradient term at the nodes (FedProx, SCAFFOLD)
    rounds: int = 10
    nodes_per_round: int = 10
    local_epochs: int = 1
    lr: float = 0.1
    batch_size: int = 32
    max_steps: int | None = None
    server_lr: float = 1.0
    aggregator: Aggregator | None = None  # default: mean weighted by examples
    keep_optimizer_state: bool = False  # nodes keep momentum/Adam state between rounds
    privacy: PrivacyPlan | None = None  # differential privacy, accounted every round
    # Report the nodes' training loss (RoundResult.train_loss, else NaN): computing it costs
    # every node work at every batch, so it is off unless asked for (and never under DP).
    track_loss: bool = False
    # Downlink compression of the broadcast weights: 4, 8 or 16 bits per weight (stochastic
    # rounding, one scale per block), 32 for float32; None sends the server's float64 weights.
    downlink_bits: int | None = None
    # Client lr decay over the run (scheduled_lr): late rounds take smaller local steps, so
    # the server's model stops jumping around the optimum it reached by then.
    lr_schedule: str = "constant"
    lr_final: float = 0.1  # the last round's lr as a fraction of lr ("cosine")
    plan: PrivacyPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("rounds", "nodes_per_round", "local_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{self.name}: {key} must be at least 1")
        if not self.lr > 0 or not self.server_lr > 0:
            raise ConfigError(f"{self.name}: lr and server_lr must be positive")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"{self.name}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                f"{self.lr_schedule!r}"
            )
        if not 0 < self.lr_final <= 1:
            raise ConfigError(
                f"{self.name}: lr_final (the last round's lr as a fraction of lr) must be in "
                f"(0, 1], got {self.lr_final!r}"
            )
        if self.downlink_bits not in DOWNLINK_BITS:
            raise ConfigError(
                f"{self.name}: downlink_bits must be one of {DOWNLINK_BITS[1:]} (or None for "
                f"float64), got {self.downlink_bits!r}"
            )
        if self.privacy is None:
            plan: PrivacyPlan = NoPrivacy(aggregator=self.aggregator or Mean())
        elif self.aggregator is None:
            plan = self.privacy
        else:
            plan = self.privacy.with_aggregator(self.aggregator)
        if self.hooks and getattr(plan, "trains_with_dp_sgd", False):
            raise ConfigError(
                f"{self.name} adds a gradient term at every node, which DP-SGD's noised step "
                "cannot take: use fedavg, fedavgm or a FedOpt algorithm with example-level "
                "privacy"
            )
        object.__setattr__(self, "plan", plan)

    def lr_at(self, round_num: int) -> float:
        """The client lr nodes are told in training round ``round_num`` (1-based)."""
        return scheduled_lr(
            self.lr,
            schedule=self.lr_schedule,
            final=self.lr_final,
            round_num=round_num,
            rounds=self.rounds,
        )

    def node_tasks(self) -> dict[str, Any]:
        """Tasks every node must install besides train/evaluate (e.g. a secure sum's)."""
        return self.plan.node_tasks()

    def init(self, weights: Weights) -> ServerState:
        return ServerState(round=0, weights={k: np.array(v, float) for k, v in weights.items()})

    def node_params(self, state: ServerState) -> dict[str, Any]:
        return {}

    def released(self, state: ServerState) -> list[str]:
        """The data-derived fields each node releases, all through the round's aggregate."""
        return [f"d/{name}" for name in state.weights]

    def server_update(
        self, state: ServerState, update: Mapping[str, Weights], *, share: float
    ) -> ServerState:
        """Step from the aggregate (``update["d"]``: the mean delta); ``share`` is the
        fraction of the federation that took part (a public count)."""
        delta = update["d"]
        weights = {k: w + self.server_lr * delta[k] for k, w in state.weights.items()}
        return ServerState(round=state.round + 1, weights=weights, slots=state.slots)

    def round(self, fed: Federation, state: ServerState, *, seed: int | None = None) -> RoundResult:
        lr = self.lr_at(state.round + 1)
        plan = self.plan.plan_round(
            fed, per_round=self.nodes_per_round, lr=lr, meta=state.meta, seed=seed
        )
        track_loss = self.track_loss and "loss" in plan.public and "n" in plan.public
        out = self._train(plan, state, lr=lr, seed=seed, track_loss=track_loss)
        update = self._aggregate(plan, state, out)
        # In the aggregate: every holder it did not exclude (a public count).
        participants = tuple(node for node in out.node_ids if node not in out.exclusions)
        new_state = self.server_update(
            state, update, share=len(participants) / max(len(fed.node_ids), 1)
        )
        meta = self.plan.account(state.meta, plan=plan, out=out, rounds=new_state.round)
        loss = float(out["loss"].mean(weights=out["n"])) if track_loss else math.nan
        failures = failure_report(out)
        # The round is done with the updates: a simulation's nodes forget them (held, they
        # would be most of an idle simulated node's memory: up to max_kept updates each).
        out.discard()
        return RoundResult(
            state=replace(new_state, meta=meta),
            train_loss=loss,
            participants=participants,
            failures=failures,
            epsilon=meta.get("epsilon"),
            delta=self.plan.delta,
        )

    def _train(
        self, plan: RoundPlan, state: ServerState, *, lr: float, seed: int | None, track_loss: bool
    ) -> NodeValues:
        """Broadcast the weights and settings to the plan's group; each of its nodes trains."""
        weights = plan.group.broadcast(
            **encode_weights(state.weights, self.downlink_bits),
            epochs=self.local_epochs,
            lr=lr,
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            seed=seed,
            keep_optimizer_state=self.keep_optimizer_state,
            **self.node_params(state),
            **plan.payload,
            **({"track_loss": True} if track_loss else {}),
        )
        public = [f for f in plan.public if f != "loss" or track_loss]
        # What the plan lets travel in the clear comes with the receipts: no second trip
        # (unless the aggregator has the nodes compress their updates first).
        fields = [] if compresses(plan.aggregator) else self.released(state)
        return plan.group.map(TRAIN, weights, send=[*fields, *public] if plan.clear else ())

    def _aggregate(
        self, plan: RoundPlan, state: ServerState, out: NodeValues
    ) -> dict[str, Weights]:
        """The round's one aggregate of every released field, split by head (``d``, ``dc``)."""
        fields = self.released(state)
        n = out["n"] if plan.weighted else None
        aggregated = out.select(*fields).aggregate(plan.aggregator, weights=n)
        if not isinstance(aggregated, dict):  # a single-array model comes back unnamed
            aggregated = {fields[0]: aggregated}
        return {head: unprefixed(head, aggregated) for head in ("d", "dc")}


def failure_report(out: NodeValues) -> dict[str, str]:
    """Why each node of a map is not in its aggregate: its failure, or its exclusion."""
    failures = {node: f"{f.kind.value}: {f.detail}" for node, f in out.failures.items()}
    for node, reason in out.exclusions.items():
        failures.setdefault(node, f"excluded: {reason}")
    return failures


@dataclass(frozen=True, kw_only=True)
class FedAvg(Algorithm):
    name: ClassVar[str] = "fedavg"


@dataclass(frozen=True, kw_only=True)
class FedProx(Algorithm):
    """FedAvg with a proximal term (mu/2)||w - w_global||^2 in every node's objective."""

    name: ClassVar[str] = "fedprox"
    hooks: ClassVar[bool] = True
    mu: float = 0.01

    def node_params(self, state: ServerState) -> dict[str, Any]:
        return {"prox_mu": self.mu}


@dataclass(frozen=True, kw_only=True)
class FedAvgM(Algorithm):
    """FedAvg with server momentum: v = beta v + delta; w += server_lr v."""

    name: ClassVar[str] = "fedavgm"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        # At 1 or more the velocity never forgets a round's delta and the steps grow
        # without bound; a negative momentum flips the sign of past deltas.
        if not 0 <= self.momentum < 1:
            raise ConfigError(
                f"{self.name}: momentum must be in [0, 1) (0 is plain FedAvg), got "
                f"{self.momentum!r}"
            )

    def server_update(
        self, state: ServerState, update: Mapping[str, Weights], *, share: float
    ) -> ServerState:
        delta = update["d"]
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
        self, state: ServerState, update: Mapping[str, Weights], *, share: float
    ) -> ServerState:
        delta = update["d"]  # the optimizer's only statistic: the aggregate itself
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
    """FedOpt with Adagrad's ever-growing second moment, so it needs a larger server step.

    With FedAdam's defaults (server_lr 0.1, tau 1e-3) it reached 0.61 after 5 demo rounds
    where the others reach about 0.90; server_lr 1.0 and tau 1e-2 reach 0.90.
    """

    name: ClassVar[str] = "fedadagrad"
    server_lr: float = 1.0
    tau: float = 1e-2

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v + d2


@dataclass(frozen=True, kw_only=True)
class Scaffold(Algorithm):
    """SCAFFOLD: control variates correct each node's drift from the global direction."""

    name: ClassVar[str] = "scaffold"
    hooks: ClassVar[bool] = True

    def node_params(self, state: ServerState) -> dict[str, Any]:
        c = state.slots.get("c") or {k: np.zeros_like(w) for k, w in state.weights.items()}
        return prefixed("c", c)

    def released(self, state: ServerState) -> list[str]:
        # The control variates' change travels with the delta, through the same aggregate
        # (clipped, summed securely and noised together): never on its own in the clear.
        return [*super().released(state), *(f"dc/{name}" for name in state.weights)]

    def server_update(
        self, state: ServerState, update: Mapping[str, Weights], *, share: float
    ) -> ServerState:
        c = state.slots.get("c") or {k: np.zeros_like(w) for k, w in state.weights.items()}
        c = {k: c[k] + share * update["dc"][k] for k in c}
        weights = {k: w + self.server_lr * update["d"][k] for k, w in state.weights.items()}
        return ServerState(round=state.round + 1, weights=weights, slots={"c": c})


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold)
}
