"""DataSpec: a simulation's node data as a description (data set name or file, partition).

A description, not arrays: an engine whose nodes run in other processes (RayEngine) sends
the spec as JSON and each worker builds the nodes it hosts from it, on first use, with the
same partition the coordinator's own process would make. Job files' ``[data]`` tables
become one.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.data.builtin import DATASETS, load_dataset
from shoal.data.dataset import Dataset
from shoal.data.files import is_file, load_csv, load_npz
from shoal.data.partition import SCHEMES, LazyPartition, partition
from shoal.data.split import split_holdout
from shoal.errors import DataError

__all__ = ["DataSpec"]

_PARTITION_KEYS = {"scheme", "nodes", "alpha", "shards_per_node", "min_size"}


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Node data from a built-in ``dataset`` or a CSV/.npz ``path``, split by ``partition``.

    ``partition`` takes ``scheme`` (iid, dirichlet, shards, quantity), ``nodes``, ``alpha``,
    ``shards_per_node`` and ``min_size``, as in a job's ``[data.partition]``. ``path`` must
    name the same file on every machine that hosts nodes.
    """

    dataset: str | None = None
    path: str | None = None
    label: str = "label"
    test_path: str | None = None
    test_fraction: float = 0.2
    partition: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    # CSV columns of category labels -> their categories (None: the file's sorted labels)
    categorical: Mapping[str, list[str] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.path is None):
            raise DataError(
                f"a DataSpec needs exactly one of dataset (one of {', '.join(DATASETS)}) or "
                "path (a CSV or .npz file)"
            )
        if self.dataset is not None and self.dataset not in DATASETS:
            raise DataError(
                f"unknown data set {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        unknown = sorted(set(self.partition) - _PARTITION_KEYS)
        if unknown:
            raise DataError(
                f"unknown partition key(s) {unknown}; allowed: {', '.join(sorted(_PARTITION_KEYS))}"
            )
        scheme = self.partition.get("scheme", "iid")
        if scheme not in SCHEMES or scheme == "by_key":
            allowed = ", ".join(s for s in SCHEMES if s != "by_key")
            raise DataError(f"partition scheme {scheme!r} is not known; choose one of {allowed}")
        nodes = self.partition.get("nodes", 10)
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise DataError(f"partition nodes must be a positive integer, got {nodes!r}")
        if not 0 < self.test_fraction < 1:
            raise DataError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        object.__setattr__(self, "partition", dict(self.partition))

    @property
    def nodes(self) -> int:
        return int(self.partition.get("nodes", 10))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise DataError(f"not a data description: {exc}") from None
        if not isinstance(raw, dict):
            raise DataError("a data description is a JSON object")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise DataError(f"not a data description: {exc}") from None

    def load(self) -> tuple[Dataset, Dataset]:
        """(pooled training data, test data)."""
        if self.dataset is not None:
            return load_dataset(self.dataset, test_fraction=self.test_fraction, seed=self.seed)
        assert self.path is not None
        full = _load_file(Path(self.path), self.label, self.categorical)
        if self.test_path is not None:
            # the test file codes its categories with the training file's tables
            tables = {k: list(v) for k, v in (full.categories or {}).items()}
            return full, _load_file(Path(self.test_path), self.label, tables)
        return split_holdout(full, fraction=self.test_fraction, seed=self.seed)

    def partitions(self, train: Dataset | None = None, *, lazy: bool = False) -> Any:
        """Every node's data (a list, or a LazyPartition that builds each on demand)."""
        if train is None:
            train, _ = self.load()
        spec = self.partition
        return partition(
            train,
            nodes=self.nodes,
            scheme=spec.get("scheme", "iid"),
            alpha=spec.get("alpha", 0.5),
            shards_per_node=spec.get("shards_per_node", 2),
            min_size=spec.get("min_size", 1),
            seed=self.seed,
            lazy=lazy,
        )

    def node(self, index: int) -> Dataset:
        """Node ``index``'s data, the same as ``partitions()[index]``; the partition is made
        once per process and description (a few are kept)."""
        if not 0 <= index < self.nodes:
            raise DataError(f"node index must be in [0, {self.nodes}), got {index}")
        parts = _partitioned(self)
        node: Dataset = parts[index]
        return node


def _load_file(
    path: Path, label: str, categorical: Mapping[str, list[str] | None] | None = None
) -> Dataset:
    if not is_file(path, "[data] path") and not path.exists():
        raise DataError(f"[data] path {str(path)!r} does not exist")
    if path.suffix.lower() == ".npz":
        if categorical:
            raise DataError("categorical columns are read from a CSV file's text, not .npz")
        return load_npz(path)
    return load_csv(path, label=label, categorical=categorical)


_KEPT = 4
_partitions: OrderedDict[str, LazyPartition] = OrderedDict()
_lock = threading.Lock()


def _partitioned(spec: DataSpec) -> LazyPartition:
    key = spec.to_json()
    with _lock:
        found = _partitions.get(key)
        if found is not None:
            _partitions.move_to_end(key)
            return found
    made: LazyPartition = spec.partitions(lazy=True)
    with _lock:
        _partitions[key] = made
        while len(_partitions) > _KEPT:
            _partitions.popitem(last=False)
    return made
