"""Job files: one TOML file describing data, model, algorithm, aggregation and engine.

The same job runs in simulation (``shoal run``) and in deployment (``shoal coordinator``
and ``shoal node``). Parsing is strict: an unknown table or key, a wrong type or a value out
of range is a ConfigError that names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.aggregate import (
    Chain,
    Clip,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    NormBound,
    Stage,
    TrimmedMean,
)
from shoal.attacks import ATTACKS, attacked_app, build_attack, choose_malicious
from shoal.cli.trees import TREE_MODELS, check_tree_job
from shoal.crypto import SecureSum
from shoal.data import (
    DATASETS,
    SCHEMES,
    Dataset,
    load_csv,
    load_dataset,
    load_npz,
    partition,
    split_holdout,
)
from shoal.errors import ConfigError, ShoalError
from shoal.learn import (
    ALGORITHMS,
    TRAIN,
    Algorithm,
    Model,
    RoundReport,
    TrainingResult,
    learning_app,
    simulate,
)
from shoal.learn.registry import build_model, model_names
from shoal.privacy.guard import budget_guard
from shoal.privacy.plans import ExampleDP, NodeDP
from shoal.runtime import Faults, NodeApp, Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RULES", "JobSpec", "load_job", "parse_job", "simulate_job"]

RULES = ("mean", "median", "trimmed_mean", "krum", "multikrum", "geometric_median")

Schema = Mapping[str, tuple[type | tuple[type, ...], Any]]

_SCHEMAS: dict[str, Schema] = {
    "job": {"name": (str, "job"), "seed": (int, 0)},
    "data": {
        "dataset": (str, None),
        "path": (str, None),
        "label": (str, "label"),
        "test_path": (str, None),
        "test_fraction": ((int, float), 0.2),
        "holdout": ((int, float), 0.0),
        "partition": (dict, {}),
    },
    "partition": {
        "scheme": (str, "iid"),
        "nodes": (int, 10),
        "alpha": ((int, float), 0.5),
        "shards_per_node": (int, 2),
        "min_size": (int, 1),
    },
    "engine": {
        "workers": (int, 1),
        "min_nodes": (int, 1),
        "deadline_s": ((int, float), 600.0),
        "federated_eval_every": (int, 0),
    },
    "faults": {
        "drop": ((int, float), 0.0),
        "straggle": ((int, float), 0.0),
        "straggle_s": ((int, float), 10.0),
        "error": ((int, float), 0.0),
    },
    "privacy": {
        "epsilon": ((int, float), None),
        "noise_multiplier": ((int, float), None),
        "delta": ((int, float), 1e-5),
        "level": (str, "example"),
        "mode": (str, "distributed"),
        "clip": ((int, float), 1.0),
        "sample_rate": ((int, float), 0.25),
        "steps_per_round": (int, 5),
        "accountant": (str, "rdp"),
        "target_quantile": ((int, float), None),
        "node_max_epsilon": ((int, float), None),
        "node_max_delta": ((int, float), None),
    },
    "aggregate": {
        "rule": (str, "mean"),
        "clip": ((int, float), None),
        "norm_bound": ((int, float), None),
        "beta": ((int, float), 0.1),
        "f": (int, 1),
        "m": (int, 1),
        "secure": (bool, False),
    },
}
_TABLES = (
    "job",
    "data",
    "model",
    "algorithm",
    "aggregate",
    "engine",
    "faults",
    "privacy",
    "attack",
)


def _section(raw: Mapping[str, Any], table: str, schema: Schema) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{table}] must be a table")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in [{table}]; allowed keys: {', '.join(sorted(schema))}"
        )
    out: dict[str, Any] = {}
    for key, (types, default) in schema.items():
        value = raw.get(key, default)
        if key in raw and (
            not isinstance(value, types) or isinstance(value, bool) != (types is bool)
        ):
            expected = " or ".join(
                t.__name__ for t in (types if isinstance(types, tuple) else (types,))
            )
            raise ConfigError(f"[{table}] {key} must be {expected}, got {value!r}")
        out[key] = value
    return out


def _choice(value: str, allowed: Any, what: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not known; choose one of: {', '.join(allowed)}")
    return value


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A validated job; ``raw`` is the file's content, for the run record."""

    name: str
    seed: int
    data: Mapping[str, Any]
    partition: Mapping[str, Any]
    model: Mapping[str, Any]
    algorithm: Mapping[str, Any]
    aggregate: Mapping[str, Any]
    engine: Mapping[str, Any]
    faults: Mapping[str, Any] | None
    privacy: Mapping[str, Any] | None
    attack: Mapping[str, Any] | None
    raw: Mapping[str, Any] = field(repr=False)
    base_dir: Path = Path(".")
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def min_nodes(self) -> int:
        return int(self.engine["min_nodes"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)

    # -- data ------------------------------------------------------------------------

    def load_data(self) -> tuple[Dataset, Dataset]:
        """(pooled training data, server-side test data); loaded once per job."""
        if "data" not in self._cache:
            self._cache["data"] = self._load_data()
        result: tuple[Dataset, Dataset] = self._cache["data"]
        return result

    def _load_data(self) -> tuple[Dataset, Dataset]:
        data = self.data
        if data["dataset"] is not None:
            return load_dataset(
                data["dataset"], test_fraction=data["test_fraction"], seed=self.seed
            )
        path = self.base_dir / data["path"]
        full = _load_file(path, data["label"])
        if data["test_path"] is not None:
            return full, _load_file(self.base_dir / data["test_path"], data["label"])
        return split_holdout(full, fraction=data["test_fraction"], seed=self.seed)

    def partitions(self) -> list[Dataset]:
        train, _ = self.load_data()
        spec = self.partition
        parts: list[Dataset] = partition(
            train,
            nodes=spec["nodes"],
            scheme=spec["scheme"],
            alpha=spec["alpha"],
            shards_per_node=spec["shards_per_node"],
            min_size=spec["min_size"],
            seed=self.seed,
        )
        return parts

    def node_data(self, index: int, count: int) -> Dataset:
        """Node ``index`` of ``count``: the same slice the simulation gives that node."""
        if count != self.partition["nodes"]:
            raise ConfigError(
                f"the job partitions data over {self.partition['nodes']} nodes, not {count}"
            )
        if not 0 <= index < count:
            raise ConfigError(f"partition index must be in [0, {count}), got {index}")
        return self.partitions()[index]

    # -- model, algorithm, aggregation ----------------------------------------------------

    def build_model(self, *, features: int | None = None, classes: int | None = None) -> Model:
        if features is None or classes is None:
            train, _ = self.load_data()
            features = features or int(train.x.reshape(len(train.x), -1).shape[1])
            classes = classes or int(train.classes or 2)
        options = {k: v for k, v in self.model.items() if k != "name"}
        return build_model(self.model["name"], features=features, classes=classes, **options)

    def build_aggregator(self) -> Stage:
        spec = self.aggregate
        reducers: dict[str, Callable[[], Stage]] = {
            "mean": Mean,
            "median": Median,
            "trimmed_mean": lambda: TrimmedMean(beta=spec["beta"]),
            "krum": lambda: Krum(f=spec["f"]),
            "multikrum": lambda: MultiKrum(f=spec["f"], m=spec["m"]),
            "geometric_median": GeometricMedian,
        }
        if spec["secure"]:
            if spec["rule"] != "mean":
                raise ConfigError(
                    f"[aggregate] rule = {spec['rule']!r} needs each update in the clear; "
                    "with secure = true only rule = 'mean' is possible"
                )
            if spec["clip"] is None:
                raise ConfigError(
                    "[aggregate] secure = true needs clip = C (the L2 bound that also sets the "
                    "quantization range of the secure sum)"
                )
            return Clip(float(spec["clip"])) | SecureSum() | Mean()
        stages: list[Stage] = []
        if spec["norm_bound"] is not None:
            stages.append(NormBound(float(spec["norm_bound"])))
        if spec["clip"] is not None:
            stages.append(Clip(float(spec["clip"])))
        stages.append(reducers[spec["rule"]]())
        return Chain.of(*stages) if len(stages) > 1 else stages[0]

    def build_privacy(self) -> ExampleDP | NodeDP | None:
        """The job's DP plan, with noise calibrated to its epsilon over all its rounds."""
        spec = self.privacy
        if spec is None or (spec["epsilon"] is None and spec["noise_multiplier"] is None):
            return None
        secure = bool(self.aggregate["secure"])
        rounds = int(self.algorithm.get("rounds", 10))
        common: dict[str, Any] = {
            "clip": float(spec["clip"]),
            "accountant": spec["accountant"],
            "secure": secure,
        }
        plan: ExampleDP | NodeDP
        if spec["level"] == "node":
            if spec["target_quantile"] is not None:
                common["target_quantile"] = float(spec["target_quantile"])
            rate = min(
                1.0, int(self.algorithm.get("nodes_per_round", 10)) / self.partition["nodes"]
            )
            if spec["noise_multiplier"] is not None:
                plan = NodeDP(
                    noise_multiplier=spec["noise_multiplier"], delta=spec["delta"], **common
                )
            else:
                plan = NodeDP.for_target(
                    epsilon=spec["epsilon"],
                    delta=spec["delta"],
                    rounds=rounds,
                    sample_rate=rate,
                    **common,
                )
            return plan
        distributed = spec["mode"] == "distributed"
        if secure and not distributed:
            common["secure"] = False  # local DP-SGD noises each update fully by itself
        train, _ = self.load_data()
        options = {
            **common,
            "sample_rate": float(spec["sample_rate"]),
            "steps_per_round": int(spec["steps_per_round"]),
            "distributed": distributed,
            "total_examples": len(train) if distributed else None,
        }
        if spec["noise_multiplier"] is not None:
            return ExampleDP(
                noise_multiplier=spec["noise_multiplier"], delta=spec["delta"], **options
            )
        return ExampleDP.for_target(
            epsilon=spec["epsilon"], delta=spec["delta"], rounds=rounds, **options
        )

    def build_algorithm(self) -> Algorithm:
        options = {k: v for k, v in self.algorithm.items() if k != "name"}
        options["track_loss"] = True  # a job prints and records the training loss per round
        cls = ALGORITHMS[self.algorithm["name"]]
        privacy = self.build_privacy()
        if privacy is not None and (isinstance(privacy, NodeDP) or privacy.distributed):
            if self.aggregate["rule"] != "mean":
                raise ConfigError(
                    f"[aggregate] rule = {self.aggregate['rule']!r} cannot combine with this "
                    "[privacy] plan, which adds noise to a sum; use rule = 'mean', or "
                    "mode = 'local' (each node noises its own update)"
                )
            return cls(privacy=privacy, **options)
        return cls(aggregator=self.build_aggregator(), privacy=privacy, **options)

    def build_budget_guard(self) -> Any:
        """Simulation: every node's owner enforces ``node_max_epsilon`` on its own ledger."""
        spec = self.privacy
        if spec is None or spec["node_max_epsilon"] is None:
            return None
        return budget_guard(
            max_epsilon=float(spec["node_max_epsilon"]),
            max_delta=float(spec["node_max_delta"] or spec["delta"]),
            tasks={TRAIN},
            accountant=spec["accountant"],
        )

    def build_attack_app(self, model: Model) -> NodeApp | None:
        """Simulation only: a NodeApp in which the job's attackers poison their updates."""
        if self.attack is None:
            return None
        options = {k: v for k, v in self.attack.items() if k not in ("name", "fraction")}
        attack = build_attack(str(self.attack.get("name")), **options)
        node_ids = [f"n{i}" for i in range(int(self.partition["nodes"]))]
        malicious = choose_malicious(
            node_ids, float(self.attack.get("fraction", 0.0)), seed=self.seed
        )
        return attacked_app(model, attack, malicious)

    def build_faults(self) -> Faults | None:
        if self.faults is None:
            return None
        return Faults(seed=self.seed, **self.faults)


def _load_file(path: Path, label: str) -> Dataset:
    if not path.exists():
        raise ConfigError(f"[data] path {str(path)!r} does not exist")
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    return load_csv(path, label=label)


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read job file {str(path)!r}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file {str(path)!r} is not valid TOML: {exc}") from None
    return parse_job(raw, base_dir=path.parent)


def parse_job(raw: Mapping[str, Any], *, base_dir: Path = Path(".")) -> JobSpec:
    unknown = sorted(set(raw) - set(_TABLES))
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}; a job has: {', '.join(_TABLES)}")
    job = _section(raw.get("job", {}), "job", _SCHEMAS["job"])
    data = _section(raw.get("data", {}), "data", _SCHEMAS["data"])
    if (data["dataset"] is None) == (data["path"] is None):
        raise ConfigError(
            f"[data] needs exactly one of dataset (one of {', '.join(DATASETS)}) or path "
            "(a CSV or .npz file)"
        )
    if data["dataset"] is not None:
        _choice(data["dataset"], DATASETS, "[data] dataset")
    if not 0 < data["test_fraction"] < 1:
        raise ConfigError("[data] test_fraction must be between 0 and 1")
    if not 0 <= data["holdout"] < 1:
        raise ConfigError("[data] holdout must be in [0, 1)")
    part = _section(data.pop("partition"), "data.partition", _SCHEMAS["partition"])
    _choice(part["scheme"], [s for s in SCHEMES if s != "by_key"], "[data.partition] scheme")
    if part["nodes"] < 1:
        raise ConfigError("[data.partition] nodes must be at least 1")

    model = dict(raw.get("model", {"name": "softmax_regression"}))
    model.setdefault("name", "softmax_regression")
    _choice(model["name"], [*model_names(), *TREE_MODELS], "[model] name")

    algorithm = dict(raw.get("algorithm", {}))
    algorithm.setdefault("name", "fedavg")
    cls = ALGORITHMS.get(algorithm["name"])
    if cls is None:
        _choice(algorithm["name"], sorted(ALGORITHMS), "[algorithm] name")
        raise AssertionError  # unreachable: _choice raised
    allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "aggregator"}
    unknown = sorted(set(algorithm) - allowed - {"name"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in [algorithm] for {cls.name}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )

    aggregate = _section(raw.get("aggregate", {}), "aggregate", _SCHEMAS["aggregate"])
    _choice(aggregate["rule"], RULES, "[aggregate] rule")
    engine = _section(raw.get("engine", {}), "engine", _SCHEMAS["engine"])
    faults = _section(raw["faults"], "faults", _SCHEMAS["faults"]) if "faults" in raw else None
    privacy = _section(raw["privacy"], "privacy", _SCHEMAS["privacy"]) if "privacy" in raw else None
    if privacy is not None:
        _choice(privacy["level"], ("example", "node"), "[privacy] level")
        _choice(privacy["mode"], ("distributed", "local"), "[privacy] mode")
        _choice(privacy["accountant"], ("rdp", "pld"), "[privacy] accountant")
        if (privacy["epsilon"] is None) == (privacy["noise_multiplier"] is None):
            raise ConfigError(
                "[privacy] needs exactly one of epsilon (the target; noise is calibrated) or "
                "noise_multiplier"
            )
        if not 0 < privacy["delta"] < 1:
            raise ConfigError("[privacy] delta must be between 0 and 1, e.g. 1e-5")
    attack = raw.get("attack")
    if attack is not None:
        if not isinstance(attack, Mapping) or "name" not in attack:
            raise ConfigError(
                f"[attack] needs name = one of {sorted(ATTACKS)} and fraction = 0.0..0.5"
            )
        fraction = attack.get("fraction", 0.0)
        if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ConfigError("[attack] fraction must be a number in [0, 1)")
    spec = JobSpec(
        name=job["name"],
        seed=job["seed"],
        data=data,
        partition=part,
        model=model,
        algorithm=algorithm,
        aggregate=aggregate,
        engine=engine,
        faults=faults,
        privacy=privacy,
        attack=attack,
        raw=dict(raw),
        base_dir=base_dir,
    )
    if model["name"] in TREE_MODELS:
        try:
            check_tree_job(spec)
        except ConfigError:
            raise
        except (ShoalError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid tree job: {exc}") from None
        return spec
    try:  # build once so that every bad value is reported now, not rounds later
        spec.build_algorithm()
        spec.build_faults()
        if attack is not None:
            build_attack(
                str(attack["name"]),
                **{k: v for k, v in attack.items() if k not in ("name", "fraction")},
            )
    except ConfigError:
        raise
    except (ShoalError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid job: {exc}") from None
    return spec


def simulate_job(
    job: JobSpec,
    *,
    store: Store | None = None,
    resume: str | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
) -> TrainingResult:
    """Run ``job`` on a LocalEngine, exactly as ``shoal run`` does."""
    _, test = job.load_data()
    model = job.build_model()
    app = job.build_attack_app(model)
    guard = job.build_budget_guard()
    if guard is not None:
        app = app or learning_app(model, plan=job.build_algorithm().plan)
        app.add_guard(guard)
    return simulate(
        model=model,
        app=app,
        nodes=job.partitions(),
        algorithm=job.build_algorithm(),
        test=test,
        holdout=float(job.data["holdout"]),
        federated_eval_every=int(job.engine["federated_eval_every"]),
        seed=job.seed,
        min_nodes=job.min_nodes,
        deadline_s=float(job.engine["deadline_s"]),
        faults=job.build_faults(),
        workers=int(job.engine["workers"]),
        store=store,
        run_name=job.name,
        config=job.to_dict(),
        resume=resume,
        on_round=on_round,
    )
