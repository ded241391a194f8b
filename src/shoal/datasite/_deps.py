"""Guarded imports of the datasite extra: FastAPI for the HTTP API, uvicorn to serve it."""

from __future__ import annotations

from types import ModuleType

from shoal.errors import ConfigError

__all__ = ["fastapi", "uvicorn"]

_HINT = "install the datasite extra: pip install 'shoal[datasite]'"


def fastapi() -> ModuleType:
    try:
        import fastapi as module
    except ImportError:
        raise ConfigError(f"the datasite server needs fastapi; {_HINT}") from None
    return module


def uvicorn() -> ModuleType:
    try:
        import uvicorn as module
    except ImportError:
        raise ConfigError(f"the datasite server needs uvicorn; {_HINT}") from None
    return module
