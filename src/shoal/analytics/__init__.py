"""Federated analytics: SQL at each party, answered by secure sums and differential privacy.

``query(fed, sql, config=...)`` validates the SQL against a restricted dialect, has each
party run it on its own database with contributions bounded, and combines the parties'
statistics with SecAgg+ (exact answers), optionally with Laplace noise added by the parties
inside the secure sum (distributed DP) or by the coordinator after it (central DP).
Needs the ``analytics`` extra (sqlglot, duckdb). See docs/analytics.md.
"""

from __future__ import annotations

from shoal.analytics.config import AnalyticsConfig, Party, Privacy, privacy_from_dict
from shoal.analytics.dialect import Plan, parse
from shoal.analytics.query import QueryResult, heavy_hitters, query
from shoal.analytics.source import Database
from shoal.analytics.tasks import (
    KEYS_TASK,
    STATS_TASK,
    NodePolicy,
    analytics_tasks,
    release_policy,
)

__all__ = [
    "KEYS_TASK",
    "STATS_TASK",
    "AnalyticsConfig",
    "Database",
    "NodePolicy",
    "Party",
    "Plan",
    "Privacy",
    "QueryResult",
    "analytics_tasks",
    "heavy_hitters",
    "parse",
    "privacy_from_dict",
    "query",
    "release_policy",
]
