"""Simulated devices: per-node compute speed and link bandwidth, and the virtual clock.

A task's virtual duration at node i is the time to download its payload, run it and upload
the reply: ``bytes * 8 / (mbps * 1e6)`` each way, plus its compute time (the nominal
``compute_s`` of the task, else the measured time) divided by the node's speed. So a 10 MB
model costs 80 virtual seconds to download on a 1 Mbit/s link, whatever this machine does.
Per-node values are float32 arrays (4 bytes a node each) or one number for every node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.errors import ConfigError

__all__ = ["Devices", "VirtualClock"]


class VirtualClock:
    """Simulated seconds since the start of a run.

    A LocalEngine starts each dispatch at ``now`` and moves ``now`` to the dispatch's end
    (its slowest answer, or its deadline when a node timed out). An event-driven algorithm
    (FedBuff) sets ``now`` to the time of the event it handles: tasks run eagerly, so a
    dispatch started at an earlier time than the last one's end is fine.
    """

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = float(now)

    def set(self, t: float) -> None:
        if not (math.isfinite(t) and t >= 0):
            raise ConfigError(f"virtual time must be a finite number >= 0, got {t}")
        self.now = float(t)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self.now:.6g})"


PerNode = float | np.ndarray


def _per_node(name: str, value: Any, nodes: int | None, *, allow_inf: bool) -> PerNode:
    if np.ndim(value) == 0:
        number = float(value)
        if not number > 0 or (math.isinf(number) and not allow_inf) or math.isnan(number):
            raise ConfigError(f"Devices.{name} must be a positive number, got {value!r}")
        return number
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 1 or (nodes is not None and len(array) != nodes):
        raise ConfigError(f"Devices.{name} must be one number or one per node, got {array.shape}")
    if not bool(np.all(array > 0)) or (not allow_inf and not bool(np.all(np.isfinite(array)))):
        raise ConfigError(f"Devices.{name} must hold positive numbers only")
    return array


@dataclass(frozen=True, kw_only=True)
class Devices:
    """Compute speed and bandwidth of every node, for the virtual clock.

    ``speed``: relative compute speed (1.0: nominal, 0.1: ten times slower). ``down_mbps`` /
    ``up_mbps``: link bandwidth in Mbit/s (inf: free transfers). ``compute_s``: nominal
    seconds a task takes at speed 1, by task name; a task not named costs its measured
    time on this machine. Each is one number, or an array with one value per node.
    """

    speed: PerNode = 1.0
    down_mbps: PerNode = math.inf
    up_mbps: PerNode = math.inf
    compute_s: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = (self.speed, self.down_mbps, self.up_mbps)
        sizes = {int(np.shape(v)[0]) for v in values if np.ndim(v) == 1}
        if len(sizes) > 1:
            raise ConfigError(f"Devices arrays must have one length, got {sorted(sizes)}")
        nodes = next(iter(sizes), None)
        object.__setattr__(self, "speed", _per_node("speed", self.speed, nodes, allow_inf=False))
        for name in ("down_mbps", "up_mbps"):
            object.__setattr__(
                self, name, _per_node(name, getattr(self, name), nodes, allow_inf=True)
            )
        for task, seconds in self.compute_s.items():
            if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
                raise ConfigError(f"Devices.compute_s[{task!r}] must be >= 0 s, got {seconds!r}")
        object.__setattr__(self, "compute_s", dict(self.compute_s))

    @property
    def nodes(self) -> int | None:
        """How many nodes the per-node arrays describe (None: the same for every node)."""
        for value in (self.speed, self.down_mbps, self.up_mbps):
            if isinstance(value, np.ndarray):
                return len(value)
        return None

    @classmethod
    def sample(
        cls,
        nodes: int,
        *,
        stragglers: float = 0.0,
        slowdown: float = 10.0,
        down_mbps: float = math.inf,
        up_mbps: float = math.inf,
        compute_s: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> Devices:
        """``nodes`` devices, a ``stragglers`` fraction of them ``slowdown`` times slower
        (chosen with ``seed``), all on the same links."""
        if not 0.0 <= stragglers <= 1.0:
            raise ConfigError(f"stragglers is a fraction in [0, 1], got {stragglers}")
        if not slowdown >= 1.0:
            raise ConfigError(f"slowdown must be >= 1, got {slowdown}")
        rng = np.random.default_rng([seed, nodes])
        slow = rng.random(nodes) < stragglers
        speed = np.where(slow, 1.0 / slowdown, 1.0).astype(np.float32)
        return cls(speed=speed, down_mbps=down_mbps, up_mbps=up_mbps, compute_s=compute_s or {})

    def _at(self, value: PerNode, index: int) -> float:
        return float(value[index]) if isinstance(value, np.ndarray) else value

    def duration(
        self, index: int, *, task: str, measured_s: float, down_bytes: int, up_bytes: int
    ) -> float:
        """Virtual seconds node ``index`` needs for a task: download, compute, upload."""
        compute = self.compute_s.get(task, measured_s) / self._at(self.speed, index)
        down = down_bytes * 8.0 / (self._at(self.down_mbps, index) * 1e6)
        up = up_bytes * 8.0 / (self._at(self.up_mbps, index) * 1e6)
        return down + compute + up
