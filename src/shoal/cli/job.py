"""Job files: one TOML file describing data, model, algorithm, aggregation and engine.

The same job runs in simulation (``shoal run``) and in deployment (``shoal coordinator``
and ``shoal node``). Parsing is strict: an unknown table or key, a wrong type or a value out
of range is a ConfigError that names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.aggregate import (
    Chain,
    Clip,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    NormBound,
    Quantize,
    RandomRotation,
    RandomSubset,
    Stage,
    TopK,
    TrimmedMean,
)
from shoal.attacks import ATTACKS, attacked_app, build_attack, choose_malicious
from shoal.cli.trees import TREE_MODELS, categorical_columns, check_tree_job
from shoal.crypto import SecureSum
from shoal.data import (
    DATASETS,
    SCHEMES,
    Dataset,
    RoleCorpus,
    load_play,
    parse_speeches,
    split_holdout,
)
from shoal.data.files import is_file
from shoal.data.spec import DataSpec
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
from shoal.learn.registry import MODELS, OPTIONAL_MODELS, build_model, model_names
from shoal.learn.transfer.spec import TransferSpec
from shoal.privacy.guard import budget_guard
from shoal.privacy.plans import ExampleDP, NodeDP
from shoal.runtime import Faults, NodeApp, Recipe, Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "COMBINATION_CHECKS",
    "RULES",
    "JobSpec",
    "check_combinations",
    "job_app",
    "job_data",
    "load_job",
    "parse_job",
    "simulate_job",
]

RULES = ("mean", "median", "trimmed_mean", "krum", "multikrum", "geometric_median")
ENGINE_KINDS = ("local", "ray")

# Data sets read from a play-formatted text file ([data] path), one node per speaking role.
TEXT_DATASETS = ("shakespeare",)
TEXT_MODELS = ("char_lstm", "word_lstm", "tiny_transformer")
_TEXT_KEYS = ("tokens", "seq_len", "vocab_size")
# Test windows the server evaluates after each round of a text job unless [engine]
# eval_examples says otherwise: tinyshakespeare's test split is 205,355 windows, minutes
# per round for LEAF's LSTM; benchmarks/text_lm.py evaluates 2,000 too.
TEXT_EVAL_EXAMPLES = 2_000

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
        # Text (dataset = "shakespeare"): see shoal.data.text.role_corpus.
        "tokens": (str, None),
        "seq_len": (int, None),
        "vocab_size": (int, None),
        "min_lines": (int, 2),
    },
    "partition": {
        "scheme": (str, "iid"),
        "nodes": (int, 10),
        "alpha": ((int, float), 0.5),
        "shards_per_node": (int, 2),
        "min_size": (int, 1),
    },
    "engine": {
        "kind": (str, "local"),
        "address": (str, None),
        "actors": (int, None),
        "workers": (int, 1),
        "min_nodes": (int, 1),
        "deadline_s": ((int, float), 600.0),
        "federated_eval_every": (int, 0),
        # The server's test set: evaluated every eval_every rounds (and after the last) on
        # eval_examples of it drawn once (0: all; default all, 2,000 windows for text).
        "eval_every": (int, 1),
        "eval_examples": (int, None),
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
        # Compression at the nodes (shoal.aggregate.compress), in this order after clip.
        "rotate": (bool, False),
        "topk": ((int, float), None),
        # RandomSubset: the same public random positions at every node (secure = true too).
        "random_subset": ((int, float), None),
        "random_subset_error_feedback": (bool, None),  # None: off, RandomSubset's default
        "quantize_bits": (int, None),
    },
}
# Models that are not PyTorch modules: nothing to load a state dict into or freeze.
MODELS_WITHOUT_TRANSFER = ("softmax_regression", "sklearn_sgd", "sklearn_logistic", "sklearn_mlp")
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
    "transfer",
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
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"[{table}] {key} must be a finite number, got {value!r}")
        if (
            isinstance(types, tuple)
            and float in types
            and isinstance(value, int)
            and abs(value) > sys.float_info.max
        ):
            # an integer TOML gives exactly; float(value) would raise OverflowError later
            raise ConfigError(f"[{table}] {key} must be a finite number, got {brief_int(value)}")
        out[key] = value
    return out


def brief_int(value: int) -> str:
    """An integer as a message shows it: huge ones by their number of digits (str() of an
    integer over 4,300 digits raises ValueError)."""
    digits = value.bit_length() * 30103 // 100000 + 1
    return repr(value) if digits < 40 else f"an integer of about {digits} digits"


def _check_fields(table: str, cls: type, values: Mapping[str, Any], skip: set[str]) -> None:
    """Type-check ``values`` against the dataclass ``cls``'s annotated fields.

    int fields take integers only (not 1.5, not true); float fields take integers or finite
    floats; bool fields take true/false; ``X | None`` fields take an X. The message names
    the key, the expected type and the value found.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in skip or key not in hints:
            continue
        kinds = {t for t in typing.get_args(hints[key]) or (hints[key],) if t is not type(None)}
        if kinds <= {int}:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kinds <= {int, float}:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok, expected = ok and math.isfinite(value), "a finite number"
        elif kinds == {bool}:
            ok, expected = isinstance(value, bool), "true or false"
        elif kinds == {str}:
            ok, expected = isinstance(value, str), "a string"
        else:
            continue  # objects (aggregators, privacy plans) are never set from a job file
        if not ok:
            raise ConfigError(f"[{table}] {key} must be {expected}, got {value!r}")


