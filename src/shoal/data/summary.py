"""Describe a partition: per-node sizes and label histograms, as numbers, JSON, or a text table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.data.dataset import Dataset
from shoal.data.partition import LazyPartition
from shoal.errors import DataError

__all__ = ["PartitionSummary", "summary"]

_BARS = " ▁▂▃▄▅▆▇█"
# Above this many classes a per-class bar chart no longer fits a terminal row.
_MAX_BAR_CLASSES = 32


@dataclass(frozen=True, eq=False, kw_only=True)
class PartitionSummary:
    """Sizes and label counts of each node of a partition.

    ``label_counts[i, c]`` is how many samples of class c node i holds (None for regression).
    """

    names: tuple[str, ...]
    sizes: npt.NDArray[np.int64]
    classes: int | None
    label_counts: npt.NDArray[np.int64] | None

    @property
    def nodes(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    @property
    def min_size(self) -> int:
        return int(self.sizes.min())

    @property
    def median_size(self) -> float:
        return float(np.median(self.sizes))

    @property
    def max_size(self) -> int:
        return int(self.sizes.max())

    @property
    def labels_per_node(self) -> npt.NDArray[np.int64] | None:
        """Distinct labels each node holds."""
        if self.label_counts is None:
            return None
        return np.asarray((self.label_counts > 0).sum(axis=1), dtype=np.int64)

    @property
    def label_entropy(self) -> npt.NDArray[np.float64] | None:
        """Entropy (bits) of each node's label distribution: 0 for one label, log2(K) uniform."""
        if self.label_counts is None:
            return None
        counts = self.label_counts.astype(np.float64)
        p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log2(p), 0.0)
        return np.asarray(terms.sum(axis=1), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (ints, floats, lists)."""
        out: dict[str, Any] = {
            "nodes": self.nodes,
            "samples": self.total,
            "classes": self.classes,
            "size": {
                "min": self.min_size,
                "median": self.median_size,
                "max": self.max_size,
                "mean": float(self.sizes.mean()),
            },
            "names": list(self.names),
            "sizes": [int(s) for s in self.sizes],
        }
        if self.label_counts is not None:
            lpn = self.labels_per_node
            ent = self.label_entropy
            assert lpn is not None and ent is not None
            out["label_counts"] = self.label_counts.tolist()
            out["labels_per_node"] = {
                "min": int(lpn.min()),
                "median": float(np.median(lpn)),
                "max": int(lpn.max()),
            }
            out["mean_label_entropy_bits"] = float(ent.mean())
        return out

    def headline(self) -> str:
        """One line: node count, samples, size spread and label spread."""
        parts = [
            f"{self.nodes} nodes",
            f"{self.total} samples",
            f"size min {self.min_size} / median {self.median_size:g} / max {self.max_size}",
        ]
        lpn = self.labels_per_node
        if lpn is not None:
            parts.append(
                f"{self.classes} classes, labels per node min {int(lpn.min())} / median "
                f"{float(np.median(lpn)):g} / max {int(lpn.max())}"
            )
        return " · ".join(parts)

    def _rows(self, max_rows: int) -> list[tuple[str, str, str, str] | None]:
        """Table rows (node, size, labels, histogram); None marks the elided middle."""
        shown: list[int | None]
        if self.nodes <= max_rows:
            shown = list(range(self.nodes))
        else:
            head = max(1, max_rows // 2)
            tail = max(1, max_rows - head)
            shown = [*range(head), None, *range(self.nodes - tail, self.nodes)]
        lpn = self.labels_per_node
        rows: list[tuple[str, str, str, str] | None] = []
        for i in shown:
            if i is None:
                rows.append(None)
                continue
            labels = str(int(lpn[i])) if lpn is not None else "-"
            rows.append((self.names[i], str(int(self.sizes[i])), labels, self._histogram(i)))
        return rows

    def _histogram(self, i: int) -> str:
        if self.label_counts is None:
            return ""
        counts = self.label_counts[i]
        top = counts.max()
        if top == 0:
            return ""
        if len(counts) <= _MAX_BAR_CLASSES:
            # Bars relative to the node's largest class; any sample at all shows a bar.
            levels = np.where(counts > 0, np.ceil(counts / top * (len(_BARS) - 1)), 0)
            return "".join(_BARS[int(v)] for v in levels)
        best = np.argsort(-counts, kind="stable")[:3]
        return " ".join(f"{int(c)}x{int(counts[c])}" for c in best if counts[c] > 0)

    def _histogram_title(self) -> str:
        if self.classes is None:
            return ""
        if self.classes <= _MAX_BAR_CLASSES:
            return f"labels 0..{self.classes - 1}"
        return "top labels (label x count)"

    def format(self, *, max_rows: int = 12) -> str:
        """A compact plain-text table; partitions longer than ``max_rows`` show head and tail."""
        title = ("node", "size", "labels", self._histogram_title())
        rows = self._rows(max_rows)
        present = [r for r in rows if r is not None]
        widths = [max(len(title[j]), *(len(r[j]) for r in present)) for j in range(4)]
        hidden = self.nodes - len(present)

        def line(cells: tuple[str, str, str, str]) -> str:
            return "  ".join(
                [
                    cells[0].ljust(widths[0]),
                    cells[1].rjust(widths[1]),
                    cells[2].rjust(widths[2]),
                    cells[3],
                ]
            ).rstrip()

        out = [self.headline(), line(title)]
        for r in rows:
            out.append(f"... {hidden} more nodes ..." if r is None else line(r))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=self.headline(), title_justify="left")
        table.add_column("node")
        table.add_column("size", justify="right")
        table.add_column("labels", justify="right")
        table.add_column(self._histogram_title())
        rows = self._rows(12)
        hidden = self.nodes - sum(r is not None for r in rows)
        for r in rows:
            if r is None:
                table.add_row(f"... {hidden} more", "", "", "")
            else:
                table.add_row(*r)
        return table


def summary(parts: Sequence[Dataset] | LazyPartition | Mapping[str, Dataset]) -> PartitionSummary:
    """Summarize a partition: a list of node Datasets, a LazyPartition, or a name -> Dataset map.

    A LazyPartition is summarized from its labels alone, without building any node's features.
    """
    if isinstance(parts, LazyPartition):
        return _summarize_lazy(parts)
    if isinstance(parts, Mapping):
        names = tuple(str(k) for k in parts)
        datasets = list(parts.values())
    else:
        datasets = list(parts)
        names = tuple(d.name if isinstance(d, Dataset) else "" for d in datasets)
    if not datasets:
        raise DataError("summary needs at least one node's Dataset")
    for d in datasets:
        if not isinstance(d, Dataset):
            raise DataError(f"summary expects shoal Datasets, got {type(d).__name__}")
    sizes = np.array([len(d) for d in datasets], dtype=np.int64)
    kinds = {d.classes is None for d in datasets}
    if len(kinds) > 1:
        raise DataError("summary got a mix of classification and regression data sets")
    if datasets[0].classes is None:
        return PartitionSummary(names=names, sizes=sizes, classes=None, label_counts=None)
    classes = max(int(d.classes or 0) for d in datasets)
    counts = np.stack([np.bincount(d.y, minlength=classes) for d in datasets]).astype(np.int64)
    return PartitionSummary(names=names, sizes=sizes, classes=classes, label_counts=counts)


def _summarize_lazy(part: LazyPartition) -> PartitionSummary:
    ds = part.dataset
    sizes = part.sizes.astype(np.int64)
    names = tuple(part.name(i) for i in range(len(part)))
    if ds.classes is None:
        return PartitionSummary(names=names, sizes=sizes, classes=None, label_counts=None)
    node_of = np.repeat(np.arange(len(part), dtype=np.int64), sizes)
    labels = ds.y[part.order]
    flat = np.bincount(node_of * ds.classes + labels, minlength=len(part) * ds.classes)
    counts = flat.reshape(len(part), ds.classes).astype(np.int64)
    return PartitionSummary(names=names, sizes=sizes, classes=ds.classes, label_counts=counts)
