"""Start-up time of the ``shoal`` command: ``--help`` of every subcommand, against the floor.

The floor is ``python -c pass`` (the interpreter alone). Each row is a fresh process, run
interleaved with all the others ``--repeat`` times; the table gives the median wall time and
the same minus the floor (what shoal itself costs). ``--compare-src DIR`` runs every command
a second time with ``PYTHONPATH=DIR`` (another checkout's ``src``, e.g. before a change), in
the same interleaved loop, so the two columns are measured under the same load.

    python benchmarks/cli_startup.py --json results/cli_startup.json
    python benchmarks/cli_startup.py --compare-src /path/to/old/checkout/src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

COMMANDS: list[list[str]] = [
    [],
    ["demo"],
    ["run"],
    ["runs"],
    ["certs"],
    ["keys"],
    ["keys", "new"],
    ["nodes"],
    ["nodes", "add"],
    ["coordinator"],
    ["node"],
    ["privacy"],
    ["privacy", "epsilon"],
    ["scan"],
]


def _argv(command: list[str] | None) -> list[str]:
    if command is None:
        return [sys.executable, "-c", "pass"]
    code = "import sys; from shoal.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *command, "--help"]


def _time(argv: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--compare-src", type=Path, help="another checkout's src directory")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    trees = {"this": SRC}
    if args.compare_src is not None:
        trees["compare"] = args.compare_src.resolve()
    rows: list[tuple[str, list[str] | None]] = [("python -c pass (floor)", None)]
    rows += [(" ".join(["shoal", *c, "--help"]), c) for c in COMMANDS]
    samples: dict[tuple[str, str], list[float]] = {}
    for argv_row in rows:  # warm the file cache once
        for src in trees.values():
            _time(_argv(argv_row[1]), src)
    for _ in range(args.repeat):
        for label, command in rows:
            for tree, src in trees.items():
                samples.setdefault((label, tree), []).append(_time(_argv(command), src))

    medians = {key: statistics.median(values) for key, values in samples.items()}
    floor = medians[(rows[0][0], "this")]
    header = f"{'command':<32} {'wall s':>8} {'- floor':>8}"
    if "compare" in trees:
        header += f" {'compare s':>10} {'- floor':>8}"
    version = sys.version.split()[0]
    print(f"median of {args.repeat} fresh processes each, interleaved; python {version}")
    print(header)
    results = []
    for label, _ in rows:
        this = medians[(label, "this")]
        line = f"{label:<32} {this:>8.3f} {this - floor:>8.3f}"
        row = {"command": label, "wall_s": this, "above_floor_s": this - floor}
        if "compare" in trees:
            other = medians[(label, "compare")]
            line += f" {other:>10.3f} {other - floor:>8.3f}"
            row["compare_wall_s"] = other
        print(line)
        results.append(row)
    slowest = max(r["wall_s"] for r in results[1:])
    print(f"slowest --help: {slowest:.3f} s (floor {floor:.3f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": platform.platform(),
            "python": sys.version,
            "repeat": args.repeat,
            "trees": {k: str(v) for k, v in trees.items()},
            "rows": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
