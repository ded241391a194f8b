"""The Aggregator extension point: the only way per-node values become one server value.

Plain aggregators read node values through :meth:`NodeValues.gather`; secure ones run a
protocol of their own node-side tasks and never see individual values at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from shoal.core.values import NodeValues

__all__ = ["Aggregator"]


@runtime_checkable
class Aggregator(Protocol):
    def aggregate(self, values: NodeValues, *, weights: NodeValues | None = None) -> Any:
        """Turn values placed at nodes into one value at the server."""
        ...
