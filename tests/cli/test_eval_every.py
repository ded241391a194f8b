"""The server's test set: evaluated every ``eval_every`` rounds (and after the last), on
``eval_examples`` of it drawn once; job keys in [engine] and ``shoal run`` flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.cli.job import TEXT_EVAL_EXAMPLES, load_job, parse_job, simulate_job
from shoal.data import load_dataset
from shoal.errors import ConfigError
from shoal.learn import FedAvg, simulate
from shoal.learn.registry import build_model

SRC = Path(__file__).resolve().parents[2] / "src"


def digits_job(**engine: Any) -> dict[str, Any]:
    return {
        "data": {"dataset": "digits", "partition": {"nodes": 4}},
        "model": {"name": "softmax_regression"},
        "algorithm": {"name": "fedavg", "rounds": 5, "nodes_per_round": 4, "lr": 0.5},
        "engine": engine,
    }


def test_evaluated_every_third_round_and_after_the_last() -> None:
    train, test = load_dataset("digits")
    nodes = [train.subset(np.arange(i, len(train), 3)) for i in range(3)]
    model = build_model("softmax_regression", features=64, classes=10)
    result = simulate(
        model=model,
        nodes=nodes,
        test=test,
        algorithm=FedAvg(rounds=5, nodes_per_round=3, lr=0.5),
        eval_every=3,
    )
    measured = [r.round for r in result.history if r.accuracy is not None]
    assert measured == [3, 5]
    assert [r.loss is None for r in result.history] == [True, True, False, True, False]
    assert result.metrics["accuracy"] == result.history[-1].accuracy > 0.5
    with pytest.raises(ConfigError, match="eval_every must be at least 1"):
        simulate(model=model, nodes=nodes, algorithm=FedAvg(rounds=1), eval_every=0)


def test_tabular_jobs_evaluate_the_whole_test_set_unless_told() -> None:
    _, test = load_dataset("digits")
    whole = parse_job(digits_job())
    assert len(whole.eval_data()) == len(test) == 360
    some = parse_job(digits_job(eval_examples=50))
    first, again = some.eval_data(), some.eval_data()
    assert len(first) == 50
    np.testing.assert_array_equal(first.x, again.x)  # drawn once from the job's seed
    rows = {row.tobytes() for row in test.x}  # a subsample of the test rows
    assert all(row.tobytes() in rows for row in first.x)
    other_seed = parse_job({**digits_job(eval_examples=50), "job": {"seed": 7}})
    assert not np.array_equal(other_seed.eval_data().x, first.x)
    assert len(parse_job(digits_job(eval_examples=0)).eval_data()) == 360
    assert len(parse_job(digits_job(eval_examples=10_000)).eval_data()) == 360


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"eval_every": 0}, "eval_every must be at least 1"),
        ({"eval_examples": -1}, "eval_examples must be 0 .the whole test set. or a positive"),
        ({"eval_every": "2"}, "eval_every"),
    ],
)
def test_bad_eval_settings(engine: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(digits_job(**engine))


@pytest.mark.torch
def test_text_jobs_evaluate_a_fixed_sample_by_default(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefgh "))
    speeches = []
    for role in ("HAMLET", "OPHELIA") * 4:  # 2 roles, 4 speeches each of 2,040 characters
        lines = ["".join(rng.choice(letters, 50)) for _ in range(40)]
        speeches.append(f"{role}:\n" + "\n".join(lines) + "\n")
    (tmp_path / "play.txt").write_text("\n".join(speeches), encoding="utf-8")
    raw = {
        "data": {"dataset": "shakespeare", "path": "play.txt", "seq_len": 8},
        "model": {"name": "char_lstm", "embedding": 4, "hidden": 8, "layers": 1},
        "algorithm": {"name": "fedavg", "rounds": 2, "nodes_per_round": 2, "max_steps": 2},
    }
    spec = parse_job(raw, base_dir=tmp_path)
    _, test = spec.load_data()
    assert len(test) > TEXT_EVAL_EXAMPLES  # 8 x 2,040 characters, the last 20% of each role
    sample = spec.eval_data()
    assert len(sample) == TEXT_EVAL_EXAMPLES
    result = simulate_job(spec)
    assert result.metrics["perplexity"] > 1
    # Accuracy on exactly 2,000 windows: a whole number of them right.
    right = result.metrics["accuracy"] * TEXT_EVAL_EXAMPLES
    assert abs(right - round(right)) < 1e-6
    everything = parse_job({**raw, "engine": {"eval_examples": 0}}, base_dir=tmp_path)
    assert len(everything.eval_data()) == len(test)


def test_shoal_run_flags_override_the_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[data]\ndataset = "digits"\n[data.partition]\nnodes = 4\n'
        "[algorithm]\nrounds = 3\nnodes_per_round = 4\nlr = 0.5\n"
        "[engine]\neval_every = 1\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli.main",
            "run",
            str(job),
            "--eval-every",
            "2",
            "--eval-examples",
            "30",
            "--quiet",
            "--store",
            str(tmp_path / "fl.db"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text(encoding="utf-8"))
    measured = [r["round"] for r in summary["history"] if r.get("accuracy") is not None]
    assert measured == [2, 3]
    right = summary["accuracy"] * 30  # judged on 30 test digits
    assert abs(right - round(right)) < 1e-9
    spec = load_job(job, engine={"eval_every": 2, "eval_examples": 30})
    assert spec.to_dict()["engine"] == {"eval_every": 2, "eval_examples": 30}
    for flag, value, message in (
        ("--eval-examples", "-1", "expected a number >= 0"),
        ("--eval-every", "0", "expected a number >= 1"),
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "shoal.cli.main", "run", str(job), flag, value],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(SRC)},
        )
        assert bad.returncode == 2 and message in bad.stderr
