"""Privacy plans: how a training round is made private, in one place.

A :class:`PrivacyPlan` decides, each round, which nodes take part, what DP request they are
sent (and charge to their owners' ledgers), which aggregate their updates go through, and
what else may leave them; after the round it accounts what the run spent. An algorithm reads
only the plan, so its round is the round's math. Plans: :class:`NoPrivacy` (a plain or
secure aggregator, no DP), :class:`ExampleDP` (DP-SGD at the nodes), :class:`NodeDP`
(DP-FedAvg). Federated evaluation goes through the plan too (:meth:`PrivacyPlan.evaluation`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from shoal.aggregate import Clip, Mean, Stage, Sum, accepts_weights, is_private
from shoal.core.reduce import l2_norm
from shoal.errors import ConfigError
from shoal.privacy.accounting import Accountant, PrivacyLedger, calibrate
from shoal.privacy.guard import DPRequest, EvalNoise, NoiseFloor
from shoal.privacy.mechanisms import adaptive_update_noise_multiplier, next_clip_norm
from shoal.privacy.stages import DistributedNoise, GaussianNoise, MeanOver

if TYPE_CHECKING:
    from shoal.core import Aggregator, Federation, NodeGroup, NodeValues

__all__ = [
    "EVAL_LOSS_BOUND",
    "EvaluationPlan",
    "ExampleDP",
    "NoPrivacy",
    "NodeDP",
    "PrivacyPlan",
    "Releases",
    "RoundPlan",
    "metrics_vector",
    "unclipped_indicator",
]

# A node's evaluation loss is clipped to this before a private aggregate: the released
# vector (accuracy, loss / bound) then lies in [0, 1]^2, a public bound on what one node
# (or one example) can move it.
EVAL_LOSS_BOUND = 10.0
_EVAL_SCALE = 1.0 / math.sqrt(2.0)  # ... scaled into the unit ball: sensitivity 1


def metrics_vector(*, accuracy: float, loss: float) -> np.ndarray:
    """A node's evaluation as a private aggregate takes it: (accuracy, clipped loss / bound)
    in [0, 1]^2, scaled into the unit ball (so one node or example moves a sum by <= 1)."""
    accuracy = min(max(float(accuracy), 0.0), 1.0)
    loss = min(max(float(loss), 0.0), EVAL_LOSS_BOUND) / EVAL_LOSS_BOUND
    if not math.isfinite(loss):  # a diverged model: the worst loss, not a NaN in the sum
        loss = 1.0
    return np.array([accuracy, loss]) * _EVAL_SCALE


def unclipped_indicator(update: Mapping[str, np.ndarray], clip: float) -> float:
    """For adaptive clipping: did this update fit under the clip? Centred (b - 1/2), which
    halves the count's sensitivity (Andrew et al. 2021)."""
    norm = math.sqrt(sum(l2_norm(v) ** 2 for v in update.values()))
    return 0.5 if norm <= clip else -0.5


@dataclass(frozen=True, kw_only=True)
class Releases:
    """Release policies (field -> kind, see ``shoal.runtime``) for the two learning tasks.

    ``update`` is the kind (``clear`` or ``secure``) of every data-derived field the round's
    aggregate takes (model deltas, SCAFFOLD's control variates, the adaptive-clip bit): a
    plan with a secure sum never lets them out otherwise. ``public`` fields (example
    count, training loss, step count) leave in the clear or never; ``metrics`` is the
    private evaluation vector's kind, and the raw metrics are clear only without privacy.
    """

    update: str
    public: bool
    metrics: str

    def train(self) -> dict[str, str]:
        if self.public:  # no privacy: every field may be read in the clear
            return {"*": "clear"}
        policy = {"d/*": self.update, "dc/*": self.update, "dp_unclipped": self.update}
        for name in ("loss", "n", "steps"):
            policy[name] = "clear" if self.public else "never"
        return policy

    def evaluate(self) -> dict[str, str]:
        if self.public:
            return {"*": "clear"}
        raw = "clear" if self.public else "never"
        return {"metrics": self.metrics, "accuracy": raw, "loss": raw, "n": raw}


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """One round's privacy decisions.

    ``clear``: updates may travel in the clear with the receipts (plain aggregates, or local
    DP whose every update is private on its own). ``public``: other result fields the nodes
    may release in the clear (the example count and training loss, only without privacy).
    ``weighted``: weight the aggregate by the (public) example counts.
    """

    group: NodeGroup
    aggregator: Aggregator
    payload: Mapping[str, Any] = field(default_factory=dict)
    clear: bool = False
    public: tuple[str, ...] = ()
    weighted: bool = False


