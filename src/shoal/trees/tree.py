"""One regression tree: arrays indexed by node id, grown depth-wise from histograms.

Node ids follow XGBoost's order (children get the next two ids as nodes expand, level by
level, lowest id first), so a tree compares node by node with XGBoost's dump. Growth asks a
:class:`HistogramSource` for histograms; where the rows live (one array, many nodes, or
split by columns between parties) is the source's business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shoal.errors import DataError
from shoal.trees.bins import MISSING
from shoal.trees.params import GBDTParams
from shoal.trees.split import (
    RT_EPS,
    SET_WORDS,
    WIDTH,
    best_splits,
    in_set,
    leaf_weight,
    one_category,
)

__all__ = [
    "HistogramSource",
    "Tree",
    "advance",
    "goes_left",
    "grow_tree",
    "local_histograms",
    "pack_trees",
    "unpack_trees",
]

_FIELDS = (
    "left",
    "right",
    "feature",
    "left_bins",
    "default_left",
    "value",
    "sum_g",
    "sum_h",
    "categorical",
    "category_set",
)


@dataclass(frozen=True, eq=False)
class Tree:
    """Node arrays: children (-1 at leaves), split (feature, ``code < left_bins`` goes left,
    missing goes left iff ``default_left``), leaf ``value`` (learning rate applied) and the
    node's gradient sums (``sum_h`` is XGBoost's cover). At a ``categorical`` split the
    categories in ``category_set`` (bits, shape (nodes, SET_WORDS)) go right and every
    other category left; ``left_bins`` is then the lowest of them."""

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    left_bins: np.ndarray
    default_left: np.ndarray
    value: np.ndarray
    sum_g: np.ndarray
    sum_h: np.ndarray
    categorical: np.ndarray
    category_set: np.ndarray

    @property
    def n_nodes(self) -> int:
        return len(self.left)

    @property
    def is_leaf(self) -> np.ndarray:
        out: np.ndarray = self.left < 0
        return out

    def leaf_index(self, codes: np.ndarray) -> np.ndarray:
        """The leaf each row of ``codes`` reaches."""
        pos = np.zeros(len(codes), dtype=np.int64)
        for _ in range(self.n_nodes):
            if not advance(self, codes, pos):
                break
        return pos

    def predict(self, codes: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.value[self.leaf_index(codes)]
        return out

    def to_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, n_features: int | None = None) -> Tree:
        """A tree from its arrays, checked so a hostile file cannot loop or index out."""
        try:
            arrays = {
                "left": np.asarray(data["left"], dtype=np.int64),
                "right": np.asarray(data["right"], dtype=np.int64),
                "feature": np.asarray(data["feature"], dtype=np.int64),
                "left_bins": np.asarray(data["left_bins"], dtype=np.int64),
                "default_left": np.asarray(data["default_left"], dtype=bool),
                "value": np.asarray(data["value"], dtype=np.float32),
                "sum_g": np.asarray(data["sum_g"], dtype=np.float64),
                "sum_h": np.asarray(data["sum_h"], dtype=np.float64),
                # files from before categorical splits have none
                "categorical": np.asarray(
                    data.get("categorical", np.zeros(len(data["left"]), dtype=bool)), dtype=bool
                ),
            }
            # files from before set splits: a categorical split's set is its one category
            default = one_category(np.where(arrays["categorical"], arrays["left_bins"], -1))
            sets = np.asarray(data.get("category_set", default), dtype=np.uint64)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"malformed tree: {exc}") from None
        n = len(arrays["left"])
        if n == 0 or any(a.shape != (n,) for a in arrays.values()):
            raise DataError("malformed tree: node arrays must be 1-D and of equal length")
        if sets.shape != (n, SET_WORDS):
            raise DataError(f"malformed tree: category_set must have {SET_WORDS} words a node")
        left, right = arrays["left"], arrays["right"]
        inner = left >= 0
        ids = np.arange(n)
        # children come after their parent: no cycles, every walk ends
        if (
            ((left >= 0) != (right >= 0)).any()
            or (left[inner] <= ids[inner]).any()
            or (right[inner] <= ids[inner]).any()
            or (left >= n).any()
            or (right >= n).any()
            or not np.isfinite(arrays["value"]).all()
        ):
            raise DataError("malformed tree: child links must point forward within the tree")
        feature = arrays["feature"][inner]
        if (feature < 0).any() or (n_features is not None and (feature >= n_features).any()):
            raise DataError("malformed tree: a split names a feature out of range")
        if ((arrays["left_bins"][inner] < 0) | (arrays["left_bins"][inner] > MISSING)).any():
            raise DataError("malformed tree: a split's bin is out of range")
        return cls(**arrays, category_set=sets)


def pack_trees(trees: Sequence[Tree], prefix: str) -> dict[str, np.ndarray]:
    """Several trees as flat arrays (``prefix/field`` and ``prefix/sizes``) for the wire."""
    out = {
        f"{prefix}/{name}": np.concatenate([getattr(t, name) for t in trees]) for name in _FIELDS
    }
    out[f"{prefix}/sizes"] = np.asarray([t.n_nodes for t in trees], dtype=np.int64)
    return out


def unpack_trees(
    payload: Mapping[str, Any], prefix: str, *, n_features: int | None = None
) -> list[Tree]:
    """The trees :func:`pack_trees` packed (checked: see :meth:`Tree.from_dict`)."""
    sizes = np.asarray(payload.get(f"{prefix}/sizes", []), dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 1).any():
        raise DataError(f"malformed trees under {prefix!r}")
    bounds = np.cumsum(sizes)[:-1]
    columns = {}
    total = int(sizes.sum())
    defaults = {  # trees without categorical splits may leave their flags and sets out
        "categorical": np.zeros(total, bool),
        "category_set": np.zeros((total, SET_WORDS), np.uint64),
    }
    for name in _FIELDS:
        column = np.asarray(payload.get(f"{prefix}/{name}", defaults.get(name, [])))
        shape = (total, SET_WORDS) if name == "category_set" else (total,)
        if column.shape != shape:
            raise DataError(f"malformed trees under {prefix!r}: {name} has the wrong length")
        columns[name] = np.split(column, bounds)
    return [
        Tree.from_dict({name: columns[name][i] for name in _FIELDS}, n_features=n_features)
        for i in range(len(sizes))
    ]


def goes_left(
    code: Any, left_bins: Any, default_left: Any, categorical: Any, *, right: Any = None
) -> np.ndarray:
    """Which rows with bin ``code`` a split sends left (arrays broadcast): ``code <
    left_bins``, or at a categorical split every category but ``left_bins`` (or, given
    ``right``, every category not marked in it); missing values go left iff
    ``default_left``."""
    code = np.asarray(code)
    right = code == left_bins if right is None else right
    split = np.where(categorical, ~np.asarray(right, dtype=bool), code < left_bins)
    out: np.ndarray = np.where(code == MISSING, default_left, split)
    return out


def advance(tree: Tree, codes: np.ndarray, pos: np.ndarray) -> bool:
    """Move rows sitting at split nodes one level down (in place); False if none moved."""
    at_split = np.flatnonzero(tree.left[pos] >= 0)
    if len(at_split) == 0:
        return False
    node = pos[at_split]
    code = codes[at_split, tree.feature[node]]
    go_left = goes_left(
        code, tree.left_bins[node], tree.default_left[node], tree.categorical[node],
        right=in_set(tree.category_set[node], code),
    )  # fmt: skip
    pos[at_split] = np.where(go_left, tree.left[node], tree.right[node])
    return True


def local_histograms(
    codes: np.ndarray, g: np.ndarray, h: np.ndarray, pos: np.ndarray, nodes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and hessian histograms, shape (len(nodes), features, WIDTH), of the rows
    whose position is one of ``nodes``. Rows with zero hessian (sampled out) are skipped."""
    k, d = len(nodes), codes.shape[1]
    slot = np.full(int(max(pos.max(initial=0), nodes.max(initial=0))) + 1, -1, dtype=np.int64)
    slot[nodes] = np.arange(k)
    row_slot = slot[pos]
    rows = np.flatnonzero((row_slot >= 0) & (h != 0))
    base = row_slot[rows] * WIDTH
    gw, hw = g[rows].astype(np.float64), h[rows].astype(np.float64)
    sub = np.asfortranarray(codes[rows])
    hist_g = np.empty((d, k * WIDTH))
    hist_h = np.empty((d, k * WIDTH))
    for j in range(d):
        key = base + sub[:, j]
        hist_g[j] = np.bincount(key, weights=gw, minlength=k * WIDTH)
        hist_h[j] = np.bincount(key, weights=hw, minlength=k * WIDTH)
    shape = (d, k, WIDTH)
    return (
        hist_g.reshape(shape).transpose(1, 0, 2),
        hist_h.reshape(shape).transpose(1, 0, 2),
    )


