"""The ``shoal`` command: one subcommand module per feature, assembled in ``shoal.cli.main``."""

from __future__ import annotations

__all__: list[str] = []
