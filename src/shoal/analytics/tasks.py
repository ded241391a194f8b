"""The node side of federated queries: the tasks a party's owner installs, and its policy.

Each task re-parses the SQL against the dialect, runs it on the party's own database with
contributions bounded, and keeps one vector, ``stats``, for the secure sum. Under DP the
node charges its owner's ledger first and, in distributed mode, adds its own share of the
Laplace noise (from OS entropy) before the value is kept: the coordinator only ever sees the
noised sum. An owner may refuse exact answers and coordinator-added noise altogether.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.analytics.config import AnalyticsConfig
from shoal.analytics.dialect import check_joins_under_dp, parse
from shoal.analytics.party import Domain, bounded_sql, key_counts, party_stats
from shoal.analytics.sketch import SketchShape, sketch
from shoal.analytics.source import Database
from shoal.analytics.stats import (
    Block,
    blocks_for,
    check_size,
    flatten,
    laplace_scales,
    released,
    scales,
    skellam_steps,
)
from shoal.errors import ConfigError, PrivacyBudgetExceeded, QueryError, TaskError
from shoal.privacy import (
    NodeBudget,
    PrivacyLedger,
    skellam_noise,
    skellam_noise_multiplier,
)
from shoal.privacy.accounting import Mechanism
from shoal.privacy.guard import charge_owner, owner_budget

__all__ = [
    "CHECK_TASK",
    "KEYS_TASK",
    "STATS_TASK",
    "NodePolicy",
    "SkellamLayout",
    "analytics_tasks",
    "join_exact",
    "release_policy",
    "secure_range",
    "skellam_layout",
    "sketch_noise_scale",
    "sketch_shape",
    "split_exact",
]

STATS_TASK = "shoal.analytics.stats"
KEYS_TASK = "shoal.analytics.keys"
CHECK_TASK = "shoal.analytics.check"  # can this party answer? (reads no row, charges nothing)
# The secure sum carries each statistic divided by its public bound (see stats.scales), so
# every coordinate lies in [-1, 1]; the range leaves room for the node's noise share.
VALUE_RANGE = 2.0
SPLIT_BITS = 26
LEDGER_STATE = "shoal.analytics.ledger"  # spend recorded when the owner set no maximum


@dataclass(frozen=True, kw_only=True)
class NodePolicy:
    """What a party's owner allows.

    ``require_dp``: every query must carry DP noise the node adds itself (exact answers and
    coordinator-added noise are declined). ``max_epsilon``: the owner's total budget, shared
    with every other DP task on the node. ``privacy_unit`` overrides the request's: the
    guarantee is always per the owner's unit. ``max_noise_shares`` caps how many parties the
    node assumes share the noise (a coordinator that overstates it would lower the noise).
    """

    require_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float = 1e-6
    privacy_unit: str | None = None
    max_noise_shares: int | None = None
    table: str | None = None  # the table a CSV/Parquet file is loaded as

    def __post_init__(self) -> None:
        if self.max_epsilon is not None:
            NodeBudget(max_epsilon=self.max_epsilon, max_delta=self.max_delta)  # validates
        if self.max_noise_shares is not None and self.max_noise_shares < 1:
            raise ConfigError("max_noise_shares must be at least 1")


def release_policy(policy: NodePolicy) -> dict[str, str]:
    """The release policy of the analytics tasks, declared once: ``stats`` leaves only as a
    secure-sum input, under every policy. Not ``noised``: the field also carries exact and
    central-noise answers (no noise added at the node), which owners who do not require DP
    allow and a noised field would refuse. Under distributed DP a party's value carries only
    its share of the noise (Gamma(1/k) differences, a k-th of the variance), which protects
    it only inside the sum; for owners who require DP the task declines exact and central
    requests and binds its share (``_bind_share``), so the runtime checks it as a noised
    share: one secure sum, over a group as large as the shares stated."""
    del policy  # the same for every owner; kept as the one place it is declared
    return {"stats": "secure"}


def _request(ctx: Any, payload: Mapping[str, Any], policy: NodePolicy) -> tuple[Any, ...]:
    sql, raw = payload.get("sql"), payload.get("config")
    if not isinstance(sql, str) or not isinstance(raw, Mapping):
        raise TaskError("an analytics request carries 'sql' and 'config'")
    config = AnalyticsConfig.from_dict(raw)
    if policy.privacy_unit is not None and config.privacy_unit != policy.privacy_unit:
        config = AnalyticsConfig.from_dict({**raw, "privacy_unit": policy.privacy_unit})
    plan = parse(sql, config)
    privacy = payload.get("privacy")
    if privacy is not None and not isinstance(privacy, Mapping):
        raise TaskError("'privacy' must be an object or null")
    if privacy is not None:
        check_joins_under_dp(plan, config)
    db = ctx.data
    if isinstance(db, (str, os.PathLike)):  # a path: opened once, as the job's table
        table = policy.table or config.table
        key = (os.fspath(db), table)
        opened = ctx.state.setdefault("shoal.analytics.db", {})
        if key not in opened:
            opened[key] = Database(key[0], table=table)
        db = opened[key]
    if not isinstance(db, Database):
        raise TaskError(f"this node holds no database (its data is {type(db).__name__})")
    return config, plan, privacy, db


def _charge(
    ctx: Any,
    policy: NodePolicy,
    privacy: Mapping[str, Any] | None,
    *,
    skellam_d2: float | None = None,
    levels: int = 1,
    check_only: bool = False,
) -> float | None:
    """Decline what the owner does not allow, and charge a DP request to the ledger.

    ``skellam_d2``: the task can add Skellam noise, at this L2 sensitivity (None: Laplace
    only, and a Skellam request is refused). ``levels``: a Laplace release in that many
    parts of epsilon / levels each (key selection's tree levels), charged as that many
    steps. ``check_only``: decline as the charge would, but record nothing. Returns the
    epsilon charged in total (None if exact)."""
    if privacy is None:
        if policy.require_dp:
            raise PrivacyBudgetExceeded(
                "this party's owner requires differential privacy for every query; run it "
                "with a [privacy] table (mode = 'distributed')"
            )
        return None
    try:
        epsilon = float(privacy["epsilon"])
        mode = privacy["mode"]
    except (KeyError, TypeError, ValueError):
        raise TaskError(f"malformed privacy request {dict(privacy)!r}") from None
    if not (0 < epsilon < math.inf) or mode not in ("distributed", "central"):
        raise TaskError(f"malformed privacy request {dict(privacy)!r}")
    noise = privacy.get("noise", "laplace")
    if noise not in ("laplace", "skellam") or (noise == "skellam" and skellam_d2 is None):
        raise TaskError(f"this task adds Laplace noise only, not {noise!r}")
    mechanism: Mechanism = "laplace"
    multiplier = levels / epsilon  # per part: Laplace scale over sensitivity = 1 / eps_part
    if noise == "skellam":
        if mode != "distributed":
            raise TaskError("Skellam noise is added by the parties: mode must be 'distributed'")
        try:
            multiplier = skellam_noise_multiplier(epsilon=epsilon, delta=privacy["delta"])
        except (KeyError, ConfigError) as exc:
            raise TaskError(f"a Skellam request needs delta in (0, 1): {exc}") from None
        mechanism = "skellam"
    if mode == "central" and policy.require_dp:
        raise PrivacyBudgetExceeded(
            "this party's owner requires noise added at the party; central noise would be "
            "added by the coordinator after the sum: use mode = 'distributed'"
        )
    if policy.max_epsilon is not None:
        # The owner's one ledger, shared with training and durable with a node state file.
        budget = owner_budget(ctx, max_epsilon=policy.max_epsilon, max_delta=policy.max_delta)
        if check_only:
            budget.check(
                sample_rate=1.0, noise_multiplier=multiplier, steps=levels, mechanism=mechanism
            )
            return epsilon
        charge_owner(
            ctx,
            budget,
            task="analytics",
            sample_rate=1.0,
            noise_multiplier=multiplier,
            steps=levels,
            mechanism=mechanism,
        )
    elif not check_only:
        ledger = ctx.state.setdefault(LEDGER_STATE, PrivacyLedger())
        ledger.record(
            sample_rate=1.0, noise_multiplier=multiplier, steps=levels, mechanism=mechanism
        )
    return epsilon


def _bind_share(ctx: Any, shares: int, policy: NodePolicy) -> None:
    """An owner who requires DP accepts no noise the coordinator adds: the node's share (a
    k-th of the noise's variance for ``shares`` = k) then enters only a secure sum whose
    SecAgg+ group, as this node validated it, has at least k members, so that the shares
    summed carry the full noise. The runtime's noise binding checks exactly that (std ratio
    1/sqrt(k) against 1/sqrt(group)); a coordinator that overstates k is refused there."""
    if policy.require_dp:
        ctx.bind_noise(clip=1.0, std=1.0, applied=True, share_std=1.0 / math.sqrt(shares))


def _noise_share(
    scale: np.ndarray, privacy: Mapping[str, Any], policy: NodePolicy
) -> np.ndarray | None:
    """This node's share of Laplace(scale) noise: Gamma(1/k, b) - Gamma(1/k, b), whose sum
    over k parties is exactly Laplace(b) (the Laplace law is infinitely divisible)."""
    if privacy.get("mode") != "distributed":
        return None
    shares = _shares(privacy, policy)
    # DP noise must be unknown to the coordinator: fresh OS entropy, never a sent seed.
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    shape = 1.0 / shares
    noise: np.ndarray = rng.gamma(shape, scale) - rng.gamma(shape, scale)
    return noise


@dataclass(frozen=True, kw_only=True)
class SkellamLayout:
    """How a query's statistics travel under Skellam noise, derived by both sides from the
    public request: integer = round(stat * step); the secure sum carries
    (integer + share) / bound; ``std`` is the summed noise's std (in integers) and ``mu``
    its Poisson parameter (noise = Poisson(mu) - Poisson(mu), variance 2 mu)."""

    step: np.ndarray
    bound: np.ndarray
    std: float
    mu: float

    def secure_range(self) -> float:
        return secure_range(np.full(1, self.std / float(np.min(self.bound))))


def skellam_layout(
    blocks: Sequence[Block],
    plan: Any,
    config: AnalyticsConfig,
    *,
    n_groups: int,
    epsilon: float,
    delta: float,
) -> SkellamLayout:
    """The Skellam layout of a query's statistics vector (``n_groups`` groups per block)."""
    k, d2 = skellam_steps(blocks, config)
    bound = scales(blocks, plan, config)
    size = [b.cells(n_groups) for b in blocks]
    step = np.concatenate([np.full(n, k[b.name]) for n, b in zip(size, blocks)])
    # A statistic is at most its public bound; rounding adds at most 1/2.
    top = np.concatenate(
        [np.full(n, bound[b.name] * k[b.name] + 1.0) for n, b in zip(size, blocks)]
    )
    std = skellam_noise_multiplier(epsilon=epsilon, delta=delta) * d2
    return SkellamLayout(step=step, bound=top, std=std, mu=std * std / 2.0)


