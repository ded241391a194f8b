"""The ``shoal`` command: one subcommand module per feature, assembled in ``main``."""

from __future__ import annotations

from shoal.cli.main import main

__all__ = ["main"]
