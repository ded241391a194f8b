"""Horizontal federated boosting: rows split across nodes, histograms through a secure sum.

The server grows every tree; nodes keep their rows, labels, margins and gradients. Each
level, the nodes build gradient/hessian histograms of their rows for the nodes being
split, in fixed point, and the server receives only their sum (SecAgg+ by default). Cuts
come from a secure-summed histogram over a fine grid spanning the nodes' ranges. With the
same cuts the trees are exactly those of :func:`shoal.trees.train` on the pooled rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from shoal.aggregate import Chain
from shoal.core import Federation
from shoal.core.reduce import finish
from shoal.crypto import SecureSum
from shoal.errors import ConfigError, DataError, NotEnoughNodes, ProtocolError
from shoal.runtime import Failure, FailureKind, TaskContext, TaskSpec
from shoal.trees import exact
from shoal.trees.bins import (
    MISSING,
    Bins,
    bins_from_grid,
    categorical_mask,
    category_cuts,
    grid_counts,
)
from shoal.trees.booster import Booster, feature_sampler, fixed_point, sample_features
from shoal.trees.objective import base_margin, check_labels, gradients
from shoal.trees.params import GBDTParams
from shoal.trees.split import WIDTH
from shoal.trees.tree import Tree, advance, grow_tree, local_histograms, pack_trees, unpack_trees

__all__ = [
    "HIST_TASK",
    "RANGE_TASK",
    "SETUP_TASK",
    "SKETCH_TASK",
    "horizontal_tasks",
    "train_horizontal",
]

RANGE_TASK = "gbdt.range"
SKETCH_TASK = "gbdt.sketch"
SETUP_TASK = "gbdt.setup"
HIST_TASK = "gbdt.hist"
DEFAULT_FIXED_POINT = 24  # gradients to 2**-24; sums stay exact up to 2**23 rows per node
_STATE = "shoal.trees.horizontal"


# -- node side --------------------------------------------------------------------------


def _rows(ctx: TaskContext) -> tuple[np.ndarray, np.ndarray]:
    data = ctx.data
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.ndim != 2:
        raise DataError("this node's data has no 2-D feature array x and labels y")
    if len(x) == 0:
        raise DataError(f"node {ctx.node_id} has no rows")
    return x, y


def _range(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    x, _ = _rows(ctx)
    with np.errstate(all="ignore"):
        low, high = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
    out = {"low": low, "high": high, "features": int(x.shape[1])}
    names = getattr(ctx.data, "feature_names", None)
    if names:
        # a digest of the column names: nodes that one-hot encode a categorical column with
        # other categories, or in another order, disagree here (values alone cannot tell)
        raw = "\x00".join(str(n) for n in names).encode()
        out["columns"] = np.frombuffer(hashlib.sha256(raw).digest(), dtype=np.uint8)
    out["categories"], out["category_counts"] = _category_digests(ctx.data, x.shape[1])
    return out


def _category_digests(data: Any, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, 32) uint8: SHA-256 of each categorical column's category -> code table
    (zeros for other columns), so nodes that code a column's categories differently are
    caught before training (the codes alone cannot tell: 2 may be "red" here, "blue" there).
    A column of integer codes declared with only its number of categories
    (``data.category_counts``: column name or index -> k) gets a digest of that number.
    Also each column's declared number of categories (0: none declared)."""
    out = np.zeros((d, 32), dtype=np.uint8)
    counts = np.zeros(d, dtype=np.int64)
    names = tuple(getattr(data, "feature_names", None) or ())
    categories = getattr(data, "categories", None) or {}
    for j, name in enumerate(names[:d]):
        if name in categories:
            raw = "\x00".join(f"{code}={c}" for code, c in enumerate(categories[name]))
            out[j] = np.frombuffer(hashlib.sha256(raw.encode()).digest(), dtype=np.uint8)
            counts[j] = len(categories[name])
    for column, k in dict(getattr(data, "category_counts", None) or {}).items():
        j = names.index(column) if column in names else column
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not 0 <= j < d:
            raise DataError(f"category_counts names {column!r}, which is not a feature here")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
            raise DataError(f"category_counts[{column!r}] must be an integer >= 2, got {k!r}")
        if counts[j]:
            raise DataError(f"column {column!r} has both a category table and a count")
        raw = f"{int(k)} integer codes"
        out[j] = np.frombuffer(hashlib.sha256(raw.encode()).digest(), dtype=np.uint8)
        counts[j] = int(k)
    return out, counts


