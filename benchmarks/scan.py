"""Benchmark: shoal's model scanner against ModelScan on hostile and benign model files.

Builds a corpus in a temp folder (benchmarks/scan_corpus.py: hand-assembled bypass payloads,
real torch/joblib/pickle/NumPy/safetensors/Keras/ONNX files, and large benign files for
throughput), scans it with both tools through their command lines, and reports detection rate,
false positives and MB/s.

Both tools are timed the same way: one untimed warm-up run per folder, then the best of
``--repeats`` runs, child CPU time from getrusage. Both run with Python's bytecode cache on (in a
temp folder), as installed tools normally do: ModelScan's wheels ship compiled, while an editable
shoal under PYTHONDONTWRITEBYTECODE would recompile its source on every start. Throughput is
given three ways: over the whole corpus (same bytes for both), over the bytes each tool actually
analysed (files it skipped or failed on earn no credit), and net of that tool's own start-up
(an empty-folder run). The bare interpreter start of each tool's Python is reported too.

ModelScan lives in its own venv, never as a shoal dependency:

    python -m venv /work/venvs/modelscan
    /work/venvs/modelscan/bin/pip install modelscan h5py

Run:  python benchmarks/scan.py [--json out.json] [--big-mb 64] [--repeats 3]
Without that venv (or --modelscan PATH) only shoal's figures are reported.
"""

from __future__ import annotations

import argparse
import json
import os
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


_ENV: dict[str, str] = {}


def _child_env(pycache: Path) -> None:
    """Bytecode cache on for every child (both tools alike), kept out of the source trees."""
    _ENV.clear()
    _ENV.update(os.environ)
    _ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    _ENV["PYTHONPYCACHEPREFIX"] = str(pycache)


def _timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Run a command: (wall seconds, child CPU seconds, process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_ENV or None)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def _size_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


# Formats shoal reports for files it could not analyse (nothing recognised, nothing read).
_NOT_ANALYSED = {"unknown", "empty", "special", "unreadable"}


def run_shoal_cli(folder: Path) -> tuple[float, float, dict[str, bool], set[str]]:
    """One CLI run over a folder: (wall s, CPU s, {relative path: flagged at medium or above},
    relative paths of the files it analysed)."""
    wall, cpu, proc = _timed([*SHOAL_CLI, "scan", "--format", "json", str(folder)])
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"shoal scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    flagged = {
        _rel(Path(f["path"]), folder): f["severity"] in ("medium", "high", "critical")
        for f in report["files"]
    }
    analysed = {
        _rel(Path(f["path"]), folder) for f in report["files"] if f["format"] not in _NOT_ANALYSED
    }
    return wall, cpu, flagged, analysed


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
    scanned = report.get("summary", {}).get("scanned", {})
    # "a.pt:a/data.pkl" means a member of a.pt was analysed; credit the whole top-level file.
    analysed = {str(name).split(":", 1)[0] for name in scanned.get("scanned_files", [])}
    extra = {
        "errors": len(report.get("errors", [])),
        "scanned": scanned.get("total_scanned"),
        "analysed": analysed,
    }
    return wall, cpu, flagged, extra


def interpreter_start(python: str, repeats: int) -> float:
    """Best CPU seconds of a bare ``python -c pass`` (the floor under any Python tool)."""
    _timed([python, "-c", "pass"])
    return min(_timed([python, "-c", "pass"])[1] for _ in range(repeats))


def shoal_in_process(paths: list[Path]) -> tuple[float, dict[str, bool]]:
    from shoal.scan import Severity, scan_file

    for p in paths:  # warm up: first use of h5py, numpy and friends imports them
        scan_file(p)
    start = time.process_time()
    flagged = {str(p): scan_file(p).severity >= Severity.MEDIUM for p in paths}
    return time.process_time() - start, flagged


