"""Models by name, for job files and the CLI: ``name -> factory(features, classes, **options)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shoal.errors import ConfigError
from shoal.learn.model import Model
from shoal.learn.softmax import SoftmaxRegression

__all__ = ["MODELS", "build_model", "register_model"]

ModelFactory = Callable[..., Model]


def _softmax(*, features: int, classes: int, l2: float = 0.0) -> Model:
    return SoftmaxRegression(features=features, classes=classes, l2=l2)


MODELS: dict[str, ModelFactory] = {"softmax_regression": _softmax}


def register_model(name: str, factory: ModelFactory) -> None:
    if name in MODELS:
        raise ConfigError(f"a model named {name!r} is already registered")
    MODELS[name] = factory


def build_model(name: str, *, features: int, classes: int, **options: Any) -> Model:
    """Instantiate a registered model; unknown names and options get a clear ConfigError."""
    _load_optional_models()
    factory = MODELS.get(name)
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return factory(features=features, classes=classes, **options)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None


def _load_optional_models() -> None:
    """Adapters for scikit-learn and PyTorch register their names when importable."""
    import importlib

    for module in ("shoal.learn.sklearn", "shoal.learn.torch"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
