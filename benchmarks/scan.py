"""Benchmark: shoal's model scanner against ModelScan on hostile and benign model files.

Builds a corpus in a temp folder (benchmarks/scan_corpus.py: hand-assembled bypass payloads,
real torch/joblib/pickle/NumPy/safetensors/Keras/ONNX files, and large benign files for
throughput), scans it with both tools through their command lines, and reports detection rate,
false positives and MB/s.

ModelScan lives in its own venv, never as a shoal dependency:

    python -m venv /work/venvs/modelscan
    /work/venvs/modelscan/bin/pip install modelscan h5py

Run:  python benchmarks/scan.py [--json out.json] [--big-mb 64] [--repeats 3]
Without that venv (or --modelscan PATH) only shoal's figures are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_corpus

DEFAULT_MODELSCAN = "/work/venvs/modelscan/bin/modelscan"
# The scan subcommand alone: `shoal`'s main parser also imports every other subcommand (dp
# accounting, scipy, ...), which would time interpreter start-up rather than the scanner.
SHOAL_CLI = [
    sys.executable,
    "-c",
    "import argparse, sys; from shoal.cli import scan; p = argparse.ArgumentParser(prog='shoal');"
    " scan.register(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))",
]


def _timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Run a command: (wall seconds, child CPU seconds, process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def _size_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def run_shoal_cli(folder: Path) -> tuple[float, float, dict[str, bool]]:
    """One CLI run over a folder: (wall s, CPU s, {relative path: flagged at medium or above})."""
    wall, cpu, proc = _timed([*SHOAL_CLI, "scan", "--format", "json", str(folder)])
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"shoal scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    flagged = {
        _rel(Path(f["path"]), folder): f["severity"] in ("medium", "high", "critical")
        for f in report["files"]
    }
    return wall, cpu, flagged


def run_modelscan(exe: str, folder: Path) -> tuple[float, float, dict[str, bool], dict[str, Any]]:
    """One ModelScan run over a folder: (wall s, CPU s, {relative path: any issue}, summary)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        wall, cpu, proc = _timed([exe, "-p", str(folder), "-r", "json", "-o", str(out)])
        if not out.exists():
            raise RuntimeError(f"modelscan produced no report ({proc.returncode}): {proc.stderr}")
        report = json.loads(out.read_text())
    flagged: dict[str, bool] = {}
    for issue in report.get("issues", []):
        source = str(issue.get("source", ""))
        top = source.split(":", 1)[0]
        top_path = Path(top)
        if top_path.is_absolute():
            top = _rel(top_path, folder) if top_path.is_relative_to(folder) else top_path.name
        flagged[top] = True
    extra = {
        "errors": len(report.get("errors", [])),
        "scanned": report.get("summary", {}).get("scanned", {}).get("total_scanned"),
    }
    return wall, cpu, flagged, extra


def shoal_in_process(paths: list[Path]) -> tuple[float, dict[str, bool]]:
    from shoal.scan import Severity, scan_file

    for p in paths:  # warm up: first use of h5py, numpy and friends imports them
        scan_file(p)
    start = time.process_time()
    flagged = {str(p): scan_file(p).severity >= Severity.MEDIUM for p in paths}
    return time.process_time() - start, flagged


