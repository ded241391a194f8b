"""Payload names under a prefix (``w/W``, ``d/b``, ``c/W``): how weights travel by name."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

__all__ = ["prefixed", "unprefixed"]


def prefixed(prefix: str, weights: Mapping[str, Any]) -> dict[str, Any]:
    """``weights`` named ``prefix/name``."""
    return {f"{prefix}/{name}": value for name, value in weights.items()}


def unprefixed(prefix: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``payload`` named ``prefix/name``, as ``name``, in the payload's order."""
    return {short: payload[name] for short, name in _under(prefix, tuple(payload))}


@functools.lru_cache(maxsize=256)
def _under(prefix: str, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    # Every node of a round gets a payload with the same names: they are sorted out once
    # per distinct set of names, not by a startswith per name at every node.
    start = prefix + "/"
    return tuple((name[len(start) :], name) for name in names if name.startswith(start))