@dataclass(frozen=True, kw_only=True)
class EvaluationPlan:
    """How per-node evaluation metrics reach the server.

    ``aggregator`` is None when they may leave in the clear (no privacy). Otherwise each
    node releases ``metrics``, the vector (accuracy, min(loss, EVAL_LOSS_BOUND) / bound)
    scaled into the unit ball, plus its own Gaussian noise of std ``node_noise_std``.
    """

    aggregator: Aggregator | None
    node_noise_std: float = 0.0

    def decode(self, vector: Any) -> dict[str, float]:
        accuracy, loss = (float(v) / _EVAL_SCALE for v in vector)
        return {"federated_accuracy": accuracy, "federated_loss": loss * EVAL_LOSS_BOUND}


@runtime_checkable
class PrivacyPlan(Protocol):
    """What an algorithm asks of its privacy: a round's decisions, and their accounting."""

    def plan_round(
        self,
        fed: Federation,
        *,
        per_round: int,
        lr: float,
        meta: Mapping[str, Any],
        seed: int | None,
    ) -> RoundPlan: ...

    def account(
        self, meta: Mapping[str, Any], *, plan: RoundPlan, out: NodeValues, rounds: int
    ) -> dict[str, Any]:
        """The run's privacy state after a round (``epsilon`` among it, or None)."""
        ...

    def evaluation(self, fed: Federation) -> EvaluationPlan: ...

    def account_evaluation(self, meta: Mapping[str, Any]) -> dict[str, Any]: ...

    def node_tasks(self) -> dict[str, Any]:
        """Tasks nodes install for this plan (a secure sum's)."""
        ...

    def with_aggregator(self, aggregator: Aggregator) -> PrivacyPlan:
        """This plan combining updates with ``aggregator``; ConfigError if it cannot."""
        ...

    def release(self) -> Releases:
        """How each field of the learning tasks may leave a node under this plan."""
        ...

    def floor(self) -> NoiseFloor | None:
        """The least noise a node holding this plan accepts (None: no DP)."""
        ...

    @property
    def delta(self) -> float | None: ...


def _secure_sum(value_range: float) -> Stage:
    from shoal.crypto import SecureSum  # a sibling package; imported only when asked for

    return SecureSum(value_range=value_range)


def _secure_sum_tasks() -> dict[str, Any]:
    from shoal.crypto import secure_sum_tasks

    return secure_sum_tasks()


def _participation(meta: Mapping[str, Any], out: NodeValues) -> dict[str, int]:
    participation = dict(meta.get("dp_participation", {}))
    for node in out.node_ids:
        participation[node] = participation.get(node, 0) + 1
    return participation


