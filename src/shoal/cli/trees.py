"""Tree jobs: ``[model] name = "gbdt"`` (horizontal) or ``"secureboost"`` (vertical).

The same job file runs in simulation (``shoal run``) and deployed (``shoal coordinator`` and
``shoal node``). The tree parameters sit in ``[model]`` with XGBoost's or LightGBM's names;
``[aggregate] secure`` picks SecureSum for the horizontal histograms (default on). A
SecureBoost job splits the data set's columns: the first ``guest_features`` to the guest
(which runs the coordinator and holds the labels), the rest evenly over ``hosts`` nodes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.cli.job import JobSpec
    from shoal.core import Federation
    from shoal.data import Dataset
    from shoal.runtime import NodeApp
    from shoal.trees import GBDTParams

__all__ = [
    "TREE_MODELS",
    "check_tree_job",
    "host_data",
    "is_tree_job",
    "run_tree_job",
    "tree_node_app",
]

TREE_MODELS = ("gbdt", "secureboost")
_VERTICAL_KEYS = ("guest_features", "hosts", "key_bits", "insecure_test_keys")
_HORIZONTAL_KEYS = ("sketch_cells",)


def is_tree_job(job: JobSpec) -> bool:
    return str(job.model.get("name")) in TREE_MODELS


@dataclass(frozen=True)
class Columns:
    """What a SecureBoost host holds: its columns of the aligned rows (block ``block``)."""

    x: np.ndarray
    block: int = 0


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


def check_tree_job(job: JobSpec) -> None:
    """Every tree key checked when the job is parsed (before any node connects)."""
    for key in _extra(job):
        value = job.model[key]
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


def host_data(job: JobSpec, index: int, count: int) -> Columns:
    """Host ``index``'s columns (``shoal node --partition I/N`` for a secureboost job)."""
    if count != int(job.model["hosts"]):
        raise ConfigError(f"the job has {job.model['hosts']} hosts, not {count}")
    if not 0 <= index < count:
        raise ConfigError(f"host index must be in [0, {count}), got {index}")
    train, _ = job.load_data()
    return Columns(x=_blocks(job, train)[1 + index], block=index)


def tree_node_app(job: JobSpec) -> NodeApp:
    """The tasks a node of this job runs."""
    from shoal.crypto import SecureSum
    from shoal.runtime import NodeApp
    from shoal.trees.horizontal import horizontal_tasks

    app = NodeApp()
    if job.model["name"] == "secureboost":
        from shoal.trees.vertical import host_tasks

        app.install(host_tasks(insecure_keys=bool(job.model.get("insecure_test_keys", False))))
    else:
        secure = bool(job.raw.get("aggregate", {}).get("secure", True))
        app.install(horizontal_tasks(secure=secure))
        app.install(SecureSum().node_tasks())
    return app


def run_tree_job(job: JobSpec, federation: Federation | None = None) -> dict[str, Any]:
    """Train the job's trees (simulated nodes unless a federation is given) and score them
    on the test split, beside centralized training on the pooled data with the same cuts."""
    from shoal.core import Federation
    from shoal.runtime import LocalEngine
    from shoal.trees import train

    training, test = job.load_data()
    params = tree_params(job, training.classes)
    started = time.perf_counter()
    summary: dict[str, Any] = {"job": job.name, "model": job.model["name"]}
    if job.model["name"] == "gbdt":
        from shoal.trees.horizontal import train_horizontal

        if federation is None:
            engine = LocalEngine(
                tree_node_app(job), data=job.partitions(), workers=int(job.engine["workers"])
            )
            federation = Federation(engine, min_nodes=job.min_nodes, seed=job.seed)
        secure = bool(job.raw.get("aggregate", {}).get("secure", True))
        model = train_horizontal(
            federation, params, secure=secure, sketch_cells=int(job.model.get("sketch_cells", 4096))
        )
        summary["secure"] = secure
        wall = time.perf_counter() - started
        scores = model.predict(test.x)
        central = train(training.x, training.y, model.params, bins=model.bins)
    else:
        scores, central, wall = _secureboost(job, federation, training, test, params, started)
    summary.update(
        {
            "nodes": len(federation.node_ids) if federation is not None else job.model["hosts"],
            "trees": params.n_trees,
            "wall_s": wall,
            **_scores(scores, test.y, params, "federated_"),
            **_scores(central.predict(test.x), test.y, params, "centralized_"),
            "identical_predictions": bool(np.array_equal(scores, central.predict(test.x))),
        }
    )
    return summary


def _secureboost(
    job: JobSpec,
    federation: Federation | None,
    training: Dataset,
    test: Dataset,
    params: GBDTParams,
    started: float,
) -> tuple[np.ndarray, Any, float]:
    from shoal.core import Federation
    from shoal.runtime import LocalEngine
    from shoal.trees import Bins, train
    from shoal.trees.vertical import (
        GuestParty,
        VerticalTreeFailed,
        federated_link,
        predict_vertical,
        train_secureboost,
    )

    blocks = _blocks(job, training)
    if federation is None:
        data = [Columns(x=b, block=i) for i, b in enumerate(blocks[1:])]
        federation = Federation(LocalEngine(tree_node_app(job), data=data), seed=job.seed)
    block = {
        h: federated_link(federation, h)("describe", {"max_bins": params.max_bins}).get("block")
        for h in federation.node_ids
    }
    hosts = sorted(federation.node_ids, key=lambda h: (block[h] is None, block[h] or 0, h))
    if len(hosts) != len(blocks) - 1:
        raise ConfigError(f"the job has {len(blocks) - 1} hosts; {len(hosts)} are connected")
    guest = GuestParty(
        x=blocks[0],
        y=training.y,
        params=params,
        key_bits=int(job.model.get("key_bits", 2048)),
        insecure_keys=bool(job.model.get("insecure_test_keys", False)),
    )
    links = [federated_link(federation, h) for h in hosts]
    start = None
    for attempt in range(3):  # a tree a host failed is dropped; resume from the complete ones
        try:
            model = train_secureboost(guest, links, start=start)
            break
        except VerticalTreeFailed as failed:
            if attempt == 2:
                raise
            start = failed.model
    wall = time.perf_counter() - started
    x_test = test.x.reshape(len(test.x), -1).astype(np.float64)
    g = blocks[0].shape[1]
    widths = [b.shape[1] for b in blocks[1:]]
    edges = np.cumsum([g, *widths])
    x_hosts = [x_test[:, edges[i] : edges[i + 1]] for i in range(len(widths))]
    # hosts score their columns of the test rows (in deployment they would hold them)
    scores = predict_vertical(model, x_test[:, :g], links, x_hosts=x_hosts)
    host_cuts: tuple[np.ndarray, ...] = ()
    for b in blocks[1:]:
        from shoal.trees import fit_bins

        host_cuts += fit_bins(b, max_bins=params.max_bins).cuts
    joined = Bins(cuts=guest.bins.cuts + host_cuts)
    central = train(training.x.reshape(len(training.x), -1), training.y, model.params, bins=joined)
    return scores, central, wall


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
