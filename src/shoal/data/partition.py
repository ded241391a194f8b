"""Split one Dataset across simulated nodes: IID, label skew, label shards, quantity skew, by key.

The ``*_indices`` functions are pure: they take labels (or a sample count, or keys) and a seed
and return one sorted index array per node. ``partition`` applies them to a Dataset, eagerly
(a list of Datasets) or lazily (``LazyPartition``, which stores one permutation plus offsets
and builds a node's Dataset only when asked, so 10,000 nodes cost two integer arrays).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from shoal.data.dataset import Dataset
from shoal.errors import DataError

__all__ = [
    "SCHEMES",
    "LazyPartition",
    "by_key_indices",
    "dirichlet_indices",
    "iid_indices",
    "partition",
    "quantity_skew_indices",
    "shard_indices",
]

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity", "by_key")

IndexArray = npt.NDArray[np.intp]


# --------------------------------------------------------------------------- argument checks


def _int_arg(value: Any, what: str, *, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def _rng(seed: Any) -> np.random.Generator:
    # Only plain integers: a seed must reproduce the same partition on every machine.
    return np.random.default_rng(_int_arg(seed, "seed", minimum=0))


def _positive(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(out) or out <= 0:
        raise DataError(f"{what} must be a positive number, got {value!r}")
    return out


def _labels(labels: Any) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(
            f"labels must be a 1-D array of integer class ids, got dtype {y.dtype} and shape "
            f"{y.shape}; label-skew schemes need a classification data set"
        )
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise DataError("labels must be class ids 0..K-1, found a negative label")
    return y


def _proportions(rng: np.random.Generator, alpha: float, nodes: int) -> npt.NDArray[np.float64]:
    p = rng.dirichlet(np.full(nodes, alpha))
    if not np.isfinite(p).all() or p.sum() <= 0:
        # Extremely small alpha can underflow every gamma draw; the limit is all mass on one node.
        p = np.zeros(nodes)
        p[rng.integers(nodes)] = 1.0
    return np.asarray(p / p.sum(), dtype=np.float64)


def _split(assign: npt.NDArray[np.intp], nodes: int) -> list[IndexArray]:
    order, offsets = _order_offsets(assign, nodes)
    return [order[offsets[i] : offsets[i + 1]].astype(np.intp) for i in range(nodes)]


def _order_offsets(
    assign: npt.NDArray[np.intp], nodes: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    # A stable sort keeps each node's indices ascending, so results do not depend on the
    # order in which an assignment was generated.
    order = np.argsort(assign, kind="stable")
    offsets = np.zeros(nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=nodes), out=offsets[1:])
    return order, offsets


# --------------------------------------------------------------------------- assignments


def _iid_assign(n: int, nodes: int, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    sizes = np.full(nodes, n // nodes)
    sizes[: n % nodes] += 1
    assign = np.empty(n, dtype=np.intp)
    assign[rng.permutation(n)] = np.repeat(np.arange(nodes), sizes)
    return assign


def _dirichlet_assign(
    y: npt.NDArray[np.int64],
    nodes: int,
    alpha: float,
    min_size: int,
    max_retries: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.intp]:
    n = len(y)
    if nodes * min_size > n:
        raise DataError(
            f"dirichlet: {nodes} nodes x min_size {min_size} needs at least {nodes * min_size} "
            f"samples but there are {n}; use fewer nodes or a smaller min_size"
        )
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    node_ids = np.arange(nodes)
    for _ in range(max_retries):
        assign = np.empty(n, dtype=np.intp)
        for idx in by_class:
            m = len(idx)
            p = _proportions(rng, alpha, nodes)
            bounds = np.minimum(np.floor(np.cumsum(p) * m).astype(np.int64), m)
            bounds[-1] = m
            counts = np.diff(bounds, prepend=0)
            assign[rng.permutation(idx)] = np.repeat(node_ids, counts)
        if np.bincount(assign, minlength=nodes).min() >= min_size:
            return assign
    raise DataError(
        f"dirichlet: after {max_retries} draws some node still had fewer than {min_size} "
        f"samples ({n} samples, {len(by_class)} classes, {nodes} nodes, alpha={alpha}); "
        "use a larger alpha (milder label skew), fewer nodes, or a smaller min_size"
    )


def _allocate_shards(total: int, counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Shards per class: proportional to class size, each class >= 1 and <= its count."""
    quota = total * counts / counts.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), 1, counts)
    # Largest-remainder adjustment, one shard at a time; at most len(counts) steps each way.
    while alloc.sum() < total:
        room = alloc < counts
        gap = np.where(room, quota - alloc, -np.inf)
        alloc[int(np.argmax(gap))] += 1
    while alloc.sum() > total:
        spare = alloc > 1
        excess = np.where(spare, alloc - quota, -np.inf)
        alloc[int(np.argmax(excess))] -= 1
    return alloc