# -- no differential privacy --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NoPrivacy:
    """No DP: the aggregator alone decides. A plain one may read updates, losses and example
    counts in the clear; a private one (a secure sum) gets every per-node value, and nothing
    else leaves the nodes."""

    aggregator: Aggregator = field(default_factory=Mean)

    @property
    def delta(self) -> float | None:
        return None

    @property
    def private(self) -> bool:
        return is_private(self.aggregator)

    def plan_round(
        self,
        fed: Federation,
        *,
        per_round: int,
        lr: float,
        meta: Mapping[str, Any],
        seed: int | None,
    ) -> RoundPlan:
        group = fed.sample(per_round, seed=seed)
        if self.private:
            return RoundPlan(group=group, aggregator=self.aggregator)
        return RoundPlan(
            group=group,
            aggregator=self.aggregator,
            clear=True,
            public=("loss", "n"),
            weighted=accepts_weights(self.aggregator),
        )

    def account(
        self, meta: Mapping[str, Any], *, plan: RoundPlan, out: NodeValues, rounds: int
    ) -> dict[str, Any]:
        return dict(meta)

    def evaluation(self, fed: Federation) -> EvaluationPlan:
        if not self.private:
            return EvaluationPlan(aggregator=None)
        # The metrics vector lies in [0, 1]^2 / sqrt(2): each coordinate within 1.
        return EvaluationPlan(aggregator=_secure_sum(1.0) | Mean())

    def account_evaluation(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        return dict(meta)

    def with_aggregator(self, aggregator: Aggregator) -> NoPrivacy:
        return NoPrivacy(aggregator=aggregator)

    def release(self) -> Releases:
        if self.private:  # only into the secure protocol; nothing else at all
            return Releases(update="secure", public=False, metrics="secure")
        return Releases(update="clear", public=True, metrics="clear")

    def floor(self) -> NoiseFloor | None:
        return None

    def node_tasks(self) -> dict[str, Any]:
        tasks = dict(getattr(self.aggregator, "node_tasks", dict)())
        if self.private:
            tasks.update(_secure_sum_tasks())  # private federated evaluation
        return tasks


# -- shared by the DP plans -----------------------------------------------------------------


class _Accounted:
    """Epsilon over training rounds and evaluations, from one ledger of Gaussian events."""

    noise_multiplier: float
    delta: float
    accountant: Accountant
    secure: bool

    def _training_entries(
        self, meta: Mapping[str, Any], rounds: int
    ) -> list[tuple[float, float, int]]:
        raise NotImplementedError

    def _spent(self, meta: Mapping[str, Any], rounds: int) -> float:
        ledger = PrivacyLedger(accountant=self.accountant)
        for rate, noise, steps in self._training_entries(meta, rounds):
            if steps > 0:
                ledger.record(sample_rate=rate, noise_multiplier=noise, steps=steps)
        evaluations = int(meta.get("dp_evaluations", 0))
        if evaluations:
            # Every node releases one bounded metrics vector: a full-batch Gaussian step.
            ledger.record(
                sample_rate=1.0, noise_multiplier=self.noise_multiplier, steps=evaluations
            )
        return ledger.epsilon(self.delta)

    def evaluation(self, fed: Federation) -> EvaluationPlan:
        nodes = max(1, len(fed.node_ids))
        std = self.noise_multiplier  # sensitivity 1: the vector lies in the unit ball
        if self.secure:
            noise = DistributedNoise(std, nodes=nodes)
            secure = _secure_sum(1.0 + 6.0 * noise.per_node_std)
            return EvaluationPlan(aggregator=Clip(1.0) | noise | secure | MeanOver(nodes))
        if self._local_noise():
            # Each node's release must be private on its own: it adds the full noise itself.
            return EvaluationPlan(aggregator=Mean(), node_noise_std=std)
        return EvaluationPlan(aggregator=Clip(1.0) | Sum() | GaussianNoise(std) | MeanOver(nodes))

    def _local_noise(self) -> bool:
        return False

    def account_evaluation(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(meta)
        out["dp_evaluations"] = int(meta.get("dp_evaluations", 0)) + 1
        out["epsilon"] = self._spent(out, int(meta.get("dp_rounds", 0)))
        return out

    def node_tasks(self) -> dict[str, Any]:
        tasks = dict(getattr(getattr(self, "aggregator", None), "node_tasks", dict)())
        if self.secure:
            tasks.update(_secure_sum_tasks())
        return tasks


# -- example-level DP ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ExampleDP(_Accounted):
    """Example-level DP by DP-SGD at the nodes; ``distributed`` shares one step's noise.

    ``distributed=True`` (DP-FedSGD): each round is one DP-SGD step over the whole
    federation; every node adds its share of the noise and normalizes by the federation's
    expected batch, so the *sum* of the updates is one DP-SGD step with the full noise. With
    ``secure=True`` that sum is a SecAgg+ secure sum. ``distributed=False`` (local DP-SGD):
    every node runs DP-SGD with its own full noise, so each update is private on its own.
    Epsilon is per example: the node that took part most often sets it.
    """

    trains_with_dp_sgd: ClassVar[bool] = True  # no gradient hooks (FedProx, SCAFFOLD)

    noise_multiplier: float
    clip: float = 1.0
    sample_rate: float = 0.2
    steps_per_round: int = 5  # local mode: DP-SGD steps per round at each node
    distributed: bool = False
    total_examples: int | None = None  # distributed: the federation's (public) data size
    secure: bool = False  # distributed: add the updates with SecAgg+
    delta: float = 1e-5
    accountant: Accountant = "rdp"
    aggregator: Aggregator | None = None  # local mode: how the private updates are combined

    def __post_init__(self) -> None:
        if self.distributed and self.aggregator is not None:
            raise ConfigError(
                "distributed example-level DP adds the nodes' noise shares with its own sum; "
                "it takes no other aggregator"
            )
        if self.distributed and (self.total_examples is None or self.total_examples < 1):
            raise ConfigError("distributed example-level DP needs total_examples (>= 1)")
        if self.secure and not self.distributed:
            raise ConfigError("secure=True applies to distributed DP (local DP needs no help)")

    @property
    def steps_each_round(self) -> int:
        return 1 if self.distributed else self.steps_per_round

    @classmethod
    def for_target(cls, *, epsilon: float, delta: float, rounds: int, **options: Any) -> ExampleDP:
        """Noise calibrated so that even a node taking part in every round stays within epsilon."""
        probe = cls(noise_multiplier=1.0, delta=delta, **options)
        noise = calibrate(
            epsilon=epsilon,
            delta=delta,
            sample_rate=probe.sample_rate,
            steps=rounds * probe.steps_each_round,
            accountant=probe.accountant,
        )
        return cls(noise_multiplier=noise, delta=delta, **options)

    def request(self, *, nodes: int) -> DPRequest:
        if not self.distributed:
            return DPRequest(
                clip=self.clip,
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps_per_round,
            )
        assert self.total_examples is not None
        return DPRequest(
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=1,
            node_noise_multiplier=self.noise_multiplier / math.sqrt(nodes),
            normalizer=self.sample_rate * self.total_examples,
        )

    def plan_round(
        self,
        fed: Federation,
        *,
        per_round: int,
        lr: float,
        meta: Mapping[str, Any],
        seed: int | None,
    ) -> RoundPlan:
        payload = {"dp": self.request(nodes=len(fed.node_ids)).to_json()}
        if not self.distributed:
            # Every update is private on its own; nothing else (loss, example count) is.
            aggregator = self.aggregator or Mean()
            return RoundPlan(
                group=fed.sample(per_round, seed=seed),
                aggregator=aggregator,
                payload=payload,
                clear=not is_private(aggregator),
            )
        # One DP-SGD step over the whole federation's data; the updates are already
        # normalized, so the server adds them.
        total: Stage = Sum()
        if self.secure:
            # Each coordinate of a node's update is at most lr * C / q (it cannot sample more
            # than all its examples); the margin covers its share of the noise.
            total = _secure_sum(1.5 * lr * self.clip / self.sample_rate)
        return RoundPlan(group=fed.all(), aggregator=total, payload=payload)

    def _training_entries(
        self, meta: Mapping[str, Any], rounds: int
    ) -> list[tuple[float, float, int]]:
        most = max(dict(meta.get("dp_participation", {})).values(), default=0)
        return [(self.sample_rate, self.noise_multiplier, most * self.steps_each_round)]

    def _local_noise(self) -> bool:
        return not self.distributed

    def with_aggregator(self, aggregator: Aggregator) -> ExampleDP:
        return replace(self, aggregator=aggregator)

    def release(self) -> Releases:
        if self.secure:
            return Releases(update="secure", public=False, metrics="secure")
        if self.distributed:
            # Without a secure sum the job trusts the coordinator with the lightly noised
            # updates and to noise the metrics' sum (central DP): the job chose so.
            return Releases(update="clear", public=False, metrics="clear")
        # Local DP-SGD: the node noises each update (and its evaluation vector) itself, with
        # no less than its own plan's noise, charged first; nothing else leaves.
        private = self.aggregator is not None and is_private(self.aggregator)
        return Releases(update="secure" if private else "noised", public=False, metrics="noised")

    def floor(self) -> NoiseFloor:
        evaluation: EvalNoise = (
            "local" if not self.distributed else "secure" if self.secure else "central"
        )
        return NoiseFloor(
            level="example",
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps_each_round,
            evaluation=evaluation,
        )

    def account(
        self, meta: Mapping[str, Any], *, plan: RoundPlan, out: NodeValues, rounds: int
    ) -> dict[str, Any]:
        new = dict(meta)
        new["dp_participation"] = _participation(meta, out)
        new["dp_rounds"] = rounds
        new["epsilon"] = self._spent(new, rounds)
        return new


# -- node-level DP ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NodeDP(_Accounted):
    """DP-FedAvg (McMahan et al. 2018): Poisson-sampled nodes, updates clipped to ``clip``,
    the sum noised and divided by the expected count (a public number).

    With ``target_quantile`` the clip adapts each round towards that quantile of the update
    norms (Andrew et al. 2021): nodes report whether their update fitted under the clip, the
    server noises that count and moves the clip geometrically by ``clip_lr``. The count's
    noise is paid for out of the same budget: the updates then carry a slightly larger
    multiplier, so that together they cost ``noise_multiplier``.
    """

    noise_multiplier: float
    clip: float = 1.0
    delta: float = 1e-5
    accountant: Accountant = "rdp"
    secure: bool = False
    target_quantile: float | None = None
    clip_lr: float = 0.2

    def __post_init__(self) -> None:
        if self.target_quantile is not None:
            if not 0.0 < self.target_quantile < 1.0:
                raise ConfigError("target_quantile must be strictly between 0 and 1, e.g. 0.5")
            if self.secure:
                raise ConfigError(
                    "adaptive clipping needs the server to count unclipped updates in the "
                    "clear; use a fixed clip with secure aggregation"
                )

    @classmethod
    def for_target(
        cls, *, epsilon: float, delta: float, rounds: int, sample_rate: float, **options: Any
    ) -> NodeDP:
        noise = calibrate(
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=rounds,
            accountant=options.get("accountant", "rdp"),
        )
        return cls(noise_multiplier=noise, delta=delta, **options)

    def with_aggregator(self, aggregator: Aggregator) -> NodeDP:
        raise ConfigError(
            "node-level DP (DP-FedAvg) clips, adds and noises the updates itself; robust or "
            "custom aggregators do not combine with its noised sum"
        )

    def release(self) -> Releases:
        if self.secure:  # a node's budget guard, if any, binds the noise it adds there
            return Releases(update="secure", public=False, metrics="secure")
        # Central DP: the job trusts the coordinator to add the noise to the clipped sum.
        return Releases(update="clear", public=False, metrics="clear")

    def floor(self) -> NoiseFloor:
        return NoiseFloor(
            level="node",
            noise_multiplier=self.noise_multiplier,
            evaluation="secure" if self.secure else "central",
        )

    def count_noise_std(self, expected: float) -> float:
        """The noise on the unclipped count: the paper's expected_count / 20."""
        return max(expected / 20.0, 0.51 * self.noise_multiplier)

    def update_noise_multiplier(self, expected: float) -> float:
        if self.target_quantile is None:
            return self.noise_multiplier
        return adaptive_update_noise_multiplier(
            noise_multiplier=self.noise_multiplier,
            count_noise_std=self.count_noise_std(expected),
        )

    def aggregator(self, *, expected: float, clip: float | None = None) -> Stage:
        """Clip, noise and add the updates; divide by ``expected`` (the expected count)."""
        clip = self.clip if clip is None else clip
        std = self.update_noise_multiplier(expected) * clip
        if not self.secure:
            return Clip(clip) | Sum() | GaussianNoise(std) | MeanOver(expected)
        # Each expected node adds its share; the range leaves room for the noise's tails.
        noise = DistributedNoise(std, nodes=max(1, math.ceil(expected)))
        secure = _secure_sum(clip + 6.0 * noise.per_node_std)
        return Clip(clip) | noise | secure | MeanOver(expected)

    def plan_round(
        self,
        fed: Federation,
        *,
        per_round: int,
        lr: float,
        meta: Mapping[str, Any],
        seed: int | None,
    ) -> RoundPlan:
        nodes = max(len(fed.node_ids), 1)
        clip = float(meta.get("dp_clip", self.clip))
        request = DPRequest(
            clip=clip,
            noise_multiplier=self.noise_multiplier,
            sample_rate=min(1.0, per_round / nodes),
            steps=1,
            level="node",
        )
        # Amplification by sampling holds for Poisson sampling, so DP-FedAvg samples so;
        # it divides by the expected count, a public number, not the group's size.
        return RoundPlan(
            group=fed.sample_poisson(request.sample_rate, seed=seed),
            aggregator=self.aggregator(expected=request.sample_rate * nodes, clip=clip),
            payload={"dp": request.to_json()},
        )

    def _training_entries(
        self, meta: Mapping[str, Any], rounds: int
    ) -> list[tuple[float, float, int]]:
        if meta.get("dp_buffered"):
            # DP-FedBuff: no amplification by sampling (who arrives in a buffer is no
            # Poisson sample); a node loses privacy only in the steps it contributed to.
            most = max(dict(meta.get("dp_participation", {})).values(), default=0)
            return [(1.0, self.noise_multiplier, most)]
        return [(float(meta.get("dp_node_rate", 1.0)), self.noise_multiplier, rounds)]

    def buffered_request(self) -> DPRequest:
        """What a node trains under in DP-FedBuff: its update clipped and noised in the
        buffer's sum, charged at sample rate 1 (asynchronous arrivals are not sampled)."""
        if self.target_quantile is not None:
            raise ConfigError(
                "adaptive clipping counts unclipped updates per synchronous round; use a "
                "fixed clip with asynchronous (buffered) training"
            )
        return DPRequest(
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            sample_rate=1.0,
            steps=1,
            level="node",
        )

    def account_buffered(
        self, meta: Mapping[str, Any], *, contributors: Sequence[str], steps: int
    ) -> dict[str, Any]:
        """The run's privacy after a DP-FedBuff server step (``steps`` so far).

        Each step is one Gaussian mechanism on a sum of clipped updates to which a node adds
        at most one; the node that contributed to the most steps sets epsilon.
        """
        new = dict(meta)
        participation = dict(meta.get("dp_participation", {}))
        for node in contributors:
            participation[node] = participation.get(node, 0) + 1
        new["dp_participation"] = participation
        new["dp_rounds"] = steps
        new["dp_buffered"] = True
        new["epsilon"] = self._spent(new, steps)
        return new

    def account(
        self, meta: Mapping[str, Any], *, plan: RoundPlan, out: NodeValues, rounds: int
    ) -> dict[str, Any]:
        new = dict(meta)
        nodes = max(len(out.federation.node_ids), 1)
        request = DPRequest.from_payload(plan.payload)
        assert request is not None
        new["dp_participation"] = _participation(meta, out)
        new["dp_rounds"] = rounds
        new["dp_node_rate"] = request.sample_rate
        new["epsilon"] = self._spent(new, rounds)
        if self.target_quantile is not None:
            expected = request.sample_rate * nodes
            # Andrew et al.: the noised fraction of updates that fitted under the clip; each
            # node reports b - 1/2, which halves the count's sensitivity.
            centred = out["dp_unclipped"].aggregate(
                Sum() | GaussianNoise(self.count_noise_std(expected))
            )
            fraction = float(centred) / expected + 0.5
            new["dp_clip"] = next_clip_norm(
                request.clip, fraction, self.target_quantile, self.clip_lr
            )
        return new
