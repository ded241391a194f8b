"""When simulated nodes are online: diurnal, random, or from a trace file.

An :class:`Availability` answers, for node index ``i`` and virtual time ``t`` (seconds), whether
the node is online and until when it stays online. LocalEngine asks it when a task starts (an
offline node is dropped) and whether the node stays online until its task ends (else it drops
out mid-task). Every model is deterministic for its seed and keeps O(1) or a few bytes of
memory per node, so that 10^5 to 10^6 registered nodes cost little while idle.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError, DataError

__all__ = [
    "Availability",
    "Diurnal",
    "RandomAvailability",
    "TraceAvailability",
]

DAY_S = 86_400.0


@runtime_checkable
class Availability(Protocol):
    """Whether node ``index`` (of ``nodes``) is online at virtual time ``t``."""

    def online(self, t: float, nodes: int) -> np.ndarray:
        """A boolean mask over all ``nodes`` at time ``t``."""
        ...

    def online_until(self, index: int, t: float, nodes: int) -> float:
        """When node ``index``'s online spell containing ``t`` ends: ``t`` itself if the node
        is offline at ``t``, ``math.inf`` if it never goes offline."""
        ...


# -- diurnal ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Diurnal:
    """Each node is online for ``online_hours`` a day, starting at its own local hour.

    Phones train at night, charging on Wi-Fi: node i's window starts at ``start_hour`` plus
    a per-node offset drawn from N(0, ``spread_hours``^2) (time zones, habits), so the number
    of nodes online rises and falls over the day. Offsets are drawn once, on first use
    (8 bytes a node).
    """

    online_hours: float = 8.0
    start_hour: float = 0.0
    spread_hours: float = 4.0
    period_s: float = DAY_S
    seed: int = 0
    _phases: dict[int, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not self.period_s > 0 or not math.isfinite(self.period_s):
            raise ConfigError(f"Diurnal.period_s must be a positive number, got {self.period_s}")
        if not 0 < self.online_hours * 3600.0 <= self.period_s:
            raise ConfigError(
                f"Diurnal.online_hours must be in (0, {self.period_s / 3600:g}], "
                f"got {self.online_hours}"
            )
        if not self.spread_hours >= 0 or not math.isfinite(self.start_hour):
            raise ConfigError("Diurnal.spread_hours must be >= 0 and start_hour finite")

    def _phase(self, nodes: int) -> np.ndarray:
        phases = self._phases.get(nodes)
        if phases is None:
            rng = np.random.default_rng([self.seed, nodes])
            offsets = rng.normal(0.0, self.spread_hours * 3600.0, size=nodes)
            phases = np.mod(self.start_hour * 3600.0 + offsets, self.period_s)
            self._phases.clear()  # one federation size at a time
            self._phases[nodes] = phases
        return phases

    def _window_end(self, t: float, phase: Any) -> Any:
        """The end of the window of the day containing ``t`` (online iff ``t`` is before it).

        online() and online_until() share this arithmetic, so a node is offline exactly at
        the time online_until() gives, to the last bit."""
        start = phase + np.floor((t - phase) / self.period_s) * self.period_s
        return start + self.online_hours * 3600.0

    def online(self, t: float, nodes: int) -> np.ndarray:
        mask: np.ndarray = t < self._window_end(t, self._phase(nodes))
        return mask

    def online_until(self, index: int, t: float, nodes: int) -> float:
        if self.online_hours * 3600.0 >= self.period_s:
            return math.inf
        end = float(self._window_end(t, self._phase(nodes)[index]))
        return end if t < end else t


# -- random -------------------------------------------------------------------------------


def _uniform(seed: int, index: np.ndarray | int, slot: np.ndarray | int) -> np.ndarray:
    """A uniform [0, 1) number per (seed, node, slot), from a splitmix64 hash: one node's
    draw for one slot costs no draw for the others (so no per-node generator is kept)."""
    with np.errstate(over="ignore"):
        x = (
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            ^ np.asarray(index, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            ^ np.asarray(slot, dtype=np.uint64) * np.uint64(0x94D049BB133111EB)
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    out: np.ndarray = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return out


@dataclass(frozen=True, kw_only=True)
class RandomAvailability:
    """Time cut into slots of ``slot_s``; each node is online in each slot with probability
    ``online``, independently (a hash of seed, node and slot: nothing is stored per node)."""

    online_fraction: float = 0.5
    slot_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.online_fraction <= 1.0:
            raise ConfigError(
                f"RandomAvailability.online_fraction is in [0, 1], got {self.online_fraction}"
            )
        if not self.slot_s > 0 or not math.isfinite(self.slot_s):
            raise ConfigError(f"RandomAvailability.slot_s must be positive, got {self.slot_s}")

    def _slot(self, t: float) -> int:
        return max(0, math.floor(t / self.slot_s))

    def online(self, t: float, nodes: int) -> np.ndarray:
        draws = _uniform(self.seed, np.arange(nodes, dtype=np.uint64), self._slot(t))
        mask: np.ndarray = draws < self.online_fraction
        return mask

    def online_until(self, index: int, t: float, nodes: int) -> float:
        if self.online_fraction >= 1.0:
            return math.inf
        slot = self._slot(t)
        if not _uniform(self.seed, index, slot) < self.online_fraction:
            return t
        # Look ahead a block of slots at a time; P(online for 4096 slots) is negligible
        # unless online_fraction is ~1, in which case the node is online "for ever".
        for start in range(slot + 1, slot + 1 + 4096, 256):
            block = _uniform(self.seed, index, np.arange(start, start + 256, dtype=np.uint64))
            off = np.flatnonzero(block >= self.online_fraction)
            if off.size:
                return float((start + int(off[0])) * self.slot_s)
        return math.inf


# -- traces -------------------------------------------------------------------------------


class TraceAvailability:
    """Online intervals per node, e.g. from a CSV of ``node,online_from,online_to`` (seconds).

    Nodes without a row are never online. Intervals of one node may touch or overlap (they
    are merged). Stored as three flat arrays: 8 bytes a node plus 16 an interval.
    """

    def __init__(self, intervals: Iterable[tuple[int, float, float]], *, nodes: int) -> None:
        rows = sorted(intervals)
        for index, start, end in rows:
            if not 0 <= index < nodes:
                raise ConfigError(f"trace interval for node index {index} of {nodes} nodes")
            if not (math.isfinite(start) and math.isfinite(end) and start < end):
                raise ConfigError(f"trace interval [{start}, {end}) must be finite and non-empty")
        merged: list[tuple[int, float, float]] = []
        for index, start, end in rows:
            if merged and merged[-1][0] == index and start <= merged[-1][2]:
                last = merged[-1]
                merged[-1] = (index, last[1], max(last[2], end))
            else:
                merged.append((index, start, end))
        self.nodes = nodes
        owner = np.fromiter((m[0] for m in merged), dtype=np.int64, count=len(merged))
        self._starts = np.fromiter((m[1] for m in merged), dtype=np.float64, count=len(merged))
        self._ends = np.fromiter((m[2] for m in merged), dtype=np.float64, count=len(merged))
        self._offsets = np.searchsorted(owner, np.arange(nodes + 1))
        self._owner = owner

    @classmethod
    def from_csv(cls, path: str | Path, *, node_ids: Sequence[str]) -> TraceAvailability:
        """Read ``node,online_from,online_to`` rows (a header line is optional).

        ``node`` is a node id of the federation (``n17``) or its index (``17``). Raises
        DataError naming the line of the first bad row and what is wrong with it.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read availability trace {str(path)!r}: {exc}") from None
        return cls.parse(text.splitlines(), node_ids=node_ids, source=str(path))

    @classmethod
    def parse(
        cls, lines: Iterable[str], *, node_ids: Sequence[str], source: str = "trace"
    ) -> TraceAvailability:
        index_of = {node: i for i, node in enumerate(node_ids)}
        nodes = len(node_ids)
        intervals: list[tuple[int, float, float]] = []
        for number, row in enumerate(csv.reader(lines), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines are allowed anywhere
            where = f"{source} line {number}"
            if len(row) != 3:
                raise DataError(
                    f"{where}: expected 3 fields (node,online_from,online_to), got {len(row)}"
                )
            node, raw_start, raw_end = (cell.strip() for cell in row)
            if number == 1 and not intervals and _is_header(raw_start, raw_end):
                continue
            index = index_of.get(node)
            if index is None and node.isdigit() and int(node) < nodes:
                index = int(node)
            if index is None:
                raise DataError(
                    f"{where}: unknown node {node[:60]!r}; use a node id of the federation "
                    f"(e.g. {node_ids[0]!r}) or an index below {nodes}"
                )
            start = _seconds(raw_start, where, "online_from")
            end = _seconds(raw_end, where, "online_to")
            if start < 0:
                raise DataError(f"{where}: online_from must be >= 0 seconds, got {raw_start}")
            if not start < end:
                raise DataError(
                    f"{where}: online_to ({raw_end}) must be after online_from ({raw_start})"
                )
            intervals.append((index, start, end))
        return cls(intervals, nodes=nodes)

    def _check(self, nodes: int) -> None:
        if nodes != self.nodes:
            raise ConfigError(f"this trace describes {self.nodes} nodes, not {nodes}")

    def online(self, t: float, nodes: int) -> np.ndarray:
        self._check(nodes)
        hit = (self._starts <= t) & (t < self._ends)
        mask = np.zeros(nodes, dtype=bool)
        mask[self._owner[hit]] = True
        return mask

    def online_until(self, index: int, t: float, nodes: int) -> float:
        self._check(nodes)
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        starts = self._starts[lo:hi]
        k = int(np.searchsorted(starts, t, side="right")) - 1
        if k >= 0 and t < self._ends[lo + k]:
            return float(self._ends[lo + k])
        return t

    def intervals(self, index: int) -> list[tuple[float, float]]:
        """Node ``index``'s merged online intervals, in order."""
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        return [(float(a), float(b)) for a, b in zip(self._starts[lo:hi], self._ends[lo:hi])]


def _is_header(*cells: str) -> bool:
    try:
        for cell in cells:
            float(cell)
    except ValueError:
        return True
    return False


def _seconds(raw: str, where: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{where}: {name} must be a number of seconds, got {raw[:60]!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {name} must be finite, got {raw[:60]!r}")
    return value
