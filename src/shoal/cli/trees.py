"""Tree jobs: ``[model] name = "gbdt"`` (horizontal) or ``"secureboost"`` (vertical).

The same job file runs in simulation (``shoal run``) and deployed (``shoal coordinator`` and
``shoal node``). The tree parameters sit in ``[model]`` with XGBoost's or LightGBM's names;
``[aggregate] secure`` picks SecureSum for the horizontal histograms (default on). A
SecureBoost job splits the data set's columns: the first ``guest_features`` to the guest
node (with the labels), the rest evenly over ``hosts`` host nodes; the coordinator addresses
them by role and relays their sealed messages (:mod:`shoal.trees.secureboost`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.errors import ConfigError
from shoal.trees.params import declared_categories

if TYPE_CHECKING:
    from shoal.cli.job import JobSpec
    from shoal.core import Federation
    from shoal.data import Dataset
    from shoal.runtime import NodeApp
    from shoal.trees import GBDTParams
    from shoal.vertical.checkpoint import Checkpoints
    from shoal.vertical.party import PartyData

__all__ = [
    "TREE_MODELS",
    "categorical_columns",
    "check_tree_job",
    "is_tree_job",
    "party_table",
    "run_tree_job",
    "tree_node_app",
]

TREE_MODELS = ("gbdt", "secureboost")
DESCRIBE = "secureboost.describe"  # a party's index in the job (clear)
_VERTICAL_KEYS = ("guest_features", "hosts", "key_bits", "insecure_test_keys")
_HORIZONTAL_KEYS = ("sketch_cells", "categorical", "categories")


def is_tree_job(job: JobSpec) -> bool:
    return str(job.model.get("name")) in TREE_MODELS


def _extra(job: JobSpec) -> dict[str, Any]:
    keys = _VERTICAL_KEYS if job.model["name"] == "secureboost" else _HORIZONTAL_KEYS
    return {k: job.model[k] for k in keys if k in job.model}


def tree_params(job: JobSpec, classes: int | None) -> GBDTParams:
    from shoal.trees import gbdt_params

    skip = {"name", *_VERTICAL_KEYS, *_HORIZONTAL_KEYS}
    values = {k: v for k, v in job.model.items() if k not in skip}
    values.setdefault("seed", job.seed)
    if "objective" not in values:
        if classes is None:
            values["objective"] = "reg:squarederror"
        elif classes > 2:
            values["objective"] = "multi:softprob"
            values.setdefault("num_class", classes)
    return gbdt_params(values)


def categorical_columns(model: Mapping[str, Any]) -> dict[str, list[str] | None]:
    """``[model] categorical`` (CSV column names) -> each one's declared categories
    (``[model] categories``) or None (each file's own sorted labels), checked."""
    if ("categorical" in model or "categories" in model) and model.get("name") != "gbdt":
        raise ConfigError(
            "[model] categorical is for gbdt jobs here; a secureboost job splitting one data "
            "set's columns does not take it: one-hot encode those columns, or use a "
            "vertical.toml secureboost job, which does"
        )
    return declared_categories(model)


def categorical_indices(job: JobSpec, feature_names: tuple[str, ...] | None) -> list[int]:
    """The job's categorical columns as feature indices of its data."""
    names = list(categorical_columns(job.model))
    if names and feature_names is None:
        raise ConfigError("[model] categorical names CSV columns; the data set has no header")
    return [list(feature_names or ()).index(n) for n in names]


def check_tree_job(job: JobSpec) -> None:
    """Every tree key checked when the job is parsed (before any node connects)."""
    columns = categorical_columns(job.model)
    if columns and job.data.get("path") is None:
        raise ConfigError(
            "[model] categorical names columns of category labels in a CSV [data] path; "
            "a built-in data set has none"
        )
    for key in _extra(job):
        value = job.model[key]
        if key in ("categorical", "categories"):
            continue
        if key == "insecure_test_keys":
            if not isinstance(value, bool):
                raise ConfigError("[model] insecure_test_keys is true or false")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"[model] {key} must be a positive integer, got {value!r}")
    if job.model["name"] == "secureboost":
        for key in ("guest_features", "hosts"):
            if key not in job.model:
                raise ConfigError(f"a secureboost job needs [model] {key}")
    train, _ = job.load_data()
    tree_params(job, train.classes)
    if job.model["name"] == "secureboost":
        _blocks(job, train)


