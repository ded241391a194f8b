"""RayEngine: simulations that outgrow one machine, on a Ray cluster (``shoal[ray]``).

Importing this package needs no Ray; creating a RayEngine does, and says which extra to
install when Ray is missing.
"""

from __future__ import annotations

from shoal.runtime.ray.engine import RayEngine

__all__ = ["RayEngine"]