def split_exact(vector: np.ndarray) -> np.ndarray:
    """An exact answer's vector as (high, low) halves, so the secure sum's 2^52-point grid
    loses nothing: the high half holds multiples of 2^-SPLIT_BITS (summed, they round back
    to integers), the low half the remainder at full float precision."""
    scaled = vector * 2.0**SPLIT_BITS
    high = np.floor(scaled)
    return np.concatenate([high / 2.0**SPLIT_BITS, scaled - high])


def join_exact(total: np.ndarray) -> np.ndarray:
    """Inverse of ``split_exact`` applied to a sum of split vectors."""
    half = total.size // 2
    high = np.round(total[:half] * 2.0**SPLIT_BITS)
    joined: np.ndarray = (high + total[half:]) / 2.0**SPLIT_BITS
    return joined


def secure_range(noise_scale: np.ndarray | None) -> float:
    """The secure sum's value range, which both sides derive from the public request: each
    statistic over its bound is at most 1, and a node's Laplace share (scale/bound at most
    ``max(noise_scale)``) stays within 40 scales but with probability below e^-40."""
    if noise_scale is None or noise_scale.size == 0:
        return VALUE_RANGE
    return VALUE_RANGE + 40.0 * float(np.max(noise_scale))


def sketch_shape(config: AnalyticsConfig, seed: Any) -> SketchShape:
    """Key selection's sketch layout, from the public declarations and the query's seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise TaskError("a key-selection request carries its hash seed, an int in [0, 2^63)")
    return SketchShape(
        levels=config.max_key_bytes + 1,
        depth=config.sketch_depth,
        width=config.sketch_columns,
        seed=seed,
    )


def sketch_noise_scale(config: AnalyticsConfig, epsilon: float) -> float:
    """Laplace scale per sketch cell for key selection at ``epsilon`` in total: every level
    gets epsilon / levels, and one privacy unit (at most m rows, each adding 1 to one cell
    per depth row) moves a level's table by m x depth in L1."""
    levels = config.max_key_bytes + 1
    return config.max_contributions * config.sketch_depth * levels / epsilon