# Algorithm fields that are objects built from other tables, never set in [algorithm].
_ALGORITHM_OBJECTS = {"aggregator", "privacy"}

# (lowest, highest, lowest allowed, highest allowed) per [algorithm] key.
_ALGORITHM_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "rounds": (1, math.inf, True, False),
    "nodes_per_round": (1, math.inf, True, False),
    "local_epochs": (1, math.inf, True, False),
    "batch_size": (1, math.inf, True, False),
    "max_steps": (1, math.inf, True, False),
    "lr": (0, math.inf, False, False),
    "server_lr": (0, math.inf, False, False),
    "lr_final": (0, 1, False, True),
    "mu": (0, math.inf, True, False),
    "momentum": (0, 1, True, False),
    "beta1": (0, 1, True, False),
    "beta2": (0, 1, True, False),
    "tau": (0, math.inf, False, False),
    # fedbuff
    "concurrency": (1, math.inf, True, False),
    "max_staleness": (0, 10_000, True, True),
    "staleness_exponent": (0, 1, True, True),
    "idle_s": (0, math.inf, False, False),
    "max_idle_waits": (1, math.inf, True, False),
}


def _check_ranges(
    table: str, values: Mapping[str, Any], ranges: Mapping[str, tuple[float, float, bool, bool]]
) -> None:
    for key, value in values.items():
        if key not in ranges or value is None:
            continue
        low, high, low_ok, high_ok = ranges[key]
        above = value >= low if low_ok else value > low
        below = value <= high if high_ok else value < high
        if not (above and below):
            lo = f"{'[' if low_ok else '('}{low:g}"
            hi = f"{high:g}{']' if high_ok else ')'}" if math.isfinite(high) else "inf)"
            raise ConfigError(f"[{table}] {key} must be in {lo}, {hi}, got {value!r}")


def _table(raw: Mapping[str, Any], name: str, default: Mapping[str, Any]) -> Mapping[str, Any]:
    value = raw.get(name, default)
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table (a [{name}] section), got {value!r}")
    return value


