"""`shoal export`: a recorded run's model as ONNX, a NumPy predictor or a hub folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from shoal.cli.main import main
from shoal.runtime import Store

JOB = """
[job]
name = "export-test"
[data]
dataset = "digits"
partition = {{ scheme = "iid", nodes = 4 }}
[model]
name = "{model}"
{options}
[algorithm]
name = "fedavg"
rounds = 2
nodes_per_round = 4
max_steps = 5
{extra}
"""


def run_job(
    tmp_path: Path, capsys: Any, *, model: str = "mlp", options: str = "hidden = 8", extra: str = ""
) -> tuple[Path, str]:
    store = tmp_path / "s.db"
    job = tmp_path / f"{model}.toml"
    job.write_text(JOB.format(model=model, options=options, extra=extra))
    out = tmp_path / "run.json"
    assert main(["run", str(job), "--store", str(store), "--quiet", "--json", str(out)]) == 0
    capsys.readouterr()
    return store, json.loads(out.read_text())["run_id"]


def export(capsys: Any, *args: str) -> tuple[int, dict[str, Any] | str]:
    code = main(["export", *args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else captured.err


def test_export_writes_checked_onnx_numpy_and_hub_files(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("onnxruntime")
    store, run_id = run_job(tmp_path, capsys)
    common = [run_id, "--store", str(store)]
    code, onnx = export(capsys, *common, "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert code == 0 and isinstance(onnx, dict)
    assert onnx["max_prob_diff"] <= 1e-5 and onnx["checked_examples"] == 360
    assert onnx["bytes"] == (tmp_path / "m.onnx").stat().st_size
    code, numpy = export(capsys, *common, "--format", "numpy", "--out", str(tmp_path / "p"))
    assert code == 0 and isinstance(numpy, dict)
    assert numpy["accuracy_predictor"] == numpy["accuracy_model"]
    code, small = export(
        capsys, *common, "--format", "numpy", "--int8", "--out", str(tmp_path / "q")
    )
    assert code == 0 and isinstance(small, dict)
    assert small["bytes"] < numpy["bytes"] / 2
    assert small["accuracy_cost_int8"] == small["accuracy_model"] - small["accuracy_predictor"]
    code, hub = export(capsys, *common, "--format", "hub", "--out", str(tmp_path / "hub"))
    assert code == 0 and isinstance(hub, dict)
    assert set(hub["files"]) == {"model.safetensors", "config.json", "README.md"}
    from shoal.learn.torch import load_pretrained

    loaded = load_pretrained(str(tmp_path / "hub"))
    with Store(store) as s:
        weights = {k[len("weights/") :]: v for k, v in s.load_checkpoint(run_id).arrays.items()}
    for name, value in loaded.get_weights().items():
        np.testing.assert_allclose(value, weights[name], rtol=1e-6, atol=1e-7)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f'run_id: "{run_id}"' in card and "rounds: 2" in card


def test_a_dp_run_card_records_epsilon_delta_and_accountant(tmp_path: Path, capsys: Any) -> None:
    store, run_id = run_job(
        tmp_path,
        capsys,
        model="softmax_regression",
        options="",
        extra='[privacy]\nepsilon = 4.0\ndelta = 1e-5\nlevel = "node"\nmode = "local"\n'
        'accountant = "pld"\n',
    )
    code, hub = export(
        capsys, run_id, "--store", str(store), "--format", "hub", "--out", str(tmp_path / "hub")
    )
    assert code == 0, hub
    card = (tmp_path / "hub" / "README.md").read_text()
    assert 'accountant: "pld"' in card and "delta: 1.0e-05" in card
    assert "epsilon_target: 4.0" in card
    with Store(store) as s:
        spent = s.round_metrics(run_id)[-1].metrics["epsilon"]
    assert f"epsilon_spent: {json.dumps(spent)}" in card


def test_export_errors_say_what_is_wrong(tmp_path: Path, capsys: Any) -> None:
    store, run_id = run_job(tmp_path, capsys)
    with Store(store) as s:  # a run that never completed a round
        empty = s.create_run(name="empty", config={"data": {"dataset": "digits"}})
    code, err = export(capsys, empty, "--store", str(store), "--format", "onnx")
    assert code == 2 and "has no checkpoint to export" in str(err)
    code, err = export(capsys, "nope", "--store", str(store), "--format", "onnx")
    assert code == 2 and "no run 'nope'" in str(err)
    code, err = export(capsys, run_id, "--store", str(store), "--format", "onnx", "--int8")
    assert code == 2 and "--int8 applies to --format numpy" in str(err)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    code, err = export(
        capsys, run_id, "--store", str(store), "--format", "hub", "--out", str(tmp_path / "taken")
    )
    assert code == 2 and "not an empty folder" in str(err)
    assert (tmp_path / "taken" / "x").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]  # no staging left


PLAY = """First Citizen:
Before we proceed any further, hear me speak.
Speak, speak.

