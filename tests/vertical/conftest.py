"""Breast cancer split by columns between a guest (10 columns + label) and a host (20)."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_breast_cancer

from shoal.core import Federation
from shoal.runtime import LocalEngine, NodeApp
from shoal.runtime.roles import NodeApps
from shoal.vertical.party import PartyData
from shoal.vertical.tasks import vertical_tasks


def split_breast_cancer(overlap: float = 0.9, seed: int = 0) -> tuple[PartyData, PartyData]:
    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    n = len(y)
    ids = np.array([f"c{i:04d}" for i in range(n)])
    keep = int(overlap * n)
    # each party drops a different few rows, and each shuffles its own table
    g_rows = rng.permutation(np.concatenate([np.arange(keep), np.arange(keep, n)[::2]]))
    h_rows = rng.permutation(np.concatenate([np.arange(keep), np.arange(keep, n)[1::2]]))
    guest = PartyData.from_columns(ids[g_rows], x[g_rows, :10], y=y[g_rows])
    host = PartyData.from_columns(ids[h_rows], x[h_rows, 10:])
    return guest, host


def federation(
    parties: dict[str, PartyData | None], roles: dict[str, str], *, mode: str, **engine_kw
) -> tuple[Federation, LocalEngine]:
    apps = {}
    for node, role in roles.items():
        app = NodeApp(max_kept=8)
        app.install(vertical_tasks(role, mode=mode))
        apps[node] = app
    nodes = list(roles)
    engine = LocalEngine(
        NodeApps(apps), nodes=nodes, data=[parties.get(n) for n in nodes], **engine_kw
    )
    by_role: dict[str, list[str]] = {}
    for node, role in roles.items():
        by_role.setdefault(role, []).append(node)
    return Federation(engine, roles=by_role), engine