def _check_model_options(model: Mapping[str, Any]) -> None:
    """Type-check [model] options against the model factory's annotated keyword arguments."""
    import inspect

    name = model["name"]
    factory = MODELS.get(name)
    if factory is None and name in OPTIONAL_MODELS:
        try:
            importlib.import_module(OPTIONAL_MODELS[name])
        except ImportError:
            return  # reported when the model is built, with the extra to install
        factory = MODELS.get(name)
    if factory is None:
        return
    params = inspect.signature(factory).parameters
    allowed = sorted(k for k in params if k not in ("features", "classes"))
    unknown = sorted(set(model) - set(allowed) - {"name"})
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"unknown key(s) {unknown} in [model] for {name}; allowed: "
            f"{', '.join(allowed) or 'none'}"
        )
    try:
        hints = typing.get_type_hints(factory)
    except (NameError, TypeError):
        return  # annotations this Python cannot evaluate: the factory checks its own input
    for key, value in model.items():
        hint = hints.get(key)
        if key == "name" or hint is None:
            continue
        kinds = {t for t in typing.get_args(hint) or (hint,) if t is not type(None)}
        if value is None and type(None) in typing.get_args(hint):
            continue
        bad = (
            (kinds <= {int} and (isinstance(value, bool) or not isinstance(value, int)))
            or (
                kinds <= {int, float}
                and kinds != {int}
                and (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                )
            )
            or (kinds == {bool} and not isinstance(value, bool))
            or (kinds == {str} and not isinstance(value, str))
        )
        if bad:
            expected = " or ".join(sorted(getattr(t, "__name__", str(t)) for t in kinds))
            raise ConfigError(f"[model] {key} must be {expected}, got {value!r}")
        if kinds <= {int, float} and isinstance(value, int) and not -(2**63) <= value < 2**63:
            # torch and numpy take 64-bit ints: a larger one failed in the factory, untold
            raise ConfigError(f"[model] {key} must fit in 64 bits (|value| < 2**63), got {value}")


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


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
    transfer: TransferSpec | None = None  # [transfer]: pretrained weights, frozen/personal parts
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

    def eval_data(self) -> Dataset:
        """The server's test set as evaluated after rounds: ``[engine] eval_examples`` of
        it drawn once from the job's seed (the same examples every round and for the
        baseline); 0 is all of it; unset, all of it except for text, where it is
        ``TEXT_EVAL_EXAMPLES`` windows."""
        _, test = self.load_data()
        limit = self.engine["eval_examples"]
        if limit is None:
            limit = TEXT_EVAL_EXAMPLES if self.data["dataset"] in TEXT_DATASETS else 0
        if limit == 0 or len(test) <= limit:
            return test
        rows = np.random.default_rng(self.seed).choice(len(test), size=limit, replace=False)
        return test.subset(np.sort(rows))

    def text_corpus(self) -> RoleCorpus:
        """A text job's corpus: one node per role (the ``nodes`` roles with most tokens)."""
        if "corpus" not in self._cache:
            data = self.data
            tokens = data["tokens"] or ("word" if self.model["name"] == "word_lstm" else "char")
            default_len = 80 if tokens == "char" else 20
            self._cache["corpus"] = load_play(
                self.base_dir / data["path"],
                tokens=tokens,
                seq_len=data["seq_len"] or default_len,
                min_lines=data["min_lines"],
                test_fraction=data["test_fraction"],
                vocab_size=data["vocab_size"] or (10_000 if tokens == "word" else None),
                max_roles=self.partition["nodes"],
            )
        corpus: RoleCorpus = self._cache["corpus"]
        if len(corpus.train) < self.partition["nodes"]:
            raise ConfigError(
                f"[data.partition] nodes = {self.partition['nodes']} but the play has only "
                f"{len(corpus.train)} roles with {self.data['min_lines']} lines or more; lower "
                "nodes or min_lines"
            )
        return corpus

    def data_spec(self) -> DataSpec:
        """The job's ``[data]`` as a description that any process can build nodes from."""
        data = self.data
        paths = {}
        for key in ("path", "test_path"):
            if data[key] is not None:
                path = self.base_dir / data[key]
                if not is_file(path, f"[data] {key}") and not path.exists():
                    raise ConfigError(f"[data] {key} {str(path)!r} does not exist")
                paths[key] = str(path.resolve())
        return DataSpec(
            dataset=data["dataset"],
            path=paths.get("path"),
            test_path=paths.get("test_path"),
            label=data["label"],
            test_fraction=data["test_fraction"],
            partition=dict(self.partition),
            seed=self.seed,
            categorical=categorical_columns(self.model),
        )

    def _load_data(self) -> tuple[Dataset, Dataset]:
        if self.data["dataset"] in TEXT_DATASETS:
            return self.text_corpus().pooled()
        return self.data_spec().load()

    def partitions(self) -> list[Dataset]:
        if self.data["dataset"] in TEXT_DATASETS:
            return list(self.text_corpus().train.values())
        train, _ = self.load_data()
        parts: list[Dataset] = self.data_spec().partitions(train)
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
        model = build_model(self.model["name"], features=features, classes=classes, **options)
        if self.transfer is None:
            return model
        from shoal.learn.transfer import apply_transfer

        text = self.data["dataset"] in TEXT_DATASETS
        vocab = self.text_corpus().vocab if text else None
        return apply_transfer(model, self.transfer, vocab=vocab)

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
            return Chain.of(Clip(float(spec["clip"])), *self._compression(), SecureSum(), Mean())
        stages: list[Stage] = []
        if spec["norm_bound"] is not None:
            stages.append(NormBound(float(spec["norm_bound"])))
        if spec["clip"] is not None:
            stages.append(Clip(float(spec["clip"])))
        stages.extend(self._compression())
        stages.append(reducers[spec["rule"]]())
        return Chain.of(*stages) if len(stages) > 1 else stages[0]

    def _compression(self) -> list[Stage]:
        spec = self.aggregate
        stages: list[Stage] = []
        if spec["rotate"]:
            stages.append(RandomRotation())
        if spec["topk"] is not None:
            stages.append(TopK(float(spec["topk"])))
        if spec["random_subset"] is not None:
            feedback = spec["random_subset_error_feedback"] is True
            stages.append(RandomSubset(float(spec["random_subset"]), error_feedback=feedback))
        if spec["quantize_bits"] is not None:
            stages.append(Quantize(int(spec["quantize_bits"])))
        return stages

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
            if self.algorithm["name"] == "fedbuff":
                rate = 1.0  # DP-FedBuff: asynchronous arrivals are no Poisson sample
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

    def node_budget(self) -> dict[str, Any]:
        """Simulation: every node's owner enforces ``node_max_epsilon`` on its own ledger
        (the keyword arguments of ``learning_app``; empty without a limit)."""
        spec = self.privacy
        if spec is None or spec["node_max_epsilon"] is None:
            return {}
        return {
            "max_epsilon": float(spec["node_max_epsilon"]),
            "max_delta": float(spec["node_max_delta"] or spec["delta"]),
            "accountant": spec["accountant"],
        }

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