def _shard_assign(
    y: npt.NDArray[np.int64], nodes: int, shards_per_node: int, rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    n = len(y)
    total = nodes * shards_per_node
    if total > n:
        raise DataError(
            f"shards: {nodes} nodes x {shards_per_node} shards = {total} shards but only {n} "
            "samples; use fewer nodes or a smaller shards_per_node"
        )
    present, counts = np.unique(y, return_counts=True)
    if total < len(present):
        raise DataError(
            f"shards: {total} single-label shards ({nodes} nodes x {shards_per_node}) cannot "
            f"hold {len(present)} classes; raise shards_per_node or nodes, or use "
            "scheme='dirichlet' for label skew with fewer nodes"
        )
    per_class = _allocate_shards(total, counts.astype(np.int64))
    shard_of = np.empty(n, dtype=np.intp)
    first = 0
    for label, k in zip(present, per_class):
        idx = rng.permutation(np.flatnonzero(y == label))
        sizes = np.full(k, len(idx) // k)
        sizes[: len(idx) % k] += 1
        shard_of[idx] = first + np.repeat(np.arange(k), sizes)
        first += int(k)
    node_of_shard = np.empty(total, dtype=np.intp)
    node_of_shard[rng.permutation(total)] = np.repeat(np.arange(nodes), shards_per_node)
    return node_of_shard[shard_of]


def _quantity_assign(
    n: int,
    nodes: int,
    min_size: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    distribution: str,
    sigma: float,
) -> npt.NDArray[np.intp]:
    if nodes * min_size > n:
        raise DataError(
            f"quantity: {nodes} nodes x min_size {min_size} needs at least {nodes * min_size} "
            f"samples but there are {n}; use fewer nodes or a smaller min_size"
        )
    if distribution == "dirichlet":
        weights = _proportions(rng, alpha, nodes)
    elif distribution == "lognormal":
        w = rng.lognormal(mean=0.0, sigma=sigma, size=nodes)
        weights = w / w.sum()
    else:
        raise DataError(
            f"unknown quantity distribution {distribution!r}: use 'dirichlet' (skew set by "
            "alpha) or 'lognormal' (skew set by sigma)"
        )
    # Everyone gets min_size first, so no retries are needed; the rest follows the weights.
    sizes = min_size + rng.multinomial(n - nodes * min_size, weights)
    assign = np.empty(n, dtype=np.intp)
    assign[rng.permutation(n)] = np.repeat(np.arange(nodes), sizes)
    return assign


def _key_assign(
    keys: Any, n: int | None, nodes: int | None, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], int, list[str] | None]:
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise DataError(f"keys must be a 1-D array with one key per sample, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise DataError(
            f"keys has {len(arr)} entries but the data set has {n} samples; give one key "
            "(e.g. writer id) per sample"
        )
    if arr.size == 0:
        raise DataError("keys is empty: there is nothing to partition")
    try:
        uniq, inverse = np.unique(arr, return_inverse=True)
    except TypeError as exc:
        raise DataError(f"keys must be comparable values of one type ({exc})") from exc
    inverse = inverse.reshape(-1)
    k = len(uniq)
    if nodes is None or nodes == k:
        return inverse.astype(np.intp), k, [str(u) for u in uniq]
    if nodes > k:
        raise DataError(
            f"by_key: {nodes} nodes but only {k} distinct keys, so some node would get no "
            f"data; use nodes <= {k} (or nodes=None for one node per key)"
        )
    # Fewer nodes than keys: deal whole keys out at random, so each key stays on one node.
    node_of_key = np.empty(k, dtype=np.intp)
    node_of_key[rng.permutation(k)] = np.arange(k) % nodes
    return node_of_key[inverse], nodes, None


# --------------------------------------------------------------------------- public index API


def iid_indices(n: int, *, nodes: int, seed: int = 0) -> list[IndexArray]:
    """Shuffle ``n`` samples and deal them into ``nodes`` near-equal parts (sizes differ by <= 1).

    With ``n < nodes`` some parts are empty; ``partition`` refuses that.
    """
    n = _int_arg(n, "n", minimum=0)
    nodes = _int_arg(nodes, "nodes", minimum=1)
    return _split(_iid_assign(n, nodes, _rng(seed)), nodes)


def dirichlet_indices(
    labels: npt.ArrayLike,
    *,
    nodes: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[IndexArray]:
    """Label skew: each class is split across nodes by proportions drawn from Dirichlet(alpha).

    Small alpha (0.1) gives each node a few dominant classes; large alpha (100) is close to
    IID. Draws repeat until every node has ``min_size`` samples, at most ``max_retries`` times.
    """
    y = _labels(labels)
    nodes = _int_arg(nodes, "nodes", minimum=1)
    return _split(
        _dirichlet_assign(
            y,
            nodes,
            _positive(alpha, "alpha"),
            _int_arg(min_size, "min_size", minimum=0),
            _int_arg(max_retries, "max_retries", minimum=1),
            _rng(seed),
        ),
        nodes,
    )


def shard_indices(
    labels: npt.ArrayLike, *, nodes: int, shards_per_node: int = 2, seed: int = 0
) -> list[IndexArray]:
    """Pathological label skew (McMahan et al.): sort by label, cut into shards, k per node.

    Every shard holds one label (shards are allotted to classes in proportion to their size),
    so each node sees at most ``shards_per_node`` labels.
    """
    y = _labels(labels)
    nodes = _int_arg(nodes, "nodes", minimum=1)
    k = _int_arg(shards_per_node, "shards_per_node", minimum=1)
    return _split(_shard_assign(y, nodes, k, _rng(seed)), nodes)


def quantity_skew_indices(
    n: int,
    *,
    nodes: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    distribution: Literal["dirichlet", "lognormal"] = "dirichlet",
    sigma: float = 1.0,
) -> list[IndexArray]:
    """Quantity skew: node sizes vary (Dirichlet(alpha) or log-normal(0, sigma) shares), labels IID.

    Each node first gets ``min_size`` samples; the remainder is dealt by the drawn shares.
    """
    n = _int_arg(n, "n", minimum=0)
    nodes = _int_arg(nodes, "nodes", minimum=1)
    return _split(
        _quantity_assign(
            n,
            nodes,
            _int_arg(min_size, "min_size", minimum=0),
            _rng(seed),
            alpha=_positive(alpha, "alpha"),
            distribution=distribution,
            sigma=_positive(sigma, "sigma"),
        ),
        nodes,
    )


def by_key_indices(
    keys: npt.ArrayLike, *, nodes: int | None = None, seed: int = 0
) -> list[IndexArray]:
    """Natural partition: samples that share a key (writer id, hospital, role) share a node.

    With ``nodes=None`` there is one node per distinct key, in sorted key order. With fewer
    nodes than keys, whole keys are dealt to nodes at random (deterministic for the seed).
    """
    if nodes is not None:
        nodes = _int_arg(nodes, "nodes", minimum=1)
    assign, count, _ = _key_assign(keys, None, nodes, _rng(seed))
    return _split(assign, count)


# --------------------------------------------------------------------------- lazy partition


class LazyPartition(Sequence[Dataset]):
    """Nodes' data sets built on demand from one stored permutation and its offsets.

    ``part[i]`` is node i's Dataset, made fresh from ``dataset`` each time it is asked for;
    ``part.indices(i)`` its sample positions. Memory is one index per sample however many
    nodes there are.
    """

    def __init__(
        self,
        *,
        dataset: Dataset,
        order: npt.ArrayLike,
        offsets: npt.ArrayLike,
        names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise DataError(f"dataset must be a shoal Dataset, got {type(dataset).__name__}")
        n = len(dataset)
        idx = np.asarray(order)
        off = np.asarray(offsets)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise DataError("order must be a 1-D array of integer sample positions")
        if off.ndim != 1 or off.size < 2 or off.dtype.kind not in "iu":
            raise DataError("offsets must be a 1-D integer array of length nodes + 1")
        if off[0] != 0 or off[-1] != idx.size or (np.diff(off) < 0).any():
            raise DataError(
                "offsets must start at 0, never decrease, and end at len(order): node i owns "
                "order[offsets[i]:offsets[i+1]]"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DataError(f"order holds positions outside 0..{n - 1}")
        # int32 halves the memory of the one array that grows with the data set.
        self._order = idx.astype(np.int32 if n < 2**31 else np.int64)
        self._offsets = off.astype(np.int64)
        self._dataset = dataset
        nodes = self._offsets.size - 1
        if names is not None:
            names = tuple(names)
            if len(names) != nodes:
                raise DataError(f"{len(names)} names for {nodes} nodes; give one name per node")
        self._names: tuple[str, ...] | None = names

    @classmethod
    def from_indices(
        cls,
        dataset: Dataset,
        indices: Sequence[npt.ArrayLike],
        *,
        names: Sequence[str] | None = None,
    ) -> LazyPartition:
        """Build from one index array per node (as returned by the ``*_indices`` functions)."""
        parts = [np.asarray(i, dtype=np.int64).reshape(-1) for i in indices]
        if not parts:
            raise DataError("a partition needs at least one node")
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return cls(dataset=dataset, order=np.concatenate(parts), offsets=offsets, names=names)

    @property
    def dataset(self) -> Dataset:
        """The data set the nodes' indices point into."""
        return self._dataset

    @property
    def sizes(self) -> npt.NDArray[np.int64]:
        """Samples per node."""
        return np.diff(self._offsets)

    @property
    def order(self) -> np.ndarray:
        """All nodes' indices, node after node (read-only view)."""
        view = self._order.view()
        view.setflags(write=False)
        return view

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        """Node i owns ``order[offsets[i]:offsets[i+1]]`` (read-only view)."""
        view = self._offsets.view()
        view.setflags(write=False)
        return view

    def __len__(self) -> int:
        return int(self._offsets.size - 1)

    def _index(self, i: Any) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"node index must be an integer or a slice, got {type(i).__name__}")
        nodes = len(self)
        if not -nodes <= i < nodes:
            raise IndexError(f"node {i} out of range for a partition of {nodes} nodes")
        return int(i) % nodes

    def name(self, i: int) -> str:
        """Node i's name (``<dataset>/node-<i>``, or its key for a by-key partition)."""
        i = self._index(i)
        if self._names is not None:
            return self._names[i]
        return f"{self._dataset.name}/node-{i}"

    def indices(self, i: int) -> IndexArray:
        """Node i's sample positions in ``dataset`` (ascending for the built-in schemes)."""
        i = self._index(i)
        return self._order[self._offsets[i] : self._offsets[i + 1]].astype(np.intp)

    def labels(self, i: int) -> np.ndarray:
        """Node i's labels, without materializing its features."""
        return self._dataset.y[self.indices(i)]

    @overload
    def __getitem__(self, i: int) -> Dataset: ...

    @overload
    def __getitem__(self, i: slice) -> list[Dataset]: ...

    def __getitem__(self, i: int | slice) -> Dataset | list[Dataset]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._dataset.subset(self.indices(i), name=self.name(i))

    def __iter__(self) -> Iterator[Dataset]:
        for i in range(len(self)):
            yield self[i]

    def materialize(self) -> list[Dataset]:
        """Every node's Dataset at once (what ``partition(lazy=False)`` returns)."""
        return list(self)

    def __repr__(self) -> str:
        sizes = self.sizes
        return (
            f"LazyPartition(dataset={self._dataset.name!r}, nodes={len(self)}, "
            f"samples={int(sizes.sum())}, size min/max={int(sizes.min())}/{int(sizes.max())})"
        )


# --------------------------------------------------------------------------- partition()


@overload
def partition(
    dataset: Dataset,
    *,
    nodes: int | None = ...,
    scheme: str = ...,
    seed: int = ...,
    alpha: float = ...,
    shards_per_node: int = ...,
    min_size: int = ...,
    keys: npt.ArrayLike | None = ...,
    distribution: Literal["dirichlet", "lognormal"] = ...,
    sigma: float = ...,
    max_retries: int = ...,
    lazy: Literal[False] = ...,
) -> list[Dataset]: ...


@overload
def partition(
    dataset: Dataset,
    *,
    nodes: int | None = ...,
    scheme: str = ...,
    seed: int = ...,
    alpha: float = ...,
    shards_per_node: int = ...,
    min_size: int = ...,
    keys: npt.ArrayLike | None = ...,
    distribution: Literal["dirichlet", "lognormal"] = ...,
    sigma: float = ...,
    max_retries: int = ...,
    lazy: Literal[True],
) -> LazyPartition: ...


@overload
def partition(
    dataset: Dataset,
    *,
    nodes: int | None = ...,
    scheme: str = ...,
    seed: int = ...,
    alpha: float = ...,
    shards_per_node: int = ...,
    min_size: int = ...,
    keys: npt.ArrayLike | None = ...,
    distribution: Literal["dirichlet", "lognormal"] = ...,
    sigma: float = ...,
    max_retries: int = ...,
    lazy: bool,
) -> list[Dataset] | LazyPartition: ...


def partition(
    dataset: Dataset,
    *,
    nodes: int | None = None,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_node: int = 2,
    min_size: int = 1,
    keys: npt.ArrayLike | None = None,
    distribution: Literal["dirichlet", "lognormal"] = "dirichlet",
    sigma: float = 1.0,
    max_retries: int = 100,
    lazy: bool = False,
) -> list[Dataset] | LazyPartition:
    """Split ``dataset`` across ``nodes`` simulated parties; every node gets at least one sample.

    Schemes: ``"iid"`` (uniform), ``"dirichlet"`` (label skew, ``alpha``), ``"shards"``
    (``shards_per_node`` single-label shards), ``"quantity"`` (size skew, ``alpha`` or
    ``distribution="lognormal"`` with ``sigma``), ``"by_key"`` (one node per distinct value
    of ``keys``, or ``nodes`` groups of keys). Deterministic for a given ``seed``. With
    ``lazy=True`` returns a ``LazyPartition`` that builds each node's Dataset on demand.
    """
    if not isinstance(dataset, Dataset):
        raise DataError(
            f"partition needs a shoal Dataset, got {type(dataset).__name__}; build one with "
            "Dataset(x=..., y=..., classes=...) or a loader such as load_digits"
        )
    key = str(scheme).strip().lower().replace("-", "_")
    if key not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if keys is not None and key != "by_key":
        raise DataError(f"keys= is only used by scheme='by_key' (scheme is {scheme!r})")
    rng = _rng(seed)
    min_size = _int_arg(min_size, "min_size", minimum=1)
    n = len(dataset)
    names: list[str] | None = None
    if key == "by_key":
        if keys is None:
            raise DataError(
                "scheme='by_key' needs keys=: one key per sample (writer id, site, ...)"
            )
        if nodes is not None:
            nodes = _int_arg(nodes, "nodes", minimum=1)
        assign, count, keynames = _key_assign(keys, n, nodes, rng)
        if keynames is not None:
            names = [f"{dataset.name}/{k}" for k in keynames]
    else:
        if nodes is None:
            raise DataError(f"scheme={scheme!r} needs nodes=<number of nodes>")
        count = _int_arg(nodes, "nodes", minimum=1)
        if count * min_size > n:
            # before anything is sized by the node count (nodes = 10**19 made NumPy raise)
            raise DataError(
                f"partition {scheme!r} cannot give {count} nodes {min_size} sample(s) each "
                f"from {n} samples; use fewer nodes (at most {n // min_size}) or a smaller "
                "min_size"
            )
        if key in ("dirichlet", "shards") and dataset.classes is None:
            raise DataError(
                f"scheme={scheme!r} skews labels, but {dataset.name!r} is a regression data "
                "set; use scheme='iid' or 'quantity'"
            )
        if key == "iid":
            assign = _iid_assign(n, count, rng)
        elif key == "dirichlet":
            assign = _dirichlet_assign(
                dataset.y,
                count,
                _positive(alpha, "alpha"),
                min_size,
                _int_arg(max_retries, "max_retries", minimum=1),
                rng,
            )
        elif key == "shards":
            k = _int_arg(shards_per_node, "shards_per_node", minimum=1)
            assign = _shard_assign(dataset.y, count, k, rng)
        else:
            assign = _quantity_assign(
                n,
                count,
                min_size,
                rng,
                alpha=_positive(alpha, "alpha"),
                distribution=distribution,
                sigma=_positive(sigma, "sigma"),
            )
    order, offsets = _order_offsets(assign, count)
    sizes = np.diff(offsets)
    if sizes.min() < min_size:
        empty = int(np.argmin(sizes))
        raise DataError(
            f"partition {scheme!r} gives node {empty} only {int(sizes[empty])} samples "
            f"(min_size={min_size}) from {n} samples over {count} nodes; use fewer nodes "
            f"(at most {n // min_size})"
        )
    lazy_part = LazyPartition(dataset=dataset, order=order, offsets=offsets, names=names)
    return lazy_part if lazy else lazy_part.materialize()