def _blocks(job: JobSpec, train: Dataset) -> list[np.ndarray]:
    d = train.x.reshape(len(train.x), -1).shape[1]
    guest, hosts = int(job.model["guest_features"]), int(job.model["hosts"])
    if not 0 < guest < d or d - guest < hosts:
        raise ConfigError(
            f"[model] guest_features = {guest} and hosts = {hosts} cannot split {d} columns "
            "(the guest and every host need at least one)"
        )
    x = train.x.reshape(len(train.x), -1).astype(np.float64)
    rest = np.array_split(np.arange(guest, d), hosts)
    return [x[:, :guest], *[x[:, cols] for cols in rest]]


def party_table(job: JobSpec, index: int, count: int) -> PartyData:
    """Party ``index``'s table (``shoal node --partition I/N`` for a secureboost job, N =
    hosts + 1): party 0 is the guest (the first ``guest_features`` columns and the labels),
    party i >= 1 host i's columns. Rows are the data set's training then test rows, keyed
    by their position; the parties align them by PSI and hold out the same rows."""
    from shoal.vertical.party import PartyData

    hosts = int(job.model["hosts"])
    if count != hosts + 1:
        raise ConfigError(
            f"the job has a guest and {hosts} host(s): --partition I/{hosts + 1}, not /{count}"
        )
    if not 0 <= index < count:
        raise ConfigError(f"party index must be in [0, {count}), got {index}")
    train, test = job.load_data()
    block = [np.vstack([a, b]) for a, b in zip(_blocks(job, train), _blocks(job, test))][index]
    ids = [f"{i:09d}" for i in range(len(block))]
    y = np.concatenate([train.y, test.y]) if index == 0 else None
    return PartyData.from_columns(ids, block, y=y)


