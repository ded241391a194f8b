"""`shoal run vertical.toml --json out.json` for hetero logistic regression, as a user runs
the shipped example: a real `shoal` process, the parties' CSV files, PSI, Paillier, and a
summary whose numbers are checked against the files themselves."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"


def _ids(path: Path) -> set[str]:
    with path.open(newline="") as f:
        return {row["id"] for row in csv.DictReader(f)}


@pytest.mark.integration
@pytest.mark.parametrize("arbiter", [False, True], ids=["two-party", "arbiter"])
def test_shoal_run_writes_the_hetero_lr_summary(tmp_path: Path, arbiter: bool) -> None:
    for name in ("bank.csv", "insurer.csv"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    text = (EXAMPLE / "vertical.toml").read_text()
    # a small key and fewer epochs keep the test short; the protocol is the same
    text = text.replace("key_bits = 2048", "key_bits = 512").replace("epochs = 10", "epochs = 3")
    if arbiter:
        text = text.replace("# arbiter = true ", "arbiter = true   ")
    assert ("\narbiter = true" in text) == arbiter
    (tmp_path / "job.toml").write_text(text)
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli.main", "run", str(tmp_path / "job.toml"),
         "--json", str(out), "--insecure-test-keys"],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    shared = _ids(tmp_path / "bank.csv") & _ids(tmp_path / "insurer.csv")
    assert summary["intersection_size"] == len(shared)
    assert summary["model"] == "hetero_logistic_regression"
    assert summary["epochs_run"] == 3
    assert summary["mode"] == ("arbiter" if arbiter else "two_party")
    # the example's label follows its columns closely: federated and centralized both learn it
    assert summary["auc"] > 0.9
    assert summary["centralized_auc"] > 0.9
    assert abs(summary["auc"] - summary["centralized_auc"]) < 0.02
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["bytes_sent"] > len(shared) * 64  # ciphertexts crossed the relay
    assert summary["wall_s"] > 0
    # the printed line is the summary's
    assert f"intersection {len(shared)}" in done.stdout
