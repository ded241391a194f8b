"""PLD accounting: shoal's adaptive grid against dp-accounting on a grid 10x finer.

For every (q, z, steps, delta) of the grid the issue tracker set (q in {0.001, 0.01, 0.1,
0.5}, z in {0.5, 0.8, 1.1, 2, 5}, steps in {1, 100, 10^4}, delta in {1e-5, 1e-6}) it prints
shoal's PLD epsilon (default, adaptive grid), the reference (dp-accounting's PLDAccountant
with a fixed width 10x finer than the adaptive one ended with), the old fixed 1e-3 grid, and
the time of each. The worst relative deviation from the reference closes the table.

    python benchmarks/pld_accuracy.py --json results/pld_accuracy.json
    python benchmarks/pld_accuracy.py --quick        # steps 1 and 100 only
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from shoal.privacy.accounting import epsilon, pld_relative_width

QS = (0.001, 0.01, 0.1, 0.5)
ZS = (0.5, 0.8, 1.1, 2.0, 5.0)
STEPS = (1, 100, 10_000)
DELTAS = (1e-5, 1e-6)


def reference(q: float, z: float, steps: int, delta: float, ours: float) -> float:
    """dp-accounting on a fixed grid 10x finer than the adaptive one (same upper-bound math)."""
    width = min(max(ours * pld_relative_width(steps) / 10, 1e-9), 0.01)
    return epsilon(
        sample_rate=q,
        noise_multiplier=z,
        steps=steps,
        delta=delta,
        accountant="pld",
        pld_discretization=width,
    )


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="steps 1 and 100 only")
    parser.add_argument("--old", action="store_true", help="also time the old fixed 1e-3 grid")
    args = parser.parse_args()
    steps_grid = STEPS[:2] if args.quick else STEPS
    rows = []
    print(
        f"{'q':>6} {'z':>4} {'steps':>6} {'delta':>6} {'shoal':>12} {'reference':>12} "
        f"{'dev %':>7} {'shoal s':>8} {'ref s':>7}" + (f" {'1e-3 grid':>10}" if args.old else "")
    )
    for q, z, steps, delta in itertools.product(QS, ZS, steps_grid, DELTAS):
        common = {"sample_rate": q, "noise_multiplier": z, "steps": steps, "delta": delta}
        ours, ours_s = timed(epsilon, accountant="pld", **common)
        ref, ref_s = timed(reference, q, z, steps, delta, ours)
        deviation = ours / ref - 1 if ref > 0 else 0.0
        row = {
            "q": q,
            "z": z,
            "steps": steps,
            "delta": delta,
            "shoal": ours,
            "reference": ref,
            "deviation": deviation,
            "shoal_s": ours_s,
            "reference_s": ref_s,
        }
        line = (
            f"{q:>6g} {z:>4g} {steps:>6} {delta:>6g} {ours:>12.6g} {ref:>12.6g} "
            f"{100 * deviation:>7.3f} {ours_s:>8.3f} {ref_s:>7.2f}"
        )
        if args.old:
            old, old_s = timed(epsilon, accountant="pld", pld_discretization=1e-3, **common)
            row["fixed_1e-3"], row["fixed_1e-3_s"] = old, old_s
            line += f" {old:>10.6g}"
        print(line, flush=True)
        rows.append(row)
    worst = max(rows, key=lambda r: abs(r["deviation"]))
    print(
        f"worst deviation {100 * worst['deviation']:+.3f}% at q={worst['q']}, z={worst['z']}, "
        f"steps={worst['steps']}, delta={worst['delta']}; shoal total "
        f"{sum(r['shoal_s'] for r in rows):.1f} s over {len(rows)} queries"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
