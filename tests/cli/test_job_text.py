"""Text jobs: [data] dataset = "shakespeare" with a play file, [model] a language model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from shoal.cli.job import parse_job, simulate_job
from shoal.errors import ConfigError

pytestmark = pytest.mark.torch

SRC = Path(__file__).resolve().parents[2] / "src"

PLAY = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer

OPHELIA:
Good my lord,
How does your honour for this many a day?

HORATIO:
Hail to your lordship!

HAMLET:
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
"""


@pytest.fixture()
def play(tmp_path: Path) -> Path:
    path = tmp_path / "play.txt"
    path.write_text(PLAY, encoding="utf-8")
    return path


def text_job(play: Path, **tables: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "data": {"dataset": "shakespeare", "path": play.name, "seq_len": 8},
        "model": {"name": "char_lstm", "embedding": 4, "hidden": 8, "layers": 1},
        "algorithm": {"name": "fedavg", "rounds": 2, "nodes_per_round": 2, "lr": 0.5},
    }
    for key, value in tables.items():
        raw[key] = value
    return raw


def test_nodes_default_to_every_role_with_two_lines(play: Path) -> None:
    spec = parse_job(text_job(play), base_dir=play.parent)
    assert spec.partition["nodes"] == 2 and spec.partition["scheme"] == "by_role"
    assert [d.name for d in spec.partitions()] == ["play/HAMLET", "play/OPHELIA"]
    model = spec.build_model()
    train, _ = spec.load_data()
    assert train.x.shape[1] == 8 and model.get_weights()["embed.weight"].shape[0] == train.classes
    result = simulate_job(spec)
    assert len(result.history) == 2 and result.metrics["perplexity"] > 1
    # Bytes on the wire: two float32 updates of the model's weights (plus receipts).
    weights = sum(v.size for v in model.get_weights().values())
    assert 2 * 4 * weights < result.history[-1].extra["uplink_bytes"] < 2 * 4 * weights + 4096


def test_word_model_reads_words(play: Path) -> None:
    raw = text_job(
        play,
        data={"dataset": "shakespeare", "path": play.name, "vocab_size": 20, "tokens": "word"},
        model={"name": "word_lstm", "embedding": 4, "hidden": 8},
        algorithm={"name": "fedadam", "rounds": 1, "nodes_per_round": 2},
    )
    spec = parse_job(raw, base_dir=play.parent)
    train, _ = spec.load_data()
    assert train.classes == 20 and train.x.shape[1] == 20  # words default to 20-token windows
    assert simulate_job(spec).metrics["perplexity"] > 1


def test_tiny_transformer_job_trains(play: Path) -> None:
    raw = text_job(
        play, model={"name": "tiny_transformer", "width": 8, "heads": 2, "layers": 1, "ff": 16}
    )
    spec = parse_job(raw, base_dir=play.parent)
    model = spec.build_model()
    train, _ = spec.load_data()
    assert model.get_weights()["position"].shape[0] == train.x.shape[1] == 8
    result = simulate_job(spec)
    assert len(result.history) == 2 and result.metrics["perplexity"] > 1
    weights = sum(v.size for v in model.get_weights().values())
    assert result.history[-1].extra["uplink_bytes"] > 2 * 4 * weights  # both nodes' updates


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"model": {"name": "softmax_regression"}}, "does not read them: use one of char_lstm"),
        (
            {"data": {"dataset": "iris"}, "model": {"name": "tiny_transformer"}},
            "reads token ids: use .*shakespeare",
        ),
        ({"data": {"dataset": "shakespeare"}}, "needs path = a play-formatted text file"),
        (
            {
                "data": {
                    "dataset": "shakespeare",
                    "path": "play.txt",
                    "partition": {"scheme": "iid"},
                }
            },
            "partitioned by speaking role",
        ),
        (
            {"data": {"dataset": "shakespeare", "path": "play.txt", "vocab_size": 100}},
            "vocab_size applies to tokens = 'word'",
        ),
        (
            {"data": {"dataset": "shakespeare", "path": "play.txt", "tokens": "bytes"}},
            "tokens 'bytes' is not known",
        ),
        (
            {"data": {"dataset": "shakespeare", "path": "play.txt", "seq_len": 0}},
            "seq_len must be at least 1",
        ),
        (
            {"data": {"dataset": "iris", "seq_len": 8}, "model": {"name": "mlp"}},
            "apply to text data only",
        ),
        ({"data": {"dataset": "shakespeare", "path": "none.txt"}}, "cannot be read"),
        (
            {"data": {"dataset": "shakespeare", "path": "play.txt", "min_lines": 9}},
            "no speaker lines with 9 lines",
        ),
    ],
)
def test_bad_text_jobs(play: Path, tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(text_job(play, **tables), base_dir=play.parent)


def test_more_nodes_than_roles(play: Path) -> None:
    raw = text_job(
        play, data={"dataset": "shakespeare", "path": play.name, "partition": {"nodes": 3}}
    )
    spec = parse_job(raw, base_dir=play.parent)
    with pytest.raises(ConfigError, match="only 2 roles with 2 lines"):
        spec.partitions()


def test_file_without_speakers_fails_in_shoal_run(tmp_path: Path) -> None:
    (tmp_path / "prose.txt").write_text("It was a dark night.\nNobody spoke.\n", encoding="utf-8")
    (tmp_path / "job.toml").write_text(
        '[data]\ndataset = "shakespeare"\npath = "prose.txt"\n[model]\nname = "char_lstm"\n',
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.cli.main", "run", str(tmp_path / "job.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert proc.returncode != 0
    assert "no speaker lines" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