def _best(fn: Any, repeats: int) -> tuple[float, float, Any]:
    """Best wall and best CPU time over ``repeats`` runs (the machine may be shared)."""
    walls, cpus = [], []
    result = None
    for _ in range(repeats):
        wall, cpu, *result = fn()
        walls.append(wall)
        cpus.append(cpu)
    return min(walls), min(cpus), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results as JSON to this path")
    parser.add_argument("--big-mb", type=int, default=64, help="size of each large benign file")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per tool (best kept)")
    parser.add_argument("--modelscan", default=DEFAULT_MODELSCAN, help="modelscan executable")
    args = parser.parse_args(argv)

    modelscan = args.modelscan if Path(args.modelscan).exists() else shutil.which("modelscan")
    with tempfile.TemporaryDirectory(prefix="shoal-scan-bench-") as tmp:
        root = Path(tmp)
        corpus = scan_corpus.build(root, big_mb=args.big_mb)
        (root / "empty").mkdir()
        groups = {
            "empty": (root / "empty", []),
            "hostile": (root / "hostile", corpus["hostile"]),
            "benign": (root / "benign", corpus["benign"]),
            "big": (root / "big", corpus["big"]),
        }
        results: dict[str, Any] = {"corpus": {}, "tools": {}}
        for g, (_folder, paths) in groups.items():
            results["corpus"][g] = {"files": len(paths), "mb": round(_size_mb(paths), 2)}

        tools: dict[str, Any] = {}
        shoal: dict[str, Any] = {}
        for g, (folder, _paths) in groups.items():
            wall, cpu, (flags,) = _best(lambda f=folder: run_shoal_cli(f), args.repeats)
            shoal[g] = {"seconds": wall, "cpu_seconds": cpu, "flags": flags}
        secs_in, _flags = shoal_in_process(corpus["hostile"] + corpus["benign"] + corpus["big"])
        shoal["in_process_seconds"] = secs_in
        tools["shoal"] = shoal
        if modelscan:
            ms: dict[str, Any] = {}
            for g, (folder, _paths) in groups.items():
                wall, cpu, (flags, extra) = _best(
                    lambda f=folder: run_modelscan(modelscan, f), args.repeats
                )
                ms[g] = {"seconds": wall, "cpu_seconds": cpu, "flags": flags, **extra}
            tools["modelscan"] = ms

        rows = []
        for name, data in tools.items():
            hostile_paths = [_rel(p, root / "hostile") for p in corpus["hostile"]]
            benign_paths = [_rel(p, root / "benign") for p in corpus["benign"]]
            detected = [p for p in hostile_paths if data["hostile"]["flags"].get(p)]
            missed = sorted(set(hostile_paths) - set(detected))
            false_pos = sorted(p for p in benign_paths if data["benign"]["flags"].get(p))
            small_mb = results["corpus"]["hostile"]["mb"] + results["corpus"]["benign"]["mb"]
            small_secs = data["hostile"]["seconds"] + data["benign"]["seconds"]
            small_cpu = data["hostile"]["cpu_seconds"] + data["benign"]["cpu_seconds"]
            big_mb = results["corpus"]["big"]["mb"]
            # CPU beyond an empty-folder run of the same tool: the scanner, not interpreter start
            base = data["empty"]["cpu_seconds"]
            net_big = max(data["big"]["cpu_seconds"] - base, 1e-3)
            net_small = max(small_cpu - 2 * base, 1e-3)
            row = {
                "tool": name,
                "detected": len(detected),
                "hostile": len(hostile_paths),
                "detection_rate": len(detected) / len(hostile_paths),
                "false_positives": len(false_pos),
                "benign": len(benign_paths),
                "missed": missed,
                "false_positive_files": false_pos,
                "corpus_mb_per_s": small_mb / small_secs,
                "corpus_mb_per_cpu_s": small_mb / small_cpu,
                "corpus_seconds": small_secs,
                "big_mb_per_s": big_mb / data["big"]["seconds"] if corpus["big"] else None,
                "big_mb_per_cpu_s": big_mb / data["big"]["cpu_seconds"] if corpus["big"] else None,
                "big_seconds": data["big"]["seconds"],
                "startup_cpu_seconds": base,
                "corpus_net_mb_per_cpu_s": small_mb / net_small,
                "big_net_mb_per_cpu_s": big_mb / net_big if corpus["big"] else None,
            }
            if name == "shoal":
                all_mb = small_mb + big_mb
                row["in_process_mb_per_cpu_s"] = all_mb / data["in_process_seconds"]
            rows.append(row)
        results["results"] = rows
        results["modelscan_available"] = bool(modelscan)
        _print(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = results["corpus"]
    console = Console()
    console.print(
        f"corpus: {c['hostile']['files']} hostile files, {c['benign']['files']} benign files "
        f"({c['hostile']['mb'] + c['benign']['mb']:.1f} MB), {c['big']['files']} large benign "
        f"files ({c['big']['mb']:.0f} MB)"
    )
    table = Table(
        "tool",
        "detected",
        "false pos.",
        "corpus MB/s (wall)",
        "corpus MB/s (CPU)",
        "large MB/s (wall)",
        "large MB/s (CPU)",
        "start-up CPU s",
        "net large MB/CPU-s",
    )
    for r in results["results"]:
        big = "-" if r["big_mb_per_s"] is None else f"{r['big_mb_per_s']:.0f}"
        big_cpu = "-" if r["big_mb_per_cpu_s"] is None else f"{r['big_mb_per_cpu_s']:.0f}"
        table.add_row(
            r["tool"],
            f"{r['detected']}/{r['hostile']} ({100 * r['detection_rate']:.0f}%)",
            f"{r['false_positives']}/{r['benign']}",
            f"{r['corpus_mb_per_s']:.2f}",
            f"{r['corpus_mb_per_cpu_s']:.2f}",
            big,
            big_cpu,
            f"{r['startup_cpu_seconds']:.2f}",
            "-" if r["big_net_mb_per_cpu_s"] is None else f"{r['big_net_mb_per_cpu_s']:.0f}",
        )
    console.print(table)
    for r in results["results"]:
        if r["missed"]:
            console.print(f"{r['tool']} missed: {', '.join(r['missed'])}")
        if r["false_positive_files"]:
            console.print(f"{r['tool']} false positives: {', '.join(r['false_positive_files'])}")
        if "in_process_mb_per_cpu_s" in r:
            console.print(
                "shoal in-process, whole corpus, no interpreter start: "
                f"{r['in_process_mb_per_cpu_s']:.0f} MB per CPU second"
            )
    if not results["modelscan_available"]:
        console.print(
            "ModelScan not found: create /work/venvs/modelscan (see this script's docstring); "
            "shoal figures only."
        )


if __name__ == "__main__":
    sys.exit(main())
