"""Composable aggregation stages, chained with ``|`` in the order the math reads.

``Clip(1.0) | Sum() | GaussianNoise(sigma) | Mean()`` means: clip each node's update (a
node transform), add the clipped updates (a reducer), noise the sum, divide by the count
(server transforms). A chain has exactly one reducer; node transforms come before it and
describe themselves as JSON (``spec``), so secure reducers can have nodes apply them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from shoal.aggregate import rules
from shoal.core import NodeValues, finish
from shoal.core.reduce import mean_rows, sum_rows
from shoal.errors import AggregationError, ConfigError

if TYPE_CHECKING:
    from shoal.core import Gathered

__all__ = [
    "Chain",
    "Clip",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NodeTransform",
    "NormBound",
    "Reduced",
    "Reducer",
    "ServerTransform",
    "Stage",
    "Sum",
    "TrimmedMean",
    "WeightedMean",
    "accepts_weights",
    "held_layout",
    "is_private",
]


@dataclass(frozen=True, kw_only=True)
class Reduced:
    """A server-side aggregate in flight: the vector, how many nodes it covers, their weight."""

    vector: np.ndarray
    count: int
    weight: float
    averaged: bool
    layout: Any
    node_ids: tuple[str, ...] = ()
    excluded: Any = None


class Stage:
    """Base of every stage; ``a | b`` builds a Chain, and a lone stage aggregates by itself.

    ``private``: the stage keeps individual values from the server (a secure sum) or noises
    them (DP); a chain holding one must get every per-node value a computation releases.
    """

    private: ClassVar[bool] = False

    def __or__(self, other: Stage) -> Chain:
        return Chain.of(self, other)

    def aggregate(self, values: NodeValues, *, weights: NodeValues | None = None) -> Any:
        return Chain.of(self).aggregate(values, weights=weights)

    def node_tasks(self) -> dict[str, Any]:
        """Tasks nodes must install for this stage (secure protocols bring their own)."""
        return {}


class NodeTransform(Stage):
    """Applied to each node's vector before reduction (at the node, for secure reducers).

    ``compresses``: the transform changes what travels (``shoal.aggregate.compress``), so
    every node applies it before its value leaves, whatever the reducer.
    """

    compresses: ClassVar[bool] = False

    def apply_rows(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """A JSON description nodes can apply themselves (they run no server code)."""
        raise NotImplementedError


class Reducer(Stage):
    """Turns node values into one vector. Plain reducers gather; secure ones override reduce.

    ``weighted``: the reducer honours ``weights=``; one that cannot refuses them rather than
    silently computing an unweighted result.
    """

    weighted: ClassVar[bool] = True

    def reduce(
        self, values: NodeValues, weights: NodeValues | None, pre: Sequence[NodeTransform]
    ) -> Reduced:
        if any(transform.compresses for transform in pre):
            from shoal.aggregate.compress import compressed_gather  # uses this module

            gathered = compressed_gather(values, weights, pre)
            return self.reduce_rows(gathered.rows, gathered)
        gathered = values.gather(weights=weights)
        rows = gathered.rows
        for transform in pre:
            if isinstance(transform, NormBound):
                rows, gathered = transform.screen(rows, gathered, values)
            else:
                rows = transform.apply_rows(rows)
        return self.reduce_rows(rows, gathered)

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        raise NotImplementedError

    @staticmethod
    def _reduced(vector: np.ndarray, gathered: Gathered, *, averaged: bool) -> Reduced:
        weight = (
            float(gathered.weights.sum()) if gathered.weights is not None else len(gathered.rows)
        )
        return Reduced(
            vector=vector,
            count=len(gathered.rows),
            weight=weight,
            averaged=averaged,
            layout=gathered.layout,
            node_ids=gathered.node_ids,
            excluded=gathered.excluded,
        )


class ServerTransform(Stage):
    """Applied at the server to the reduced vector (noise, scaling, averaging)."""

    def apply(self, reduced: Reduced) -> Reduced:
        raise NotImplementedError


@dataclass(frozen=True)
class Chain(Stage):
    stages: tuple[Stage, ...]

    @classmethod
    def of(cls, *stages: Stage) -> Chain:
        flat: list[Stage] = []
        for stage in stages:
            if isinstance(stage, Chain):
                flat.extend(stage.stages)
            elif isinstance(stage, Stage):
                flat.append(stage)
            else:
                raise ConfigError(f"cannot chain {stage!r}: aggregation stages only")
        return cls(tuple(flat))

    def split(self) -> tuple[list[NodeTransform], Reducer, list[ServerTransform]]:
        pre: list[NodeTransform] = []
        reducer: Reducer | None = None
        post: list[ServerTransform] = []
        for stage in self.stages:
            if reducer is None:
                if isinstance(stage, NodeTransform):
                    pre.append(stage)
                elif isinstance(stage, Reducer):
                    reducer = stage
                else:
                    raise ConfigError(
                        f"{type(stage).__name__} acts on an aggregate; put a reducer such as "
                        "Sum() or Mean() before it"
                    )
            elif isinstance(stage, Mean):
                post.append(_Average())
            elif isinstance(stage, ServerTransform):
                post.append(stage)
            else:
                raise ConfigError(
                    f"{type(stage).__name__} cannot follow the reducer "
                    f"{type(reducer).__name__}: a chain has one reducer, and node transforms "
                    "such as Clip come before it"
                )
        if reducer is None:
            raise ConfigError("an aggregation chain needs a reducer such as Sum() or Mean()")
        return pre, reducer, post

    def node_tasks(self) -> dict[str, Any]:
        tasks: dict[str, Any] = {}
        for stage in self.stages:
            tasks.update(stage.node_tasks())
        return tasks

    def reduce(self, values: NodeValues, *, weights: NodeValues | None = None) -> Reduced:
        """Run the chain and keep the bookkeeping (count, weight, excluded nodes)."""
        pre, reducer, post = self.split()
        if weights is not None and not reducer.weighted:
            raise AggregationError(
                f"{type(reducer).__name__} cannot weight the nodes' values; aggregate without "
                "weights= (or use Mean(), Sum() or GeometricMedian(), which honour them)"
            )
        reduced = reducer.reduce(values, weights, pre)
        if reduced.excluded:
            values.record_exclusions(reduced.excluded)
        for stage in post:
            reduced = stage.apply(reduced)
        return reduced

    def aggregate(self, values: NodeValues, *, weights: NodeValues | None = None) -> Any:
        reduced = self.reduce(values, weights=weights)
        return finish(values, reduced.vector, reduced.layout)


# -- node transforms ----------------------------------------------------------------------


@dataclass(frozen=True)
class Clip(NodeTransform):
    """Scale each node's whole update down to L2 norm at most ``l2``."""

    l2: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.l2) or self.l2 <= 0:
            raise ConfigError(f"Clip(l2) needs a positive finite norm, got {self.l2}")

    def apply_rows(self, rows: np.ndarray) -> np.ndarray:
        clipped, _ = rules.clip_l2(rows, self.l2)
        return np.asarray(clipped)

    def spec(self) -> dict[str, Any]:
        return {"clip_l2": self.l2}


