"""Per-node task registries for in-process engines: each role installs its own tasks.

In deployment every party runs its own node process with its own NodeApp. A LocalEngine
(or RayEngine) simulating a multi-party job takes one app; :class:`NodeApps` is that app,
handing each task to the app of the node it is addressed to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.errors import ConfigError, UnknownTask
from shoal.runtime.app import NodeApp, Prepared, TaskContext
from shoal.runtime.engine import Buffer

__all__ = ["NodeApps"]


class NodeApps(NodeApp):
    """One NodeApp per node id (e.g. the guest's, the hosts', the arbiter's)."""

    def __init__(self, apps: Mapping[str, NodeApp]) -> None:
        super().__init__()
        if not apps:
            raise ConfigError("NodeApps needs at least one node's app")
        self.apps = dict(apps)
        # The wire limits for payloads shared by several nodes: the strictest app's.
        first = next(iter(self.apps.values()))
        self.limits = first.limits

    @property
    def task_names(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for app in self.apps.values():
            names.update(dict.fromkeys(app.task_names))
        return tuple(names)

    def app_for(self, node_id: str) -> NodeApp:
        app = self.apps.get(node_id)
        if app is None:
            raise UnknownTask(f"node {node_id!r} has no app in this simulation")
        return app

    def handle(
        self,
        ctx: TaskContext,
        name: str,
        payload: Buffer,
        *,
        prepared: Prepared | None = None,
        **kwargs: Any,
    ) -> Buffer:
        app = self.app_for(ctx.node_id)
        if prepared is not None:
            # Prepared for these apps together: the node's own app prepares its part once
            # (each app has its own guards); anything else the node's app checks in full.
            prepared = prepared.part(app) if prepared.app is self else None
        return app.handle(ctx, name, payload, prepared=prepared, **kwargs)
