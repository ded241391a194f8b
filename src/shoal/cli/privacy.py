"""``shoal privacy``: epsilon of a DP-SGD / DP-FedAvg schedule, or the noise a target epsilon needs.

In the spirit of TensorFlow Privacy's compute_dp_sgd_privacy, on Google's dp-accounting.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from shoal.errors import ConfigError

__all__ = ["register", "run"]

EPILOG = """\
examples:
  # MNIST-style DP-SGD: 60000 examples, batches of 256, 60 epochs
  shoal privacy epsilon --sample-rate 0.004267 --noise-multiplier 1.1 --steps 14063 --delta 1e-5

  # the noise multiplier needed for epsilon=3 with the tighter PLD accountant, as JSON
  shoal privacy noise --epsilon 3 --delta 1e-5 --sample-rate 0.01 --steps 10000 \\
      --accountant pld --json

  # user-level DP-FedAvg: 100 of 10000 nodes per round, 500 rounds
  shoal privacy noise --epsilon 2 --delta 1e-6 --sample-rate 0.01 --steps 500

sample rate: expected batch size / dataset size (or nodes per round / population), with
Poisson sampling; steps: optimizer steps (or federated rounds); neighbouring datasets differ
by adding or removing one example (or one node's data).
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        metavar="Q",
        help="Poisson sampling rate in (0, 1]",
    )
    p.add_argument(
        "--steps", type=int, required=True, metavar="T", help="number of steps or rounds (>= 1)"
    )
    p.add_argument("--delta", type=float, required=True, metavar="D", help="target delta in (0, 1)")
    p.add_argument(
        "--accountant",
        choices=("rdp", "pld"),
        default="rdp",
        help="RDP (fast, default) or PLD (tighter, slower)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``privacy`` with its ``epsilon`` and ``noise`` subcommands."""
    parser = subparsers.add_parser(
        "privacy",
        help="differential-privacy accounting: epsilon for a schedule, noise for an epsilon",
        description="Differential-privacy accounting for the Poisson-subsampled Gaussian "
        "mechanism (DP-SGD, DP-FedAvg).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run, privacy_command=None, _privacy_parser=parser)
    sub = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")

    eps = sub.add_parser(
        "epsilon",
        help="epsilon spent by a schedule",
        description="Epsilon at --delta after --steps steps at --sample-rate with "
        "--noise-multiplier.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eps.add_argument(
        "--noise-multiplier",
        type=float,
        required=True,
        metavar="S",
        help="noise std divided by the clipping norm (>= 0)",
    )
    _add_common(eps)

    noise = sub.add_parser(
        "noise",
        help="noise multiplier needed for a target epsilon",
        description="Smallest noise multiplier whose epsilon at --delta is at most --epsilon "
        "(within 1%).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    noise.add_argument(
        "--epsilon", type=float, required=True, metavar="E", help="target epsilon (> 0)"
    )
    _add_common(noise)


def _fmt_eps(value: float) -> str:
    return "infinite" if math.isinf(value) else f"{value:.4g}"


def run(args: argparse.Namespace) -> int:
    """Run ``shoal privacy ...``; returns the exit code (ConfigError for bad options)."""
    # dp-accounting (and SciPy behind it) loads only here, so that `--help` stays fast.
    from shoal.privacy.accounting import calibrate, epsilon

    command = getattr(args, "privacy_command", None)
    if command is None:
        args._privacy_parser.print_help()
        return 2
    result: dict[str, Any] = {
        "accountant": args.accountant,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "delta": args.delta,
    }
    if command == "epsilon":
        eps = epsilon(
            sample_rate=args.sample_rate,
            noise_multiplier=args.noise_multiplier,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
        result["noise_multiplier"] = args.noise_multiplier
        # JSON has no infinity; null says "no finite guarantee" without breaking parsers.
        result["epsilon"] = None if math.isinf(eps) else eps
    elif command == "noise":
        # PLD's adaptive grid (the default) is sized to the answer, so small targets are met
        # within 1% too; the reported epsilon uses the same grid, so the two numbers agree.
        width = None
        z = calibrate(
            epsilon=args.epsilon,
            delta=args.delta,
            sample_rate=args.sample_rate,
            steps=args.steps,
            accountant=args.accountant,
            pld_discretization=width,
        )
        eps = epsilon(
            sample_rate=args.sample_rate,
            noise_multiplier=z,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
            pld_discretization=width,
        )
        result["target_epsilon"] = args.epsilon
        result["noise_multiplier"] = z
        result["epsilon"] = eps
    else:  # argparse restricts the choices; kept for a clear message if that changes
        raise ConfigError(f"unknown privacy subcommand {command!r}; use 'epsilon' or 'noise'")

    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"Poisson-subsampled Gaussian with sample rate {args.sample_rate:g} and noise "
            f"multiplier {result['noise_multiplier']:.4g}, over {args.steps} steps, satisfies "
            f"({_fmt_eps(eps)}, {args.delta:g})-DP ({args.accountant.upper()} accountant, "
            f"add/remove-one neighbours)."
        )
    return 0