def _keep(vector: np.ndarray, *, limit: float, exact: bool) -> dict[str, Any]:
    if not np.all(np.abs(vector) <= (1.0 if exact else limit)):
        raise TaskError(
            "a statistic exceeds its public bound (more rows than max_rows, or a noise draw "
            "beyond the secure sum's range); raise [analytics] max_rows"
        )
    return {"stats": split_exact(vector) if exact else vector}


def _shares(privacy: Mapping[str, Any], policy: NodePolicy) -> int:
    shares = privacy.get("shares")
    if isinstance(shares, bool) or not isinstance(shares, int) or shares < 1:
        raise TaskError("a distributed-noise request states how many parties share the noise")
    if policy.max_noise_shares is not None:
        shares = min(shares, policy.max_noise_shares)
    return shares


def _skellam_stats(
    ctx: Any,
    stats: Mapping[str, np.ndarray],
    blocks: Sequence[Block],
    plan: Any,
    config: AnalyticsConfig,
    privacy: Mapping[str, Any],
    policy: NodePolicy,
    epsilon: float,
    n_groups: int,
) -> dict[str, Any]:
    """The statistics as integers plus this party's Skellam(mu / k) share: the k shares sum
    to exactly Skellam(mu) inside the secure sum (Poisson laws add)."""
    layout = skellam_layout(
        blocks, plan, config, n_groups=n_groups, epsilon=epsilon, delta=privacy["delta"]
    )
    ints = np.round(flatten(dict(stats), blocks) * layout.step)
    if not np.all(np.abs(ints) <= layout.bound):
        raise TaskError("a statistic exceeds its public bound (more rows than max_rows)")
    # DP noise must be unknown to the coordinator: fresh OS entropy, never a sent seed.
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    shares = _shares(privacy, policy)
    _bind_share(ctx, shares, policy)
    share = skellam_noise(rng, mu=layout.mu / shares, size=ints.size)
    vector = (ints + share) / layout.bound
    if not np.all(np.abs(vector) <= layout.secure_range()):
        raise TaskError("a noise draw beyond the secure sum's range")
    return {"stats": split_exact(vector)}


