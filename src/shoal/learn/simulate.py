"""``simulate()``: train a model across simulated nodes in one call."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shoal.core import Federation
from shoal.data import Dataset, split_holdout
from shoal.errors import ConfigError
from shoal.learn._gcfreeze import older_objects_frozen
from shoal.learn.algorithms import Algorithm
from shoal.learn.model import Model
from shoal.learn.runner import RoundReport, Trainer, TrainingResult
from shoal.learn.tasks import TRAIN, LocalData, learning_app
from shoal.privacy.accounting import Accountant
from shoal.runtime import Devices, Engine, Faults, LocalEngine, NodeApp, NodeStateFile
from shoal.runtime.store import Store

__all__ = ["simulate"]


def simulate(
    *,
    model: Model,
    nodes: Sequence[Any] | None = None,
    algorithm: Algorithm,
    test: Dataset | None = None,
    holdout: float = 0.0,
    federated_eval_every: int = 0,
    eval_every: int = 1,
    seed: int = 0,
    min_nodes: int = 1,
    deadline_s: float = 600.0,
    faults: Faults | None = None,
    devices: Devices | None = None,
    workers: int = 1,
    app: NodeApp | None = None,
    engine: Engine | None = None,
    store: Store | None = None,
    run_name: str = "simulation",
    config: Mapping[str, Any] | None = None,
    resume: str | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    on_start: Callable[[str | None], None] | None = None,
    max_epsilon: float | None = None,
    max_delta: float = 1e-5,
    accountant: Accountant = "rdp",
    node_state: str | os.PathLike[str] | None = None,
) -> TrainingResult:
    """Train ``model`` with ``algorithm`` across ``nodes`` (one data set per node).

    ``holdout`` keeps that fraction of each node's data for federated evaluation (every
    ``federated_eval_every`` rounds); ``test`` is the server's own test set, evaluated every
    ``eval_every`` rounds and after the last. ``devices``
    gives the nodes compute speeds and link bandwidths on the engine's virtual clock, whose
    time after each round is recorded as ``virtual_s``.

    ``max_epsilon`` (at ``max_delta``) is every node owner's limit on their own ledger.
    ``node_state`` is one SQLite file holding every virtual node's ledger and audit log
    (``shoal node --state`` for simulation): budgets spent in one call stay spent in the
    next. Without it they live in memory for this call.

    ``engine``: run on this engine instead of a LocalEngine over ``nodes`` (e.g. a RayEngine,
    which builds each node's app and data on its workers from recipes). The engine then holds
    the nodes, their app and the faults: ``nodes``, ``app``, ``faults``, ``devices``,
    ``workers`` and ``holdout`` are its own settings, not simulate's. The caller closes it.
    """
    own_engine = engine is None
    states: NodeStateFile | None = None
    if engine is not None:
        given = [
            name
            for name, value in (
                ("nodes", nodes),
                ("app", app),
                ("max_epsilon", max_epsilon),
                ("node_state", node_state),
                ("faults", faults),
                ("devices", devices),
                ("workers", None if workers == 1 else workers),
                ("holdout", holdout or None),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"simulate(engine=...) runs on the engine's own nodes, app and faults; drop "
                f"{', '.join(given)} (set them on the engine)"
            )
    else:
        if nodes is None or len(nodes) == 0:
            raise ConfigError("simulate needs at least one node's data (nodes=) or an engine=")
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout is a fraction in [0, 1), got {holdout}")
        node_data: Sequence[Any] = nodes
        if holdout > 0:
            node_data = [_holdout(part, holdout, seed + i) for i, part in enumerate(nodes)]
        if app is None or TRAIN not in app.task_names:  # an app may bring its own train task
            app = learning_app(  # release policies and noise floor from the plan
                model,
                app=app,
                plan=algorithm.plan,
                max_epsilon=max_epsilon,
                max_delta=max_delta,
                accountant=accountant,
            )
        elif max_epsilon is not None:
            raise ConfigError(
                "max_epsilon applies to the learning app simulate() builds; an app with its "
                "own train task installs its own budget guard"
            )
        app.install(algorithm.node_tasks())  # e.g. the secure sum's protocol tasks
        if node_state is not None:
            states = NodeStateFile(node_state, owner="simulation")
        engine = LocalEngine(
            app,
            data=node_data,
            seed=seed,
            faults=faults,
            workers=workers,
            devices=devices,
            node_states=states,
        )
    federation = Federation(engine, min_nodes=min_nodes, deadline_s=deadline_s, seed=seed)
    trainer = Trainer(
        federation=federation,
        algorithm=algorithm,
        model=model,
        test=test,
        store=store,
        run_name=run_name,
        config=config,
        federated_eval_every=federated_eval_every,
        eval_every=eval_every,
        seed=seed,
        on_round=on_round,
        on_start=on_start,
    )
    try:
        with older_objects_frozen():
            return trainer.run(resume=resume)
    finally:
        if own_engine:
            engine.close()
        if states is not None:
            states.close()


def _holdout(part: Dataset, fraction: float, seed: int) -> LocalData:
    train, test = split_holdout(part, fraction=fraction, seed=seed)
    return LocalData(train=train, test=test)