# -- combinations ------------------------------------------------------------------------
#
# Every rule about which model, algorithm, aggregation and privacy settings fit together
# lives here, and runs at parse time before any data loads. A check takes the parsed job
# and raises a ConfigError that names the keys involved and what would work instead; add a
# new rule by appending a function to COMBINATION_CHECKS.

# Models trained by scikit-learn's own solver: they cannot add a term to the local objective.
_SOLVER_MODELS = ("sklearn_sgd", "sklearn_mlp")
_TORCH_MODELS = ("mlp", "cnn", *TEXT_MODELS)


def _noised_sum(job: JobSpec) -> bool:
    """Whether the job's DP plan adds its noise to a sum of updates (not per node)."""
    p = job.privacy
    if p is None or (p["epsilon"] is None and p["noise_multiplier"] is None):
        return False
    return bool(p["level"] == "node" or p["mode"] == "distributed")


def _check_solver_models(job: JobSpec) -> None:
    model, name = job.model["name"], job.algorithm["name"]
    if model not in _SOLVER_MODELS:
        return
    if name == "scaffold" or (name == "fedprox" and job.algorithm.get("mu", 0.01) > 0):
        term = "SCAFFOLD's correction" if name == "scaffold" else "FedProx's proximal term"
        raise ConfigError(
            f"[model] name = {model!r} trains with scikit-learn's own solver, which cannot add "
            f"{term}: [algorithm] name = {name!r} does not fit it. Use name = 'fedavg', "
            "'fedavgm', 'fedadam', 'fedyogi' or 'fedadagrad', or a model that computes its "
            "own gradients: softmax_regression, sklearn_logistic, mlp, cnn"
        )


def _check_torch_models(job: JobSpec) -> None:
    model = job.model["name"]
    if model in _TORCH_MODELS and importlib.util.find_spec("torch") is None:
        raise ConfigError(
            f"[model] name = {model!r} needs PyTorch: pip install 'shoal[torch]' (on Linux, "
            "the CPU build: see the README's install section), or use softmax_regression, "
            "sklearn_sgd, sklearn_logistic or sklearn_mlp"
        )


def _check_text(job: JobSpec) -> None:
    text_data = job.data["dataset"] in TEXT_DATASETS
    text_model = job.model["name"] in TEXT_MODELS
    if text_data and not text_model:
        raise ConfigError(
            f"[data] dataset = {job.data['dataset']!r} is token ids; [model] name = "
            f"{job.model['name']!r} does not read them: use one of {', '.join(TEXT_MODELS)}"
        )
    if text_model and not text_data:
        raise ConfigError(
            f"[model] name = {job.model['name']!r} reads token ids: use [data] dataset = "
            "'shakespeare' with path = a play-formatted text file"
        )


def _check_secure(job: JobSpec) -> None:
    spec = job.aggregate
    if not spec["secure"] or _noised_sum(job):
        return  # a DP plan that noises the sum clips with [privacy] clip (and needs a mean)
    if spec["rule"] != "mean":
        raise ConfigError(
            f"[aggregate] rule = {spec['rule']!r} needs each update in the clear; with "
            "secure = true only rule = 'mean' is possible (drop secure, or use rule = 'mean')"
        )
    if spec["norm_bound"] is not None:
        raise ConfigError(
            "[aggregate] norm_bound needs each update's norm, which secure = true hides; use "
            "clip = C instead (each node clips its own update before masking)"
        )
    if spec["clip"] is None:
        raise ConfigError(
            "[aggregate] secure = true needs clip = C (the L2 bound that also sets the "
            "quantization range of the secure sum)"
        )


def _check_compression(job: JobSpec) -> None:
    spec = job.aggregate
    subset = spec["random_subset"]
    wanted = (
        spec["rotate"]
        or spec["topk"] is not None
        or subset is not None
        or spec["quantize_bits"] is not None
    )
    if spec["topk"] is not None and not 0 < spec["topk"] <= 1:
        raise ConfigError(f"[aggregate] topk must be a fraction in (0, 1], got {spec['topk']!r}")
    if subset is not None and not 0 < subset <= 1:
        raise ConfigError(f"[aggregate] random_subset must be a fraction in (0, 1], got {subset!r}")
    if subset is not None and spec["topk"] is not None:
        raise ConfigError(
            "[aggregate] topk and random_subset both choose which coordinates travel: set one"
        )
    if subset is None and spec["random_subset_error_feedback"] is not None:
        raise ConfigError("[aggregate] random_subset_error_feedback needs random_subset = FRACTION")
    if spec["quantize_bits"] is not None and spec["quantize_bits"] not in (1, 2, 4, 8, 16):
        raise ConfigError(
            f"[aggregate] quantize_bits must be 1, 2, 4, 8 or 16, got {spec['quantize_bits']!r}"
        )
    if not wanted:
        return
    if spec["secure"] and spec["topk"] is not None:
        raise ConfigError(
            "[aggregate] topk cannot combine with secure = true: every node would keep "
            "different coordinates, and a secure sum masks the same positions at every node. "
            "Under secure = true use rotate = true, random_subset = FRACTION (the same "
            "public positions at every node) and quantize_bits"
        )
    if spec["norm_bound"] is not None:
        raise ConfigError(
            "[aggregate] norm_bound needs each update's exact norm at the server, which "
            "compression (rotate, topk, random_subset, quantize_bits) changes; use clip = C "
            "instead"
        )
    p = job.privacy
    if p is not None and (p["level"] == "node" or p["mode"] == "distributed"):
        raise ConfigError(
            "[aggregate] compression (rotate, topk, random_subset, quantize_bits) does not "
            "combine with this [privacy] plan, whose noised sum takes no other aggregator; "
            "use mode = 'local' "
            "(each node noises its own update, and compressing that is post-processing)"
        )