def _best(fn: Any, repeats: int) -> tuple[float, float, Any]:
    """Best wall and best CPU time over ``repeats`` runs after one untimed warm-up (fills the
    bytecode cache and the page cache; the machine may be shared)."""
    walls, cpus = [], []
    fn()
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
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="leave PYTHONDONTWRITEBYTECODE as inherited (source recompiled on every start)",
    )
    args = parser.parse_args(argv)

    modelscan = args.modelscan if Path(args.modelscan).exists() else shutil.which("modelscan")
    with tempfile.TemporaryDirectory(prefix="shoal-scan-bench-") as tmp:
        root = Path(tmp)
        if not args.no_bytecode_cache:
            _child_env(root / "pycache")
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
        sizes = {
            g: {_rel(p, folder): p.stat().st_size for p in paths}
            for g, (folder, paths) in groups.items()
        }
        shoal["interpreter_cpu_seconds"] = interpreter_start(sys.executable, args.repeats)
        for g, (folder, _paths) in groups.items():
            wall, cpu, (flags, analysed) = _best(lambda f=folder: run_shoal_cli(f), args.repeats)
            shoal[g] = {
                "seconds": wall,
                "cpu_seconds": cpu,
                "flags": flags,
                "analysed_mb": sum(sizes[g].get(n, 0) for n in analysed) / 2**20,
            }
        secs_in, _flags = shoal_in_process(corpus["hostile"] + corpus["benign"] + corpus["big"])
        shoal["in_process_seconds"] = secs_in
        tools["shoal"] = shoal
        if modelscan:
            ms: dict[str, Any] = {}
            ms_python = Path(modelscan).resolve().parent / "python"
            if not ms_python.exists():
                ms_python = Path(sys.executable)
            ms["interpreter_cpu_seconds"] = interpreter_start(str(ms_python), args.repeats)
            for g, (folder, _paths) in groups.items():
                wall, cpu, (flags, extra) = _best(
                    lambda f=folder: run_modelscan(modelscan, f), args.repeats
                )
                analysed = extra.pop("analysed")
                ms[g] = {
                    "seconds": wall,
                    "cpu_seconds": cpu,
                    "flags": flags,
                    "analysed_mb": sum(sizes[g].get(n, 0) for n in analysed) / 2**20,
                    **extra,
                }
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
            small_analysed = data["hostile"]["analysed_mb"] + data["benign"]["analysed_mb"]
            big_analysed = data["big"]["analysed_mb"]
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
                "interpreter_cpu_seconds": data["interpreter_cpu_seconds"],
                "corpus_cpu_seconds": small_cpu,
                "big_cpu_seconds": data["big"]["cpu_seconds"],
                "corpus_net_mb_per_cpu_s": small_mb / net_small,
                "big_net_mb_per_cpu_s": big_mb / net_big if corpus["big"] else None,
                "corpus_analysed_mb": small_analysed,
                "big_analysed_mb": big_analysed,
                "corpus_analysed_mb_per_cpu_s": small_analysed / small_cpu,
                "big_analysed_mb_per_cpu_s": big_analysed / data["big"]["cpu_seconds"],
                "corpus_analysed_net_mb_per_cpu_s": small_analysed / net_small,
                "big_analysed_net_mb_per_cpu_s": big_analysed / net_big,
            }
            if name == "shoal":
                all_mb = small_mb + big_mb
                row["in_process_mb_per_cpu_s"] = all_mb / data["in_process_seconds"]
            rows.append(row)
        if len(rows) == 2:
            s_row, m_row = rows
            results["speedup"] = {
                key: s_row[key] / m_row[key]
                for key in (
                    "corpus_mb_per_s",
                    "corpus_mb_per_cpu_s",
                    "corpus_net_mb_per_cpu_s",
                    "corpus_analysed_mb_per_cpu_s",
                    "corpus_analysed_net_mb_per_cpu_s",
                    "big_mb_per_s",
                    "big_mb_per_cpu_s",
                    "big_net_mb_per_cpu_s",
                    "big_analysed_mb_per_cpu_s",
                    "big_analysed_net_mb_per_cpu_s",
                )
                if s_row.get(key) and m_row.get(key)
            }
        results["bytecode_cache"] = not args.no_bytecode_cache
        results["results"] = rows
        results["modelscan_available"] = bool(modelscan)
        _print(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = results["corpus"]
    console = Console()
    console.print(
        f"corpus: {c['hostile']['files']} hostile files, {c['benign']['files']} benign files "
        f"({c['hostile']['mb'] + c['benign']['mb']:.1f} MB), {c['big']['files']} large benign "
        f"files ({c['big']['mb']:.0f} MB); bytecode cache "
        f"{'on' if results['bytecode_cache'] else 'as inherited'}"
    )
    rows = results["results"]
    speed = results.get("speedup", {})

    def ratio(key: str, digits: int = 2) -> str:
        return f"{speed[key]:.{digits}f}x" if key in speed else "-"

    table = Table("tool", "detected", "false pos.", "start-up CPU s", "bare python CPU s")
    for r in rows:
        table.add_row(
            r["tool"],
            f"{r['detected']}/{r['hostile']} ({100 * r['detection_rate']:.0f}%)",
            f"{r['false_positives']}/{r['benign']}",
            f"{r['startup_cpu_seconds']:.3f}",
            f"{r['interpreter_cpu_seconds']:.3f}",
        )
    console.print(table)

    table = Table(title="small mixed corpus (hostile + benign folders, one CLI run each)")
    for col in ("", *[r["tool"] for r in rows], "shoal / ModelScan"):
        table.add_column(col)
    lines = [
        ("CPU s (incl. start-up)", "corpus_cpu_seconds", 3, None),
        ("MB analysed", "corpus_analysed_mb", 2, None),
        ("MB/s wall, all bytes", "corpus_mb_per_s", 2, "corpus_mb_per_s"),
        ("MB/CPU-s, all bytes", "corpus_mb_per_cpu_s", 2, "corpus_mb_per_cpu_s"),
        ("MB/CPU-s, analysed bytes", "corpus_analysed_mb_per_cpu_s", 2,
         "corpus_analysed_mb_per_cpu_s"),
        ("MB/CPU-s net of start-up, all bytes", "corpus_net_mb_per_cpu_s", 1,
         "corpus_net_mb_per_cpu_s"),
        ("MB/CPU-s net of start-up, analysed", "corpus_analysed_net_mb_per_cpu_s", 1,
         "corpus_analysed_net_mb_per_cpu_s"),
    ]  # fmt: skip
    for label, key, digits, skey in lines:
        table.add_row(label, *[_fmt(r[key], digits) for r in rows], ratio(skey) if skey else "")
    console.print(table)

    if c["big"]["files"]:
        table = Table(title="large benign files (one CLI run over the folder)")
        for col in ("", *[r["tool"] for r in rows], "shoal / ModelScan"):
            table.add_column(col)
        lines = [
            ("CPU s (incl. start-up)", "big_cpu_seconds", 3, None),
            ("MB analysed", "big_analysed_mb", 0, None),
            ("MB/s wall, all bytes", "big_mb_per_s", 0, "big_mb_per_s"),
            ("MB/CPU-s, all bytes", "big_mb_per_cpu_s", 0, "big_mb_per_cpu_s"),
            ("MB/CPU-s, analysed bytes", "big_analysed_mb_per_cpu_s", 0,
             "big_analysed_mb_per_cpu_s"),
            ("MB/CPU-s net of start-up, all bytes", "big_net_mb_per_cpu_s", 0,
             "big_net_mb_per_cpu_s"),
            ("MB/CPU-s net of start-up, analysed", "big_analysed_net_mb_per_cpu_s", 0,
             "big_analysed_net_mb_per_cpu_s"),
        ]  # fmt: skip
        for label, key, digits, skey in lines:
            table.add_row(label, *[_fmt(r[key], digits) for r in rows], ratio(skey) if skey else "")
        console.print(table)

    for r in rows:
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
