"""Recipe: a pickle-free description of how to build an object where it will be used.

A recipe names an importable function (``"package.module:function"``) and JSON options. An
engine that runs nodes in other processes (RayEngine) sends recipes, never objects: the
worker imports the function and calls it, so nothing is unpickled and no arrays travel.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ConfigError

__all__ = ["Recipe"]

_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """``target(**options)``, built where it is needed.

    ``target`` is ``"module:function"`` (importable on every worker); ``options`` hold only
    JSON values (strings, numbers, booleans, None, lists and string-keyed tables).
    """

    target: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not _TARGET.match(self.target):
            raise ConfigError(
                f"a recipe's target is 'package.module:function', got {self.target!r}"
            )
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"a recipe's options are a table, got {type(self.options).__name__}")
        try:
            text = json.dumps(dict(self.options), allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"recipe {self.target}: options must be plain JSON values (no arrays or "
                f"objects: describe them, e.g. by a file path), {exc}"
            ) from None
        # Frozen as JSON: what the worker gets is exactly what was checked here.
        object.__setattr__(self, "options", json.loads(text))

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "options": self.options}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"not a recipe: {exc}") from None
        if not isinstance(raw, dict) or set(raw) != {"target", "options"}:
            raise ConfigError("a recipe is a JSON object with exactly 'target' and 'options'")
        return cls(target=raw["target"], options=raw["options"])

    def build(self) -> Any:
        """Import the target and call it with the options."""
        module_name, _, attr = self.target.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"recipe {self.target}: cannot import {module_name!r} here ({exc}); the module "
                "must be installed (or on PYTHONPATH) wherever the nodes run"
            ) from None
        for part in attr.split("."):
            try:
                found = getattr(found, part)
            except AttributeError:
                raise ConfigError(f"recipe {self.target}: {module_name} has no {attr}") from None
        if not callable(found):
            raise ConfigError(f"recipe {self.target}: {attr} is not callable")
        return found(**self.options)