def _sketch(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    x, _ = _rows(ctx)
    low, high = np.asarray(payload["low"]), np.asarray(payload["high"])
    cells = int(payload["cells"])
    if low.shape != (x.shape[1],) or high.shape != low.shape or not 2 <= cells <= 65536:
        raise ProtocolError("gbdt.sketch: ranges must give one (low, high) per feature")
    counts = grid_counts(x, low, high, cells)
    return {"counts": exact.encode(counts, offset=_offset(payload))}


def _offset(payload: Mapping[str, Any]) -> float | None:
    offset = payload.get("offset")
    return None if offset is None else float(offset)


def _cuts_from(payload: Mapping[str, Any]) -> Bins:
    flat, sizes = np.asarray(payload["cuts"], np.float64), np.asarray(payload["sizes"], np.int64)
    if sizes.ndim != 1 or (sizes < 1).any() or (sizes > MISSING - 1).any():
        raise ProtocolError("gbdt.setup: malformed cuts")
    if int(sizes.sum()) != len(flat) or not np.isfinite(flat).all():
        raise ProtocolError("gbdt.setup: malformed cuts")
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    if any((np.diff(p) <= 0).any() for p in parts):
        raise ProtocolError("gbdt.setup: cuts must increase")
    flags = np.asarray(payload.get("categorical", np.zeros(len(parts), bool)), dtype=bool)
    if flags.shape != (len(parts),):
        raise ProtocolError("gbdt.setup: one categorical flag per feature")
    return Bins(cuts=tuple(parts), categorical=tuple(bool(f) for f in flags))


def _setup(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    x, y = _rows(ctx)
    params = GBDTParams(**payload["params"])
    bins = _cuts_from(payload)
    if bins.n_features != x.shape[1]:
        raise DataError(
            f"node {ctx.node_id} has {x.shape[1]} features; the federation's cuts are for "
            f"{bins.n_features}: every node must hold the same columns in the same order"
        )
    labels = check_labels(y, params)
    ctx.state[_STATE] = {
        "params": params,
        "bins": bins,
        "codes": bins.transform(x),
        "labels": labels,
        "margin": np.full((len(x), params.outputs), base_margin(params), np.float32),
        "applied": 0,
        "grad_round": -1,
        "tree_key": None,
    }
    return {"ok": True}


def _hist(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    st = ctx.state.get(_STATE)
    if st is None:
        raise ProtocolError(f"node {ctx.node_id} was not set up for boosting (gbdt.setup)")
    params: GBDTParams = st["params"]
    codes: np.ndarray = st["codes"]
    d = codes.shape[1]
    r, k = int(payload["round"]), int(payload["output"])
    if "previous/sizes" in payload and st["applied"] == r - 1:
        previous = unpack_trees(payload, "previous", n_features=d)
        if len(previous) != params.outputs:
            raise ProtocolError("gbdt.hist: a round has one tree per output")
        for j, tree in enumerate(previous):
            st["margin"][:, j] += tree.predict(codes)
        st["applied"] = r
    if st["applied"] != r:
        raise ProtocolError(
            f"node {ctx.node_id} has the trees of {st['applied']} rounds, not {r}: it missed "
            "a round and sits out until training restarts"
        )
    if st["grad_round"] != r:
        grad, hess = gradients(st["margin"], st["labels"], params)
        st["grad"], st["hess"], st["grad_round"] = grad, hess, r
    (tree,) = unpack_trees(payload, "tree", n_features=d)
    if st["tree_key"] != (r, k) or tree.n_nodes == 1:
        g = fixed_point(st["grad"][:, k], params.fixed_point_bits)
        h = fixed_point(st["hess"][:, k], params.fixed_point_bits)
        if params.subsample < 1.0:
            rng = np.random.default_rng([params.seed, 2, r, k, *ctx.node_id.encode()])
            keep = rng.random(len(g)) < params.subsample
            g, h = np.where(keep, g, 0.0), np.where(keep, h, 0.0)
        st["g"], st["h"], st["tree_key"] = g, h, (r, k)
        st["pos"] = np.zeros(len(codes), dtype=np.int64)
    while advance(tree, codes, st["pos"]):
        pass
    nodes = np.asarray(payload["nodes"], dtype=np.int64)
    features = np.asarray(payload["features"], dtype=np.int64)
    if nodes.ndim != 1 or features.ndim != 1 or (nodes < 0).any() or (nodes >= tree.n_nodes).any():
        raise ProtocolError("gbdt.hist: malformed node list")
    if (features < 0).any() or (features >= d).any():
        raise ProtocolError("gbdt.hist: malformed feature list")
    hg, hh = local_histograms(codes[:, features], st["g"], st["h"], st["pos"], nodes)
    take = _slots(st["bins"], features)
    scale = float(2 ** (params.fixed_point_bits or DEFAULT_FIXED_POINT))
    both = np.stack([hg.reshape(len(nodes), -1)[:, take], hh.reshape(len(nodes), -1)[:, take]])
    return {"hist": exact.encode(np.round(both * scale).astype(np.int64), offset=_offset(payload))}


def _slots(bins: Bins, features: np.ndarray) -> np.ndarray:
    """Flat histogram slots that can be non-zero: each feature's real bins and its missing."""
    n_bins = bins.n_bins[features]
    return np.concatenate(
        [i * WIDTH + np.r_[np.arange(nb), MISSING] for i, nb in enumerate(n_bins)]
    ).astype(np.int64)


def horizontal_tasks(*, secure: bool = True) -> dict[str, TaskSpec]:
    """The node-side tasks of horizontal boosting (install with SecureSum's tasks), with the
    node's release policies: ranges leave in the clear; counts and histograms only into a
    secure sum, or in the clear when ``secure=False`` (a plain-sum job; see docs/trees.md)."""
    summed = "secure" if secure else "clear"
    return {
        RANGE_TASK: TaskSpec(
            _range,
            release={
                "low": "clear",
                "high": "clear",
                "features": "clear",
                "columns": "clear",
                "categories": "clear",
                "category_counts": "clear",
            },
        ),
        SKETCH_TASK: TaskSpec(_sketch, release={"counts": summed}),
        SETUP_TASK: TaskSpec(_setup, release={"ok": "clear"}),
        HIST_TASK: TaskSpec(_hist, release={"hist": summed}),
    }


# -- server side ------------------------------------------------------------------------


class _Restart(Exception):
    """Some nodes dropped out of a tree: grow it again from the ones still there."""

    def __init__(self, survivors: Sequence[str]) -> None:
        self.survivors = tuple(survivors)


def _summed(
    fed: Federation,
    ids: Sequence[str],
    task: str,
    field: str,
    payload: Mapping[str, Any],
    *,
    secure: bool,
    dropout_fraction: float,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Exact integer sum of ``field`` over the nodes, and the nodes in it."""
    ids = tuple(ids)
    while True:
        offset = exact.offset_for(len(ids)) if secure else None
        group = fed.group(ids)
        values = group.map(task, offset=offset, send=() if secure else (field,), **payload)
        if secure and len(values) != len(ids):
            ids = values.node_ids  # the encoding depends on the count: ask again
            continue
        if secure:
            secure_sum = SecureSum(
                value_range=offset, bits=exact.BITS, dropout_fraction=dropout_fraction
            )
            reduced = Chain.of(secure_sum).reduce(values[field])
            total = finish(values[field], reduced.vector, reduced.layout)
            # the nodes whose masked input is in the sum: one that drops out after sending
            # it (at unmasking) is still in it
            summed = set(reduced.node_ids)
            in_sum = tuple(n for n in values.node_ids if n in summed)
        else:
            total = values[field].sum()
            in_sum = tuple(n for n in values.node_ids if n not in values.exclusions)
        sums, count = exact.decode(total, offset=offset)
        if count != len(in_sum):
            raise ProtocolError(f"{count} nodes in the sum, {len(in_sum)} expected")
        return sums, in_sum


class _FederatedRows:
    """The histogram source of one tree: the nodes' rows, summed."""

    def __init__(
        self,
        fed: Federation,
        ids: tuple[str, ...],
        *,
        bins: Bins,
        features: np.ndarray,
        round_: int,
        output: int,
        previous: dict[str, np.ndarray] | None,
        scale: float,
        secure: bool,
        dropout_fraction: float,
    ) -> None:
        self.fed, self.ids, self.bins = fed, ids, bins
        self.features = np.flatnonzero(features)
        self.round, self.output, self.previous = round_, output, previous
        self.scale, self.secure, self.dropout_fraction = scale, secure, dropout_fraction
        self.take = _slots(bins, self.features)

    def histograms(self, tree: Tree, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        payload: dict[str, Any] = {
            "round": self.round,
            "output": self.output,
            **pack_trees([tree], "tree"),
            "nodes": nodes,
            "features": self.features,
        }
        if self.previous is not None and tree.n_nodes == 1:
            payload.update(self.previous)
        sums, in_sum = _summed(
            self.fed,
            self.ids,
            HIST_TASK,
            "hist",
            payload,
            secure=self.secure,
            dropout_fraction=self.dropout_fraction,
        )
        if in_sum != self.ids:
            raise _Restart(in_sum)
        exact_sums = sums.reshape(2, len(nodes), len(self.take))
        self._check(tree, nodes, exact_sums)
        both = exact_sums.astype(np.float64) / self.scale
        d = self.bins.n_features
        out = np.zeros((2, len(nodes), d * WIDTH))
        full = (self.features[:, None] * WIDTH + np.arange(WIDTH)[None, :]).ravel()
        sel = np.zeros((2, len(nodes), len(self.features) * WIDTH))
        sel[:, :, self.take] = both
        out[:, :, full] = sel
        shaped = out.reshape(2, len(nodes), d, WIDTH)
        return shaped[0], shaped[1]

    def _check(self, tree: Tree, nodes: np.ndarray, sums: np.ndarray) -> None:
        """The summed fixed-point histograms (2, nodes, slots) must be histograms of rows:
        each sampled feature's slots (its bins and missing) add up to the same node totals,
        which below the root are the sums the server split off the parent, and no hessian
        sum is negative. A node whose histogram breaks this (faulty or hostile) stops
        training; the secure sum hides which node it was. A lie that keeps every total (mass
        moved between the bins of a feature) passes: see docs/trees.md."""
        sizes = self.bins.n_bins[self.features] + 1
        starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        totals = np.add.reduceat(sums, starts, axis=2) if sums.size else sums
        bad = "the summed histograms are not histograms of rows"
        if (totals != totals[:, :, :1]).any():
            raise ProtocolError(
                f"{bad}: the features disagree on a node's (g, h) totals; a node sent a "
                "histogram that is not of its rows (the secure sum hides which)"
            )
        if (sums[1] < 0).any():
            raise ProtocolError(f"{bad}: a negative hessian sum; a node sent a bad histogram")
        for i, n in enumerate(nodes.tolist()):
            if n == 0 or not sums.size:
                continue  # the root's totals are read off its histogram
            want = np.round(np.array([tree.sum_g[n], tree.sum_h[n]]) * self.scale)
            if (totals[:, i, 0] != want).any():
                raise ProtocolError(
                    f"{bad}: tree node {n}'s totals are not the sums the server split off its "
                    "parent; a node sent a histogram of other rows or other gradients"
                )


def federated_bins(
    fed: Federation,
    ids: Sequence[str],
    *,
    max_bins: int,
    cells: int = 4096,
    secure: bool = True,
    dropout_fraction: float = 0.1,
    categorical: Sequence[int] = (),
    feature_names: Sequence[str] | None = None,
) -> Bins:
    """Cuts from a secure sum of the nodes' counts over a fine grid.

    Each node reveals its per-feature minimum and maximum (the grid's span); its counts
    enter only the sum. A ``categorical`` feature (by index) gets one bin per code up to
    the largest any node holds; the nodes must agree on its category -> code table.
    """
    replies, failures = fed.request(list(ids), RANGE_TASK)
    _refused(failures)
    if not replies:
        raise NotEnoughNodes(f"no node answered {RANGE_TASK}: {_first(failures)}")
    widths = {n: r.get("features") for n, r in replies.items()}
    common = max(set(widths.values()), key=list(widths.values()).count)
    odd = sorted(n for n, w in widths.items() if w != common)
    if odd:
        raise DataError(
            f"node(s) {odd} hold {[widths[n] for n in odd]} features, the others {common}: "
            "every node must hold the same columns in the same order"
        )
    named = {n: bytes(np.asarray(r["columns"], np.uint8)) for n, r in replies.items()
             if "columns" in r}  # fmt: skip
    if len(set(named.values())) > 1:
        groups: dict[bytes, list[str]] = {}
        for n, digest in named.items():
            groups.setdefault(digest, []).append(n)
        raise DataError(
            "the nodes' columns have different names or order (groups of nodes that agree: "
            f"{sorted(sorted(g) for g in groups.values())}): every node must encode its columns "
            "the same way; a categorical column one-hot encoded with other categories or in "
            "another order at some node would silently mix features"
        )
    _same_categories(replies, int(common or 0), feature_names)
    declared = _declared_counts(replies, int(common or 0))
    low = np.nanmin(np.stack([np.asarray(r["low"], np.float64) for r in replies.values()]), 0)
    high = np.nanmax(np.stack([np.asarray(r["high"], np.float64) for r in replies.values()]), 0)
    flags = categorical_mask(categorical, len(low))
    sums, _ = _summed(
        fed,
        tuple(replies),
        SKETCH_TASK,
        "counts",
        {"low": low, "high": high, "cells": cells},
        secure=secure,
        dropout_fraction=dropout_fraction,
    )
    counts = sums.reshape(len(low), cells)
    if (counts < 0).any():
        raise ProtocolError(
            "the summed sketch counts are negative in some cell: a node sent counts that are "
            "not counts of its values (the secure sum hides which); no cuts can be placed"
        )
    bins = bins_from_grid(counts, low, high, max_bins=max_bins)
    if not any(flags):
        return bins
    cuts = list(bins.cuts)
    for j in (int(i) for i in np.flatnonzero(flags)):
        if declared[j]:
            cuts[j] = _declared_cuts(j, int(declared[j]), replies, max_bins, feature_names)
            continue
        if not (low[j] >= 0 and high[j] == np.round(high[j])):
            raise DataError(
                f"categorical column {_column(j, feature_names)} holds values from {low[j]} to "
                f"{high[j]}: category codes are integers from 0"
            )
        if high[j] + 1 > max_bins:
            raise DataError(
                f"categorical column {_column(j, feature_names)} has codes up to "
                f"{int(high[j])}: more than max_bins = {max_bins} categories (one bin each)"
            )
        cuts[j] = category_cuts(int(high[j]) + 1)
    return Bins(cuts=tuple(cuts), categorical=flags)


def _declared_counts(replies: Mapping[str, Mapping[str, Any]], d: int) -> np.ndarray:
    """Each column's declared number of categories (0: none); the nodes agree on it, as
    their digests (checked first) include it."""
    counts = [np.asarray(r.get("category_counts", np.zeros(d)), np.int64) for r in replies.values()]
    if any(c.shape != (d,) or (c < 0).any() for c in counts):
        raise ProtocolError(f"{RANGE_TASK}: a node sent malformed category counts")
    out: np.ndarray = np.max(np.stack(counts), axis=0) if counts else np.zeros(d, np.int64)
    return out


def _declared_cuts(
    j: int,
    k: int,
    replies: Mapping[str, Mapping[str, Any]],
    max_bins: int,
    names: Sequence[str] | None,
) -> np.ndarray:
    """One bin per declared category, all ``k`` of them (a category no node holds keeps its
    code); a node holding codes outside ``0..k-1`` is refused by name, its values unquoted."""
    odd = []
    for node, r in replies.items():
        low, high = float(np.asarray(r["low"])[j]), float(np.asarray(r["high"])[j])
        if not np.isnan(high) and not (low >= 0 and high < k):  # NaN: no value at that node
            odd.append(node)
    odd.sort()
    if odd:
        raise DataError(
            f"categorical column {_column(j, names)} is declared with {k} categories (codes "
            f"0..{k - 1}), but node(s) {odd} hold codes outside that range: those nodes code "
            "its categories differently (or more of them); re-encode their column or declare "
            "its categories in the job file"
        )
    if k > max_bins:
        raise DataError(
            f"categorical column {_column(j, names)} is declared with {k} categories: more "
            f"than max_bins = {max_bins} (one bin each)"
        )
    return category_cuts(k)


def _column(j: int, names: Sequence[str] | None) -> str:
    return repr(names[j]) if names is not None and j < len(names) else str(j)


def _same_categories(
    replies: Mapping[str, Mapping[str, Any]], d: int, names: Sequence[str] | None
) -> None:
    """Every node codes each column's categories with the same table (or none has one)."""
    digests = {}
    for node, reply in replies.items():
        table = np.asarray(reply.get("categories", np.zeros((d, 32))), dtype=np.uint8)
        if table.shape != (d, 32):
            raise ProtocolError(f"{RANGE_TASK}: node {node} sent a malformed category digest")
        digests[node] = table
    for j in range(d):
        groups: dict[bytes, list[str]] = {}
        for node, table in digests.items():
            groups.setdefault(bytes(table[j]), []).append(node)
        if len(groups) < 2:
            continue
        ranked = sorted(groups.values(), key=lambda g: (-len(g), sorted(g)))
        odd = sorted(n for g in ranked[1:] for n in g)
        raise DataError(
            f"categorical column {_column(j, names)} is encoded differently across nodes: "
            f"node(s) {odd} map its categories to codes differently from {sorted(ranked[0])} "
            "(another category table or number of categories, or none declared where the "
            "others declare one); declare the "
            "categories in the job file ([model] categories = {column = [...]}) so that "
            "every node uses the same codes"
        )


def _refused(failures: Mapping[str, Failure]) -> None:
    """A node whose data cannot train stops training with its reason (a drop does not)."""
    for node, failure in failures.items():
        if failure.kind is not FailureKind.DROPPED:
            raise DataError(f"node {node} cannot take part in boosting: {failure.detail}")


def _first(failures: Mapping[str, Any]) -> str:
    failure = next(iter(failures.values()), None)
    return "no failures" if failure is None else f"{failure.node_id}: {failure.detail}"


def train_horizontal(
    fed: Federation,
    params: GBDTParams,
    *,
    secure: bool = True,
    bins: Bins | None = None,
    sketch_cells: int = 4096,
    dropout_fraction: float = 0.1,
    on_tree: Callable[[int, int], None] | None = None,
    categorical: Sequence[int] = (),
    feature_names: Sequence[str] | None = None,
) -> Booster:
    """Boost on rows spread over the federation's nodes; the server sees only sums.

    ``params.fixed_point_bits`` defaults to 24 here. ``bins`` skips the sketch (cuts agreed
    beforehand). A node that drops out of a tree's secure sum makes the server grow that
    tree again from the nodes still there (down to ``fed.min_nodes``); a node that missed
    a round sits out the rest of training. ``on_tree(done, total)`` is called after each
    boosting round. ``categorical`` columns (by index; codes ``0..k-1``) split one category
    against the rest; ``feature_names`` only name columns in errors.
    """
    if params.fixed_point_bits is None:
        params = GBDTParams(**{**params.to_dict(), "fixed_point_bits": DEFAULT_FIXED_POINT})
    ids = fed.node_ids
    if bins is None:
        bins = federated_bins(
            fed,
            ids,
            max_bins=params.max_bins,
            cells=sketch_cells,
            secure=secure,
            dropout_fraction=dropout_fraction,
            categorical=categorical,
            feature_names=feature_names,
        )
    elif int(bins.n_bins.max()) > params.max_bins:
        raise ConfigError(f"the given cuts have more than max_bins={params.max_bins} bins")
    sizes = np.asarray([len(c) for c in bins.cuts], dtype=np.int64)
    replies, failures = fed.request(
        list(ids),
        SETUP_TASK,
        common={
            "params": params.to_dict(),
            "cuts": np.concatenate(bins.cuts),
            "sizes": sizes,
            "categorical": bins.is_categorical,
        },
    )
    _refused(failures)
    ids = tuple(n for n in ids if n in replies)
    if len(ids) < fed.min_nodes:
        raise NotEnoughNodes(f"{len(ids)} node(s) set up, fewer than {fed.min_nodes}")
    scale = float(2 ** (params.fixed_point_bits or DEFAULT_FIXED_POINT))
    columns = feature_sampler(params, bins.n_features)
    trees: list[tuple[Tree, ...]] = []
    for r in range(params.n_trees):
        previous = pack_trees(trees[-1], "previous") if trees else None
        round_trees: list[Tree] = []
        for k in range(params.outputs):
            features = sample_features(columns, params, bins.n_features)
            while True:
                source = _FederatedRows(
                    fed,
                    ids,
                    bins=bins,
                    features=features,
                    round_=r,
                    output=k,
                    previous=previous,
                    scale=scale,
                    secure=secure,
                    dropout_fraction=dropout_fraction,
                )
                try:
                    tree = grow_tree(
                        source,
                        params=params,
                        n_bins=bins.n_bins,
                        features=features,
                        categorical=bins.is_categorical,
                    )
                    break
                except _Restart as restart:
                    if len(restart.survivors) < fed.min_nodes:
                        raise NotEnoughNodes(
                            f"{len(restart.survivors)} node(s) left, fewer than {fed.min_nodes}"
                        ) from None
                    fed.audit("gbdt.restart_tree", round=r, nodes=len(restart.survivors))
                    ids = restart.survivors
            round_trees.append(tree)
        trees.append(tuple(round_trees))
        if on_tree is not None:
            on_tree(r + 1, params.n_trees)
    return Booster(params=params, bins=bins, trees=tuple(trees))
