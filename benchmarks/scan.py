"""Benchmark: shoal's model scanner against ModelScan, and shoal's loader against torch/NumPy.

Builds a corpus in a temp folder (benchmarks/scan_corpus.py: hand-assembled bypass payloads,
real torch/joblib/pickle/NumPy/safetensors/Keras/ONNX files, large benign files), then:

1. detection: hostile files flagged (medium or above) and benign files wrongly flagged;
2. scanning throughput NET of process start-up (the headline): each tool is run as its command
   line on a folder and on an empty folder, interleaved, ``--repeats`` times; the median CPU of
   the empty run is subtracted from the median CPU of the folder run. Compared on the bytes
   both tools analyse: the files both report as analysed (of the large files, those both read
   in full) are linked into a folder of their own and timed there, so neither earns credit
   for bytes it skipped. Two views of the same runs: the median folder run minus the median
   empty run (a ratio of medians), and the ratio within each repeat (each tool's folder run
   minus its own empty run of that repeat), whose lowest and highest say how far one run's
   ratio swings. ``--copies K`` (default 10) also times both tools on K hard links of each
   file both analyse (distinct names, the same bytes), so the net is K times larger against
   the same start-up noise. Neither tool skips a file it has seen (no hashing of contents
   or inodes in either); ModelScan keeps nothing across files, shoal classifies each
   imported name once per process (``pickle_scan._IMPORTS``): ~1 ms of its ~38 ms over the
   67 files (scan_file with that table emptied before a pass against a warm pass, 15
   passes, 2026-12-07), so K copies credit shoal at most ~2.5% more than one does. The
   K=1 row is always reported beside it;
3. what each tool reads of each large file (``rchar`` of the tool's process minus an
   empty-folder run): skipping a tensor's bytes is not scanning them;
4. shoal's opcode walk against ``pickletools.genops`` over the same pickles (in-process CPU);
5. ``shoal.scan.load`` (scan + build) against ``torch.load(weights_only=True)`` and ``np.load``
   on the benign files both load, and on the large files, in-process, interleaved, medians;
6. peak memory (RSS growth in a fresh process) of ``scan_file`` and ``load`` on the largest
   benign files, against their size.

ModelScan lives in its own venv, never as a shoal dependency:

    python -m venv /work/venvs/modelscan
    /work/venvs/modelscan/bin/pip install modelscan h5py

Run:  python benchmarks/scan.py [--json out.json] [--big-mb 64] [--repeats 9] [--copies 10]
Without that venv (or --modelscan PATH) only shoal's figures are reported. ``--baseline SRC``
adds an earlier shoal (its ``src`` folder, e.g. ``git worktree add /tmp/base <rev>``) as a
third tool, interleaved with the others, for before/after ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_corpus

DEFAULT_MODELSCAN = "/work/venvs/modelscan/bin/modelscan"

# Every tool runs through a tiny launcher that records its process's bytes read (rchar) at
# exit, so the benchmark can say what each tool actually read.
_IO_PRELUDE = (
    "import atexit, os, sys\n"
    "def _io():\n"
    "    out = os.environ.get('SCAN_BENCH_IO')\n"
    "    if out:\n"
    "        rchar = [l for l in open('/proc/self/io') if l.startswith('rchar')][0]\n"
    "        open(out, 'w').write(rchar.split()[1])\n"
    "atexit.register(_io)\n"
)
# The scan subcommand alone: `shoal`'s main parser also imports every other subcommand.
SHOAL_MAIN = (
    "import argparse\n"
    "from shoal.cli import scan\n"
    "p = argparse.ArgumentParser(prog='shoal')\n"
    "scan.register(p.add_subparsers())\n"
    "a = p.parse_args()\n"
    "sys.exit(a.func(a))\n"
)
MODELSCAN_MAIN = "from modelscan.cli import main\nsys.argv[0] = 'modelscan'\nsys.exit(main())\n"
_ENV: dict[str, str] = {}


def _child_env(pycache: Path) -> None:
    """Bytecode cache on for every child (both tools alike), kept out of the source trees."""
    _ENV.clear()
    _ENV.update(os.environ)
    _ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    _ENV["PYTHONPYCACHEPREFIX"] = str(pycache)


def _timed(
    cmd: list[str], io_file: Path, extra_env: dict[str, str] | None = None
) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Run a command: (child CPU seconds, bytes it read, process)."""
    env = {**_ENV, **(extra_env or {}), "SCAN_BENCH_IO": str(io_file)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rchar = int(io_file.read_text()) if io_file.exists() else -1
    return cpu, rchar, proc


def _mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


_NOT_ANALYSED = {"unknown", "empty", "special", "unreadable"}


class Tool:
    """One scanner, run as its command line on a folder."""

    def __init__(
        self, name: str, python: str, main: str, tmp: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.python = python
        self.main = main
        self.tmp = tmp
        self.env = env or {}

    def command(self, folder: Path, out: Path) -> list[str]:
        raise NotImplementedError

    def parse(self, proc: subprocess.CompletedProcess[str], folder: Path, out: Path) -> Any:
        raise NotImplementedError

    def run(self, folder: Path) -> tuple[float, int, dict[str, bool], set[str]]:
        """(CPU s, bytes read, {file: flagged}, files analysed), paths relative to folder."""
        out = self.tmp / f"{self.name}-report.json"
        io_file = self.tmp / f"{self.name}-io"
        for f in (out, io_file):
            f.unlink(missing_ok=True)
        cmd = [self.python, "-c", _IO_PRELUDE + self.main, *self.command(folder, out)]
        cpu, rchar, proc = _timed(cmd, io_file, self.env)
        flags, analysed = self.parse(proc, folder, out)
        return cpu, rchar, flags, analysed


class Shoal(Tool):
    def command(self, folder: Path, out: Path) -> list[str]:
        return ["scan", "--format", "json", str(folder)]

    def parse(self, proc: Any, folder: Path, out: Path) -> Any:
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"shoal scan failed ({proc.returncode}): {proc.stderr[-2000:]}")
        files = json.loads(proc.stdout)["files"]
        rel = [(str(Path(f["path"]).relative_to(folder)), f) for f in files]
        flags = {r: f["severity"] in ("medium", "high", "critical") for r, f in rel}
        analysed = {r for r, f in rel if f["format"] not in _NOT_ANALYSED}
        return flags, analysed


class ModelScan(Tool):
    def command(self, folder: Path, out: Path) -> list[str]:
        return ["-p", str(folder), "-r", "json", "-o", str(out)]

    def parse(self, proc: Any, folder: Path, out: Path) -> Any:
        if not out.exists():
            raise RuntimeError(f"modelscan produced no report ({proc.returncode}): {proc.stderr}")
        report = json.loads(out.read_text())
        flags: dict[str, bool] = {}
        for issue in report.get("issues", []):
            flags[_top(str(issue.get("source", "")), folder)] = True
        scanned = report.get("summary", {}).get("scanned", {})
        analysed = {_top(str(n), folder) for n in scanned.get("scanned_files", [])}
        return flags, analysed


def _top(source: str, folder: Path) -> str:
    """'a.pt:a/data.pkl' (a member of a.pt) credits the top-level file a.pt."""
    top = Path(source.split(":", 1)[0])
    if top.is_absolute():
        return str(top.relative_to(folder)) if top.is_relative_to(folder) else top.name
    return str(top)


def dense_pickle(root: Path) -> Path:
    """An opcode-dense pickle (~10 MB of ints, strings and floats): scanning it means walking
    about two million opcodes, with no array bytes to skip."""
    p = root / "dense.pkl"
    obj = {
        "ints": list(range(1_000_000)),
        "names": [f"feature_{i}" for i in range(300_000)],
        "weights": [i * 0.5 for i in range(300_000)],
    }
    p.write_bytes(pickle.dumps(obj, protocol=4))
    return p


def _link_folder(dest: Path, src_folder: Path, names: set[str]) -> list[Path]:
    dest.mkdir()
    out = []
    for n in sorted(names):
        target = dest / n.replace("/", "__")
        os.link(src_folder / n, target)
        out.append(target)
    return out


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- 2/3: throughput net of start-up, bytes read ------------------------------------------------


def scanner_runs(
    tools: list[Tool], folders: dict[str, Path], repeats: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Interleaved: each repeat runs every tool on every folder. Returns per tool and folder
    the CPU seconds of every run, the median bytes read, and the last run's flags and files."""
    out: dict[str, dict[str, dict[str, Any]]] = {t.name: {} for t in tools}
    for t in tools:  # untimed warm-up: bytecode and page caches
        for folder in folders.values():
            t.run(folder)
    for _ in range(repeats):
        empty: dict[str, float] = {}
        for name, folder in folders.items():
            for t in tools:
                cpu, rchar, flags, analysed = t.run(folder)
                rec = out[t.name].setdefault(name, {"cpu": [], "rchar": [], "paired_net": []})
                rec["cpu"].append(cpu)
                rec["rchar"].append(rchar)
                rec["flags"], rec["analysed"] = flags, analysed
                if name == "empty":
                    empty[t.name] = cpu
                elif t.name in empty:
                    # this repeat's folder run minus this repeat's empty run of the same tool
                    rec["paired_net"].append(cpu - empty[t.name])
    return out


def net(runs: dict[str, dict[str, Any]], folder: str) -> tuple[float, float, float]:
    """(median net CPU s, lowest, highest) of a folder run minus the median empty run."""
    base = _median(runs["empty"]["cpu"])
    xs = [c - base for c in runs[folder]["cpu"]]
    return _median(xs), min(xs), max(xs)


# --- 4: opcode walk against pickletools.genops --------------------------------------------------


def opcode_walk(paths: list[Path], repeats: int) -> list[dict[str, Any]]:
    import pickletools

    from shoal.scan import scan_file

    rows = []
    for p in paths:
        data = p.read_bytes()
        scan_file(p)
        shoal_t, genops_t = [], []
        for _ in range(repeats):
            t = time.process_time()
            scan_file(p)
            shoal_t.append(time.process_time() - t)
            t = time.process_time()
            for _op in pickletools.genops(data):
                pass
            genops_t.append(time.process_time() - t)
        rows.append(
            {
                "file": p.name,
                "mb": len(data) / 2**20,
                "shoal_scan_s": _median(shoal_t),
                "genops_s": _median(genops_t),
            }
        )
    return rows


# --- 5: loading ---------------------------------------------------------------------------------


def _reference_load(p: Path) -> Any:
    if p.suffix == ".pt":
        import torch

        return torch.load(p, weights_only=True)
    import numpy as np

    out = np.load(p)
    if p.suffix == ".npz":
        with out:
            return {k: out[k] for k in out.files}
    return out


def load_speed(paths: list[Path], repeats: int) -> dict[str, Any]:
    """Median CPU seconds over the files, shoal.scan.load against the file's own loader."""
    from shoal.scan import load

    for p in paths:
        load(p)
        _reference_load(p)
    per_file = []
    for p in paths:
        ours, theirs = [], []
        for _ in range(repeats):
            t = time.process_time()
            load(p)
            ours.append(time.process_time() - t)
            t = time.process_time()
            _reference_load(p)
            theirs.append(time.process_time() - t)
        per_file.append((p, _median(ours), _median(theirs)))
    mb = _mb(paths)
    ours_s = sum(o for _p, o, _t in per_file)
    theirs_s = sum(t for _p, _o, t in per_file)
    return {
        "files": [p.name for p in paths],
        "mb": mb,
        "shoal_s": ours_s,
        "reference_s": theirs_s,
        "shoal_mb_per_s": mb / ours_s,
        "reference_mb_per_s": mb / theirs_s,
    }


# --- 6: peak memory -----------------------------------------------------------------------------

_MEMORY_CHILD = """
import sys
import numpy, torch
from shoal.scan import load, scan_file

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

op, path = sys.argv[1], sys.argv[2]
(scan_file if op == "scan" else load)(sys.argv[3])  # warm up on a tiny file of the same kind
before = kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
out = scan_file(path) if op == "scan" else load(path)
print((kb("VmHWM") - before) * 1024)
"""


def peak_memory(path: Path, small: Path) -> dict[str, Any]:
    """Peak RSS growth of one scan_file and one load of ``path`` in a fresh process (after a
    warm-up on ``small``, a small file of the same kind, so imports are not counted)."""
    row: dict[str, Any] = {"file": path.name, "mb": path.stat().st_size / 2**20}
    for op in ("scan", "load"):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, op, str(path), str(small)],
            capture_output=True,
            text=True,
            check=True,
            env=_ENV or None,
        )
        row[f"{op}_peak_mb"] = int(proc.stdout.strip()) / 2**20
    return row


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results as JSON to this path")
    parser.add_argument("--big-mb", type=int, default=64, help="size of each large benign file")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing runs per tool")
    parser.add_argument(
        "--copies",
        type=int,
        default=10,
        help="also time each tool on K copies of the files both analyse (1: not)",
    )
    parser.add_argument("--modelscan", default=DEFAULT_MODELSCAN, help="modelscan executable")
    parser.add_argument(
        "--baseline", type=Path, help="an earlier shoal's src folder, timed as 'shoal-base'"
    )
    args = parser.parse_args(argv)

    modelscan = args.modelscan if Path(args.modelscan).exists() else shutil.which("modelscan")
    with tempfile.TemporaryDirectory(prefix="shoal-scan-bench-") as tmp:
        root = Path(tmp)
        _child_env(root / "pycache")
        corpus = scan_corpus.build(root / "c", big_mb=args.big_mb)
        corpus["big"].append(dense_pickle(root / "c" / "big"))
        (root / "empty").mkdir()
        small = root / "small"  # hostile + benign in one folder: one run each
        small.mkdir()
        for group in ("hostile", "benign"):
            for p in corpus[group]:
                os.link(p, small / f"{group}__{p.name}")
        folders = {"empty": root / "empty", "small": small, "big": root / "c" / "big"}
        tools: list[Tool] = [Shoal("shoal", sys.executable, SHOAL_MAIN, root)]
        if args.baseline:
            base_env = {"PYTHONPATH": str(args.baseline.resolve())}
            tools.append(Shoal("shoal-base", sys.executable, SHOAL_MAIN, root, base_env))
        if modelscan:
            ms_python = Path(modelscan).resolve().parent / "python"
            tools.append(ModelScan("modelscan", str(ms_python), MODELSCAN_MAIN, root))
        runs = scanner_runs(tools, folders, args.repeats)

        results: dict[str, Any] = {"corpus": {}, "repeats": args.repeats, "copies": args.copies}
        for g in ("hostile", "benign", "big"):
            results["corpus"][g] = {"files": len(corpus[g]), "mb": round(_mb(corpus[g]), 2)}

        detection = {}
        for t in tools:
            flags = runs[t.name]["small"]["flags"]
            hostile = [n for n in flags if n.startswith("hostile__")]
            all_hostile = [f"hostile__{p.name}" for p in corpus["hostile"]]
            all_benign = [f"benign__{p.name}" for p in corpus["benign"]]
            detected = [n for n in all_hostile if flags.get(n)]
            detection[t.name] = {
                "detected": len(detected),
                "hostile": len(all_hostile),
                "false_positives": sorted(n for n in all_benign if flags.get(n)),
                "benign": len(all_benign),
                "missed": sorted(set(all_hostile) - set(detected)),
            }
            del hostile
        results["detection"] = detection

        # what each tool reads of each large file, alone in a folder
        reads: dict[str, dict[str, float]] = {t.name: {} for t in tools}
        for p in corpus["big"]:
            solo = root / f"solo_{p.name}"
            solo.mkdir()
            os.link(p, solo / p.name)
            for t in tools:
                base = _median([t.run(folders["empty"])[1] for _ in range(2)])
                got = _median([t.run(solo)[1] for _ in range(2)])
                reads[t.name][p.name] = (got - base) / 2**20
        results["bytes_read_mb"] = reads
        results["big_files_mb"] = {p.name: p.stat().st_size / 2**20 for p in corpus["big"]}

        # bytes both analyse: link the common files into folders of their own and time those
        common: dict[str, Path] = {}
        pair = ("shoal", "modelscan")  # a baseline shoal is timed on the same folders
        if modelscan:
            for g in ("small", "big"):
                both = set.intersection(*(runs[t][g]["analysed"] for t in pair))
                if g == "big":
                    # of large files, only those both tools read in full: a tensor's bytes
                    # that both skip are not bytes either analyses
                    size = results["big_files_mb"]
                    both = {n for n in both if all(reads[t][n] >= 0.9 * size[n] for t in pair)}
                common[f"common_{g}"] = root / f"common_{g}"
                _link_folder(common[f"common_{g}"], folders[g], both)
            if args.copies > 1:
                # the same bytes under K distinct names: a net K times larger against the
                # same start-up noise (neither tool skips a file it has seen: see --copies)
                copies = common["common_small_copies"] = root / "common_small_copies"
                copies.mkdir()
                for p in sorted(common["common_small"].iterdir()):
                    for k in range(args.copies):
                        os.link(p, copies / f"copy{k:03d}__{p.name}")
            common_runs = scanner_runs(tools, {"empty": folders["empty"], **common}, args.repeats)
            for t in tools:
                runs[t.name].update({k: v for k, v in common_runs[t.name].items() if k != "empty"})
                runs[t.name]["empty"]["cpu"] += common_runs[t.name]["empty"]["cpu"]

        throughput: dict[str, Any] = {}
        for t in tools:
            row: dict[str, Any] = {}
            base_cpu = _median(runs[t.name]["empty"]["cpu"])
            base_read = _median(runs[t.name]["empty"]["rchar"])
            row["startup_cpu_s"] = base_cpu
            for g, folder in {**folders, **common}.items():
                if g == "empty":
                    continue
                files = [p for p in folder.iterdir() if p.is_file()]
                mb = _mb(files)
                med, lo, hi = net(runs[t.name], g)
                row[g] = {
                    "mb": mb,
                    "cpu_s": _median(runs[t.name][g]["cpu"]),
                    "net_cpu_s": med,
                    "net_mb_per_cpu_s": mb / med if med > 0 else None,
                    "net_mb_per_cpu_s_range": [
                        mb / hi if hi > 0 else None,
                        mb / lo if lo > 0 else None,
                    ],
                    "read_mb": (_median(runs[t.name][g]["rchar"]) - base_read) / 2**20,
                    "analysed_files": len(runs[t.name][g]["analysed"]),
                }
            throughput[t.name] = row
        results["throughput"] = throughput

        pickles = [p for p in corpus["big"] if p.suffix == ".pkl"]
        results["opcode_walk"] = opcode_walk(pickles, args.repeats)

        loadable = [p for p in corpus["benign"] if p.suffix in (".pt", ".npy", ".npz")]
        results["load_benign"] = load_speed(loadable, args.repeats)
        big_loadable = [p for p in corpus["big"] if p.suffix in (".pt", ".npy")]
        results["load_big"] = load_speed(big_loadable, args.repeats)
        warm = {
            ".pt": root / "c" / "benign" / "linear.pt",
            ".npy": root / "c" / "benign" / "weights.npy",
        }
        results["peak_memory"] = [peak_memory(p, warm[p.suffix]) for p in big_loadable]

        if modelscan:
            results["speedup_net"] = _ratios(throughput, "shoal", "modelscan")
            results["speedup_paired"] = _paired_ratios(runs, "shoal", "modelscan")
            if args.baseline:
                results["baseline_speedup_net"] = _ratios(throughput, "shoal-base", "modelscan")
                results["shoal_over_baseline"] = _ratios(throughput, "shoal", "shoal-base")
                results["baseline_speedup_paired"] = _paired_ratios(runs, "shoal-base", "modelscan")
        results["modelscan_available"] = bool(modelscan)
        _print(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


_GROUPS = ("small", "big", "common_small", "common_small_copies", "common_big")


def _ratios(throughput: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """Net MB per CPU-s of tool ``a`` over tool ``b``, per folder (ratio of the medians)."""
    x, y = throughput[a], throughput[b]
    return {
        g: x[g]["net_mb_per_cpu_s"] / y[g]["net_mb_per_cpu_s"]
        for g in _GROUPS
        if g in x and x[g]["net_mb_per_cpu_s"] and y[g]["net_mb_per_cpu_s"]
    }


def _paired_ratios(runs: dict[str, Any], a: str, b: str) -> dict[str, dict[str, Any]]:
    """Throughput of tool ``a`` over tool ``b`` within each repeat, per folder: each tool's
    folder run minus its empty run of the same repeat, then ``b``'s net over ``a``'s. The
    median of these, and their lowest and highest, say how far one run's ratio can swing."""
    out: dict[str, dict[str, Any]] = {}
    for g in _GROUPS:
        if g not in runs[a]:
            continue
        pairs = zip(runs[a][g]["paired_net"], runs[b][g]["paired_net"], strict=True)
        xs = [nb / na for na, nb in pairs if na > 0 and nb > 0]
        if xs:
            out[g] = {"median": _median(xs), "min": min(xs), "max": max(xs), "ratios": xs}
    return out


def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = results["corpus"]
    console = Console(width=160)  # the tables stay legible when the output is a file
    console.print(
        f"corpus: {c['hostile']['files']} hostile, {c['benign']['files']} benign "
        f"({c['hostile']['mb'] + c['benign']['mb']:.1f} MB), {c['big']['files']} large "
        f"({c['big']['mb']:.0f} MB); {results['repeats']} interleaved repeats, medians"
    )
    table = Table("tool", "detected", "false positives", "start-up CPU s")
    for name, d in results["detection"].items():
        table.add_row(
            name,
            f"{d['detected']}/{d['hostile']}",
            f"{len(d['false_positives'])}/{d['benign']}",
            _f(results["throughput"][name]["startup_cpu_s"], 3),
        )
    console.print(table)

    tp = results["throughput"]
    names = list(tp)
    table = Table(title="scanning, MB per CPU second NET of start-up (median \\[range])")
    ratios = {"shoal / ModelScan": results.get("speedup_net", {})}
    if "shoal_over_baseline" in results:
        ratios["shoal-base / ModelScan"] = results["baseline_speedup_net"]
        ratios["shoal / shoal-base"] = results["shoal_over_baseline"]
    for col in ("folder", "MB", *names, *ratios):
        table.add_column(col)
    labels = {
        "small": "hostile + benign, all files",
        "common_small": "hostile + benign, files both analyse",
        "common_small_copies": f"the same, {results['copies']} copies of each",
        "big": "large files, all",
        "common_big": "large files both read in full",
    }
    for g, label in labels.items():
        if g not in tp["shoal"]:
            continue
        cells = []
        for n in names:
            r = tp[n][g]
            lo, hi = r["net_mb_per_cpu_s_range"]
            cells.append(f"{_f(r['net_mb_per_cpu_s'])} [{_f(lo)}-{_f(hi)}]")
        ratio_cells = [f"{r[g]:.2f}x" if r.get(g) else "-" for r in ratios.values()]
        table.add_row(label, _f(tp["shoal"][g]["mb"]), *cells, *ratio_cells)
    console.print(table)

    paired = {"shoal / ModelScan": results.get("speedup_paired", {})}
    if "baseline_speedup_paired" in results:
        paired["shoal-base / ModelScan"] = results["baseline_speedup_paired"]
    if any(paired.values()):
        table = Table(
            title="the same ratios within each repeat (each tool's folder run minus its empty "
            "run of that repeat): median \\[lowest-highest] over the repeats"
        )
        for col in ("folder", *paired):
            table.add_column(col)
        for g, label in labels.items():
            if g in tp["shoal"]:
                table.add_row(
                    label,
                    *[
                        f"{r[g]['median']:.2f}x [{r[g]['min']:.2f}-{r[g]['max']:.2f}]"
                        if g in r
                        else "-"
                        for r in paired.values()
                    ],
                )
        console.print(table)

    table = Table(title="net CPU s (median of the folder runs minus the median empty run)")
    for col in ("folder", *names):
        table.add_column(col)
    for g, label in labels.items():
        if g in tp["shoal"]:
            table.add_row(label, *[_f(tp[n][g]["net_cpu_s"], 3) for n in names])
    console.print(table)

    table = Table(title="what each tool reads of each large file (MB read / file MB)")
    table.add_column("file")
    table.add_column("MB")
    for n in names:
        table.add_column(n)
    for f, mb in results["big_files_mb"].items():
        table.add_row(f, _f(mb), *[_f(results["bytes_read_mb"][n][f]) for n in names])
    console.print(table)

    table = Table(title="opcode walk, in-process CPU s (median)")
    for col in ("pickle", "MB", "shoal scan_file", "pickletools.genops", "shoal / genops"):
        table.add_column(col)
    for r in results["opcode_walk"]:
        table.add_row(
            r["file"],
            _f(r["mb"]),
            _f(r["shoal_scan_s"], 3),
            _f(r["genops_s"], 3),
            f"{r['shoal_scan_s'] / r['genops_s']:.2f}x",
        )
    console.print(table)

    table = Table(title="loading: shoal.scan.load (scan + build) vs torch.load / np.load")
    for col in ("files", "MB", "shoal MB/s", "torch/np MB/s", "shoal time / theirs"):
        table.add_column(col)
    for key, label in (("load_benign", "benign .pt/.npy/.npz"), ("load_big", "large .pt/.npy")):
        r = results[key]
        table.add_row(
            f"{label} ({len(r['files'])})",
            _f(r["mb"]),
            _f(r["shoal_mb_per_s"]),
            _f(r["reference_mb_per_s"]),
            f"{r['shoal_s'] / r['reference_s']:.2f}x",
        )
    console.print(table)

    table = Table(title="peak memory (RSS growth in a fresh process)")
    for col in ("file", "MB", "scan MB", "load MB"):
        table.add_column(col)
    for r in results["peak_memory"]:
        table.add_row(r["file"], _f(r["mb"]), _f(r["scan_peak_mb"]), _f(r["load_peak_mb"]))
    console.print(table)
    for name, d in results["detection"].items():
        if d["missed"]:
            console.print(f"{name} missed: {', '.join(d['missed'])}")
        if d["false_positives"]:
            console.print(f"{name} false positives: {', '.join(d['false_positives'])}")
    if not results["modelscan_available"]:
        console.print("ModelScan not found: see this script's docstring; shoal figures only.")


if __name__ == "__main__":
    sys.exit(main())
