"""Roles: which nodes play which part in a multi-party job (guest, host, arbiter, ...).

A job assigns each node one role; ``fed.role("host")`` is then the NodeGroup of the hosts.
Roles also name where a sealed value may be routed (``release={"x": "sealed:host"}``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["Roles"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Roles:
    """Role name -> the node ids that play it; every node plays at most one role."""

    assignment: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, mapping: Mapping[str, Sequence[str] | str] | Roles) -> Roles:
        """Build from ``{"guest": "bank", "host": ["insurer", "lab"]}``; checks the names."""
        if isinstance(mapping, Roles):
            return mapping
        out: dict[str, tuple[str, ...]] = {}
        seen: dict[str, str] = {}
        for role, nodes in mapping.items():
            if not isinstance(role, str) or not _NAME.match(role):
                raise ConfigError(f"role names are letters, digits, '_', '.', '-': got {role!r}")
            ids = (nodes,) if isinstance(nodes, str) else tuple(nodes)
            if not ids:
                raise ConfigError(f"role {role!r} names no node")
            for node in ids:
                if not isinstance(node, str) or not node:
                    raise ConfigError(f"role {role!r}: node ids are non-empty strings")
                if node in seen:
                    raise ConfigError(
                        f"node {node!r} is given two roles ({seen[node]!r} and {role!r}); "
                        "each node plays one role in a job"
                    )
                seen[node] = role
            out[role] = ids
        if not out:
            raise ConfigError("a job with roles names at least one role")
        return cls(assignment=out)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.assignment)

    def nodes(self, role: str) -> tuple[str, ...]:
        if role not in self.assignment:
            raise ConfigError(f"no role {role!r} in this job; it has {sorted(self.assignment)}")
        return self.assignment[role]

    def role_of(self, node_id: str) -> str | None:
        for role, nodes in self.assignment.items():
            if node_id in nodes:
                return role
        return None
