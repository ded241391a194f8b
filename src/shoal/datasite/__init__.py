"""Remote data science: datasets with mock assets, code requests, owner approval, a sandbox.

A data scientist submits a function; the datasite runs it on mock data, its owner reviews
code and mock result and approves it for exactly that code hash; the sandbox runs it on the
real data; the result is released under the request's output policy (review, dp or
threshold). The server needs the ``datasite`` extra (fastapi, uvicorn); the client and the
sandbox need only NumPy. See docs/datasite.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Datasite",
    "FederatedRequest",
    "RemoteRequest",
    "SandboxLimits",
    "Table",
    "connect",
    "run_sandboxed",
    "submit_federated",
]

_LAZY = {
    "Datasite": "shoal.datasite.client",
    "RemoteRequest": "shoal.datasite.client",
    "connect": "shoal.datasite.client",
    "FederatedRequest": "shoal.datasite.federated",
    "submit_federated": "shoal.datasite.federated",
    "SandboxLimits": "shoal.datasite.sandbox",
    "run_sandboxed": "shoal.datasite.sandbox",
    "Table": "shoal.datasite.table",
}

if TYPE_CHECKING:
    from shoal.datasite.client import Datasite, RemoteRequest, connect
    from shoal.datasite.federated import FederatedRequest, submit_federated
    from shoal.datasite.sandbox import SandboxLimits, run_sandboxed
    from shoal.datasite.table import Table


def __getattr__(name: str) -> Any:
    # lazy, so that the sandbox's runner can import shoal.datasite.dp without the rest
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal.datasite' has no attribute {name!r}")