class HistogramSource(Protocol):
    """Where rows live during growth: the histograms of some nodes of a partial tree."""

    def histograms(self, tree: Tree, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(G, H), each (len(nodes), features, WIDTH), for ``nodes`` of the partial ``tree``
        (whose latest splits the source applies to its rows first)."""
        ...


class _Builder:
    def __init__(self, root_g: float, root_h: float) -> None:
        self.rows: dict[str, list[Any]] = {name: [] for name in _FIELDS}
        self.add(root_g, root_h)

    def add(self, g: float, h: float) -> int:
        empty = np.zeros(SET_WORDS, dtype=np.uint64)
        for name, value in zip(_FIELDS, (-1, -1, 0, 0, False, 0.0, g, h, False, empty)):
            self.rows[name].append(value)
        return len(self.rows["left"]) - 1

    def tree(self) -> Tree:
        r = self.rows
        return Tree(
            left=np.asarray(r["left"], dtype=np.int64),
            right=np.asarray(r["right"], dtype=np.int64),
            feature=np.asarray(r["feature"], dtype=np.int64),
            left_bins=np.asarray(r["left_bins"], dtype=np.int64),
            default_left=np.asarray(r["default_left"], dtype=bool),
            value=np.asarray(r["value"], dtype=np.float32),
            sum_g=np.asarray(r["sum_g"], dtype=np.float64),
            sum_h=np.asarray(r["sum_h"], dtype=np.float64),
            categorical=np.asarray(r["categorical"], dtype=bool),
            category_set=np.asarray(r["category_set"], dtype=np.uint64).reshape(-1, SET_WORDS),
        )


def grow_tree(
    source: HistogramSource,
    *,
    params: GBDTParams,
    n_bins: np.ndarray,
    features: np.ndarray,
    root_g: float | None = None,
    root_h: float | None = None,
    categorical: np.ndarray | None = None,
) -> Tree:
    """Grow one tree depth-wise. Of two siblings only the one with the smaller hessian sum
    is asked for; the other is its parent's histogram minus it (XGBoost's subtraction).
    Without ``root_g``/``root_h`` the root's sums are read off its histogram (every row
    sits in exactly one slot of each feature)."""
    b = _Builder(root_g or 0.0, root_h or 0.0)
    level = [0]
    parent_of: dict[int, int] = {}
    cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for depth in range(params.max_depth):
        if not level:
            break
        build = [n for n in level if _built_directly(n, parent_of, b)]
        hg, hh = source.histograms(b.tree(), np.asarray(build, dtype=np.int64))
        hists = {n: (hg[i], hh[i]) for i, n in enumerate(build)}
        if depth == 0 and (root_g is None or root_h is None):
            first = int(np.flatnonzero(features)[0])
            b.rows["sum_g"][0] = float(hg[0, first].sum())
            b.rows["sum_h"][0] = float(hh[0, first].sum())
        for n in level:
            if n not in hists:
                sibling = _sibling(n, parent_of, b)
                pg, ph = cached[parent_of[n]]
                hists[n] = (pg - hists[sibling][0], ph - hists[sibling][1])
        cached = hists
        splits = best_splits(
            np.stack([hists[n][0] for n in level]),
            np.stack([hists[n][1] for n in level]),
            np.asarray([b.rows["sum_g"][n] for n in level]),
            np.asarray([b.rows["sum_h"][n] for n in level]),
            n_bins=n_bins,
            features=features,
            params=params,
            categorical=categorical,
        )
        next_level: list[int] = []
        for i, n in enumerate(level):
            gain = float(splits.gain[i])
            if (
                gain <= RT_EPS
                or gain < params.gamma
                or splits.left_h[i] == 0
                or splits.right_h[i] == 0
            ):
                continue
            left = b.add(float(splits.left_g[i]), float(splits.left_h[i]))
            right = b.add(float(splits.right_g[i]), float(splits.right_h[i]))
            r = b.rows
            r["left"][n], r["right"][n] = left, right
            r["feature"][n] = int(splits.feature[i])
            r["left_bins"][n] = int(splits.left_bins[i])
            r["default_left"][n] = bool(splits.default_left[i])
            r["categorical"][n] = bool(splits.categorical[i])
            r["category_set"][n] = splits.category_set[i]
            parent_of[left] = parent_of[right] = n
            next_level += [left, right]
        level = next_level
    r = b.rows
    leaves = [n for n in range(len(r["left"])) if r["left"][n] < 0]
    weights = leaf_weight(
        np.asarray([r["sum_g"][n] for n in leaves]),
        np.asarray([r["sum_h"][n] for n in leaves]),
        params,
    )
    for n, w in zip(leaves, weights * np.float32(params.learning_rate)):
        r["value"][n] = float(w)
    return b.tree()


def _sibling(n: int, parent_of: dict[int, int], b: _Builder) -> int:
    p = parent_of[n]
    left, right = b.rows["left"][p], b.rows["right"][p]
    return int(right if n == left else left)


def _built_directly(n: int, parent_of: dict[int, int], b: _Builder) -> bool:
    if n not in parent_of:
        return True
    sibling = _sibling(n, parent_of, b)
    h, hs = b.rows["sum_h"][n], b.rows["sum_h"][sibling]
    # the smaller child is built; on a tie, the left one (the lower id)
    return bool(h < hs or (h == hs and n < sibling))
