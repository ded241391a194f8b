"""Transfer learning as the issue asks for it: a char-LSTM pretrained centrally on half of a
play's roles, saved as safetensors, then fine-tuned federated on the other half's roles
through a job's ``[transfer] pretrained``; judged on those roles' held-out text (the last
fifth of each, never trained on).

The plays are generated: both halves share common words, and each half has words of its
own over the same letters, so the pretrained model knows the shared language but not the
second half's own words.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shoal.cli.job import parse_job, simulate_job  # noqa: E402
from shoal.data import load_play  # noqa: E402
from shoal.learn import FitConfig  # noqa: E402
from shoal.learn.registry import build_model  # noqa: E402

pytestmark = pytest.mark.torch

PANGRAM = "the quick brown fox jumps over the lazy dog"  # every letter in every role's text
COMMON = ["the", "and", "my", "lord", "good", "love"]
FIRST_HALF = [*COMMON, "king", "crown", "throne", "sword", "realm", "court"]
SECOND_HALF = [*COMMON, "shepherd", "meadow", "flock", "lamb", "hill", "wool"]
MODEL = {"name": "char_lstm", "embedding": 8, "hidden": 32, "layers": 1}
SEQ_LEN = 12


def write_play(path: Path, roles: list[str], words: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    speeches = []
    for turn in range(6):
        for role in roles:
            lines = [PANGRAM] if turn == 0 else []
            lines += [" ".join(rng.choice(words, 5)) for _ in range(4)]
            speeches.append(f"{role}:\n" + "\n".join(lines) + "\n")
    path.write_text("\n".join(speeches), encoding="utf-8")


def job(path: Path, **tables: Any) -> dict[str, Any]:
    return {
        "data": {"dataset": "shakespeare", "path": path.name, "seq_len": SEQ_LEN},
        "model": {**MODEL, "optimizer": "adam"},
        "algorithm": {
            "name": "fedavg",
            "rounds": 6,
            "nodes_per_round": 4,
            "lr": 0.01,
            "max_steps": 10,
        },
        "engine": {"eval_examples": 0},  # every held-out window
        **tables,
    }


def test_federated_fine_tuning_from_saved_weights_improves_on_held_out_text(
    tmp_path: Path,
) -> None:
    from safetensors.numpy import save_file

    torch.set_num_threads(1)
    pre_play, fine_play = tmp_path / "court.txt", tmp_path / "pasture.txt"
    write_play(pre_play, ["KING", "QUEEN", "DUKE", "EARL"], FIRST_HALF, seed=0)
    write_play(fine_play, ["CORIN", "PHEBE", "SILVIUS", "AUDREY"], SECOND_HALF, seed=1)
    pre = load_play(pre_play, seq_len=SEQ_LEN)
    fine = load_play(fine_play, seq_len=SEQ_LEN)
    assert pre.vocab == fine.vocab  # same letters: ids mean the same characters

    # Central pretraining on the first half's pooled training windows.
    pooled, _ = pre.pooled()
    options = {k: v for k, v in MODEL.items() if k != "name"}
    net = build_model("char_lstm", features=SEQ_LEN, classes=len(pre.vocab), seed=3, **options)
    net.fit(pooled, config=FitConfig(epochs=3, lr=1.0), rng=np.random.default_rng(0))
    saved = {k: v.astype(np.float32) for k, v in net.get_weights().items()}
    save_file(saved, str(tmp_path / "court.safetensors"))

    tuned = parse_job(
        job(fine_play, transfer={"pretrained": "court.safetensors"}), base_dir=tmp_path
    )
    held_out = tuned.eval_data()
    _, test = tuned.load_data()
    assert len(held_out) == len(test)  # the second half's held-out text, all of it
    start = tuned.build_model()
    for name, value in start.get_weights().items():  # starts exactly where pretraining ended
        np.testing.assert_array_equal(np.asarray(value, np.float32), saved[name])
    at_start = start.evaluate(held_out)["perplexity"]
    scratch = parse_job(job(fine_play), base_dir=tmp_path)
    at_random = scratch.build_model().evaluate(held_out)["perplexity"]
    # The saved weights carry what pretraining learned (the shared words, spaces, lines) ...
    assert at_start < 0.8 * at_random
    # ... and federated fine-tuning on the second half's roles improves on that start.
    result = simulate_job(tuned)
    after = result.metrics["perplexity"]
    assert math.isfinite(after) and after < 0.5 * at_start
    # The same federated budget from a random start ends clearly worse.
    assert after < 0.8 * simulate_job(scratch).metrics["perplexity"]
