"""What extracting a served linear model costs an attacker, with and without output noise.

The textbook attack on a linear model: query the unit vectors e_1..e_d and the zero row,
repeatedly, and average (least squares): d + 1 exact answers give the weights. Each row
goes through the real service (``shoal.vertical.prediction``: Paillier-encrypted rows,
encrypted noised scores), and the attacker pools every answer so far. For each noise level
the table reports how many rows the attacker needed before its estimate of every weight
stayed within ``--tol`` (median over ``--trials``), and the error it reaches within a query
budget of ``--budget`` rows. Query counts do not depend on the key size; small keys keep it quick.

    python benchmarks/prediction.py --json prediction.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def attack(
    noise: float, *, d: int, max_repeats: int, key_bits: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Max abs weight error after each repeat of the d + 1 probe rows; the true weights."""
    from shoal.core import Federation
    from shoal.runtime import LocalEngine, NodeApp
    from shoal.vertical.prediction import PredictionClient, ServedModel, serving_tasks

    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=d), float(rng.normal())
    model = ServedModel(weights=w, bias=b, noise_std=noise, min_key_bits=key_bits)
    app = NodeApp()
    app.install(serving_tasks(model))
    fed = Federation(LocalEngine(app, nodes=["owner"]))
    client = PredictionClient(fed, owner="owner", key_bits=key_bits, insecure=key_bits < 2048)
    probes = np.vstack([np.eye(d), np.zeros((1, d))])
    answers = []
    step = 64  # repeats per query: the service's answers are the same whatever the split
    for start in range(0, max_repeats, step):
        k = min(step, max_repeats - start)
        answers.append(client.predict(np.tile(probes, (k, 1))).reshape(k, d + 1))
    y = np.vstack(answers)
    # least squares on the pooled answers: w_i = mean(answer to e_i) - mean(answer to 0)
    means = np.cumsum(y, axis=0) / np.arange(1, len(y) + 1)[:, None]
    est = means[:, :d] - means[:, d:]
    return np.max(np.abs(est - w), axis=1), w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.2, 0.5])
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--tol", type=float, default=0.1, help="max abs error on every weight")
    ap.add_argument("--budget", type=int, default=600, help="rows the owner lets a client score")
    ap.add_argument("--max-repeats", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--key-bits", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    d, per = args.features, args.features + 1
    print(
        f"extracting a {d}-feature linear model through the encrypted service "
        f"({args.key_bits}-bit keys): rows until every weight is within {args.tol}, "
        f"median of {args.trials} trials; error within a budget of {args.budget} rows"
    )
    print(f"{'noise std':>10s} {'rows needed':>12s} {'x exact':>8s} {'err @ budget':>13s} "
          f"{'wall s':>7s}", flush=True)  # fmt: skip
    rows_exact = None
    results: list[dict[str, Any]] = []
    for noise in args.noise:
        start = time.perf_counter()
        needed, at_budget = [], []
        for trial in range(args.trials):
            errors, _ = attack(
                noise, d=d, max_repeats=args.max_repeats, key_bits=args.key_bits, seed=trial
            )
            # from which repeat on the estimate stays within tol (a lucky early dip aside)
            miss = np.flatnonzero(errors >= args.tol)
            last = int(miss[-1]) + 1 if miss.size else 0
            needed.append(per * (last + 1) if last < len(errors) else None)
            k = max(1, min(len(errors), args.budget // per))
            at_budget.append(float(errors[k - 1]))
        found = [n for n in needed if n is not None]
        median = (
            float(np.median(found)) if len(found) * 2 > len(needed) else None
        )  # None: most trials never got there within max_repeats
        if noise == 0 and median is not None:
            rows_exact = median
        ratio = median / rows_exact if median is not None and rows_exact else None
        wall = time.perf_counter() - start
        results.append(
            {
                "noise_std": noise,
                "rows_needed": needed,
                "rows_needed_median": median,
                "error_at_budget": at_budget,
                "wall_s": wall,
            }
        )
        shown = (
            f"{median:12.0f}"
            if median is not None
            else f"{'> ' + str(per * args.max_repeats):>12s}"
        )
        print(
            f"{noise:10.3f} {shown} {ratio if ratio else float('nan'):8.1f} "
            f"{float(np.median(at_budget)):13.4f} {wall:7.1f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
