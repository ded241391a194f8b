"""`shoal --help` and every subcommand's `--help` import no heavy module (checked by name,
with ``python -X importtime``; the time itself is measured in benchmarks/cli_startup.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.cli.main import COMMANDS

SRC = Path(__file__).resolve().parents[2] / "src"

# Each costs 0.05-2 s to import; a --help needs none of them.
HEAVY = {
    "numpy",
    "scipy",
    "sklearn",
    "torch",
    "grpc",
    "dp_accounting",
    "cryptography",
    "sqlite3",
}

HELP_COMMANDS = [
    [],
    *([name] for name in COMMANDS),
    ["keys", "new"],
    ["nodes", "add"],
    ["privacy", "epsilon"],
    ["privacy", "noise"],
]


def imported_modules(argv: list[str]) -> set[str]:
    code = "import sys; from shoal.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: shoal" in proc.stdout
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name)
    assert "shoal.cli.main" in names  # the trace is real: it saw shoal's own modules
    return names


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda a: " ".join(a) or "shoal")
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    names = imported_modules(argv)
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert not heavy, f"`shoal {' '.join(argv)} --help` imported {heavy[:10]}"