Second Citizen:
We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us.

First Citizen:
You are all resolved rather to die than to famish?
Resolved. resolved.

Second Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?
"""


def test_a_text_run_exports_its_vocabulary_and_checks_it_on_load(
    tmp_path: Path, capsys: Any
) -> None:
    pytest.importorskip("onnxruntime")
    (tmp_path / "play.txt").write_text(PLAY)
    job = tmp_path / "text.toml"
    job.write_text(
        '[data]\ndataset = "shakespeare"\npath = "play.txt"\nseq_len = 8\n'
        'partition = { nodes = 2 }\n[model]\nname = "char_lstm"\nhidden = 8\nlayers = 1\n'
        "[algorithm]\nrounds = 1\nnodes_per_round = 2\nmax_steps = 2\n"
    )
    store = tmp_path / "s.db"
    out = tmp_path / "run.json"
    assert main(["run", str(job), "--store", str(store), "--quiet", "--json", str(out)]) == 0
    run_id = json.loads(out.read_text())["run_id"]
    capsys.readouterr()
    common = [run_id, "--store", str(store), "--data-dir", str(tmp_path)]
    for fmt, target in (("onnx", "m.onnx"), ("numpy", "m.st"), ("hub", "hub")):
        code, report = export(capsys, *common, "--format", fmt, "--out", str(tmp_path / target))
        assert code == 0, report
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["tokens"] == "char" and config["seq_len"] == 8
    vocab = config["vocab"]
    assert vocab[:2] == ["<pad>", "<unk>"] and "S" in vocab
    card = (tmp_path / "hub" / "README.md").read_text()
    assert 'source: "shakespeare (play.txt)"' in card and str(tmp_path) not in card
    from shoal.learn.torch import load_pretrained
    from shoal.learn.transfer import VocabularyMismatch

    load_pretrained(str(tmp_path / "hub"), vocab=vocab)
    with pytest.raises(VocabularyMismatch, match=f"vocabulary of {len(vocab)} tokens.*has 5"):
        load_pretrained(str(tmp_path / "hub"), vocab=vocab[:5])
    swapped = [vocab[0], vocab[1], vocab[3], vocab[2], *vocab[4:]]
    with pytest.raises(VocabularyMismatch, match="token 2 is"):
        load_pretrained(str(tmp_path / "hub"), vocab=swapped)
    # A job that fine-tunes it on a play with other characters is refused before training.
    (tmp_path / "other.txt").write_text(PLAY.replace("speak", "SPEAK!?").replace("s", "zq"))
    tune = tmp_path / "tune.toml"
    tune.write_text(
        job.read_text().replace("play.txt", "other.txt") + '[transfer]\npretrained = "hub"\n'
    )
    assert main(["run", str(tune), "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the pretrained model has a vocabulary of {len(vocab)} tokens" in err
    assert "but the data's has" in err


def test_a_job_fine_tunes_an_exported_model_with_a_frozen_backbone(
    tmp_path: Path, capsys: Any
) -> None:
    pytest.importorskip("onnxruntime")
    store, run_id = run_job(tmp_path, capsys)
    code, _ = export(
        capsys, run_id, "--store", str(store), "--format", "hub", "--out", str(tmp_path / "base")
    )
    assert code == 0
    job = tmp_path / "tune.toml"
    job.write_text(
        JOB.format(model="mlp", options="hidden = 8", extra="")
        + '[transfer]\npretrained = "base"\nfreeze = ["1.*"]\n'
    )
    out = tmp_path / "tune.json"
    assert main(["run", str(job), "--store", str(store), "--quiet", "--json", str(out)]) == 0
    tuned = json.loads(out.read_text())["run_id"]
    capsys.readouterr()
    with Store(store) as s:
        arrays = s.load_checkpoint(tuned).arrays
        base = s.load_checkpoint(run_id).arrays
    assert sorted(arrays) == ["weights/3.bias", "weights/3.weight"]  # only the head travelled
    code, hub = export(
        capsys,
        tuned,
        "--store",
        str(store),
        "--data-dir",
        str(tmp_path),
        "--format",
        "hub",
        "--out",
        str(tmp_path / "tuned"),
    )
    assert code == 0, hub
    assert isinstance(hub, dict) and hub["parameters"] == 64 * 8 + 8 + 8 * 10 + 10  # whole model
    assert hub["checkpoint_bytes"] == (8 * 10 + 10) * 8  # the Store holds the head only
    from shoal.learn.torch import load_pretrained

    weights = load_pretrained(str(tmp_path / "tuned")).get_weights()
    np.testing.assert_allclose(weights["1.weight"], base["weights/1.weight"], rtol=1e-6)
    np.testing.assert_allclose(weights["3.weight"], arrays["weights/3.weight"], rtol=1e-6)
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert 'pretrained: "base"' in card and 'freeze: ["1.*"]' in card


def test_transfer_jobs_refuse_what_cannot_work(tmp_path: Path, capsys: Any) -> None:
    cases = [
        ("softmax_regression", "", '[transfer]\nfreeze = ["W"]\n', "needs a PyTorch model"),
        ("mlp", "hidden = 8", '[transfer]\nfrozen = ["1.*"]\n', "unknown key(s) ['frozen']"),
        ("mlp", "hidden = 8", '[transfer]\nfreeze = "1.*"\n', "list of name patterns"),
        ("mlp", "hidden = 8", '[transfer]\npretrained = "missing.pt"\n', "do not exist"),
        ("mlp", "hidden = 8", '[transfer]\nfreeze = ["head.*"]\n', "matches no weight"),
    ]
    for model, options, extra, message in cases:
        job = tmp_path / "bad.toml"
        job.write_text(JOB.format(model=model, options=options, extra="") + extra)
        assert main(["run", str(job), "--store", str(tmp_path / "s.db"), "--quiet"]) == 2
        assert message in capsys.readouterr().err, message


def test_a_personalized_run_is_not_exported_from_the_server(tmp_path: Path, capsys: Any) -> None:
    extra = '[transfer]\npersonal = ["3.*"]\n'
    store = tmp_path / "s.db"
    job = tmp_path / "p.toml"
    job.write_text(JOB.format(model="mlp", options="hidden = 8", extra="") + extra)
    out = tmp_path / "p.json"
    assert main(["run", str(job), "--store", str(store), "--quiet", "--json", str(out)]) == 0
    personal = json.loads(out.read_text())["run_id"]
    capsys.readouterr()
    code, err = export(
        capsys,
        personal,
        "--store",
        str(store),
        "--data-dir",
        str(tmp_path),
        "--format",
        "onnx",
        "--out",
        str(tmp_path / "p.onnx"),
    )
    assert code == 2 and "personal layers that stay at each node" in str(err)
    assert not (tmp_path / "p.onnx").exists()


def test_a_predictor_that_fails_its_check_is_removed(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team: the ONNX path removed an unchecked file; the NumPy path left it behind."""
    import shoal.learn.export as export_module
    from shoal.learn.export import PredictorError

    store, run_id = run_job(tmp_path, capsys, model="softmax_regression", options="")

    def broken(path: Any) -> Any:
        raise PredictorError(f"{path}: corrupted on the way to disk")

    monkeypatch.setattr(export_module.NumpyPredictor, "load", staticmethod(broken))
    out = tmp_path / "p.safetensors"
    code, err = export(
        capsys, run_id, "--store", str(store), "--format", "numpy", "--out", str(out)
    )
    assert code != 0 and "corrupted on the way to disk" in str(err)
    assert not out.exists()
