"""Helpers every subcommand shares: option parsers and where the store lives."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from shoal.runtime import Store

__all__ = ["default_store_path", "open_store", "positive_float", "positive_int"]


def default_store_path() -> Path:
    """Where runs are recorded unless --store says otherwise (``$SHOAL_STORE`` overrides)."""
    env = os.environ.get("SHOAL_STORE")
    return Path(env) if env else Path.home() / ".shoal" / "store.db"


def open_store(path: str | None) -> Store:
    """The store at ``path`` (or the default), creating its folder if needed."""
    target = Path(path) if path else default_store_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    return Store(target)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value