def _check_noised_sum(job: JobSpec) -> None:
    if _noised_sum(job) and job.aggregate["rule"] != "mean":
        raise ConfigError(
            f"[aggregate] rule = {job.aggregate['rule']!r} cannot combine with this [privacy] "
            "plan, which adds noise to a sum; use rule = 'mean', or mode = 'local' (each node "
            "noises its own update)"
        )


def _check_robust_rule(job: JobSpec) -> None:
    spec = job.aggregate
    rule, n = spec["rule"], int(job.algorithm["nodes_per_round"])
    if rule == "trimmed_mean" and not 0 <= spec["beta"] < 0.5:
        raise ConfigError(f"[aggregate] beta must be in [0, 0.5), got {spec['beta']!r}")
    if rule in ("krum", "multikrum"):
        f = spec["f"]
        if f < 0:
            raise ConfigError(f"[aggregate] f must be at least 0, got {f}")
        if n < 2 * f + 3:
            raise ConfigError(
                f"[aggregate] rule = {rule!r} with f = {f} needs at least 2f+3 = {2 * f + 3} "
                f"updates per round, but [algorithm] nodes_per_round = {n}; sample more nodes "
                "or lower f"
            )
        if rule == "multikrum" and not 1 <= spec["m"] <= n - f:
            raise ConfigError(
                f"[aggregate] m must be in 1..nodes_per_round - f = {n - f}, got {spec['m']}"
            )
    for key in ("clip", "norm_bound"):
        value = spec[key]
        if value is not None and not value > 0:
            raise ConfigError(f"[aggregate] {key} must be a positive number, got {value!r}")


def _check_fedbuff(job: JobSpec) -> None:
    if job.algorithm["name"] != "fedbuff":
        return
    p = job.privacy
    if p is not None and p["level"] != "node":
        raise ConfigError(
            "[algorithm] name = 'fedbuff' takes [privacy] level = 'node' (DP-FedBuff: each "
            "buffer's sum clipped and noised); example-level DP-SGD is accounted per "
            "synchronous round: use fedavg for it"
        )
    if p is not None and p["target_quantile"] is not None:
        raise ConfigError(
            "[privacy] target_quantile (adaptive clipping) needs synchronous rounds; with "
            "[algorithm] name = 'fedbuff' use a fixed clip"
        )


def _check_engine(job: JobSpec) -> None:
    nodes, min_nodes = int(job.partition["nodes"]), job.min_nodes
    if min_nodes < 1 or min_nodes > nodes:
        raise ConfigError(
            f"[engine] min_nodes must be in 1..{nodes} (the nodes of [data.partition]), got "
            f"{min_nodes}"
        )
    if job.engine["workers"] < 1:
        raise ConfigError(f"[engine] workers must be at least 1, got {job.engine['workers']}")
    if not job.engine["deadline_s"] > 0:
        raise ConfigError(
            f"[engine] deadline_s must be a positive number, got {job.engine['deadline_s']!r}"
        )
    if job.engine["federated_eval_every"] < 0:
        raise ConfigError("[engine] federated_eval_every must be 0 (never) or more")
    if job.engine["eval_every"] < 1:
        raise ConfigError(
            f"[engine] eval_every must be at least 1 (the server's test set every that many "
            f"rounds, and after the last), got {job.engine['eval_every']}"
        )
    if job.engine["eval_examples"] is not None and job.engine["eval_examples"] < 0:
        raise ConfigError(
            f"[engine] eval_examples must be 0 (the whole test set) or a positive count, got "
            f"{job.engine['eval_examples']}"
        )
    kind = _choice(job.engine["kind"], ENGINE_KINDS, "[engine] kind")
    if kind != "ray":
        for key in ("address", "actors"):
            if job.engine[key] is not None:
                raise ConfigError(f"[engine] {key} is a Ray setting; it needs kind = 'ray'")
        return
    if job.engine["actors"] is not None and job.engine["actors"] < 1:
        raise ConfigError(f"[engine] actors must be at least 1, got {job.engine['actors']}")
    address = job.engine["address"]
    if address is not None and address != "auto":
        host, colon, port = address.rpartition(":") if ":" in address else (address, "", "")
        bad_port = colon and not (port.isdigit() and 0 < int(port) < 65536)
        if not host or bad_port or any(c.isspace() or c in "/@" for c in address):
            raise ConfigError(
                f"[engine] address must be 'auto' (the cluster this machine belongs to), a "
                f"host, or host:port of the Ray head (e.g. '10.0.0.5:6379'), got {address!r}"
            )