def tree_node_app(
    job: JobSpec,
    party: int | None = None,
    *,
    checkpoints: Checkpoints | None = None,
    model_out: str | None = None,
) -> NodeApp:
    """The tasks a node of this job runs (a secureboost party's by its index, keeping its
    part of each complete round in ``checkpoints``, memory unless given, and writing its
    part of the model to ``model_out`` when the run ends, if given)."""
    from shoal.crypto import SecureSum
    from shoal.runtime import NodeApp, TaskSpec
    from shoal.trees.horizontal import horizontal_tasks

    app = NodeApp(max_kept=16)
    if job.model["name"] == "secureboost":
        from shoal.trees.secureboost import secureboost_tasks

        if party is None:
            raise ConfigError("a secureboost node needs its party index (--partition I/N)")
        role = "guest" if party == 0 else "host"
        app.install(secureboost_tasks(role, checkpoints=checkpoints, model_out=model_out))

        def describe(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
            return {"party": party}

        app.install({DESCRIBE: TaskSpec(describe, {"party": "clear"})})
    else:
        secure = bool(job.raw.get("aggregate", {}).get("secure", True))
        app.install(horizontal_tasks(secure=secure))
        app.install(SecureSum().node_tasks())
    return app


def job_tree_app(*, job: Mapping[str, Any], base_dir: str) -> NodeApp:
    """The NodeApp every node of tree job ``job`` runs (a RayEngine's app recipe)."""
    from pathlib import Path

    from shoal.cli.job import parse_job
    from shoal.runtime.roles import NodeApps

    spec = parse_job(job, base_dir=Path(base_dir))
    if spec.model["name"] != "secureboost":
        return tree_node_app(spec)
    # node n<i> is party i (0 the guest); the parties say their index when asked
    return NodeApps({f"n{i}": tree_node_app(spec, i) for i in range(int(spec.model["hosts"]) + 1)})


def job_party_tables(*, job: Mapping[str, Any], base_dir: str) -> Any:
    """node id ``n<i>`` -> SecureBoost party i's table (a RayEngine's data recipe)."""
    from pathlib import Path

    from shoal.cli.job import parse_job

    spec = parse_job(job, base_dir=Path(base_dir))
    parties = int(spec.model["hosts"]) + 1
    return lambda node_id: party_table(spec, int(node_id.removeprefix("n")), parties)


def run_tree_job(
    job: JobSpec,
    federation: Federation | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the job's trees (simulated nodes unless a federation is given) and score them
    on the test split, beside centralized training on the pooled data with the same cuts.
    ``progress`` gets a line after each tree (a deployed coordinator prints them).

    Simulated on a LocalEngine, or on a RayEngine for ``[engine] kind = "ray"`` (the same
    nodes, built on the actors from the job file; closed when training ends)."""
    if federation is not None or job.engine["kind"] != "ray":
        return _run_tree_job(job, federation, progress)
    from shoal.cli.job import job_description, ray_engine
    from shoal.core import Federation
    from shoal.runtime import Recipe

    description = job_description(job)
    app = Recipe(target="shoal.cli.trees:job_tree_app", options=description)
    if job.model["name"] == "gbdt":  # as _run_tree_job builds it on a LocalEngine
        engine = ray_engine(job, app=app, data=job.data_spec(), nodes=int(job.partition["nodes"]))
        options: dict[str, Any] = {"min_nodes": job.min_nodes}
    else:
        tables = Recipe(target="shoal.cli.trees:job_party_tables", options=description)
        engine = ray_engine(job, app=app, data=tables, nodes=int(job.model["hosts"]) + 1)
        options = {}
    try:
        return _run_tree_job(job, Federation(engine, seed=job.seed, **options), progress)
    finally:
        engine.close()


def _on_tree(progress: Callable[[str], None] | None) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(f"tree {done}/{total}")


def _run_tree_job(
    job: JobSpec, federation: Federation | None, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    from shoal.core import Federation
    from shoal.runtime import LocalEngine
    from shoal.trees import train

    summary: dict[str, Any] = {"job": job.name, "model": job.model["name"]}
    if job.model["name"] == "secureboost":
        summary.update(_secureboost(job, federation, progress))
        return summary
    from shoal.trees.horizontal import train_horizontal

    training, test = job.load_data()
    params = tree_params(job, training.classes)
    started = time.perf_counter()
    if federation is None:
        engine = LocalEngine(
            tree_node_app(job), data=job.partitions(), workers=int(job.engine["workers"])
        )
        federation = Federation(engine, min_nodes=job.min_nodes, seed=job.seed)
    secure = bool(job.raw.get("aggregate", {}).get("secure", True))
    model = train_horizontal(
        federation,
        params,
        secure=secure,
        sketch_cells=int(job.model.get("sketch_cells", 4096)),
        on_tree=_on_tree(progress),
        categorical=categorical_indices(job, training.feature_names),
        feature_names=training.feature_names,
    )
    summary["secure"] = secure
    summary["categorical_splits"] = sum(
        int((t.categorical & (t.left >= 0)).sum()) for r in model.trees for t in r
    )
    # trees grown again without nodes that dropped out of their secure sums
    summary["restarts"] = [
        {"round": int(e.detail["round"]), "nodes": int(e.detail["nodes"])}
        for e in federation.audit_log
        if e.action == "gbdt.restart_tree"
    ]
    wall = time.perf_counter() - started
    scores = model.predict(test.x)
    central = train(training.x, training.y, model.params, bins=model.bins)
    summary.update(
        {
            "nodes": len(federation.node_ids),
            "trees": params.n_trees,
            "wall_s": wall,
            **_scores(scores, test.y, params, "federated_"),
            **_scores(central.predict(test.x), test.y, params, "centralized_"),
            "identical_predictions": bool(np.array_equal(scores, central.predict(test.x))),
        }
    )
    return summary


def _secureboost(
    job: JobSpec, federation: Federation | None, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    """Train through the routed protocol; beside it, the centralized model on the joined
    columns of the same aligned training rows (the coordinator of a ``shoal run`` job can
    build it: the job file names the whole data set)."""
    from shoal.core import Federation
    from shoal.core.roles import Roles
    from shoal.runtime import LocalEngine
    from shoal.runtime.roles import NodeApps
    from shoal.trees import Bins, fit_bins, train
    from shoal.trees.horizontal import DEFAULT_FIXED_POINT
    from shoal.trees.secureboost import SecureBoostConfig, digest, train_routed
    from shoal.vertical.model import held_out_rows

    training, test = job.load_data()
    params = tree_params(job, training.classes)
    parties = int(job.model["hosts"]) + 1
    tables = [party_table(job, i, parties) for i in range(parties)]
    if federation is None:
        names = ["guest", *[f"host{i}" for i in range(1, parties)]]
        apps = NodeApps({n: tree_node_app(job, i) for i, n in enumerate(names)})
        federation = Federation(LocalEngine(apps, nodes=names, data=tables), seed=job.seed)
        index = {n: i for i, n in enumerate(names)}
    else:
        replies, failures = federation.request(federation.node_ids, DESCRIBE)
        if failures:
            raise ConfigError(f"parties did not describe themselves: {sorted(failures)}")
        index = {n: int(r["party"]) for n, r in replies.items()}
    found = sorted(index.values())
    if found != list(range(parties)):
        raise ConfigError(f"the job has parties 0..{parties - 1}; connected: {found}")
    by_index = {i: n for n, i in index.items()}
    roles = Roles.of({"guest": by_index[0], "host": [by_index[i] for i in range(1, parties)]})
    # the protocol addresses one party at a time (PSI, the guest's steps): min_nodes 1
    federation = Federation(
        federation.engine, min_nodes=1, deadline_s=federation.deadline_s, seed=job.seed,
        audit=federation.trail, roles=roles,
    )  # fmt: skip
    n_all = len(training.y) + len(test.y)
    cfg = SecureBoostConfig(
        params=params,
        key_bits=int(job.model.get("key_bits", 2048)),
        insecure_test_keys=bool(job.model.get("insecure_test_keys", False)),
        min_overlap=1,
        test_fraction=len(test.y) / n_all,
        seed=job.seed,
    )
    started = time.perf_counter()
    result = train_routed(federation, cfg, on_tree=_on_tree(progress))
    wall = time.perf_counter() - started
    # the centralized reference: ids are positions, so the aligned order is the table's
    held = held_out_rows(n_all, seed=cfg.seed, test_fraction=cfg.test_fraction)
    blocks = [t.x for t in tables]
    y = tables[0].y
    assert y is not None
    bins = Bins(cuts=sum((fit_bins(b[~held], max_bins=params.max_bins).cuts for b in blocks), ()))
    fixed = params.to_dict()
    fixed["fixed_point_bits"] = fixed.get("fixed_point_bits") or DEFAULT_FIXED_POINT
    x = np.hstack(blocks)
    central = train(x[~held], y[~held], type(params)(**fixed), bins=bins)
    predicted = central.predict(x[held])
    summary: dict[str, Any] = {
        "nodes": parties,
        "trees": params.n_trees,
        "intersection_size": result.intersection_size,
        "retries": result.retries,
        "resumed_from": result.resumed_from,
        "bytes_routed": result.routed_bytes,
        "wall_s": wall,
        **{f"federated_{k}": v for k, v in result.test.items() if k not in ("n", "digest")},
        **_scores(predicted, y[held], params, "centralized_"),
        "test_rows": int(result.test.get("n", 0)),
        "identical_predictions": result.test.get("digest") == bytes(digest(predicted)).hex(),
    }
    return summary


def _scores(
    predictions: np.ndarray, y: np.ndarray, params: GBDTParams, prefix: str
) -> Mapping[str, float]:
    if params.objective == "binary:logistic":
        from sklearn.metrics import roc_auc_score

        return {
            prefix + "auc": float(roc_auc_score(y, predictions)),
            prefix + "accuracy": float(np.mean((predictions > 0.5) == y)),
        }
    if params.objective == "multi:softprob":
        return {prefix + "accuracy": float(np.mean(predictions.argmax(axis=1) == y))}
    return {prefix + "rmse": float(np.sqrt(np.mean((predictions - y) ** 2)))}


def tree_line(summary: Mapping[str, Any]) -> str:
    """One line for the console: federated against centralized on the test split."""
    parts = []
    for metric in ("auc", "accuracy", "rmse"):
        if "federated_" + metric in summary:
            parts.append(
                f"{metric} {summary['federated_' + metric]:.4f} federated, "
                f"{summary['centralized_' + metric]:.4f} centralized"
            )
    same = "identical" if summary.get("identical_predictions") else "different"
    return (
        f"{summary['model']} ({summary['trees']} trees, {summary['nodes']} nodes): "
        + "; ".join(parts)
        + f"; predictions {same}; {summary['wall_s']:.1f} s"
    )
