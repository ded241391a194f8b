"""Entry point of the ``shoal`` command.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds an
argparse parser whose ``func`` default takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from shoal.errors import ShoalError

# Modules that contribute subcommands; each has register(subparsers).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "shoal.cli.learn",
    "shoal.cli.deploy",
    "shoal.cli.privacy",
    "shoal.cli.scan",
)

EPILOG = """\
examples:
  shoal demo                          train digits across 20 simulated nodes
  shoal run job.toml --json out.json  run a job file in simulation
  shoal runs                          list recorded runs
  shoal scan model.pt                 check a model file for code that would run on load
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Privacy-preserving federated learning: simulate, deploy, scan.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subcommand not written yet; the others still work
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
