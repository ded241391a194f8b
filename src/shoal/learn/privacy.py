"""Differential privacy for federated training, with accounting over the rounds actually run.

Three ways to train with a guarantee, chosen per job:

* ``ExampleDP(distributed=True)`` (DP-FedSGD): each round is one DP-SGD step over the whole
  federation. Every node samples its own examples (Poisson, rate q), clips each example's
  gradient, adds its share of the Gaussian noise and normalizes by the federation's expected
  batch; the *sum* of the nodes' updates is one DP-SGD step with the full noise. With
  ``secure=True`` that sum is computed with SecAgg+, so the server never sees anything but
  the noised sum; otherwise the guarantee covers what the model reveals, not a curious
  server that sees each node's (lightly noised) update.
* ``ExampleDP()`` (local DP-SGD): every node runs DP-SGD with its own full noise, so each
  update is private on its own, even from the server. Costly in accuracy for small nodes.
* ``NodeDP`` (DP-FedAvg, McMahan et al. 2018): user-level DP. Nodes are Poisson-sampled, each
  whole update clipped and the sum noised. Needs many nodes for good accuracy.

Epsilon is per example (ExampleDP: each example lives at one node, so the node that took part
most often sets it) or per node (NodeDP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.aggregate import Clip, Stage, Sum
from shoal.errors import ConfigError
from shoal.privacy import (
    Accountant,
    adaptive_update_noise_multiplier,
    calibrate,
    epsilon,
    next_clip_norm,
)
from shoal.privacy.guard import DPRequest
from shoal.privacy.stages import DistributedNoise, GaussianNoise, MeanOver

__all__ = ["ExampleDP", "NodeDP"]


@dataclass(frozen=True, kw_only=True)
class ExampleDP:
    """Example-level DP by DP-SGD at the nodes; ``distributed`` shares one step's noise."""

    noise_multiplier: float
    clip: float = 1.0
    sample_rate: float = 0.2
    steps_per_round: int = 5  # local mode: DP-SGD steps per round at each node
    distributed: bool = False
    total_examples: int | None = None  # distributed: the federation's (public) data size
    secure: bool = False  # distributed: add the updates with SecAgg+
    delta: float = 1e-5
    accountant: Accountant = "rdp"

    def __post_init__(self) -> None:
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

    def request(self, *, nodes: int, per_round: int) -> DPRequest:
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

    def aggregator(self, *, nodes: int, per_round: int, lr: float) -> Stage | None:
        """Distributed mode adds the updates (they are already normalized); local mode: None."""
        if not self.distributed:
            return None
        if not self.secure:
            return Sum()
        from shoal.crypto import SecureSum  # a sibling package; imported only when asked for

        # Each coordinate of a node's update is at most lr * C / q (it cannot sample more
        # than all examples); the margin covers its share of the noise.
        return SecureSum(value_range=1.5 * lr * self.clip / self.sample_rate)

    def node_tasks(self) -> dict[str, Any]:
        """Tasks nodes need for this plan: the secure sum's, when it uses one."""
        if not self.secure:
            return {}
        from shoal.crypto import secure_sum_tasks

        return secure_sum_tasks()

    def spent(self, *, participation: Mapping[str, int], rounds: int, node_rate: float) -> float:
        """Epsilon so far: the DP-SGD steps of the node that took part most often."""
        most = max(participation.values(), default=0)
        if most == 0:
            return 0.0
        return epsilon(
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=most * self.steps_each_round,
            delta=self.delta,
            accountant=self.accountant,
        )


@dataclass(frozen=True, kw_only=True)
class NodeDP:
    """DP-FedAvg: Poisson-sampled nodes, updates clipped to ``clip``, the sum noised.

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

    def next_clip(self, clip: float, noised_unclipped_fraction: float) -> float:
        assert self.target_quantile is not None
        return next_clip_norm(clip, noised_unclipped_fraction, self.target_quantile, self.clip_lr)

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

    def request(self, *, nodes: int, per_round: int, clip: float | None = None) -> DPRequest:
        return DPRequest(
            clip=self.clip if clip is None else clip,
            noise_multiplier=self.noise_multiplier,
            sample_rate=min(1.0, per_round / nodes),
            steps=1,
            level="node",
        )

    def aggregator(
        self, *, nodes: int, per_round: int, lr: float, clip: float | None = None
    ) -> Stage:
        expected = float(per_round)
        clip = self.clip if clip is None else clip
        std = self.update_noise_multiplier(expected) * clip
        if not self.secure:
            return Clip(clip) | Sum() | GaussianNoise(std) | MeanOver(expected)
        from shoal.crypto import SecureSum

        # Each expected node adds its share; the range leaves room for the noise's tails.
        noise = DistributedNoise(std, nodes=max(1, math.ceil(expected)))
        value_range = clip + 6.0 * noise.per_node_std
        return Clip(clip) | noise | SecureSum(value_range=value_range) | MeanOver(expected)

    def node_tasks(self) -> dict[str, Any]:
        """Tasks nodes need for this plan: the secure sum's, when it uses one."""
        if not self.secure:
            return {}
        from shoal.crypto import secure_sum_tasks

        return secure_sum_tasks()

    def spent(self, *, participation: Mapping[str, int], rounds: int, node_rate: float) -> float:
        """Epsilon so far: ``rounds`` subsampled Gaussian steps at the node sampling rate."""
        if rounds == 0:
            return 0.0
        return epsilon(
            sample_rate=node_rate,
            noise_multiplier=self.noise_multiplier,
            steps=rounds,
            delta=self.delta,
            accountant=self.accountant,
        )
