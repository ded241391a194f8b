"""Federated Core API: Federation, NodeGroup, NodeValues and the Aggregator protocol."""

from __future__ import annotations

from shoal.core.aggregator import Aggregator
from shoal.core.federation import Broadcast, Federation, NodeGroup
from shoal.core.reduce import finish, plain_mean, plain_sum
from shoal.core.roles import Roles
from shoal.core.routing import received, route
from shoal.core.values import FieldSpec, Gathered, Layout, NodeValues, unflatten

__all__ = [
    "Aggregator",
    "Broadcast",
    "Federation",
    "FieldSpec",
    "Gathered",
    "Layout",
    "NodeGroup",
    "NodeValues",
    "Roles",
    "finish",
    "plain_mean",
    "plain_sum",
    "received",
    "route",
    "unflatten",
]
