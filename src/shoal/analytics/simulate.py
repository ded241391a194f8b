"""A simulated federation of the job's parties: one in-process node per party's database."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.analytics.config import AnalyticsConfig
from shoal.analytics.source import Database
from shoal.analytics.tasks import NodePolicy, analytics_tasks
from shoal.errors import ConfigError

__all__ = ["federation", "node_app"]


def node_app(policy: NodePolicy | None = None) -> Any:
    """A NodeApp that answers federated queries (and runs the secure sum they need)."""
    from shoal.crypto import secure_sum_tasks
    from shoal.runtime import NodeApp

    app = NodeApp()
    app.install(analytics_tasks(policy))
    app.install(secure_sum_tasks())
    return app


def federation(
    config: AnalyticsConfig,
    *,
    policy: NodePolicy | None = None,
    policies: Mapping[str, NodePolicy] | None = None,
    min_nodes: int = 3,
    workers: int = 1,
) -> Any:
    """A Federation over ``config.parties`` in one process; ``policies`` per party name
    (else ``policy`` for all) play each owner's rules."""
    from shoal.core import Federation
    from shoal.runtime import LocalEngine

    if len(config.parties) < 3:
        raise ConfigError(
            "[analytics] parties must list at least three parties: a secure sum of two "
            "would show each party the other's answer"
        )
    policies = dict(policies or {})
    unknown = sorted(set(policies) - {p.name for p in config.parties})
    if unknown:
        raise ConfigError(f"policies for unknown parties {unknown}")
    if policies:
        apps = {p.name: node_app(policies.get(p.name, policy)) for p in config.parties}
        return Federation(_MultiEngine(config, apps, workers), min_nodes=min_nodes)
    data = [Database(p.path, table=config.table) for p in config.parties]
    engine = LocalEngine(
        node_app(policy), data=data, nodes=[p.name for p in config.parties], workers=workers
    )
    return Federation(engine, min_nodes=min_nodes)


class _MultiEngine:
    """Parties with different owners' policies: one LocalEngine each, seen as one engine."""

    def __init__(self, config: AnalyticsConfig, apps: Mapping[str, Any], workers: int) -> None:
        from shoal.runtime import LocalEngine

        self._engines = {
            p.name: LocalEngine(
                apps[p.name],
                data=[Database(p.path, table=config.table)],
                nodes=[p.name],
                workers=workers,
            )
            for p in config.parties
        }

    def node_ids(self) -> list[str]:
        return list(self._engines)

    def dispatch(self, tasks: Any, *, deadline_s: float) -> Any:
        from shoal.runtime import DispatchResult

        replies: dict[str, Any] = {}
        failures: dict[str, Any] = {}
        per: dict[str, list[Any]] = {}
        for task in tasks:
            per.setdefault(task.node_id, []).append(task)
        for node, items in per.items():
            out = self._engines[node].dispatch(items, deadline_s=deadline_s)
            replies.update(out.replies)
            failures.update(out.failures)
        return DispatchResult(replies=replies, failures=failures)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
