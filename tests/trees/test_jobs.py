"""Tree jobs through `shoal run`: parse-time errors, and simulated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.cli.job import parse_job
from shoal.cli.main import main
from shoal.errors import ConfigError

GBDT = """
[job]
name = "cancer-gbdt"

[data]
dataset = "breast_cancer"
partition = { scheme = "dirichlet", alpha = 0.5, nodes = 5 }

[model]
name = "gbdt"
n_trees = 4
max_depth = 3
eta = 0.3
"""

VERTICAL = """
[job]
name = "cancer-secureboost"

[data]
dataset = "breast_cancer"

[model]
name = "secureboost"
guest_features = 10
hosts = 2
n_trees = 2
max_depth = 3
max_bins = 16
key_bits = 512
insecure_test_keys = true
"""


def _raw(text: str, **model: object) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    raw = tomllib.loads(text)
    raw["model"].update(model)
    return raw


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"max_bins": 300}, "max_bins must be in"),
        ({"max_depth": 13}, "max_depth must be in"),
        ({"num_leaves": 31}, "unknown tree parameter 'num_leaves'"),
        ({"eta": "fast"}, "learning_rate must be a finite number"),
    ],
)
def test_bad_tree_parameters_fail_at_parse_time(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(_raw(GBDT, **model))


def test_bad_vertical_splits_fail_at_parse_time() -> None:
    with pytest.raises(ConfigError, match="cannot split 30 columns"):
        parse_job(_raw(VERTICAL, guest_features=30))
    raw = _raw(VERTICAL)
    del raw["model"]["hosts"]
    with pytest.raises(ConfigError, match="needs \\[model\\] hosts"):
        parse_job(raw)


def test_shoal_run_trains_gbdt_like_centralized(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(GBDT)
    code = main(["run", str(tmp_path / "job.toml"), "--json", str(tmp_path / "s.json"), "--quiet"])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and summary["identical_predictions"] and summary["secure"]
    assert summary["federated_auc"] == summary["centralized_auc"] > 0.9


def test_shoal_run_trains_secureboost_like_centralized(tmp_path: Path) -> None:
    pytest.importorskip("shoal.crypto.paillier")
    (tmp_path / "job.toml").write_text(VERTICAL)
    code = main(["run", str(tmp_path / "job.toml"), "--json", str(tmp_path / "s.json"), "--quiet"])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and summary["identical_predictions"]
    assert summary["federated_auc"] == summary["centralized_auc"] > 0.9


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"

SECUREBOOST_TOML = """
[job]
name = "bank-insurer-trees"
seed = 0

[vertical]
id_column = "id"
parties = [
  { name = "bank", role = "guest", path = "bank.csv", label = "default" },
  { name = "insurer", role = "host", path = "insurer.csv" },
]
test_fraction = 0.2

[model]
name = "secureboost"
n_trees = 2
max_depth = 3
max_bins = 16

[crypto]
key_bits = 512
"""


def test_shoal_run_vertical_toml_trains_secureboost_like_centralized(tmp_path: Path) -> None:
    pytest.importorskip("shoal.crypto.paillier")
    for name in ("bank", "insurer"):
        (tmp_path / f"{name}.csv").write_bytes((EXAMPLE / f"{name}.csv").read_bytes())
    (tmp_path / "vertical.toml").write_text(SECUREBOOST_TOML)
    code = main(["run", str(tmp_path / "vertical.toml"), "--insecure-test-keys",
                 "--json", str(tmp_path / "s.json"), "--quiet"])  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and summary["model"] == "secureboost" and summary["identical_predictions"]
    assert summary["auc"] == summary["centralized_auc"] > 0.6
    assert 0 < summary["intersection_size"] < 2000 and summary["bytes_sent"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[model]", "[model]\nmax_depth = 13"), "max_depth must be in"),
        (("test_fraction = 0.2", "test_fraction = 0.2\narbiter = true"), "has no arbiter"),
    ],
)
def test_bad_vertical_secureboost_jobs_fail_before_training(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    from shoal.trees.secureboost import config_from_job
    from shoal.vertical.job import load_vertical_job

    text = (
        SECUREBOOST_TOML.replace("max_depth = 3\n", "")
        if "max_depth" in change[1]
        else (SECUREBOOST_TOML)
    )
    (tmp_path / "vertical.toml").write_text(text.replace(*change))
    with pytest.raises(ConfigError, match=message):
        config_from_job(load_vertical_job(tmp_path / "vertical.toml", insecure_test_keys=True))
