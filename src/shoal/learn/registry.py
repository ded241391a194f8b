"""Models by name, for job files and the CLI: ``name -> factory(features, classes, **options)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from shoal.errors import ConfigError
from shoal.learn.model import Model
from shoal.learn.softmax import SoftmaxRegression

__all__ = ["MODELS", "OPTIONAL_MODELS", "build_model", "model_names", "register_model"]

ModelFactory = Callable[..., Model]


def _softmax(*, features: int, classes: int, l2: float = 0.0) -> Model:
    return SoftmaxRegression(features=features, classes=classes, l2=l2)


MODELS: dict[str, ModelFactory] = {"softmax_regression": _softmax}

# Models whose adapters import heavy libraries: registered when their module is imported,
# which happens only when one of them is asked for.
OPTIONAL_MODELS: dict[str, str] = {
    "sklearn_sgd": "shoal.learn.sklearn",
    "sklearn_logistic": "shoal.learn.sklearn",
    "sklearn_mlp": "shoal.learn.sklearn",
    "mlp": "shoal.learn.torch",
    "cnn": "shoal.learn.torch",
    "char_lstm": "shoal.learn.text_models",
    "word_lstm": "shoal.learn.text_models",
    "tiny_transformer": "shoal.learn.text_models",
}


def model_names() -> list[str]:
    """Every model name a job may use (optional ones need their extra when built)."""
    return sorted(set(MODELS) | set(OPTIONAL_MODELS))


def register_model(name: str, factory: ModelFactory) -> None:
    if name in MODELS:
        raise ConfigError(f"a model named {name!r} is already registered")
    MODELS[name] = factory


def build_model(name: str, *, features: int, classes: int, **options: Any) -> Model:
    """Instantiate a registered model; unknown names and options get a clear ConfigError."""
    if name not in MODELS and name in OPTIONAL_MODELS:
        module = OPTIONAL_MODELS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"model {name!r} needs an optional dependency: {exc}") from None
    factory = MODELS.get(name)
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; choose one of {model_names()}")
    try:
        return factory(features=features, classes=classes, **options)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None