COMBINATION_CHECKS: list[Callable[[JobSpec], None]] = [
    _check_solver_models,
    _check_torch_models,
    _check_text,
    _check_secure,
    _check_compression,
    _check_noised_sum,
    _check_robust_rule,
    _check_fedbuff,
    _check_engine,
]


def check_combinations(job: JobSpec) -> None:
    """Run every check in COMBINATION_CHECKS on ``job`` (each raises a ConfigError)."""
    for check in COMBINATION_CHECKS:
        check(job)


def _check_text_data(data: Mapping[str, Any], part: Any) -> None:
    if data["path"] is None:
        raise ConfigError(
            f"[data] dataset = {data['dataset']!r} needs path = a play-formatted text file "
            "(e.g. tinyshakespeare.txt: speeches that start with a 'ROLE:' line)"
        )
    if data["test_path"] is not None:
        raise ConfigError(
            "[data] test_path does not apply to text data: each role's last lines "
            "(test_fraction of its tokens) are its test set"
        )
    if data["tokens"] is not None:
        _choice(data["tokens"], ("char", "word"), "[data] tokens")
    for key, low in (("seq_len", 1), ("vocab_size", 3), ("min_lines", 1)):
        if data[key] is not None and data[key] < low:
            raise ConfigError(f"[data] {key} must be at least {low}, got {data[key]}")
    if data["vocab_size"] is not None and data["tokens"] != "word":
        raise ConfigError("[data] vocab_size applies to tokens = 'word' only")
    if isinstance(part, Mapping):
        extra = sorted(set(part) - {"nodes", "scheme"})
        if extra or part.get("scheme", "by_role") != "by_role":
            raise ConfigError(
                "text data is partitioned by speaking role: [data.partition] takes only "
                "scheme = 'by_role' and nodes (how many roles, those with the most text; "
                f"default all), got {dict(part)}"
            )


