"""benchmarks/text_lm.py --checkpoint: a stopped run resumes to the rows an unstopped run gives;
a checkpoint of other settings, or a damaged one, is refused with a message."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "text_lm.py"
NAMES = ("ROMEO", "JULIET", "NURSE", "TYBALT", "MERCUTIO", "FRIAR")
WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "thou",
    "art",
    "my",
    "love",
    "hate",
    "speak",
    "now",
    "hold",
)


def load_script() -> Any:
    # Loaded from its file, not put on sys.path: benchmarks/grpc.py would shadow grpc.
    spec = importlib.util.spec_from_file_location("text_lm_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def play(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    speeches = []
    for i in range(60):
        lines = "\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(3))
        speeches.append(f"{NAMES[i % len(NAMES)]}:\n{lines}\n")
    path = tmp_path / "play.txt"
    path.write_text("\n".join(speeches), encoding="utf-8")
    return path


def command(play: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-u",
        str(SCRIPT),
        *("--corpus", str(play), "--hidden", "8", "--seq-len", "10", "--rounds", "8"),
        *("--nodes-per-round", "2", "--steps", "2", "--eval", "50", "--parts", "training"),
        *("--checkpoint", str(folder), "--json", str(out), "--progress", "--table-every", "1"),
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def perplexities(path: Path, name: str) -> list[float]:
    return [r["perplexity"] for r in json.loads(path.read_text())["runs"][name]]


@pytest.mark.integration
def test_a_killed_federated_run_resumes_to_the_rows_of_an_unkilled_one_and_no_other(
    play: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole.json"
    args = ("--training-runs", "fedavg")
    done = subprocess.run(
        command(play, tmp_path / "a", whole, *args),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    cut = tmp_path / "cut.json"
    log = tmp_path / "cut.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command(play, tmp_path / "b", cut, *args), env=env(), stdout=sink, stderr=sink
        )
        deadline = time.monotonic() + 300
        while "fedavg round 2:" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no clean-up: the store still says 'running'
        proc.wait(timeout=60)
    stopped = json.loads(cut.read_text())
    assert stopped["partial"] is True and 2 <= len(stopped["runs"]["fedavg"]) < 8
    again = subprocess.run(
        command(play, tmp_path / "b", cut, *args),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "rounds resumed" in again.stdout
    resumed_at = len(stopped["runs"]["fedavg"])
    assert f"fedavg round {resumed_at}:" not in again.stdout  # not trained again
    assert perplexities(cut, "fedavg") == perplexities(whole, "fedavg")
    assert [r["round"] for r in json.loads(cut.read_text())["runs"]["fedavg"]] == list(range(1, 9))

    # The same folder with another lr: refused, naming the setting, and left as it was.
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    other = subprocess.run(
        command(play, tmp_path / "b", tmp_path / "other.json", *args, "--lr", "1.5"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2
    assert "lr 3.0 (now 1.5)" in other.stderr and "another --checkpoint folder" in other.stderr
    assert "Traceback" not in other.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before


def test_a_damaged_federated_store_is_a_message(tmp_path: Path) -> None:
    text_lm = load_script()
    (tmp_path / "federated.db").write_bytes(b"not a database" * 100)
    with pytest.raises(text_lm.CheckpointError, match=r"federated\.db"):
        text_lm.federated_checkpoint(tmp_path, "fedavg", {})


def test_a_stopped_centralized_run_resumes_to_the_rows_of_an_unstopped_one(
    play: Path, tmp_path: Path
) -> None:
    text_lm = load_script()
    from shoal.data import load_play
    from shoal.learn.registry import build_model

    corpus = load_play(play, seq_len=10)
    train, test = corpus.pooled()
    model = build_model("char_lstm", features=10, classes=len(corpus.vocab), hidden=8, seed=0)
    options = {"rounds": 6, "steps": 3, "lr": 1.0, "seed": 0}
    settings = {"anything": 1}
    whole, _ = text_lm.centralized(model, train, test, **options)

    class Stop(Exception):
        pass

    def stop_after_3(row: dict[str, Any]) -> None:
        if row["round"] == 3:
            raise Stop

    saved = tmp_path / "central.npz"
    with pytest.raises(Stop):
        text_lm.centralized(
            model,
            train,
            test,
            **options,
            checkpoint=saved,
            settings=settings,
            on_round=stop_after_3,
        )
    rows, resumed = text_lm.centralized(
        model, train, test, **options, checkpoint=saved, settings=settings
    )
    assert resumed == 3
    assert [r["perplexity"] for r in rows] == [r["perplexity"] for r in whole]
    # A run already at its last round trains nothing more and gives the same rows.
    again, resumed = text_lm.centralized(
        model, train, test, **options, checkpoint=saved, settings=settings
    )
    assert resumed == 6 and again == rows

    with pytest.raises(text_lm.CheckpointError, match=r"anything 1 \(now 2\)"):
        text_lm.centralized(
            model, train, test, **options, checkpoint=saved, settings={"anything": 2}
        )
    # Rows that are not rounds 1..n (a file edited by hand): refused, not a crash later.
    with np.load(saved) as kept:
        arrays = {k: kept[k] for k in kept.files}
    state = json.loads(bytes(arrays["state"]))
    for rows in (5, [{"round": 2}], [{"round": 1}, "x"]):
        arrays["state"] = np.frombuffer(json.dumps({**state, "rows": rows}).encode(), np.uint8)
        np.savez(tmp_path / "edited.npz", **arrays)
        with pytest.raises(text_lm.CheckpointError, match="rounds 1, 2"):
            text_lm.centralized(
                model, train, test, **options, checkpoint=tmp_path / "edited.npz", settings=settings
            )
    saved.write_bytes(saved.read_bytes()[:100])  # a file cut short
    with pytest.raises(text_lm.CheckpointError, match="delete it"):
        text_lm.centralized(model, train, test, **options, checkpoint=saved, settings=settings)
