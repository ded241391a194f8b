"""Vertical job files: the parties, their CSVs and id column, the model and the crypto.

``shoal run vertical.toml`` simulates the job (every party a virtual node, the centralized
model on the joined columns alongside); ``shoal coordinator/node --job vertical.toml`` runs
the same job deployed, each party a node holding only its own CSV.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import ConfigError, DataError
from shoal.vertical.model import MODELS, evaluate, held_out_rows, prepare, train_centralized
from shoal.vertical.party import PartyData
from shoal.vertical.protocol import HeteroConfig, HeteroResult, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "SECUREBOOST",
    "Party",
    "VerticalJob",
    "is_vertical",
    "load_vertical_job",
    "parse_vertical_job",
]

ARBITER = "arbiter"
SECUREBOOST = "secureboost"  # trees (shoal.trees.secureboost); its [model] keys are checked there


@dataclass(frozen=True, kw_only=True)
class Party:
    name: str
    role: str
    path: Path
    label: str | None = None

    def load(
        self,
        id_column: str,
        path: Path | None = None,
        *,
        missing_ok: bool = False,
        categorical: Mapping[str, Sequence[str] | None] | None = None,
    ) -> PartyData:
        return PartyData.from_csv(
            path or self.path, id_column=id_column, label=self.label, missing_ok=missing_ok,
            categorical=categorical,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class VerticalJob:
    name: str
    id_column: str
    parties: tuple[Party, ...]
    config: HeteroConfig
    raw: Mapping[str, Any]
    model: str = "hetero_logistic_regression"

    @property
    def roles(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.parties:
            out.setdefault(p.role, []).append(p.name)
        if self.config.mode == "arbiter":
            out[ARBITER] = [ARBITER]
        return out

    def party(self, name: str) -> Party:
        for p in self.parties:
            if p.name == name:
                return p
        raise ConfigError(f"no party {name!r} in job {self.name!r}")


def is_vertical(path: str | Path) -> bool:
    try:
        with Path(path).open("rb") as fh:
            return "vertical" in tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the regular job loader reports the problem


def load_vertical_job(path: str | Path, *, insecure_test_keys: bool = False) -> VerticalJob:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read job file {path}: {exc}") from None
    return parse_vertical_job(raw, base_dir=path.parent, insecure_test_keys=insecure_test_keys)


def parse_vertical_job(
    raw: Mapping[str, Any], *, base_dir: Path = Path("."), insecure_test_keys: bool = False
) -> VerticalJob:
    job = dict(raw.get("job", {}))
    vert = dict(raw.get("vertical", {}))
    engine = raw.get("engine", {})
    if isinstance(engine, Mapping) and (
        engine.get("kind", "local") != "local" or "address" in engine or "actors" in engine
    ):
        raise ConfigError(
            "a vertical job runs its parties in one process when simulated and on their own "
            "machines when deployed; it has no Ray engine: remove kind, address and actors "
            "from [engine]"
        )
    model = dict(raw.get("model", {}))
    algo = dict(raw.get("algorithm", {}))
    crypto = dict(raw.get("crypto", {}))
    id_column = vert.get("id_column")
    if not isinstance(id_column, str) or not id_column:
        raise ConfigError("[vertical] id_column names the column of ids every party holds")
    parties = []
    for entry in vert.get("parties", []):
        if not isinstance(entry, Mapping) or not {"name", "role", "path"} <= set(entry):
            raise ConfigError("[vertical] parties are tables with name, role and path")
        role = entry["role"]
        if role not in ("guest", "host"):
            raise ConfigError(f"party {entry['name']!r}: role is guest or host, got {role!r}")
        label = entry.get("label")
        if role == "host" and label is not None:
            raise ConfigError(
                f"party {entry['name']!r} is a host with a label column; only the guest holds "
                "labels"
            )
        if role == "guest" and not label:
            raise ConfigError(f"the guest {entry['name']!r} names its label column (label = ...)")
        if entry["name"] == ARBITER:
            raise ConfigError(f"{ARBITER!r} is reserved for the key-holding third party")
        parties.append(
            Party(
                name=str(entry["name"]), role=role, path=base_dir / str(entry["path"]), label=label
            )
        )
    if sum(p.role == "guest" for p in parties) != 1 or not any(p.role == "host" for p in parties):
        raise ConfigError("[vertical] parties: exactly one guest and at least one host")
    if len({p.name for p in parties}) != len(parties):
        raise ConfigError("[vertical] party names must be unique")
    scheme = crypto.get("scheme", "paillier")
    if scheme != "paillier":
        raise ConfigError(f"[crypto] scheme {scheme!r} is not supported; use 'paillier'")
    name = str(model.get("name", "hetero_logistic_regression"))
    if name not in MODELS and name != SECUREBOOST:
        raise ConfigError(
            f"[model] name must be one of {sorted([*MODELS, SECUREBOOST])}, got {name!r}"
        )
    if name == SECUREBOOST and vert.get("arbiter", False):
        raise ConfigError("secureboost has no arbiter: the guest holds the Paillier key")
    cfg = HeteroConfig(
        model=name if name in MODELS else "hetero_logistic_regression",
        mode="arbiter" if vert.get("arbiter", False) else "two_party",
        epochs=int(algo.get("epochs", 10)),
        batch_size=int(algo.get("batch_size", 1024)),
        lr=float(algo.get("lr", 0.15)),
        l2=float(algo.get("l2", 0.0)),
        patience=algo.get("patience"),
        max_retries=int(algo.get("max_retries", 3)),
        resume_wait_s=float(algo.get("resume_wait_s", 300.0)),
        seed=int(job.get("seed", 0)),
        test_fraction=float(vert.get("test_fraction", 0.2)),
        key_bits=int(crypto.get("key_bits", 2048)),
        insecure_test_keys=insecure_test_keys,
        min_overlap=int(vert.get("min_overlap", 10)),
    )
    if name in MODELS and cfg.mode == "two_party" and len(parties) != 2:
        raise ConfigError("without an arbiter a job has exactly two parties; set arbiter = true")
    return VerticalJob(
        name=str(job.get("name", "vertical")),
        id_column=id_column,
        parties=tuple(parties),
        config=cfg,
        raw=raw,
        model=name,
    )


def simulate(job: VerticalJob) -> dict[str, Any]:
    """Run the job with every party a virtual node; adds the centralized reference."""
    from shoal.core import Federation
    from shoal.runtime import LocalEngine, NodeApp
    from shoal.runtime.roles import NodeApps
    from shoal.vertical.tasks import vertical_tasks

    data = {p.name: p.load(job.id_column) for p in job.parties}
    roles = job.roles
    apps = {}
    for role, nodes in roles.items():
        for node in nodes:
            app = NodeApp(max_kept=8)
            app.install(vertical_tasks(role, mode=job.config.mode))
            apps[node] = app
    names = list(apps)
    engine = LocalEngine(NodeApps(apps), nodes=names, data=[data.get(n) for n in names])
    fed = Federation(engine, roles=roles, seed=job.config.seed)
    start = time.perf_counter()
    result = train(fed, job.config)
    wall = time.perf_counter() - start
    rows = {p.name: engine.node_state(p.name)["shoal.vertical"]["rows"] for p in job.parties}
    summary = summarize(job, result, wall)
    summary.update(centralized(job, data, rows, epochs=result.epochs_run))
    return summary


def summarize(job: VerticalJob, result: HeteroResult, wall_s: float) -> dict[str, Any]:
    return {
        "job": job.name,
        "model": job.config.model,
        "mode": job.config.mode,
        "intersection_size": result.intersection_size,
        "epochs_run": result.epochs_run,
        "retries": result.retries,
        "resumed_from": result.resumed_from,
        **{k: v for k, v in result.test.items() if k != "n"},
        "test_rows": int(result.test.get("n", 0)),
        "wall_s": wall_s,
        "bytes_sent": result.routed_bytes,
        "history": result.history,
    }


def centralized(
    job: VerticalJob,
    data: Mapping[str, PartyData],
    rows: Mapping[str, np.ndarray],
    *,
    epochs: int,
) -> dict[str, float]:
    """The same model trained on the joined aligned columns (simulation only: it needs
    every party's table in one place)."""
    cfg = job.config
    guest = next(p for p in job.parties if p.role == "guest")
    order = [guest] + [p for p in job.parties if p.role == "host"]
    n = len(rows[guest.name])
    held = held_out_rows(n, seed=cfg.seed, test_fraction=cfg.test_fraction)
    blocks = [
        prepare(data[p.name].x[rows[p.name]], held, intercept=p.role == "guest") for p in order
    ]
    y_all = data[guest.name].y
    if y_all is None:
        raise DataError("the guest holds no label column")
    y = y_all[rows[guest.name]]
    spec = MODELS[cfg.model]
    w = train_centralized(
        spec,
        np.hstack([b[0] for b in blocks]),
        y[~held],
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        l2=cfg.l2,
        seed=cfg.seed,
    )
    metrics = evaluate(spec, np.hstack([b[1] for b in blocks]) @ w, y[held]) if held.any() else {}
    return {f"centralized_{k}": v for k, v in metrics.items() if k != "loss"}
