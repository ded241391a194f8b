"""shoal: privacy-preserving federated machine learning.

The names a user needs first are importable from here; they load on first use, so
``import shoal`` stays cheap for tools that need only a part of the library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shoal.errors import ShoalError

__version__ = "0.1.0"

_LAZY = {
    "simulate": "shoal.learn",
    "FedAvg": "shoal.learn",
    "SoftmaxRegression": "shoal.learn",
    "Federation": "shoal.core",
    "NodeApp": "shoal.runtime",
    "LocalEngine": "shoal.runtime",
    "Store": "shoal.runtime",
}

__all__ = [
    "FedAvg",
    "Federation",
    "LocalEngine",
    "NodeApp",
    "ShoalError",
    "SoftmaxRegression",
    "Store",
    "__version__",
    "simulate",
]

if TYPE_CHECKING:
    from shoal.core import Federation
    from shoal.learn import FedAvg, SoftmaxRegression, simulate
    from shoal.runtime import LocalEngine, NodeApp, Store


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
