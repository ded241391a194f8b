"""Budgets enforced at the node: a guard that charges each DP request to the owner's ledger.

A task that trains on private data states its privacy cost in its payload (``"dp"``: clip,
noise multiplier, sample rate, steps, level). The owner's guard charges that cost to the
ledger in the node's state (``ctx.node_state``: durable with ``shoal node --state``) before
the task runs, so before anything leaves, and declines the task (PrivacyBudgetExceeded) when
it would overspend; the coordinator only learns that the node declined. A guarded task that
states no DP cost is declined too: without noise its privacy loss is unbounded. A request
id charged once is refused the second time (a replay), and the task's result is bound to
the noise the charge assumed: the node releases its noised fields with no less.

A :class:`NoiseFloor` is the least privacy the node's own plan (the job it holds) allows: a
request for less noise than the floor, or none, is refused whatever the owner's budget, and
federated evaluation is charged and noised at the floor's multiplier, not the request's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from shoal.errors import ConfigError, PrivacyBudgetExceeded, ReleaseRefused
from shoal.privacy.accounting import Accountant, Mechanism
from shoal.privacy.budget import NodeBudget
from shoal.runtime.app import NodeCheck, NoiseBinding
from shoal.runtime.nodestate import NODE_STATE_KEY, Charge

__all__ = [
    "DP_KEY",
    "BudgetGuard",
    "DPRequest",
    "LocalDP",
    "NoiseFloor",
    "budget_guard",
    "charge_owner",
    "charge_owner_terms",
    "charge_terms",
    "owner_budget",
]

DP_KEY = "dp"
BUDGET_STATE = "shoal.privacy.budget"
Level = Literal["example", "node"]
# How a DP plan's federated evaluation is noised: each node adds the full noise itself
# (local), each adds its share inside a secure sum (secure), or the server adds it (central).
EvalNoise = Literal["local", "secure", "central"]


@dataclass(frozen=True, kw_only=True)
class DPRequest:
    """The privacy cost a task declares. ``level="example"``: DP-SGD at the node, each step
    on a Poisson sample of the node's examples. ``level="node"``: the node's whole update is
    clipped and noised in aggregate (DP-FedAvg); ``sample_rate`` is the server's node rate."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    level: Level = "example"
    # Distributed DP: the node adds only its share of the noise (the secure sum of all
    # shares carries ``noise_multiplier``) and normalizes by the federation's batch.
    node_noise_multiplier: float | None = None
    normalizer: float | None = None

    def __post_init__(self) -> None:
        if self.level not in ("example", "node"):
            raise ConfigError(f"DP level must be 'example' or 'node', got {self.level!r}")
        if not self.clip > 0 or not self.noise_multiplier >= 0:
            raise ConfigError("a DP request needs clip > 0 and noise_multiplier >= 0")
        if not 0 < self.sample_rate <= 1 or self.steps < 1:
            raise ConfigError("a DP request needs 0 < sample_rate <= 1 and steps >= 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def local(self) -> LocalDP:
        """What DP-SGD at this node runs: with distributed noise, only the node's share."""
        share = self.node_noise_multiplier
        return LocalDP(
            clip=self.clip,
            noise_multiplier=self.noise_multiplier if share is None else share,
            sample_rate=self.sample_rate,
            steps=self.steps,
            normalizer=self.normalizer,
        )

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> DPRequest | None:
        raw = payload.get(DP_KEY)
        if raw is None:
            return None
        if type(raw) is not dict and not isinstance(raw, Mapping):
            raise ConfigError(f"payload field {DP_KEY!r} must be an object")
        # The guard and the task both read the request, and every node of a round gets the
        # same one (an in-process engine hands each node its own copy): parse it once per
        # distinct content. Values equal under == parse to the same request (1, 1.0 and
        # True alike), and a NaN never equals itself, so it is parsed, and refused, each time.
        last = _LAST_PARSED[0]
        if last is not None and last[0] == raw:
            return last[1]
        request = cls._parse(raw)
        _LAST_PARSED[0] = (dict(raw), request)  # our own copy; one tuple: threads see both
        return request

    @classmethod
    def _parse(cls, raw: Mapping[str, Any]) -> DPRequest:
        try:
            return cls(
                clip=float(raw["clip"]),
                noise_multiplier=float(raw["noise_multiplier"]),
                sample_rate=float(raw["sample_rate"]),
                steps=int(raw["steps"]),
                level=raw.get("level", "example"),
                node_noise_multiplier=_optional_float(raw.get("node_noise_multiplier")),
                normalizer=_optional_float(raw.get("normalizer")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed DP request {dict(raw)!r}: {exc}") from None


_LAST_PARSED: list[tuple[dict[str, Any], DPRequest] | None] = [None]


@dataclass(frozen=True, kw_only=True)
class LocalDP:
    """DP-SGD at a node: ``steps`` steps, each on a Poisson sample of rate ``sample_rate``,
    every example's gradient clipped to ``clip`` and Gaussian noise of std
    ``noise_multiplier * clip`` added to the sum (Abadi et al. 2016)."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    # Divide the noised sum by this (the federation's expected batch in distributed DP)
    # instead of this node's own expected batch.
    normalizer: float | None = None

    def __post_init__(self) -> None:
        if self.normalizer is not None and not self.normalizer > 0:
            raise ConfigError(f"DP normalizer must be positive, got {self.normalizer}")
        if not np.isfinite(self.clip) or self.clip <= 0:
            raise ConfigError(f"DP clip norm must be positive, got {self.clip}")
        if not np.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise ConfigError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"DP sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ConfigError(f"DP steps must be at least 1, got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class NoiseFloor:
    """The least noise a node's own privacy plan lets its learning tasks run with.

    The node takes it from the job it holds, never from the request. A DP request at another
    level, with a smaller noise multiplier, a larger sample rate or more steps than the plan
    states (or no DP request at all) is refused. ``evaluation`` says how the plan noises
    federated evaluation; the node charges each evaluation as one release of a unit-ball
    vector at ``noise_multiplier`` (what the run's own accounting counts).
    """

    level: Level
    noise_multiplier: float
    sample_rate: float = 1.0  # the most a request may state (example level)
    steps: int = 1  # the most steps one request may take
    evaluation: EvalNoise = "central"

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not 0 < self.sample_rate <= 1 or self.steps < 1:
            raise ConfigError(
                "a noise floor needs noise_multiplier > 0, 0 < sample_rate <= 1, steps >= 1"
            )

    def check(self, task: str, request: DPRequest | None) -> DPRequest:
        """The request, if the plan allows it; ReleaseRefused with the reason otherwise."""
        if request is None:
            raise ReleaseRefused(
                f"task {task!r} came without a DP request, but the job this node holds trains "
                f"with {self.level}-level differential privacy (noise multiplier "
                f"{self.noise_multiplier:g}); the node does not train without it"
            )
        short = []
        if request.level != self.level:
            short.append(f"level {request.level!r}, not {self.level!r}")
        if request.noise_multiplier < self.noise_multiplier * (1 - 1e-9):
            short.append(
                f"noise multiplier {request.noise_multiplier:g} < {self.noise_multiplier:g}"
            )
        if self.level == "example" and request.sample_rate > self.sample_rate * (1 + 1e-9):
            short.append(f"sample rate {request.sample_rate:g} > {self.sample_rate:g}")
        if request.steps > self.steps:
            short.append(f"{request.steps} steps > {self.steps}")
        if short:
            raise ReleaseRefused(
                f"task {task!r} asks for less privacy than the job this node holds allows ("
                + "; ".join(short)
                + "); the node refuses to train with less noise than its own plan"
            )
        return request


def budget_guard(
    *,
    max_epsilon: float | None,
    max_delta: float = 1e-5,
    tasks: Collection[str],
    evaluate: Collection[str] = (),
    floor: NoiseFloor | None = None,
    accountant: Accountant = "rdp",
    trust_server_sampling: bool = False,
) -> BudgetGuard:
    """A NodeApp guard charging DP work on ``tasks`` to the owner's ledger, before it runs.

    ``max_epsilon`` (at ``max_delta``) is the owner's limit; None records every charge
    without one (the ledger still refuses replays and binds the noise). ``floor`` (the
    node's own plan) refuses requests for less noise than it states, and makes the
    ``evaluate`` tasks charge one release at its noise multiplier and bind that noise.
    Example-level requests are charged as stated: the node samples its own examples.
    Node-level requests are charged with sample rate 1 unless the owner trusts the server's
    sampling, since only then does amplification by sampling hold for this node.
    """
    if max_epsilon is not None:  # validate now, not at the first task
        NodeBudget(max_epsilon=max_epsilon, max_delta=max_delta, accountant=accountant)
    elif floor is None:
        raise ConfigError("a budget guard needs the owner's max_epsilon or the plan's floor")
    guarded = frozenset(tasks)
    evaluated = frozenset(evaluate) if floor is not None else frozenset()

    def budget(ctx: Any) -> NodeBudget | None:
        if max_epsilon is None:
            return None
        return owner_budget(
            ctx, max_epsilon=max_epsilon, max_delta=max_delta, accountant=accountant
        )

    def accepted(request: DPRequest) -> tuple[Charge, NoiseBinding]:
        """What a request the floor accepts charges and binds (the same at every node)."""
        rate = request.sample_rate
        if request.level == "node" and not trust_server_sampling:
            rate = 1.0
        charge = charge_terms(
            sample_rate=rate,
            noise_multiplier=request.noise_multiplier,
            steps=request.steps,
            clip=request.clip,
            level=request.level,
            node_noise_multiplier=request.node_noise_multiplier,
        )
        share = request.node_noise_multiplier
        # Example level: DP-SGD adds the noise inside the task. Node level: the node adds it
        # when the update leaves, and refuses a release with less. The ledger counted the
        # full noise_multiplier: a node's share of distributed noise (node_noise_multiplier)
        # is enough only inside a secure sum over a group big enough that the shares add
        # up to it (the node checks the group it sees), never for a release on its own.
        binding = NoiseBinding.of(
            clip=request.clip,
            std=request.clip * request.noise_multiplier,
            share_std=None if share is None else request.clip * share,
            applied=request.level == "example",
        )
        return charge, binding

    # Every node of a round sends the same request (DPRequest.from_payload hands them one
    # object): its floor check, charge terms and noise binding are made once, here.
    last: list[tuple[DPRequest, Charge, NoiseBinding] | None] = [None]
    # Federated evaluation: one unit-ball metrics vector, released once at the plan's noise
    # multiplier; the node charges it and binds the noise, whatever the request says.
    evaluation = (
        None
        if floor is None
        else (
            charge_terms(
                sample_rate=1.0,
                noise_multiplier=floor.noise_multiplier,
                steps=1,
                clip=1.0,
                level="evaluation",
            ),
            NoiseBinding.of(
                clip=1.0, std=floor.noise_multiplier, applied=floor.evaluation == "local"
            ),
        )
    )

    def terms(task: str, payload: Mapping[str, Any]) -> tuple[Charge, NoiseBinding] | None:
        """What ``task`` with ``payload`` charges and binds at any node (None: not guarded);
        raises for a request the floor or the owner refuses. Nothing per node."""
        if task in evaluated:
            assert evaluation is not None
            return evaluation
        if task not in guarded:
            return None
        request = DPRequest.from_payload(payload)
        known = last[0]
        if known is not None and request is known[0]:
            return known[1], known[2]  # the floor accepted this very request
        if floor is not None:
            request = floor.check(task, request)
        if request is None:
            raise PrivacyBudgetExceeded(
                f"task {task!r} declares no differential privacy, and this node's owner "
                f"limits it to epsilon {max_epsilon}; run the job with a [privacy] table"
            )
        charge, binding = accepted(request)
        last[0] = (request, charge, binding)  # one tuple: threads see all or none
        return charge, binding

    def guard(task: str, ctx: Any, payload: Mapping[str, Any]) -> None:
        found = terms(task, payload)
        if found is not None:
            charge, binding = found
            owner = None if max_epsilon is None else budget(ctx)
            charge_owner_terms(ctx, owner, task=task, charge=charge)
            ctx.noise = binding

    def prepare(task: str, payload: Mapping[str, Any]) -> NodeCheck | None:
        found = terms(task, payload)
        if found is None:
            return None
        charge, binding = found
        # The node's own part, as in guard(): the replay check, the owner's budget and the
        # ledger entry (under the node's lock), then the binding.
        if max_epsilon is None:
            # No limit of this guard's own: the node's replay check and ledger entry (its
            # text finished when read), and the owner's budget if another guard built it.
            entry = charge.entry(task)
            record = functools.partial(_record_in_owner_budget, charge.terms)

            def node_check(ctx: Any, payload: Mapping[str, Any]) -> None:
                state = ctx.state.get(NODE_STATE_KEY)
                if state is None:
                    state = ctx.node_state
                state.charge_entry(ctx.task_id, entry, record)
                ctx.noise = binding

        else:

            def node_check(ctx: Any, payload: Mapping[str, Any]) -> None:
                charge_owner_terms(ctx, budget(ctx), task=task, charge=charge)
                ctx.noise = binding

        return node_check

    return BudgetGuard(check=guard, prepare_check=prepare)


@dataclass(frozen=True, eq=False)
class BudgetGuard:
    """A node's budget guard (see :func:`budget_guard`): called per request like any guard,
    or prepared once (:meth:`prepare`) for a request that many nodes receive alike."""

    check: Callable[[str, Any, Mapping[str, Any]], None]
    prepare_check: Callable[[str, Mapping[str, Any]], NodeCheck | None]

    def __call__(self, task: str, ctx: Any, payload: Mapping[str, Any]) -> None:
        self.check(task, ctx, payload)

    def prepare(self, task: str, payload: Mapping[str, Any]) -> NodeCheck | None:
        """The floor check, charge terms and binding of ``task`` with ``payload``, done
        now; returns what each node still does (charge its own ledger and bind the noise),
        or None if the guard does not concern ``task``. Raises what the guard would raise
        at every node (the caller then runs the guard at each node, which raises it there)."""
        return self.prepare_check(task, payload)


def owner_budget(
    ctx: Any, *, max_epsilon: float, max_delta: float, accountant: Accountant = "rdp"
) -> NodeBudget:
    """The owner's budget at this node, rebuilt once from the durable ledger in
    ``ctx.node_state`` (so a restart forgets nothing) and shared by every task that charges."""
    state = ctx.node_state
    budget: NodeBudget | None = state.cached(BUDGET_STATE)
    if budget is not None:
        return budget
    with state.lock:  # built once: a second copy would miss the charges made into the first
        budget = state.cached(BUDGET_STATE)
        if budget is None:
            budget = NodeBudget(max_epsilon=max_epsilon, max_delta=max_delta, accountant=accountant)
            for past in state.charges():
                budget.ledger.record(
                    sample_rate=float(past["sample_rate"]),
                    noise_multiplier=float(past["noise_multiplier"]),
                    steps=int(past["steps"]),
                    mechanism=past.get("mechanism", "gaussian"),
                )
            state.cache[BUDGET_STATE] = budget
    return budget


def charge_terms(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    mechanism: Mechanism = "gaussian",
    **detail: Any,
) -> Charge:
    """The terms of one privacy charge, as the ledger records them (see charge_owner)."""
    return Charge.of(
        {
            "sample_rate": sample_rate,
            "noise_multiplier": noise_multiplier,
            "steps": steps,
            "mechanism": mechanism,
            **detail,
        }
    )


def charge_owner(
    ctx: Any,
    budget: NodeBudget | None,
    *,
    task: str,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    mechanism: Mechanism = "gaussian",
    **detail: Any,
) -> None:
    """Charge request ``ctx.task_id`` to the owner's ledger: refused if it was charged before
    (a replay), declined (PrivacyBudgetExceeded) if it would overspend ``budget`` (None: no
    limit, only the record), and written to the node's state (on disk with a state file)
    before the task's result can leave."""
    charge = charge_terms(
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=steps,
        mechanism=mechanism,
        **detail,
    )
    charge_owner_terms(ctx, budget, task=task, charge=charge)


def charge_owner_terms(ctx: Any, budget: NodeBudget | None, *, task: str, charge: Charge) -> None:
    """:func:`charge_owner` with terms made once (:func:`charge_terms`) for many nodes."""
    state = ctx.node_state
    task_id = ctx.task_id
    # The check and the charge as one step: two requests at once (a task still running
    # from a dropped session while the next one arrives) must not both fit a budget that
    # has room for one.
    with state.lock:
        if budget is not None:
            if state.charged(task_id):  # a replay is refused, not declined for the budget
                raise ReleaseRefused(
                    f"request {task_id!r} was charged to this node's privacy ledger already; "
                    "the node does not run a charged request twice"
                )
            terms = charge.terms
            budget.check(
                sample_rate=terms["sample_rate"],
                noise_multiplier=terms["noise_multiplier"],
                steps=terms["steps"],
                mechanism=terms["mechanism"],
            )
        # Refuses a replay itself (the same message), under the same lock.
        state.charge(task_id=task_id, task=task, charge=charge)
        # The owner's budget, if another guard built it, counts this charge too.
        owner = budget if budget is not None else state.cached(BUDGET_STATE)
        if owner is not None:
            _record(owner, charge.terms)


def _record(budget: NodeBudget, terms: Mapping[str, Any]) -> None:
    budget.ledger.record(
        sample_rate=terms["sample_rate"],
        noise_multiplier=terms["noise_multiplier"],
        steps=terms["steps"],
        mechanism=terms["mechanism"],
    )


def _record_in_owner_budget(terms: Mapping[str, Any], cache: Mapping[str, Any]) -> None:
    """A charge made without a limit also counts in the owner's budget, if a guard with a
    limit built it at this node (called under the node's lock, by NodeState.charge_entry)."""
    owner = cache.get(BUDGET_STATE)
    if owner is not None:
        _record(owner, terms)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