@dataclass(frozen=True)
class NormBound(NodeTransform):
    """Exclude (rather than clip) every update whose L2 norm exceeds ``max_l2``.

    A coordinator-side validity check: an honest update has a bounded norm, a boosted or
    corrupted one stands out. Excluded nodes are recorded with their norm.
    """

    max_l2: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.max_l2) or self.max_l2 <= 0:
            raise ConfigError(f"NormBound needs a positive finite bound, got {self.max_l2}")

    def screen(
        self, rows: np.ndarray, gathered: Gathered, values: NodeValues
    ) -> tuple[np.ndarray, Gathered]:
        norms = np.linalg.norm(rows, axis=1)
        keep = norms <= self.max_l2
        reasons = {
            node: f"update norm {norm:.4g} exceeds the bound {self.max_l2:g}"
            for node, norm, ok in zip(gathered.node_ids, norms, keep)
            if not ok
        }
        if not reasons:
            return rows, gathered
        values.record_exclusions(reasons)
        if not keep.any():
            raise AggregationError(
                f"every update exceeds the norm bound {self.max_l2:g}; raise it or check the nodes"
            )
        screened = replace(
            gathered,
            node_ids=tuple(n for n, ok in zip(gathered.node_ids, keep) if ok),
            rows=rows[keep],
            weights=None if gathered.weights is None else gathered.weights[keep],
            excluded={**gathered.excluded, **reasons},
        )
        return rows[keep], screened


# -- reducers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sum(Reducer):
    """The sum; with weights, the weighted sum, so that ``Sum() | Mean()`` is the weighted mean."""

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        # The averaging stage divides by the total weight, so the sum must carry the weights.
        return self._reduced(sum_rows(rows, gathered.weights), gathered, averaged=False)


@dataclass(frozen=True)
class Mean(Reducer):
    """The mean (weighted when weights are given). After another reducer: divide by the count."""

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        # The same kernel as NodeValues.mean: the two must agree bit for bit.
        return self._reduced(mean_rows(rows, gathered.weights), gathered, averaged=True)


@dataclass(frozen=True)
class WeightedMean(Mean):
    """A mean that insists on weights (e.g. each node's number of examples)."""

    def reduce(
        self, values: NodeValues, weights: NodeValues | None, pre: Sequence[NodeTransform]
    ) -> Reduced:
        if weights is None:
            raise AggregationError("WeightedMean needs weights=..., e.g. weights=out['n']")
        return super().reduce(values, weights, pre)