def _count_roles(path: Path, min_lines: int) -> int:
    """Roles of the play with ``min_lines`` lines: the default node count of a text job."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"[data] path {str(path)!r} cannot be read as UTF-8 text: {exc}"
        ) from None
    speeches = parse_speeches(text)
    count = sum(1 for body in speeches.values() if body.count("\n") >= min_lines)
    if count == 0:
        raise ConfigError(
            f"[data] path {str(path)!r} has no speaker lines with {min_lines} lines or more: "
            "a play's text needs speeches that start with a line 'ROLE:' (a capitalised name "
            "and a colon), followed by the role's lines"
        )
    return count


def load_job(path: str | Path, *, engine: Mapping[str, Any] | None = None) -> JobSpec:
    """Read and check a job file; ``engine`` keys (from the command line) replace the
    file's ``[engine]`` ones before the checks, and the run records them."""
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
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(
            f"job file {str(path)!r} nests arrays or tables too deeply to be a job"
        ) from None
    if engine:
        table = raw.get("engine", {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"[engine] must be a table (an [engine] section), got {table!r}")
        raw = {**raw, "engine": {**table, **engine}}
    return parse_job(raw, base_dir=path.parent)


def parse_job(raw: Mapping[str, Any], *, base_dir: Path = Path(".")) -> JobSpec:
    unknown = sorted(set(raw) - set(_TABLES))
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}; a job has: {', '.join(_TABLES)}")
    job = _section(raw.get("job", {}), "job", _SCHEMAS["job"])
    if not 0 <= job["seed"] < 2**32:
        raise ConfigError(f"[job] seed must be in [0, 2**32), got {job['seed']}")
    data = _section(raw.get("data", {}), "data", _SCHEMAS["data"])
    raw_part = data["partition"]
    if data["dataset"] in TEXT_DATASETS:
        _check_text_data(data, raw_part)
    elif (data["dataset"] is None) == (data["path"] is None):
        raise ConfigError(
            f"[data] needs exactly one of dataset (one of {', '.join(DATASETS)}) or path "
            "(a CSV or .npz file)"
        )
    if data["dataset"] is not None:
        _choice(data["dataset"], (*DATASETS, *TEXT_DATASETS), "[data] dataset")
    if data["dataset"] not in TEXT_DATASETS:
        extra = [k for k in (*_TEXT_KEYS, "min_lines") if k in (raw.get("data") or {})]
        if extra:
            raise ConfigError(
                f"[data] {', '.join(extra)} apply to text data only (dataset = 'shakespeare')"
            )
    if not 0 < data["test_fraction"] < 1:
        raise ConfigError("[data] test_fraction must be between 0 and 1")
    if not 0 <= data["holdout"] < 1:
        raise ConfigError("[data] holdout must be in [0, 1)")
    part = _section(data.pop("partition"), "data.partition", _SCHEMAS["partition"])
    if data["dataset"] in TEXT_DATASETS:
        part["scheme"] = "by_role"
        if "nodes" not in raw_part:
            part["nodes"] = _count_roles(base_dir / data["path"], data["min_lines"])
    else:
        _choice(part["scheme"], [s for s in SCHEMES if s != "by_key"], "[data.partition] scheme")
    if part["nodes"] < 1:
        raise ConfigError("[data.partition] nodes must be at least 1")

    model = dict(_table(raw, "model", {"name": "softmax_regression"}))
    model.setdefault("name", "softmax_regression")
    _choice(model["name"], [*model_names(), *TREE_MODELS], "[model] name")
    if model["name"] not in TREE_MODELS:
        _check_model_options(model)

    algorithm = dict(_table(raw, "algorithm", {}))
    algorithm.setdefault("name", "fedavg")
    if not isinstance(algorithm["name"], str):
        raise ConfigError(
            f"[algorithm] name must be a string, one of {', '.join(sorted(ALGORITHMS))}; "
            f"got {algorithm['name']!r}"
        )
    cls = ALGORITHMS.get(algorithm["name"])
    if cls is None:
        _choice(algorithm["name"], sorted(ALGORITHMS), "[algorithm] name")
        raise AssertionError  # unreachable: _choice raised
    allowed = {
        f.name for f in dataclasses.fields(cls) if f.init and f.name not in _ALGORITHM_OBJECTS
    }
    unknown = sorted(set(algorithm) - allowed - {"name", "clamp"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in [algorithm] for {cls.name}; "
            f"allowed: {', '.join(sorted(allowed | {'clamp'}))}"
        )
    _check_fields("algorithm", cls, algorithm, skip={"name"})
    clamp = algorithm.pop("clamp", False)
    if not isinstance(clamp, bool):
        raise ConfigError(f"[algorithm] clamp must be true or false, got {clamp!r}")
    _check_ranges("algorithm", algorithm, _ALGORITHM_RANGES)
    nodes = part["nodes"]
    per_round = algorithm.get("nodes_per_round")
    if per_round is None:
        algorithm["nodes_per_round"] = min(_default(cls, "nodes_per_round"), nodes)
    elif per_round > nodes:
        if not clamp:
            raise ConfigError(
                f"[algorithm] nodes_per_round = {per_round} is more than the {nodes} nodes of "
                f"[data.partition]; lower it, or add clamp = true to [algorithm] to sample "
                f"all {nodes} every round"
            )
        algorithm["nodes_per_round"] = nodes

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
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 <= fraction < 1
        ):
            raise ConfigError("[attack] fraction must be a number in [0, 1)")
        _choice(str(attack["name"]), sorted(ATTACKS), "[attack] name")
        _check_fields("attack", ATTACKS[attack["name"]], attack, skip={"name", "fraction"})
    transfer = None
    if "transfer" in raw:
        if not isinstance(raw["transfer"], Mapping):
            raise ConfigError("[transfer] must be a table (pretrained = ..., freeze = [...])")
        if model["name"] in TREE_MODELS or model["name"] in MODELS_WITHOUT_TRANSFER:
            raise ConfigError(
                f"[transfer] needs a PyTorch model (mlp, cnn, char_lstm, ...), not "
                f"{model['name']!r}"
            )
        transfer = TransferSpec.from_mapping(raw["transfer"], base_dir=base_dir)
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
        transfer=transfer,
    )
    if model["name"] in TREE_MODELS:
        try:
            check_tree_job(spec)
        except ConfigError:
            raise
        except (ShoalError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid tree job: {exc}") from None
        return spec
    check_combinations(spec)  # before any data loads
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
    on_start: Callable[[str | None], None] | None = None,
) -> TrainingResult:
    """Run ``job`` as ``shoal run`` does: on a LocalEngine, or a RayEngine for kind = 'ray'."""
    if job.engine["kind"] == "ray":
        return _simulate_on_ray(
            job, store=store, resume=resume, on_round=on_round, on_start=on_start
        )
    test = job.eval_data()
    model = job.build_model()
    app = job.build_attack_app(model)
    budget = job.node_budget()
    if app is not None and budget:  # attackers train with their own tasks: guard them too
        app.add_guard(budget_guard(tasks={TRAIN}, **budget))
    return simulate(
        model=model,
        app=app,
        **({} if app is not None else budget),
        nodes=job.partitions(),
        algorithm=job.build_algorithm(),
        test=test,
        holdout=float(job.data["holdout"]),
        federated_eval_every=int(job.engine["federated_eval_every"]),
        eval_every=int(job.engine["eval_every"]),
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
        on_start=on_start,
    )