def analytics_tasks(policy: NodePolicy | None = None) -> dict[str, Any]:
    """The node-side tasks a NodeApp installs to answer federated queries."""
    policy = policy or NodePolicy()

    def stats_task(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        config, plan, privacy, db = _request(ctx, payload, policy)
        keys = payload.get("keys")
        if keys is not None and not (
            isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        ):
            raise TaskError("'keys' must list the released group keys")
        if keys is not None and len(keys) > config.max_groups:
            raise TaskError(f"{len(keys)} groups requested, over max_groups {config.max_groups}")
        try:
            domain = Domain(plan, config, keys)
        except (ValueError, TypeError) as exc:
            raise TaskError(f"malformed group keys: {exc}") from None
        dp = privacy is not None
        blocks = blocks_for(plan, config, dp=dp)
        check_size(blocks, len(domain) + 1)
        epsilon = _charge(ctx, policy, privacy, skellam_d2=skellam_steps(blocks, config)[1])
        stats = party_stats(db, plan, config, blocks, domain)
        n_groups = len(domain)
        # The outside-the-domain group is disclosed only in exact answers.
        stats = released(stats, blocks, n_groups if dp else n_groups + 1)
        if privacy is not None and privacy.get("noise") == "skellam":
            assert epsilon is not None
            return _skellam_stats(
                ctx, stats, blocks, plan, config, privacy, policy, epsilon, n_groups
            )
        bound = scales(blocks, plan, config)
        vector = flatten({b.name: stats[b.name] / bound[b.name] for b in blocks}, blocks)
        if dp:
            assert privacy is not None and epsilon is not None
            lap = laplace_scales(blocks, config, epsilon)
            scale = np.concatenate(
                [np.full(stats[b.name].size, lap[b.name] / bound[b.name]) for b in blocks]
            )
            share = _noise_share(scale, privacy, policy)
            if share is not None:
                _bind_share(ctx, _shares(privacy, policy), policy)
                vector = vector + share
            return _keep(vector, limit=secure_range(scale), exact=False)
        return _keep(vector, limit=1.0, exact=True)

    def keys_task(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        config, plan, privacy, db = _request(ctx, payload, policy)
        shape = sketch_shape(config, payload.get("seed"))
        if not plan.keys:
            raise QueryError("key selection needs a GROUP BY")
        # Every level is charged at once, before anything is read: one token per row per
        # level, each level its own share of epsilon (see sketch_noise_scale).
        epsilon = _charge(ctx, policy, privacy, levels=shape.levels)
        table = sketch(key_counts(db, plan, config), shape)
        vector = table.ravel() / float(config.max_rows)
        if privacy is not None:
            assert epsilon is not None
            scale = np.full(vector.shape, sketch_noise_scale(config, epsilon) / config.max_rows)
            share = _noise_share(scale, privacy, policy)
            if share is not None:
                _bind_share(ctx, _shares(privacy, policy), policy)
                vector = vector + share
            return _keep(vector, limit=secure_range(scale), exact=False)
        return _keep(vector, limit=1.0, exact=True)

    def check_task(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        """Whether this party can answer a STATS_TASK or KEYS_TASK request: declined as that
        task would decline it (owner's rules, budget; nothing is charged), and its query
        bound against the database (every table and column it reads; no row is read). The
        answer is empty: that it succeeded is all the coordinator learns."""
        config, plan, privacy, db = _request(ctx, payload, policy)
        of = payload.get("task")
        if of == KEYS_TASK:
            if not plan.keys:
                raise QueryError("key selection needs a GROUP BY")
            levels = sketch_shape(config, payload.get("seed")).levels
            _charge(ctx, policy, privacy, levels=levels, check_only=True)
        elif of == STATS_TASK:
            blocks = blocks_for(plan, config, dp=privacy is not None)
            d2 = skellam_steps(blocks, config)[1]
            _charge(ctx, policy, privacy, skellam_d2=d2, check_only=True)
        else:
            raise TaskError(f"a check names the task it is for ({STATS_TASK} or {KEYS_TASK})")
        db.query(f"SELECT * FROM ({bounded_sql(db, plan, config)}) AS check__ LIMIT 0")
        return {}

    from shoal.runtime import TaskSpec

    release = release_policy(policy)
    return {
        STATS_TASK: TaskSpec(stats_task, release=release),
        KEYS_TASK: TaskSpec(keys_task, release=release),
        CHECK_TASK: TaskSpec(check_task, release=release),
    }