@dataclass(frozen=True)
class Median(Reducer):
    """Coordinate-wise median (robust to a minority of arbitrary updates)."""

    weighted: ClassVar[bool] = False

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        return self._reduced(np.asarray(rules.coordinate_median(rows)), gathered, averaged=True)


@dataclass(frozen=True)
class TrimmedMean(Reducer):
    """Coordinate-wise mean after dropping the ``beta`` fraction of extremes on each side."""

    weighted: ClassVar[bool] = False

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"TrimmedMean(beta) needs 0 <= beta < 0.5, got {self.beta}")

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        vector = rules.trimmed_mean(rows, self.beta)
        return self._reduced(np.asarray(vector), gathered, averaged=True)


@dataclass(frozen=True)
class Krum(Reducer):
    """The single update closest to its n - f - 2 nearest neighbours (Blanchard et al.)."""

    weighted: ClassVar[bool] = False

    f: int = 1

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        index = rules.krum(rows, self.f)
        reduced = self._reduced(np.asarray(rows[index]), gathered, averaged=True)
        return replace(reduced, node_ids=(gathered.node_ids[index],))


@dataclass(frozen=True)
class MultiKrum(Reducer):
    """The mean of the ``m`` updates with the best Krum scores."""

    weighted: ClassVar[bool] = False

    f: int = 1
    m: int = 1

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        vector, chosen = rules.multi_krum(rows, self.f, self.m)
        reduced = self._reduced(np.asarray(vector), gathered, averaged=True)
        return replace(reduced, node_ids=tuple(gathered.node_ids[i] for i in chosen))


# -- server transforms --------------------------------------------------------------------


class _Average(ServerTransform):
    """What ``Mean()`` means after a sum: divide by the total weight (the count if unweighted)."""

    def apply(self, reduced: Reduced) -> Reduced:
        if reduced.averaged:
            return reduced
        if reduced.weight <= 0:
            raise AggregationError("cannot average an aggregate of zero total weight")
        return replace(reduced, vector=reduced.vector / reduced.weight, averaged=True)


@dataclass(frozen=True)
class GeometricMedian(Reducer):
    """The point minimizing the sum of distances to the updates (RFA, Pillutla et al.)."""

    eps: float = 1e-8
    max_iter: int = 100

    def reduce_rows(self, rows: np.ndarray, gathered: Gathered) -> Reduced:
        vector = rules.geometric_median(
            rows, gathered.weights, eps=self.eps, max_iter=self.max_iter
        )
        return self._reduced(np.asarray(vector), gathered, averaged=True)


def is_private(aggregator: Any) -> bool:
    """Whether ``aggregator`` keeps individual values from the server or noises them.

    An aggregator that is not a shoal stage might do anything, so it counts as private:
    nothing else per-node is then released in the clear beside it.
    """
    if isinstance(aggregator, Chain):
        return any(stage.private for stage in aggregator.stages)
    if isinstance(aggregator, Stage):
        return aggregator.private
    return True


def accepts_weights(aggregator: Any) -> bool:
    """Whether ``aggregator`` honours ``weights=`` (its reducer does)."""
    if isinstance(aggregator, Chain):
        try:
            return aggregator.split()[1].weighted
        except ConfigError:
            return False
    return isinstance(aggregator, Reducer) and aggregator.weighted


def held_layout(
    values: NodeValues,
) -> tuple[tuple[tuple[str, tuple[int, ...], str], ...], list[str], dict[str, str]]:
    """For aggregates that run node-side (secure sums, compression): the fields' shapes and
    dtypes as the map's receipts give them (the majority's), the nodes whose value matches,
    and why each other node is left out. Arrays are aggregated; JSON fields only when the
    value has no array field."""

    def is_array(node: str, field: str) -> bool:
        try:
            return values.spec(node, field).dtype != "json"
        except KeyError:
            return False

    arrays = [f for f in values.field_names if any(is_array(n, f) for n in values.node_ids)]
    fields = arrays or list(values.field_names)
    signatures: dict[str, tuple[tuple[str, tuple[int, ...], str], ...]] = {}
    excluded: dict[str, str] = {}
    for node in values.node_ids:
        try:
            specs = [values.spec(node, f) for f in fields]
        except KeyError:
            excluded[node] = f"its value lacks one of the fields {fields}"
            continue
        if any(s.dtype == "json" or np.dtype(s.dtype).kind not in "biuf" for s in specs):
            excluded[node] = "its value is not a real-valued array"
            continue
        signatures[node] = tuple(
            (f, tuple(s.shape), s.dtype) for f, s in zip(fields, specs, strict=True)
        )
    if not signatures:
        raise AggregationError(f"no node holds real-valued arrays for {fields}")
    majority = Counter(signatures.values()).most_common(1)[0][0]
    holders = []
    for node, signature in signatures.items():
        if signature == majority:
            holders.append(node)
        else:
            excluded[node] = "its value's shape or dtype differs from the other nodes'"
    return majority, holders, excluded
