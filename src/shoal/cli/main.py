"""Entry point of the ``shoal`` command.

Each subcommand lives in a module exposing ``register(subparsers)``, which adds argparse
parsers whose ``func`` default takes the parsed namespace and returns an exit code. Only the
module of the command being run is imported, so ``shoal scan`` does not pay for gRPC or
the privacy accountants.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from shoal.cli.text import inert
from shoal.errors import ShoalError

# command -> (module that registers it, one-line help shown by `shoal --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("shoal.cli.learn", "train digits across simulated nodes, compare with centralized"),
    "run": ("shoal.cli.learn", "simulate a job file"),
    "runs": ("shoal.cli.learn", "list recorded runs, or show one"),
    "certs": ("shoal.cli.deploy", "make a CA and TLS certificates for a federation"),
    "keys": ("shoal.cli.deploy", "create or inspect a node's Ed25519 identity key"),
    "nodes": ("shoal.cli.deploy", "admit, list or revoke nodes in the coordinator's registry"),
    "coordinator": ("shoal.cli.deploy", "serve a job to nodes over gRPC and train"),
    "node": ("shoal.cli.deploy", "connect to a coordinator and run its tasks on local data"),
    "privacy": ("shoal.cli.privacy", "DP accounting: epsilon for a schedule, noise for a target"),
    "predict": (
        "shoal.cli.vertical",
        "private prediction on encrypted rows: serve or query",
    ),
    "export": (
        "shoal.cli.export",
        "export a run's model: ONNX, a NumPy-only predictor, or a model-hub folder",
    ),
    "scan": ("shoal.cli.scan", "check model files for code that would run when loaded"),
    "query": ("shoal.cli.query", "answer a SQL query across an analytics job's parties"),
    "audit": ("shoal.cli.audit", "verify or show an audit trail (a store or a node's state)"),
    "analytics-node": (
        "shoal.cli.query",
        "alias of `shoal node --db FILE` (serve a database to `shoal query`)",
    ),
    "datasite": (
        "shoal.cli.datasite",
        "serve data for remote data science: code requests, approval, sandbox",
    ),
}

EPILOG = """\
examples:
  shoal demo                          train digits across 20 simulated nodes
  shoal run job.toml --json out.json  run a job file in simulation
  shoal runs                          list recorded runs
  shoal export RUN_ID --format onnx   a run's model as ONNX, checked with onnxruntime
  shoal scan model.pt                 check a model file for code that would run on load
  shoal audit verify --store fl.db    check the coordinator's audit chain for tampering
  shoal privacy epsilon --sample-rate 0.01 --noise-multiplier 1.1 --steps 10000 --delta 1e-5
"""


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with full sub-parsers for the command named in ``argv`` (if any)."""
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Privacy-preserving federated learning: simulate, deploy, scan.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    registered: set[str] = set()
    if wanted in COMMANDS:
        module = importlib.import_module(COMMANDS[wanted][0])
        before = set(subparsers.choices)
        module.register(subparsers)
        registered = set(subparsers.choices) - before
    for name, (_, help_text) in COMMANDS.items():
        if name not in registered:  # listed in --help; its module loads when it is used
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
    except ShoalError as exc:
        # Messages quote what files hold (a member name, a scanner finding): shown inert.
        print(f"shoal: error: {inert(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
