"""Simulation overhead in instructions: ``simulate()`` against the floor loop, under callgrind.

``benchmarks/simulation.py`` times the Quickstart's ``simulate(...)`` against its minimal
NumPy floor in CPU seconds, which move with the machine's load. This script counts what each
row executes instead (valgrind's callgrind: user-space instructions of every thread, the same
on every run), so that a CPU ratio above the instruction ratio can be told apart from extra
work: the rest is what each instruction costs (cache and TLB misses, branch mispredictions,
the kernel's page faults), which callgrind does not see.

For each N, three processes run side by side under ``valgrind --tool=callgrind`` with the
same setup (imports, the digits data, every node's shard built, one warm-up call of each row
on 2 nodes): ``none`` stops there, ``floor`` then runs ``simulation.floor_run`` and ``simulate``
the Quickstart call, both exactly as ``simulation.py`` runs them, for ``--rounds`` rounds.
A row's instructions are its process's total minus ``none``'s; per round, and as a ratio to
the floor. ``--cache-sim`` adds callgrind's simulated first-level data and instruction cache
misses and its branch mispredictions (several times slower). The same rows also run
natively here, one after the other (``--native-repeats``, default 5, interleaved), for
the CPU ratio to compare with. valgrind runs NumPy's and OpenBLAS's AVX2 kernels where this
machine's CPU would run AVX-512 ones; ``--native-avx2`` makes the native rows take the same
AVX2 paths (``NPY_DISABLE_CPU_FEATURES``, ``OPENBLAS_CORETYPE=Haswell``), so that both ratios
count the same code.

    python benchmarks/simulation_instructions.py --nodes 100 1000 --rounds 3 \
        --json results/simulation_instructions.json

``--enforcement PLAN ...`` (``plain``, ``node DP``, ``example DP``: the plans of
``simulation.py``'s enforcement rows) adds, for each plan, that plan's ``simulate()`` as
shipped (``PLAN``) and with the node's enforcement patched to a no-op (``PLAN, unenforced``:
``simulation.enforcement_off``), and reports what the enforcement executes: enforced minus
no-op, per node-round and as a share of the no-op call. ``--rows`` restricts the processes
(``none`` always runs), e.g. ``--rows --enforcement "node DP"`` for the enforcement rows alone.
NumPy's kernels execute a number of instructions that depends on the values (DP noise drawn
from the OS changes the weights), so two processes of the same row differ by a few million
instructions; ``--fixed-entropy`` makes ``os.urandom`` a seeded stream in every counted
process, so that the enforced and no-op calls draw the same noise:

    python benchmarks/simulation_instructions.py --nodes 200 --rounds 3 --native-repeats 0 \
        --enforcement "node DP" "example DP" --rows --fixed-entropy

``--serial`` runs the rows' valgrind processes one after another (each takes a core for
minutes) instead of side by side.

valgrind must be on the PATH (``apt-get install valgrind``). PYTHONHASHSEED is fixed in the
children so that the setup runs the same instructions in every process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENFORCEMENT_PLANS = ("plain", "node DP", "example DP")  # simulation.py's enforcement rows
ROWS = ("none", "floor", "simulate")
# callgrind's summary line names each event it counted; these are the ones reported.
UNENFORCED = ", unenforced"
EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bcm", "Bim")


def child(row: str, nodes: int, rounds: int, seed: int, enforcement: list[str]) -> None:
    """The setup, then ``row`` once (run under callgrind by the parent)."""
    if os.environ.get("SHOAL_BENCH_FIXED_ENTROPY"):
        # Every process draws the same "entropy" (DP noise, SecAgg keys): the enforced and
        # no-op calls then follow the same numeric paths, whose instruction counts depend on
        # the values (a measurement only: never in the library).
        import random

        stream = random.Random(0)
        os.urandom = stream.randbytes
    sys.path.insert(0, str(HERE))
    import simulation as sim

    from shoal.data import Dataset
    from shoal.learn import FedAvg, SoftmaxRegression, simulate

    pool_x, pool_y, test_x, test_y = sim.digits(seed)
    test = Dataset(x=test_x, y=test_y, classes=sim.CLASSES, name="test")
    built = [sim.shard(pool_x, pool_y, seed, i) for i in range(nodes)]
    node_data = [
        Dataset(x=x, y=y, classes=sim.CLASSES, name=f"n{i}") for i, (x, y) in enumerate(built)
    ]

    def quickstart(data: list[Any], n_rounds: int, plan: Any = None) -> None:
        simulate(
            model=SoftmaxRegression(features=sim.FEATURES, classes=sim.CLASSES),
            nodes=data,
            algorithm=FedAvg(
                rounds=n_rounds,
                nodes_per_round=len(data),
                local_epochs=sim.EPOCHS,
                lr=sim.LR,
                batch_size=sim.BATCH,
                privacy=plan,
            ),
            test=test,
        )

    # Warm-up on 2 nodes, in every row's process: lazy imports and first-call caches are
    # then part of the setup that ``none`` subtracts, not of either row.
    sim.floor_run(lambda: built[:2], test_x, test_y, 1, seed)
    quickstart(node_data[:2], 1)
    for name in enforcement:  # the same setup in every process: each plan, both ways
        quickstart(node_data[:2], 1, sim.plan_of(name))
        with sim.enforcement_off():
            quickstart(node_data[:2], 1, sim.plan_of(name))
    gc.collect()
    plan, unenforced = row.removesuffix(UNENFORCED), row.endswith(UNENFORCED)
    if plan in enforcement:
        if unenforced:
            with sim.enforcement_off():
                quickstart(node_data, rounds, sim.plan_of(plan))
        else:
            quickstart(node_data, rounds, sim.plan_of(plan))
    elif row == "floor":
        sim.floor_run(lambda: built, test_x, test_y, rounds, seed)
    elif row == "simulate":
        quickstart(node_data, rounds)
    elif row == "native":
        native(built, node_data, test_x, test_y, rounds, seed, quickstart)


def native(
    built: list[Any],
    node_data: list[Any],
    test_x: Any,
    test_y: Any,
    rounds: int,
    seed: int,
    quickstart: Any,
) -> None:
    """Both rows natively, interleaved: process CPU per round, printed as JSON."""
    import simulation as sim

    repeats = int(os.environ["SHOAL_NATIVE_REPEATS"])
    cpu: dict[str, list[float]] = {"floor": [], "simulate": []}
    for _ in range(repeats):
        for name in cpu:
            gc.collect()
            c0 = time.process_time()
            if name == "floor":
                sim.floor_run(lambda: built, test_x, test_y, rounds, seed)
            else:
                quickstart(node_data, rounds)
            cpu[name].append((time.process_time() - c0) / rounds)
    print(json.dumps(cpu))


def events(out_file: Path) -> dict[str, int]:
    """The totals of a callgrind output file, by event name."""
    names: list[str] = []
    totals: list[int] = []
    for line in out_file.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("totals:") or line.startswith("summary:"):
            totals = [int(v) for v in line.split()[1:]]
    if not names or not totals:
        raise RuntimeError(f"no event totals in {out_file}")
    return dict(zip(names, totals))


def run_callgrind(
    nodes: int,
    rounds: int,
    seed: int,
    cache_sim: bool,
    rows: list[str],
    enforcement: list[str],
    fixed_entropy: bool = False,
    serial: bool = False,
) -> dict[str, dict[str, int]]:
    """Every row's event totals at ``nodes``; the rows' processes run side by side (counts do
    not depend on the load), or one after another with ``serial`` (on a shared machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        running = {}
        for i, row in enumerate(rows):
            out = Path(tmp) / f"{i}.out"
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            if cache_sim:
                command += ["--cache-sim=yes", "--branch-sim=yes"]
            command += [sys.executable, __file__, "--child", row, "--nodes", str(nodes)]
            command += ["--rounds", str(rounds), "--seed", str(seed)]
            if enforcement:
                command += ["--enforcement", *enforcement]
            env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1")
            if fixed_entropy:
                env["SHOAL_BENCH_FIXED_ENTROPY"] = "1"
            log_path = Path(tmp) / f"{i}.log"
            log = open(log_path, "w")  # noqa: SIM115 (closed below)
            running[row] = (
                subprocess.Popen(command, stdout=log, stderr=log, env=env),
                out,
                log,
                log_path,
            )
            if serial:
                running[row][0].wait()
        counted = {}
        for row, (process, out, log, log_path) in running.items():
            code = process.wait()
            log.close()
            if code != 0:
                text = log_path.read_text(errors="replace")
                raise RuntimeError(f"callgrind run of {row} at N={nodes} failed:\n{text[-2000:]}")
            counted[row] = events(out)
        return counted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-sim", action="store_true", help="cache and branch simulation")
    parser.add_argument("--native-repeats", type=int, default=5)
    parser.add_argument(
        "--native-avx2", action="store_true", help="native rows on the AVX2 paths valgrind runs"
    )
    parser.add_argument(
        "--enforcement",
        nargs="+",
        default=[],
        choices=ENFORCEMENT_PLANS,
        help="plans whose simulate() is counted enforced and with the enforcement a no-op",
    )
    parser.add_argument(
        "--rows",
        nargs="*",
        choices=ROWS[1:],
        help="the floor rows to count (default: floor and simulate; none: enforcement only)",
    )
    parser.add_argument(
        "--fixed-entropy",
        action="store_true",
        help="os.urandom a seeded stream in every counted process (same noise in each row)",
    )
    parser.add_argument(
        "--serial", action="store_true", help="one valgrind process at a time, not side by side"
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.nodes[0], args.rounds, args.seed, args.enforcement)
        return 0
    base_rows = list(ROWS[1:] if args.rows is None else dict.fromkeys(args.rows))
    rows = ["none", *base_rows]
    for plan in args.enforcement:
        rows += [plan, plan + UNENFORCED]
    results = []
    for n in args.nodes:
        counted = run_callgrind(
            n,
            args.rounds,
            args.seed,
            args.cache_sim,
            rows,
            args.enforcement,
            args.fixed_entropy,
            args.serial,
        )
        result: dict[str, Any] = {"nodes": n, "rounds": args.rounds}
        for row in rows[1:]:
            result[row] = {
                event: (counted[row][event] - counted["none"][event]) / args.rounds
                for event in EVENTS
                if event in counted[row]
            }
        floor_rows = "floor" in result and "simulate" in result
        if floor_rows:
            result["instructions_vs_floor"] = result["simulate"]["Ir"] / result["floor"]["Ir"]
        if args.native_repeats and floor_rows:
            command = [sys.executable, __file__, "--child", "native", "--nodes", str(n)]
            command += ["--rounds", str(args.rounds), "--seed", str(args.seed)]
            env = dict(os.environ, SHOAL_NATIVE_REPEATS=str(args.native_repeats))
            if args.native_avx2:
                env["NPY_DISABLE_CPU_FEATURES"] = "X86_V4 AVX512_ICL AVX512_SPR"
                env["OPENBLAS_CORETYPE"] = "Haswell"
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            cpu = json.loads(out.stdout.strip().splitlines()[-1])
            ratios = [s / f for s, f in zip(cpu["simulate"], cpu["floor"])]
            result["native_cpu_s_per_round"] = {k: statistics.median(v) for k, v in cpu.items()}
            result["native_cpu_vs_floor"] = statistics.median(ratios)
            result["native_cpu_ratio_range"] = [min(ratios), max(ratios)]
        result["native_avx2"] = args.native_avx2
        result["fixed_entropy"] = args.fixed_entropy
        # What the node's enforcement executes: the enforced call minus the no-op one.
        enforcement: dict[str, Any] = {}
        for plan in args.enforcement:
            on, off = result[plan]["Ir"], result[plan + UNENFORCED]["Ir"]
            enforcement[plan] = {
                "instructions_per_round": on,
                "unenforced_instructions_per_round": off,
                "extra_per_node_round": (on - off) / n,
                "overhead": on / off - 1,
            }
        if enforcement:
            result["enforcement"] = enforcement
        result["load_average"] = os.getloadavg()
        results.append(result)
        if floor_rows:
            floor, shoal = result["floor"], result["simulate"]
            line = (
                f"N={n:>6}: instructions per round floor {floor['Ir'] / 1e6:.1f}M, simulate()"
                f" {shoal['Ir'] / 1e6:.1f}M: {result['instructions_vs_floor']:.3f}x"
            )
            if "native_cpu_vs_floor" in result:
                lo, hi = result["native_cpu_ratio_range"]
                line += f"; native CPU {result['native_cpu_vs_floor']:.2f}x [{lo:.2f}-{hi:.2f}]"
            line += f"; load average {result['load_average'][0]:.1f}"
            print(line)
            for event in EVENTS[1:]:
                if floor.get(event):
                    print(
                        f"{'':>10}{event:>5} per round: floor {floor[event] / 1e6:.3f}M,"
                        f" simulate() {shoal[event] / 1e6:.3f}M"
                        f" ({shoal[event] / floor[event]:.2f}x)"
                    )
        for plan, e in enforcement.items():
            print(
                f"N={n:>6} {plan}: instructions per round enforced"
                f" {e['instructions_per_round'] / 1e6:.2f}M, no-op"
                f" {e['unenforced_instructions_per_round'] / 1e6:.2f}M: enforcement"
                f" {e['extra_per_node_round'] / 1e3:+.1f}k per node-round,"
                f" {e['overhead'] * 100:+.2f}%"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