# -- on Ray: the job itself is the description each worker builds its nodes from ---------


def job_app(*, job: Mapping[str, Any], base_dir: str) -> NodeApp:
    """The NodeApp every node of ``job`` runs in simulation (a RayEngine's app recipe):
    the same one :func:`simulate_job` builds for its LocalEngine."""
    spec = parse_job(job, base_dir=Path(base_dir))
    model = spec.build_model()
    algorithm = spec.build_algorithm()
    app = spec.build_attack_app(model)
    budget = spec.node_budget()
    if app is None or TRAIN not in app.task_names:
        app = learning_app(model, app=app, plan=algorithm.plan, **budget)
    elif budget:  # attackers train with their own tasks: guard them too
        app.add_guard(budget_guard(tasks={TRAIN}, **budget))
    app.install(algorithm.node_tasks())
    return app


def job_data(*, job: Mapping[str, Any], base_dir: str) -> Callable[[str], Any]:
    """node id ``n<i>`` -> that node's data, with the job's holdout (a RayEngine's data
    recipe for jobs with ``[data] holdout`` or a text data set, which a DataSpec does not
    describe)."""
    from shoal.learn.tasks import LocalData

    spec = parse_job(job, base_dir=Path(base_dir))
    fraction = float(spec.data["holdout"])
    part_of: Callable[[int], Dataset]
    if spec.data["dataset"] in TEXT_DATASETS:  # a play's roles: read once per actor
        parts = spec.partitions()
        part_of = parts.__getitem__
    else:
        part_of = spec.data_spec().node

    def node(node_id: str) -> Any:
        index = int(node_id.removeprefix("n"))
        part = part_of(index)
        if fraction <= 0:
            return part
        train, test = split_holdout(part, fraction=fraction, seed=spec.seed + index)
        return LocalData(train=train, test=test)

    return node


def refuse_simulation_engine(job: JobSpec, command: str) -> None:
    """``shoal coordinator`` and ``shoal node`` run real nodes: a job asking for the Ray
    simulation engine is refused rather than deployed as if the table were not there."""
    if job.engine["kind"] == "ray":
        raise ConfigError(
            f"[engine] kind = 'ray' runs this job's nodes as a simulation on a Ray cluster "
            f"(`shoal run`); `{command}` deploys it with real nodes connecting over gRPC, "
            "where no Ray is involved. Remove kind, address and actors from [engine] to "
            "deploy this job"
        )


def job_description(job: JobSpec) -> dict[str, Any]:
    """The job as a recipe's options: every Ray worker parses it again, with paths resolved
    against the same directory (which must hold the same files on every machine)."""
    return {"job": job.to_dict(), "base_dir": str(job.base_dir.resolve())}


def ray_engine(
    job: JobSpec,
    *,
    app: Recipe,
    data: DataSpec | Recipe | None,
    nodes: int,
    faults: Faults | None = None,
) -> Any:
    """A RayEngine as the job's ``[engine]`` table (kind = 'ray') describes it."""
    from shoal.runtime.ray import RayEngine

    return RayEngine(
        app=app,
        data=data,
        nodes=nodes,
        address=job.engine["address"],
        actors=job.engine["actors"],
        workers=int(job.engine["workers"]),
        seed=job.seed,
        faults=faults,
    )


def _simulate_on_ray(
    job: JobSpec,
    *,
    store: Store | None,
    resume: str | None,
    on_round: Callable[[RoundReport], None] | None,
    on_start: Callable[[str | None], None] | None,
) -> TrainingResult:
    test = job.eval_data()
    model = job.build_model()
    description = job_description(job)
    data = (
        Recipe(target="shoal.cli.job:job_data", options=description)
        if float(job.data["holdout"]) > 0 or job.data["dataset"] in TEXT_DATASETS
        else job.data_spec()
    )
    engine = ray_engine(
        job,
        app=Recipe(target="shoal.cli.job:job_app", options=description),
        data=data,
        nodes=int(job.partition["nodes"]),
        faults=job.build_faults(),
    )
    try:
        return simulate(
            model=model,
            engine=engine,
            algorithm=job.build_algorithm(),
            test=test,
            federated_eval_every=int(job.engine["federated_eval_every"]),
            eval_every=int(job.engine["eval_every"]),
            seed=job.seed,
            min_nodes=job.min_nodes,
            deadline_s=float(job.engine["deadline_s"]),
            store=store,
            run_name=job.name,
            config=job.to_dict(),
            resume=resume,
            on_round=on_round,
            on_start=on_start,
        )
    finally:
        engine.close()
