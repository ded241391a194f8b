"""Vertical SecureBoost: columns split between a guest (labels and some features) and hosts.

The guest encrypts each row's fixed-point ``(g, h)`` once per tree under its Paillier key.
Each host sums the ciphertexts per (tree node, feature, bin), derives one sibling by
subtraction, turns bins into cumulative left sums, shuffles them, packs several into one
ciphertext and returns them. The guest decrypts, finds the best split and tells the host
which of its (shuffled) candidates won; the host keeps the threshold in its own lookup
table and answers with the rows that go left. The guest knows only (host, record id).
With the same cuts the trees equal :func:`shoal.trees.train` on the joined columns.
A party's categorical columns split one category against the rest; a host's candidates
for them are left sums like any other, so the guest cannot tell them from thresholds.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np

from shoal.crypto import paillier
from shoal.errors import ConfigError, DataError, ProtocolError, ShoalError
from shoal.trees.bins import MISSING, Bins, fit_bins
from shoal.trees.booster import feature_sampler, row_sampler, sample_features, tree_gradients
from shoal.trees.gh import GHCodec
from shoal.trees.horizontal import DEFAULT_FIXED_POINT
from shoal.trees.objective import (
    base_margin,
    check_labels,
    gradients,
    predict_from_margin,
)
from shoal.trees.params import GBDTParams
from shoal.trees.split import RT_EPS, best_splits, leaf_weight, node_gain
from shoal.trees.tree import Tree, goes_left, local_histograms

__all__ = [
    "TREE_FIELDS",
    "Boosting",
    "Grower",
    "GuestParty",
    "HostParty",
    "Link",
    "VerticalModel",
    "VerticalTree",
    "VerticalTreeFailed",
    "load_guest",
    "predict_vertical",
    "save_guest",
    "train_secureboost",
    "tree_from_arrays",
]

HOST_FORMAT = "shoal.trees.host/1"
GUEST_FORMAT = "shoal.trees.guest/1"

GUEST = 0  # owner of a node's split: 0 the guest, h >= 1 the h-th host

# A host's method by name, called with a wire-encodable payload (in simulation a direct
# call, in deployment a task relayed by the coordinator).
Link = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


# -- host -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Candidate:
    key: tuple[int, int, int]  # XGBoost's scan order: (feature, backward?, +-bin)
    feature: int
    left_bins: int  # categorical: the category that goes right
    default_left: bool


class HostParty:
    """A party holding some columns of the same rows (aligned by PSI beforehand).

    Its cuts and the thresholds of the splits it wins never leave it: the guest sees
    record ids into :attr:`records`. ``categorical`` columns (by index; codes ``0..k-1``)
    split one category against the rest; which columns they are stays here too.
    """

    def __init__(
        self,
        *,
        x: np.ndarray,
        max_bins: int = 256,
        insecure_keys: bool = False,
        categorical: Sequence[int] = (),
        _bins: Bins | None = None,
    ) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise DataError(
                "a host has no rows after the intersection (or no 2-D feature array): "
                "it cannot take part; check the PSI alignment"
            )
        self.bins = (
            _bins if _bins is not None
            else fit_bins(x, max_bins=max_bins, categorical=categorical)
        )  # fmt: skip
        self.codes = self.bins.transform(x)
        self.insecure_keys = insecure_keys
        self.records: list[tuple[int, int, bool]] = []  # (feature, left_bins, default_left)
        self._key: Any = None
        self._cts: list[Any] = []
        self._codec: GHCodec | None = None
        self._features = np.zeros(0, dtype=np.int64)
        self._cache: dict[int, list[dict[int, Any]]] = {}
        self._pending: dict[int, list[_Candidate]] = {}
        # CPU seconds (this process) by phase: what a benchmark reports as core-seconds
        self.seconds: dict[str, float] = {"accumulate": 0.0, "pack": 0.0}

    def handle(self, method: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        handlers = {
            "describe": self.describe,
            "start_tree": self.start_tree,
            "histograms": self.histograms,
            "commit": self.commit,
            "decide": self.decide,
        }
        if method not in handlers:
            raise ProtocolError(f"a SecureBoost host has no method {method!r}")
        try:
            return handlers[method](payload)
        except (KeyError, TypeError, ValueError) as exc:  # a peer's malformed message
            raise ProtocolError(f"{method}: malformed message ({exc!r})") from None

    def describe(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return {"rows": len(self.codes), "features": self.codes.shape[1]}

    def start_tree(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        P = paillier
        key = P.PublicKey.from_bytes(bytes(payload["key"]), insecure=self.insecure_keys)
        rows = int(payload["rows"])
        if rows != len(self.codes):
            raise ProtocolError(f"the guest has {rows} rows, this host {len(self.codes)}")
        self._key = key
        self._codec = GHCodec(
            frac_bits=int(payload["frac_bits"]),
            rows=rows,
            key_bits=key.bits,
            grad_bound=int(payload["grad_bound"]),
        )
        self._cts = list(P.ciphertexts_from_bytes(key, payload["ct"]))
        if len(self._cts) != rows:
            raise ProtocolError(f"{len(self._cts)} ciphertexts for {rows} rows")
        features = np.asarray(payload["features"], dtype=np.int64)
        if features.ndim != 1 or (features < 0).any() or (features >= self.codes.shape[1]).any():
            raise ProtocolError("start_tree: malformed feature list")
        self._features = features
        self._cache, self._pending = {}, {}
        return {}

    def _sums(self, rows: np.ndarray) -> list[dict[int, Any]]:
        """Per sampled feature: bin -> product of the rows' ciphertexts (their sum)."""
        nsq = self._key.nsquare
        cts = self._cts
        out = []
        for j in self._features:
            column = self.codes[rows, j]
            order = np.argsort(column, kind="stable")
            ordered, members = column[order], rows[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            ends = np.r_[starts[1:], len(ordered)]
            sums: dict[int, Any] = {}
            for a, b in zip(starts.tolist(), ends.tolist()):
                acc = cts[members[a]]
                for i in members[a + 1 : b].tolist():
                    acc = acc * cts[i] % nsq
                sums[int(ordered[a])] = acc
            out.append(sums)
        return out

    def _derive(
        self, parent: list[dict[int, Any]], sibling: list[dict[int, Any]], rows: np.ndarray
    ) -> list[dict[int, Any]]:
        """A node's sums as its parent's minus its sibling's (for bins it has rows in)."""
        nsq = self._key.nsquare
        out = []
        for f, j in enumerate(self._features):
            present = np.unique(self.codes[rows, j]).tolist()
            whole, part = parent[f], sibling[f]
            sums = {}
            for b in present:
                sums[b] = whole[b] if b not in part else whole[b] * gmpy2.invert(part[b], nsq) % nsq
            out.append(sums)
        return out

    def histograms(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Packed, shuffled cumulative sums of each requested node's candidate splits."""
        if self._codec is None:
            raise ProtocolError("histograms before start_tree")
        pos = np.asarray(payload["pos"], dtype=np.int64)
        level = np.asarray(payload["level"], dtype=np.int64)
        parent = np.asarray(payload["parent"], dtype=np.int64)
        sibling = np.asarray(payload["sibling"], dtype=np.int64)
        if pos.shape != (len(self.codes),) or not (level.shape == parent.shape == sibling.shape):
            raise ProtocolError("histograms: malformed positions or node lists")
        started = time.process_time()
        sums: dict[int, list[dict[int, Any]]] = {}
        derived = [i for i, p in enumerate(parent.tolist()) if p >= 0]
        for i, node in enumerate(level.tolist()):  # built directly first
            if i not in derived:
                sums[node] = self._sums(np.flatnonzero(pos == node))
        for i in derived:
            node, p, s = int(level[i]), int(parent[i]), int(sibling[i])
            if p not in self._cache or s not in sums:
                raise ProtocolError("histograms: a derived node needs its parent and sibling")
            sums[node] = self._derive(self._cache[p], sums[s], np.flatnonzero(pos == node))
        self._cache = sums
        accumulated = time.process_time()
        P, codec = paillier, self._codec
        packed_all: list[Any] = []
        counts, packed = [], []
        for node in level.tolist():
            candidates, cts = self._candidates(sums[node])
            order = list(range(len(candidates)))
            secrets.SystemRandom().shuffle(order)  # the guest must not learn which is which
            self._pending[node] = [candidates[i] for i in order]
            out = codec.pack([cts[i] for i in order], self._key.nsquare)
            packed_all += out
            counts.append(len(candidates))
            packed.append(len(out))
        self.seconds["accumulate"] += accumulated - started
        self.seconds["pack"] += time.process_time() - accumulated
        width = self._key.ciphertext_bytes
        blob = (
            P.ciphertexts_to_bytes(self._key, packed_all)
            if packed_all
            else np.zeros((0, width), dtype=np.uint8)
        )
        return {"ct": blob, "counts": np.asarray(counts), "packed": np.asarray(packed)}

    def _candidates(self, sums: list[dict[int, Any]]) -> tuple[list[_Candidate], list[Any]]:
        """Every candidate split of a node with the encrypted sums of its left side (a
        categorical column's too: the guest decrypts left sums of either kind alike)."""
        nsq = self._key.nsquare
        candidates: list[_Candidate] = []
        cts: list[Any] = []
        categorical = self.bins.is_categorical
        for f, j in enumerate(self._features.tolist()):
            by_bin = sums[f]
            missing = by_bin.get(MISSING)
            present = sorted(b for b in by_bin if b != MISSING)
            if categorical[j]:
                k = len(self.bins.cuts[j]) + 1
                for c in _one_hot_candidates(j, by_bin, present, missing, k, nsq):
                    candidates.append(c[0])
                    cts.append(c[1])
                continue
            cum: Any = None
            for k, b in enumerate(present):
                before = cum
                cum = by_bin[b] if cum is None else cum * by_bin[b] % nsq
                # forward: bins <= b left, missing right (the last only if missing exists)
                if k < len(present) - 1 or missing is not None:
                    candidates.append(_Candidate(key=(j, 0, b + 1), feature=j, left_bins=b + 1,
                                                 default_left=False))  # fmt: skip
                    cts.append(cum)
                # backward: bins >= b right, the rest and missing left
                if missing is not None:
                    left = missing if before is None else before * missing % nsq
                    candidates.append(_Candidate(key=(j, 1, -b), feature=j, left_bins=b,
                                                 default_left=True))  # fmt: skip
                    cts.append(left)
        return candidates, cts

    def commit(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Record the splits the guest chose privately; answer which rows go left.

        For each node in ``nodes``, ``ids`` holds ``counts[i]`` candidates of equal gain; the
        host takes the one a centralized scan meets first (lowest feature, forward before
        backward, lowest bin), so ties break as in :func:`shoal.trees.train`. The reply's
        ``left`` is the direction of each node's rows (in row order), node after node.
        """
        nodes = np.asarray(payload["nodes"], dtype=np.int64)
        ids = np.asarray(payload["ids"], dtype=np.int64)
        counts = np.asarray(payload["counts"], dtype=np.int64)
        pos = np.asarray(payload["pos"], dtype=np.int64)
        if (
            nodes.ndim != 1
            or counts.shape != nodes.shape
            or (counts < 1).any()
            or ids.shape != (int(counts.sum()),)
            or pos.shape != (len(self.codes),)
        ):
            raise ProtocolError("commit: malformed node, candidate or position lists")
        records, chosen, left = [], [], []
        at = 0
        for node, count in zip(nodes.tolist(), counts.tolist()):
            pending = self._pending.get(node, [])
            tied = ids[at : at + count].tolist()
            at += count
            if any(not 0 <= i < len(pending) for i in tied):
                raise ProtocolError("commit: unknown candidate")
            choice = min(tied, key=lambda i: pending[i].key)
            won = pending[choice]
            self.records.append((won.feature, won.left_bins, won.default_left))
            records.append(len(self.records) - 1)
            chosen.append(choice)
            left.append(self._goes_left(won, self.codes[pos == node]))
        return {
            "records": np.asarray(records, dtype=np.int64),
            "chosen": np.asarray(chosen, dtype=np.int64),
            "left": np.concatenate(left) if left else np.zeros(0, np.uint8),
        }

    def _goes_left(self, c: _Candidate | tuple[int, int, bool], codes: np.ndarray) -> np.ndarray:
        feature, left_bins, default_left = (
            (c.feature, c.left_bins, c.default_left) if isinstance(c, _Candidate) else c
        )
        go = goes_left(codes[:, feature], left_bins, default_left,
                       self.bins.is_categorical[feature])  # fmt: skip
        return go.astype(np.uint8)

    def decide(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """For prediction: each requested record's direction for every row of ``x`` (the
        host's columns of the rows to score) or of its training rows."""
        x = payload.get("x")
        codes = self.codes if x is None else self.bins.transform(np.asarray(x))
        ids = np.asarray(payload["records"], dtype=np.int64)
        if ids.ndim != 1 or (ids < 0).any() or (ids >= len(self.records)).any():
            raise ProtocolError("decide: unknown record")
        bits = [self._goes_left(self.records[i], codes) for i in ids.tolist()]
        return {"left": np.stack(bits) if bits else np.zeros((0, len(codes)), np.uint8)}

    def save(self, path: str | Path) -> None:
        """This host's part of the model (its cuts and split records) as JSON."""
        doc = {
            "format": HOST_FORMAT,
            "cuts": [[float(c) for c in cuts] for cuts in self.bins.cuts],
            "categorical": [bool(c) for c in self.bins.is_categorical],
            "records": [[f, t, bool(d)] for f, t, d in self.records],
        }
        Path(path).write_text(json.dumps(doc), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> HostParty:
        """A host that can answer ``decide`` for new rows (``x`` in the payload)."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            if raw.get("format") != HOST_FORMAT:
                raise DataError(f"not a SecureBoost host file (format {HOST_FORMAT!r})")
            bins = _bins_from(raw)
            records = [(int(f), int(t), bool(d)) for f, t, d in raw["records"]]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                ValueError) as exc:  # fmt: skip
            raise DataError(f"cannot read host model {str(path)!r}: {exc}") from None
        host = cls(x=np.zeros((1, bins.n_features)), _bins=bins)  # no rows: it only decides
        host.restore(records)
        return host

    def restore(self, records: Sequence[tuple[int, int, bool]]) -> None:
        """Take a saved table of won splits (checked against this host's cuts)."""
        n_bins = self.bins.n_bins
        for f, t, _ in records:
            if not 0 <= f < self.bins.n_features or not 0 <= t <= n_bins[f]:
                raise DataError("malformed host model: a record names a missing feature or bin")
        self.records = [(int(f), int(t), bool(d)) for f, t, d in records]

    def threshold_table(self) -> list[dict[str, Any]]:
        """This host's model part: record id -> feature, raw threshold (or, for a
        categorical column, the category that goes right), default direction."""
        categorical = self.bins.is_categorical
        return [
            {"record": i, "feature": f, "default_left": d}
            | ({"category": t} if categorical[f] else {"threshold": self.bins.threshold(f, t)})
            for i, (f, t, d) in enumerate(self.records)
        ]


def _one_category_only(params: GBDTParams) -> None:
    """SecureBoost splits a category against the rest: a set split would need the guest to
    sort a host's categories by their (decrypted) weights, which would tell it each
    category's sums."""
    if params.partition_splits:
        raise ConfigError(
            f"max_cat_to_onehot = {params.max_cat_to_onehot} asks for category-set splits, "
            "which SecureBoost does not make (a host's categories would have to be sorted "
            "by their gradient sums at the guest); leave max_cat_to_onehot at its default"
        )


def _bins_from(raw: Mapping[str, Any]) -> Bins:
    """A party file's cuts and categorical flags (files from before categories have none)."""
    flags = raw.get("categorical", [])
    if not isinstance(flags, list) or any(not isinstance(f, bool) for f in flags):
        raise DataError("categorical must be a list of true/false, one per feature")
    return Bins(
        cuts=tuple(np.asarray(c, dtype=np.float64) for c in raw["cuts"]),
        categorical=tuple(flags),
    )


def _one_hot_candidates(
    j: int, by_bin: Mapping[int, Any], present: list[int], missing: Any, k: int, nsq: Any
) -> list[tuple[_Candidate, Any]]:
    """A categorical column's candidates at one node, in XGBoost's scan order (category
    ``c`` right with missing values left, then with them right), each with the encrypted
    sum of its left side: every other present category (prefix times suffix products, no
    inverses), times the missing rows where they go left. Candidates with an empty side
    are left out: their gain is 0 (as for a numeric column's last bin)."""
    prefix: list[Any] = [None]
    for b in present:
        prefix.append(by_bin[b] if prefix[-1] is None else prefix[-1] * by_bin[b] % nsq)
    suffix: list[Any] = [None]
    for b in reversed(present):
        suffix.append(by_bin[b] if suffix[-1] is None else suffix[-1] * by_bin[b] % nsq)
    suffix.reverse()  # suffix[i]: the product of present[i:]

    def times(a: Any, b: Any) -> Any:
        return b if a is None else a if b is None else a * b % nsq

    out = []
    for i, c in enumerate(present):
        rest = times(prefix[i], suffix[i + 1])
        with_missing = times(rest, missing)
        if with_missing is not None:  # category c right, missing values left
            out.append((_Candidate(key=(j, 0, 2 * c), feature=j, left_bins=c,
                                   default_left=True), with_missing))  # fmt: skip
        if missing is not None and rest is not None:  # c and the missing values right
            out.append((_Candidate(key=(j, 0, 2 * c + 1), feature=j, left_bins=c,
                                   default_left=False), rest))  # fmt: skip
    absent = next((c for c in range(k) if c not in by_bin), None)
    if missing is not None and absent is not None and prefix[-1] is not None:
        # a category with no rows here, right with the missing values: missing against the
        # rest, which a centralized scan meets at the lowest such category
        out.append((_Candidate(key=(j, 0, 2 * absent + 1), feature=j, left_bins=absent,
                               default_left=False), prefix[-1]))  # fmt: skip
    return sorted(out, key=lambda pair: pair[0].key)


# -- guest ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VerticalTree:
    """A tree as the guest holds it: a split is (owner, feature or record id)."""

    left: np.ndarray
    right: np.ndarray
    owner: np.ndarray
    split: np.ndarray  # guest: feature index; host: that host's record id
    left_bins: np.ndarray  # guest splits only
    default_left: np.ndarray  # guest splits only
    value: np.ndarray
    # guest splits only: category ``left_bins`` goes right (a host keeps its own kind)
    categorical: np.ndarray


@dataclass(frozen=True, eq=False)
class VerticalModel:
    params: GBDTParams
    bins: Bins  # the guest's own cuts
    trees: tuple[tuple[VerticalTree, ...], ...]
    hosts: int


TREE_FIELDS = (
    "left", "right", "owner", "split", "left_bins", "default_left", "value", "categorical",
)  # fmt: skip


def save_guest(model: VerticalModel, path: str | Path) -> None:
    """The guest's part of a SecureBoost model: its cuts, the trees (host splits as
    (host, record id)) and the leaves, as JSON numbers."""
    doc = {
        "format": GUEST_FORMAT,
        "params": model.params.to_dict(),
        "hosts": model.hosts,
        "cuts": [[float(c) for c in cuts] for cuts in model.bins.cuts],
        "categorical": [bool(c) for c in model.bins.is_categorical],
        "trees": [
            [{k: np.asarray(getattr(t, k)).tolist() for k in TREE_FIELDS} for t in r]
            for r in model.trees
        ],
    }
    Path(path).write_text(json.dumps(doc), encoding="utf-8")


def load_guest(path: str | Path) -> VerticalModel:
    """Load :func:`save_guest`'s file, checked like a horizontal model."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("format") != GUEST_FORMAT:
            raise DataError(f"not a SecureBoost guest file (format {GUEST_FORMAT!r})")
        params = GBDTParams(**raw["params"])
        hosts = int(raw["hosts"])
        bins = _bins_from(raw)
        trees = tuple(tuple(tree_from_arrays(t, bins, hosts) for t in r) for r in raw["trees"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:  # fmt: skip
        raise DataError(f"cannot read guest model {str(path)!r}: {exc}") from None
    return VerticalModel(params=params, bins=bins, trees=trees, hosts=hosts)


def tree_from_arrays(raw: Mapping[str, Any], bins: Bins, hosts: int) -> VerticalTree:
    """A guest's tree from its arrays, checked (a model file's, or a party's saved round)."""
    # The links and leaves are checked as a plain tree's; owners and guest features here.
    plain = Tree.from_dict(
        {
            "left": raw["left"],
            "right": raw["right"],
            "feature": np.zeros(len(raw["left"]), dtype=np.int64),
            "left_bins": raw["left_bins"],
            "default_left": raw["default_left"],
            "value": raw["value"],
            "sum_g": np.zeros(len(raw["left"])),
            "sum_h": np.zeros(len(raw["left"])),
            # files from before categorical splits have none
            "categorical": raw.get("categorical", np.zeros(len(raw["left"]), dtype=bool)),
        }
    )
    owner = np.asarray(raw["owner"], dtype=np.int64)
    split = np.asarray(raw["split"], dtype=np.int64)
    inner = plain.left >= 0
    if owner.shape != plain.left.shape or split.shape != owner.shape:
        raise DataError("malformed guest model: owner/split arrays")
    if ((owner < 0) | (owner > hosts)).any():
        raise DataError("malformed guest model: a split names an unknown party")
    guest = inner & (owner == GUEST)
    if (
        (split[guest] < 0).any()
        or (split[guest] >= bins.n_features).any()
        or (split[inner] < 0).any()
    ):
        raise DataError("malformed guest model: a split names a missing feature or record")
    categorical = plain.categorical & guest
    if not bins.is_categorical[split[categorical]].all():
        raise DataError("malformed guest model: a categorical split on a numeric feature")
    return VerticalTree(
        left=plain.left,
        right=plain.right,
        owner=owner,
        split=split,
        left_bins=plain.left_bins,
        default_left=plain.default_left,
        value=plain.value,
        categorical=categorical,
    )


@dataclass
class _Stats:
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("gradients", "encrypt", "hosts", "decrypt", "split", "other"), 0.0
        )
    )


class GuestParty:
    """The party with the labels (and some columns). It holds the Paillier private key.
    ``categorical`` columns (by index; codes ``0..k-1``) split one category against the rest."""

    def __init__(
        self,
        *,
        x: np.ndarray,
        y: np.ndarray,
        params: GBDTParams,
        key_bits: int = 2048,
        insecure_keys: bool = False,
        categorical: Sequence[int] = (),
    ) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise DataError(
                "the guest has no rows after the intersection (or no 2-D feature array)"
            )
        if params.fixed_point_bits is None:
            params = GBDTParams(**{**params.to_dict(), "fixed_point_bits": DEFAULT_FIXED_POINT})
        _one_category_only(params)
        self.params = params
        self.labels = check_labels(y, params)
        if len(self.labels) != len(x):
            raise DataError(f"{len(x)} rows of features but {len(self.labels)} labels")
        self.bins = fit_bins(x, max_bins=params.max_bins, categorical=categorical)
        self.codes = self.bins.transform(x)
        P = paillier
        self.public_key, self.private_key = P.generate_keypair(key_bits, insecure=insecure_keys)
        self.pool = P.RandomnessPool(public_key=self.public_key, private_key=self.private_key)
        self.stats = _Stats()


def _timed(stats: _Stats, what: str, start: float) -> float:
    now = time.process_time()
    stats.seconds[what] += now - start
    return now


class VerticalTreeFailed(ProtocolError):
    """A party failed during a tree: that tree is dropped; ``model`` holds the complete
    trees, and ``train_secureboost(..., start=model)`` resumes from them."""

    def __init__(self, message: str, model: VerticalModel) -> None:
        super().__init__(message)
        self.model = model


def train_secureboost(
    guest: GuestParty, hosts: Sequence[Link], *, start: VerticalModel | None = None
) -> VerticalModel:
    """Boost with the guest driving and ``hosts`` reached through their links (in one
    process; :mod:`shoal.trees.secureboost` runs the same steps between federation nodes).

    ``start`` resumes from a model's complete trees (after :class:`VerticalTreeFailed`):
    the result is the model an uninterrupted run would have grown.
    """
    widths = []
    for index, link in enumerate(hosts, start=1):
        info = link("describe", {"max_bins": guest.params.max_bins})
        if int(info["rows"]) != len(guest.codes):
            raise DataError(
                f"host {index} has {info['rows']} rows and the guest {len(guest.codes)}: align "
                "the parties' rows (PSI) before training"
            )
        widths.append(int(info["features"]))
    session = Boosting(guest, widths, start=start, hosts=hosts)
    while not session.done:
        grower = session.begin()
        try:
            for index, message in grower.start().items():
                hosts[index - 1]("start_tree", message)
            for _ in range(guest.params.max_depth):
                requests = grower.request()
                replies = {i: hosts[i - 1]("histograms", r) for i, r in requests.items()}
                commits = grower.choose(replies)
                grower.apply({i: hosts[i - 1]("commit", c) for i, c in commits.items()})
        except (ShoalError, OSError) as exc:
            session.abort()
            raise VerticalTreeFailed(
                f"tree {len(session.trees)} failed ({exc}); {len(session.trees)} complete "
                "tree(s) are kept: resume with train_secureboost(..., start=error.model)",
                session.model(),
            ) from exc
        session.end(grower)
    return session.model()


class Boosting:
    """The guest's boosting state across trees: margins, the row and column samplers and
    the complete trees. :meth:`begin` starts a tree's :class:`Grower`, :meth:`end` adds it,
    :meth:`abort` forgets it (and rewinds the samplers, so a retry draws the same)."""

    def __init__(
        self,
        guest: GuestParty,
        widths: Sequence[int],
        *,
        start: VerticalModel | None = None,
        hosts: Sequence[Link] = (),
        margin: np.ndarray | None = None,
    ) -> None:
        params = guest.params
        n, d_guest = guest.codes.shape
        self.guest, self.hosts = guest, len(widths)
        self.offsets = np.cumsum([d_guest, *widths])
        self.d_total = int(self.offsets[-1])
        self.columns = feature_sampler(params, self.d_total)
        self.rows_rng = row_sampler(params)
        self.margin = np.full((n, params.outputs), base_margin(params), dtype=np.float32)
        self.trees: list[tuple[VerticalTree, ...]] = []
        self._round: list[VerticalTree] = []
        self._grad: np.ndarray | None = None
        self._hess: np.ndarray | None = None
        self._saved: tuple[Any, Any, np.ndarray] | None = None
        # the state before the last complete round: a coordinator that lost the reply
        # ending that round counts it as failed, and abort(keep=...) must undo it
        self._undo: tuple[Any, Any, np.ndarray] | None = None
        if start is not None:
            if start.params != params or start.hosts != len(widths):
                raise ConfigError(
                    "resume with the same parameters and hosts as the interrupted run"
                )
            self.trees = list(start.trees)
            if margin is not None:  # the guest's own saved margins after those trees
                saved = np.asarray(margin, dtype=np.float32).reshape(n, params.outputs)
                self.margin = np.ascontiguousarray(saved)
            elif start.trees:
                self.margin = _margin(start, guest.codes, hosts)
            for _ in range(len(start.trees) * params.outputs):  # replay their randomness
                if params.subsample < 1.0:
                    self.rows_rng.random(n)
                sample_features(self.columns, params, self.d_total)

    @property
    def done(self) -> bool:
        return len(self.trees) >= self.guest.params.n_trees

    def begin(self) -> Grower:
        guest, params = self.guest, self.guest.params
        k = len(self._round)
        if k == 0:
            self._saved = (
                self.rows_rng.bit_generator.state, self.columns.bit_generator.state,
                self.margin.copy(),
            )  # fmt: skip
            t0 = time.process_time()
            self._grad, self._hess = gradients(self.margin, guest.labels, params)
            _timed(guest.stats, "gradients", t0)
        assert self._grad is not None and self._hess is not None
        g, h = tree_gradients(self._grad[:, k], self._hess[:, k], params, self.rows_rng)
        mask = sample_features(self.columns, params, self.d_total)
        return Grower(guest, g, h, mask, self.offsets, records=self._last_records())

    def _last_records(self) -> dict[int, int]:
        """Each host's highest record id in the trees so far (-1: none): a host numbers its
        records in the order it makes them, so a new split must name a higher one."""
        last = dict.fromkeys(range(1, self.hosts + 1), -1)
        for t in [tree for r in self.trees for tree in r] + self._round:
            for o, sp in zip(t.owner[t.left >= 0].tolist(), t.split[t.left >= 0].tolist()):
                if o != GUEST:
                    last[o] = max(last[o], sp)
        return last

    def end(self, grower: Grower) -> VerticalTree:
        tree, leaves = grower.finish()
        self.margin[:, len(self._round)] += tree.value[leaves]
        self._round.append(tree)
        if len(self._round) == self.guest.params.outputs:
            self.trees.append(tuple(self._round))
            self._round = []
            self._undo, self._saved = self._saved, None
        return tree

    def abort(self, *, keep: int | None = None) -> None:
        """Forget the tree under way, with the finished trees of its round (a multi-class
        round's trees share one gradient): the next :meth:`begin` grows the round again.

        ``keep`` is the number of complete rounds the caller counts. One more than that
        (the round ended here but its last reply was lost) is undone too; anything else
        cannot be reconciled and is refused.
        """
        if keep is not None and keep != len(self.trees):
            if keep != len(self.trees) - 1 or self._undo is None or self._round:
                raise ProtocolError(
                    f"the guest has {len(self.trees)} complete round(s) of trees, the "
                    f"coordinator counts {keep}: cannot roll back to it"
                )
            self.trees.pop()
            self._saved, self._undo = self._undo, None
        if self._saved is not None:
            rows_state, columns_state, margin = self._saved
            self.rows_rng.bit_generator.state = rows_state
            self.columns.bit_generator.state = columns_state
            self.margin = margin
        self._round = []
        self._saved = None

    def model(self) -> VerticalModel:
        return VerticalModel(
            params=self.guest.params, bins=self.guest.bins, trees=tuple(self.trees),
            hosts=self.hosts,
        )  # fmt: skip


def _encrypt_rows(guest: GuestParty, g: np.ndarray, h: np.ndarray) -> tuple[Any, GHCodec]:
    scale = 2 ** (guest.params.fixed_point_bits or DEFAULT_FIXED_POINT)
    g_int = np.round(g * scale).astype(np.int64)
    h_int = np.round(h * scale).astype(np.int64)
    bound = max(1, math.ceil(max(np.abs(g).max(initial=0), h.max(initial=0))))
    codec = GHCodec(
        frac_bits=guest.params.fixed_point_bits or DEFAULT_FIXED_POINT,
        rows=len(g),
        key_bits=guest.public_key.bits,
        grad_bound=bound,
    )
    pk, n, pool = guest.public_key, guest.public_key.n, guest.pool
    cts = [
        pk.raw_encrypt(codec.row_plaintext(gi, hi, n), pool.take())
        for gi, hi in zip(g_int.tolist(), h_int.tolist())
    ]
    return paillier.ciphertexts_to_bytes(pk, cts), codec


class Grower:
    """One tree at the guest, as steps between messages to and from the hosts (host ``i``
    is numbered from 1, in the order of the hosts' columns):

    ``start()`` -> per host, the encrypted (g, h) and its sampled features; then for each
    level ``request()`` -> node positions for the hosts' histograms; ``choose(replies)`` ->
    per host, the splits it won (empty if none); ``apply(replies)`` moves the rows. After
    ``max_depth`` levels (empty once the tree stops growing), ``finish()``.
    """

    def __init__(
        self, guest: GuestParty, g: np.ndarray, h: np.ndarray, mask: np.ndarray,
        offsets: np.ndarray, *, records: Mapping[int, int] | None = None,
    ) -> None:  # fmt: skip
        self.guest, self.g, self.h, self.mask, self.offsets = guest, g, h, mask, offsets
        # per host: its highest record id so far (a new split must name a higher one)
        self.last_record = dict(records or dict.fromkeys(range(1, len(offsets)), -1))
        params = guest.params
        self.scale = float(2 ** (params.fixed_point_bits or DEFAULT_FIXED_POINT))
        self.nodes: dict[str, list[Any]] = {
            k: [] for k in ("left", "right", "owner", "split", "left_bins", "default_left", "g",
                            "h", "categorical")
        }  # fmt: skip
        self._add(float(g.sum()), float(h.sum()))
        self.pos = np.zeros(len(g), dtype=np.int64)
        self.parent_of: dict[int, int] = {}
        self.level = [0]
        self.best: list[Any] = []
        self.codec: GHCodec | None = None

    def _add(self, sg: float, sh: float) -> int:
        for key, value in zip(self.nodes, (-1, -1, GUEST, -1, 0, False, sg, sh, False)):
            self.nodes[key].append(value)
        return len(self.nodes["left"]) - 1

    def _features(self, index: int) -> np.ndarray:
        return np.flatnonzero(self.mask[self.offsets[index - 1] : self.offsets[index]])

    def start(self) -> dict[int, dict[str, Any]]:
        guest = self.guest
        t0 = time.process_time()
        blob, self.codec = _encrypt_rows(guest, self.g, self.h)
        _timed(guest.stats, "encrypt", t0)
        key = np.frombuffer(guest.public_key.to_bytes(), dtype=np.uint8)
        return {
            i: {"key": key, "rows": len(self.g), "frac_bits": self.codec.frac_bits,
                "grad_bound": self.codec.grad_bound, "ct": blob, "features": self._features(i)}
            for i in range(1, len(self.offsets))
        }  # fmt: skip

    def request(self) -> dict[int, dict[str, Any]]:
        """The guest's own best splits of this level, and the hosts' histogram request."""
        guest, params, nodes, level = self.guest, self.guest.params, self.nodes, self.level
        t0 = time.process_time()
        d_guest = guest.codes.shape[1]
        guest_mask = self.mask[:d_guest]
        # per node: (gain, owner, feature or tied ids, left_bins, default_left, left g,
        # left h, categorical)
        self.best = [(0.0, GUEST, -1, 0, False, 0.0, 0.0, False)] * len(level)
        if level and guest_mask.any():
            totals_g = np.asarray([nodes["g"][v] for v in level])
            totals_h = np.asarray([nodes["h"][v] for v in level])
            hg, hh = local_histograms(guest.codes, self.g, self.h, self.pos, np.asarray(level))
            own = best_splits(hg, hh, totals_g, totals_h, n_bins=guest.bins.n_bins,
                              features=guest_mask, params=params,
                              categorical=guest.bins.is_categorical)  # fmt: skip
            self.best = [
                (float(own.gain[i]), GUEST, int(own.feature[i]), int(own.left_bins[i]),
                 bool(own.default_left[i]), float(own.left_g[i]), float(own.left_h[i]),
                 bool(own.categorical[i]))
                for i in range(len(level))
            ]  # fmt: skip
        parent, sibling = [], []
        for v in level:
            if v in self.parent_of and not _built(v, self.parent_of, nodes):
                parent.append(self.parent_of[v])
                sibling.append(_sibling_of(v, self.parent_of, nodes))
            else:
                parent.append(-1)
                sibling.append(-1)
        _timed(guest.stats, "split", t0)
        message = {
            "pos": self.pos,
            "level": np.asarray(level, dtype=np.int64),
            "parent": np.asarray(parent, dtype=np.int64),
            "sibling": np.asarray(sibling, dtype=np.int64),
        }
        # a host with no sampled column, or an empty level, gets an empty request
        empty = {k: np.zeros(0, np.int64) for k in ("level", "parent", "sibling")}
        return {
            i: message if level and len(self._features(i)) else {**message, **empty}
            for i in range(1, len(self.offsets))
        }

    def choose(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Decrypt the hosts' candidates, keep each node's best split; per host, the nodes
        it won with the candidates of equal best gain (the host breaks the tie)."""
        guest, params, nodes, level = self.guest, self.guest.params, self.nodes, self.level
        assert self.codec is not None
        hosts = len(self.offsets) - 1
        if sorted(replies) != list(range(1, hosts + 1)):
            raise ProtocolError("a histogram reply is missing")
        totals_g = np.asarray([nodes["g"][v] for v in level])
        totals_h = np.asarray([nodes["h"][v] for v in level])
        t0 = time.process_time()
        for hi in range(1, hosts + 1):
            asked = len(level) if len(self._features(hi)) else 0
            sums = _decrypt(guest, self.codec, replies[hi], asked)
            t0 = _timed(guest.stats, "decrypt", t0)
            for i in range(asked):
                if not sums[i]:
                    continue
                pairs = np.asarray(sums[i], dtype=np.float64) / self.scale
                lg, lh = pairs[:, 0], pairs[:, 1]
                pg, ph = totals_g[i], totals_h[i]
                rg, rh = pg - lg, ph - lh
                root = np.float32(node_gain(np.asarray(pg), np.asarray(ph), params.reg_lambda))
                both = (node_gain(lg, lh, params.reg_lambda) +
                        node_gain(rg, rh, params.reg_lambda)).astype(np.float32)  # fmt: skip
                gain = (both - root).astype(np.float32)
                ok = (lh >= params.min_child_weight) & (rh >= params.min_child_weight)
                gain = np.where(ok, gain, -np.inf)
                top = float(gain.max())
                if not top > max(self.best[i][0], 0.0):
                    continue  # the guest (lower feature indices) or an earlier host wins ties
                tied = np.flatnonzero(gain == top)
                self.best[i] = (top, hi, tied, 0, False, lg, lh, False)
            t0 = _timed(guest.stats, "split", t0)
        commits: dict[int, dict[str, list[Any]]] = {
            i: {"nodes": [], "ids": [], "counts": []} for i in range(1, hosts + 1)
        }
        for i, v in enumerate(level):
            gain, owner, tied, _, _, lg, lh, _ = self.best[i]
            if owner == GUEST or gain <= RT_EPS or gain < params.gamma:
                continue
            c = commits[owner]
            c["nodes"].append(v)
            c["ids"] += tied.tolist()
            c["counts"].append(len(tied))
        _timed(guest.stats, "split", t0)
        return {
            i: {"nodes": np.asarray(c["nodes"], np.int64), "ids": np.asarray(c["ids"], np.int64),
                "counts": np.asarray(c["counts"], np.int64), "pos": self.pos}
            for i, c in commits.items()
        }  # fmt: skip

    def apply(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        """Split this level's nodes (host splits as the hosts answered) and move the rows."""
        guest, params, nodes = self.guest, self.guest.params, self.nodes
        t0 = time.process_time()
        answers: dict[int, tuple[int, int, np.ndarray]] = {}  # node -> (record, choice, left)
        for hi, reply in replies.items():
            asked = [v for i, v in enumerate(self.level)
                     if self.best[i][1] == hi and self.best[i][0] > RT_EPS
                     and self.best[i][0] >= params.gamma]  # fmt: skip
            records = np.asarray(reply["records"], dtype=np.int64)
            chosen = np.asarray(reply["chosen"], dtype=np.int64)
            bits = np.asarray(reply["left"]).astype(bool)
            sizes = [int((self.pos == v).sum()) for v in asked]
            if (
                records.shape != (len(asked),)
                or chosen.shape != (len(asked),)
                or bits.shape != (sum(sizes),)
            ):
                raise ProtocolError(f"host {hi} answered for the wrong nodes or rows")
            if len(records) and (
                records[0] <= self.last_record[hi] or (np.diff(records) <= 0).any()
            ):
                raise ProtocolError(
                    f"host {hi} named a split record it used before (or a negative one): "
                    "each split it wins is a new record"
                )
            if len(records):
                self.last_record[hi] = int(records[-1])
            ends = np.cumsum(sizes)
            for j, v in enumerate(asked):
                answers[v] = (int(records[j]), int(chosen[j]), bits[ends[j] - sizes[j] : ends[j]])
        next_level: list[int] = []
        for i, v in enumerate(self.level):
            gain, owner, split, left_bins, default_left, lg_, lh_, cat = self.best[i]
            if owner != GUEST:
                if v not in answers:
                    continue  # below gamma: not asked
                record, choice, go = answers[v]
                if not 0 <= choice < len(lg_) or choice not in set(split.tolist()):
                    raise ProtocolError(f"host {owner} chose a candidate it was not offered")
                split, lg_, lh_ = record, float(lg_[choice]), float(lh_[choice])
                # the rows the host sends left must carry the sums it offered for the split
                # (fixed point: the sums are exact), or the tree would be built on a lie
                mine = np.flatnonzero(self.pos == v)[go]
                if self.g[mine].sum() != lg_ or self.h[mine].sum() != lh_:
                    raise ProtocolError(
                        f"host {owner}: the rows it sends left at node {v} do not carry the "
                        "(g, h) sums of the candidate it offered for that split"
                    )
            rg_, rh_ = nodes["g"][v] - lg_, nodes["h"][v] - lh_
            if gain <= RT_EPS or gain < params.gamma or lh_ == 0 or rh_ == 0:
                continue
            rows = np.flatnonzero(self.pos == v)
            if owner == GUEST:
                go = goes_left(guest.codes[rows, split], left_bins, default_left, cat)
            left, right = self._add(lg_, lh_), self._add(rg_, rh_)
            nodes["left"][v], nodes["right"][v] = left, right
            nodes["owner"][v], nodes["split"][v] = owner, split
            nodes["left_bins"][v], nodes["default_left"][v] = left_bins, default_left
            nodes["categorical"][v] = owner == GUEST and cat
            self.parent_of[left] = self.parent_of[right] = v
            self.pos[rows] = np.where(go, left, right)
            next_level += [left, right]
        self.level = next_level
        _timed(guest.stats, "split", t0)

    def finish(self) -> tuple[VerticalTree, np.ndarray]:
        """The tree (leaf values at the guest) and each row's leaf."""
        nodes, params = self.nodes, self.guest.params
        leaves = [v for v in range(len(nodes["left"])) if nodes["left"][v] < 0]
        weights = leaf_weight(
            np.asarray([nodes["g"][v] for v in leaves]),
            np.asarray([nodes["h"][v] for v in leaves]),
            params,
        )
        value = np.zeros(len(nodes["left"]), dtype=np.float32)
        value[leaves] = weights * np.float32(params.learning_rate)
        tree = VerticalTree(
            left=np.asarray(nodes["left"], dtype=np.int64),
            right=np.asarray(nodes["right"], dtype=np.int64),
            owner=np.asarray(nodes["owner"], dtype=np.int64),
            split=np.asarray(nodes["split"], dtype=np.int64),
            left_bins=np.asarray(nodes["left_bins"], dtype=np.int64),
            default_left=np.asarray(nodes["default_left"], dtype=bool),
            value=value,
            categorical=np.asarray(nodes["categorical"], dtype=bool),
        )
        return tree, self.pos


def _built(v: int, parent_of: Mapping[int, int], nodes: Mapping[str, list[Any]]) -> bool:
    s = _sibling_of(v, parent_of, nodes)
    h, hs = nodes["h"][v], nodes["h"][s]
    return bool(h < hs or (h == hs and v < s))


def _sibling_of(v: int, parent_of: Mapping[int, int], nodes: Mapping[str, list[Any]]) -> int:
    p = parent_of[v]
    return int(nodes["right"][p] if nodes["left"][p] == v else nodes["left"][p])


def _decrypt(
    guest: GuestParty, codec: GHCodec, reply: Mapping[str, Any], nodes: int
) -> list[list[tuple[int, int]]]:
    P = paillier
    counts = np.asarray(reply["counts"], dtype=np.int64)
    packed = np.asarray(reply["packed"], dtype=np.int64)
    if counts.shape != (nodes,) or packed.shape != (nodes,):
        raise ProtocolError("a host's histogram reply does not match the level")
    cts = P.ciphertexts_from_bytes(guest.public_key, reply["ct"])
    if len(cts) != int(packed.sum()) or (packed != -(-counts // codec.slots)).any():
        raise ProtocolError("a host's histogram reply has the wrong number of ciphertexts")
    sk, n = guest.private_key, guest.public_key.n
    out, at = [], 0
    for count, k in zip(counts.tolist(), packed.tolist()):
        plains = [sk.raw_decrypt(c) for c in cts[at : at + k]]
        at += k
        out.append(codec.unpack(plains, count, n))
    return out


def predict_vertical(
    model: VerticalModel, x_guest: np.ndarray, hosts: Sequence[Link], *, x_hosts: Any = None
) -> np.ndarray:
    """Federated prediction: hosts answer directions for their records, the guest walks.

    ``x_hosts[h]`` (optional) is passed to host ``h`` as the rows to score; by default each
    host scores its training rows.
    """
    margin = _margin(model, model.bins.transform(x_guest), hosts, x_hosts=x_hosts)
    return predict_from_margin(margin, model.params)


def _margin(
    model: VerticalModel, codes: np.ndarray, hosts: Sequence[Link], *, x_hosts: Any = None
) -> np.ndarray:
    n = len(codes)
    # one matrix of directions per owner: row = a host record, column = a row to score
    where: list[dict[int, int]] = [{}]
    bits_of: list[np.ndarray] = [np.zeros((0, n), dtype=bool)]
    for h, link in enumerate(hosts, start=1):
        wanted = sorted(
            {int(t.split[v]) for r in model.trees for t in r for v in
             np.flatnonzero((t.owner == h) & (t.left >= 0))}
        )  # fmt: skip
        payload: dict[str, Any] = {"records": np.asarray(wanted, dtype=np.int64)}
        if x_hosts is not None:
            payload["x"] = np.asarray(x_hosts[h - 1], dtype=np.float64)
        bits = np.asarray(link("decide", payload)["left"]).astype(bool)
        if bits.shape != (len(wanted), n):
            raise ProtocolError(f"host {h} answered for the wrong rows or records")
        where.append({record: i for i, record in enumerate(wanted)})
        bits_of.append(bits)
    margin = np.full((n, model.params.outputs), base_margin(model.params), dtype=np.float32)
    rows = np.arange(n)
    for round_trees in model.trees:
        for k, t in enumerate(round_trees):
            # per node: which matrix row holds its direction (host nodes)
            slot = np.asarray(
                [where[o].get(int(sp), 0) if o != GUEST else 0 for o, sp in zip(t.owner, t.split)],
                dtype=np.int64,
            )
            pos = np.zeros(n, dtype=np.int64)
            for _ in range(len(t.left)):
                inner = t.left[pos] >= 0
                if not inner.any():
                    break
                owner = t.owner[pos]
                feature = np.where(owner == GUEST, np.maximum(t.split[pos], 0), 0)
                go = goes_left(codes[rows, feature], t.left_bins[pos], t.default_left[pos],
                               t.categorical[pos])  # fmt: skip
                for h in range(1, len(bits_of)):
                    mine = inner & (owner == h)
                    if mine.any():
                        go[mine] = bits_of[h][slot[pos[mine]], rows[mine]]
                pos = np.where(inner, np.where(go, t.left[pos], t.right[pos]), pos)
            margin[:, k] += t.value[pos]
    return margin
