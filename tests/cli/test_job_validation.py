"""Hostile job and data files: each class of bad input is a ConfigError/DataError naming the
key (or the file) and what would work, raised at parse time where it can be, never a
traceback, and never after gigabytes have been allocated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.cli.job import COMBINATION_CHECKS, parse_job, simulate_job
from shoal.cli.main import main
from shoal.errors import ConfigError, DataError, ShoalError

BASE: dict[str, Any] = {
    "data": {"dataset": "iris", "partition": {"scheme": "iid", "nodes": 6}},
    "algorithm": {"name": "fedavg", "rounds": 1, "nodes_per_round": 5},
}


def job(**tables: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    for name, value in tables.items():
        if name == "algorithm" and isinstance(value, dict):  # only [algorithm] is merged
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return raw


# [algorithm]: every key is type-checked against the algorithm's fields.
@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"rounds": "3"}, r"\[algorithm\] rounds must be an integer, got '3'"),
        ({"nodes_per_round": True}, r"\[algorithm\] nodes_per_round must be an integer"),
        ({"local_epochs": 1.5}, r"\[algorithm\] local_epochs must be an integer, got 1.5"),
        ({"lr": "fast"}, r"\[algorithm\] lr must be a finite number"),
        ({"lr": float("nan")}, r"\[algorithm\] lr must be a finite number"),
        ({"lr": float("inf")}, r"\[algorithm\] lr must be a finite number"),
        ({"lr": 0}, r"\[algorithm\] lr must be in \(0, inf\)"),
        ({"keep_optimizer_state": 1}, r"keep_optimizer_state must be true or false"),
        ({"max_steps": 0}, r"\[algorithm\] max_steps must be in \[1, inf\)"),
        ({"name": "fedavgm", "momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"name": "fedadam", "beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"name": "fedprox", "mu": "0.1"}, r"mu must be a finite number"),
        ({"privacy": {"epsilon": 1}}, r"unknown key\(s\) \['privacy'\] in \[algorithm\]"),
        ({"aggregator": "mean"}, r"unknown key\(s\) \['aggregator'\]"),
        ({"clamp": "yes"}, r"\[algorithm\] clamp must be true or false"),
        ({"lr_final": 2.0}, r"\[algorithm\] lr_final must be in \(0, 1\]"),
        ({"lr_final": 0}, r"\[algorithm\] lr_final must be in \(0, 1\]"),
        ({"lr_schedule": "step"}, r"lr_schedule must be one of constant, cosine, got 'step'"),
        ({"lr_schedule": 1}, r"lr_schedule"),
    ],
)
def test_algorithm_values_are_type_checked(algorithm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(job(algorithm=algorithm))


def test_nodes_per_round_above_the_nodes_is_an_error_unless_clamped() -> None:
    with pytest.raises(ConfigError, match=r"nodes_per_round = 9 is more than the 6 nodes.*clamp"):
        parse_job(job(algorithm={"nodes_per_round": 9}))
    spec = parse_job(job(algorithm={"nodes_per_round": 9, "clamp": True}))
    assert spec.algorithm["nodes_per_round"] == 6
    assert spec.build_algorithm().nodes_per_round == 6
    # Not given: the algorithm's default, never more than the nodes there are.
    raw = job()
    del raw["algorithm"]["nodes_per_round"]
    assert parse_job(raw).algorithm["nodes_per_round"] == 6


# Combinations that cannot work are refused before any data loads: the data path below does
# not exist, and the error is still about the combination.
MISSING_DATA = {"path": "no-such-file.csv", "partition": {"scheme": "iid", "nodes": 6}}


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            {"model": {"name": "sklearn_sgd"}, "algorithm": {"name": "fedprox", "mu": 0.1}},
            r"\[model\] name = 'sklearn_sgd'.*FedProx's proximal term.*'fedavg'",
        ),
        (
            {"model": {"name": "sklearn_mlp"}, "algorithm": {"name": "scaffold"}},
            r"sklearn_mlp.*SCAFFOLD's correction",
        ),
        (
            {"aggregate": {"secure": True, "clip": 1.0, "rule": "median"}},
            r"rule = 'median' needs each update in the clear.*secure = true",
        ),
        (
            {"aggregate": {"secure": True, "clip": 1.0, "norm_bound": 5.0}},
            r"norm_bound.*secure = true hides",
        ),
        ({"aggregate": {"secure": True}}, r"secure = true needs clip"),
        (
            {
                "aggregate": {"rule": "krum", "f": 1},
                "privacy": {"epsilon": 2.0, "level": "node"},
            },
            r"rule = 'krum' cannot combine with this \[privacy\] plan",
        ),
        (
            {"aggregate": {"rule": "krum", "f": 2}},
            r"needs at least 2f\+3 = 7 updates per round, but \[algorithm\] nodes_per_round = 5",
        ),
        ({"aggregate": {"rule": "multikrum", "f": 1, "m": 5}}, r"\[aggregate\] m must be in"),
        ({"aggregate": {"rule": "trimmed_mean", "beta": 0.6}}, r"\[aggregate\] beta"),
        ({"aggregate": {"clip": -1.0}}, r"\[aggregate\] clip must be a positive number"),
        ({"engine": {"min_nodes": 7}}, r"\[engine\] min_nodes must be in 1..6"),
        ({"engine": {"deadline_s": 0}}, r"\[engine\] deadline_s must be a positive"),
    ],
)
def test_bad_combinations_fail_before_data_loads(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(job(data=MISSING_DATA, **tables))


def test_combination_checks_live_in_one_list() -> None:
    # Other rules (e.g. privacy refusals) are added to this list; each is a plain function.
    assert len(COMBINATION_CHECKS) >= 5 and all(callable(c) for c in COMBINATION_CHECKS)


# Other tables: wrong types, non-tables and out-of-range numbers.
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**BASE, "model": 3}, r"\[model\] must be a table"),
        ({**BASE, "algorithm": 3}, r"\[algorithm\] must be a table"),
        (job(model={"name": "softmax_regression", "l2": "x"}), r"\[model\] l2 must be float"),
        (job(model={"name": "softmax_regression", "foo": 1}), r"unknown key.*\[model\]"),
        (job(job={"seed": -1}), r"\[job\] seed must be in \[0, 2\*\*32\)"),
        (job(job={"seed": 2**70}), r"\[job\] seed must be in"),
        (
            job(data={**BASE["data"], "test_fraction": float("nan")}),
            r"test_fraction must be a finite number",
        ),
        (job(attack={"name": "sign_flip", "scale": "x"}), r"\[attack\] scale must be"),
        (job(attack={"name": "sign_flip", "fraction": True}), r"\[attack\] fraction"),
        (job(attack={"name": 3}), r"\[attack\] name '3' is not known"),
    ],
)
def test_other_tables_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(raw)


# Data files: labels are checked before anything is sized by the number of classes.
def _csv_job(tmp_path: Path, name: str) -> dict[str, Any]:
    return job(
        data={"path": name, "partition": {"scheme": "iid", "nodes": 1}},
        algorithm={"nodes_per_round": 1},
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a,label\n1,0\n2,1\n3,268435456\n", r"label 268435456.*more than 10000 classes"),
        (b"a,label\n1,0\n2,1\n3,1e300\n", r"label 1e\+300.*more than 10000 classes"),
        (b"a,label\n1,0\n2,-1\n", r"negative"),
        (b"a,label\n1,0\n2,0.5\n", r"not an integer"),
        (b"a,label\nx,0\n", r"not a number"),
        (b"", r"is empty"),
        (b"\x00\xff\xfe" * 50, r"not UTF-8 text"),
        (b"a,b,label\n1,0\n", r"has 2 fields but the file has 3 columns"),
        # a field past the csv module's limit was a _csv.Error traceback
        (b"a,label\n" + b"1" * 200_000 + b",0\n2,1\n", r"cannot be parsed as CSV"),
        (b"a" * (17 << 20) + b",label\n1,0\n", r"first line is longer than"),
        (b"label,a,label\n1,2,0\n", r"has 2 columns named 'label'"),
    ],
)
def test_hostile_csv_files_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "d.csv").write_bytes(content)
    spec = parse_job(_csv_job(tmp_path, "d.csv"), base_dir=tmp_path)
    with pytest.raises(DataError, match=message):
        simulate_job(spec)


def test_npz_with_a_huge_label_fails_fast(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0, 1, 2**28]))
    spec = parse_job(_csv_job(tmp_path, "d.npz"), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"label 268435456.*more than 10000 classes"):
        simulate_job(spec)


def test_shoal_run_on_a_three_row_csv_with_label_2_pow_28(tmp_path: Path, capsys) -> None:
    (tmp_path / "d.csv").write_text("a,label\n1,0\n2,1\n3,268435456\n")
    (tmp_path / "job.toml").write_text(
        '[data]\npath = "d.csv"\npartition = { scheme = "iid", nodes = 1 }\n'
        '[algorithm]\nname = "fedavg"\nrounds = 1\nnodes_per_round = 1\n'
    )
    code = main(["run", str(tmp_path / "job.toml"), "--store", str(tmp_path / "s.db")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("shoal: error:") and "10000 classes" in err
    assert "Traceback" not in err


def test_every_error_above_is_a_shoal_error() -> None:
    assert issubclass(ConfigError, ShoalError) and issubclass(DataError, ShoalError)


def test_secure_dp_plans_clip_with_their_own_clip() -> None:
    # The DP demo's job: secure = true without [aggregate] clip; the plan's clip bounds it.
    spec = parse_job(
        job(
            aggregate={"secure": True},
            privacy={"epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.2},
        )
    )
    assert spec.build_algorithm().privacy is not None


# Red team: inputs that escaped as a TypeError, a torch ValueError or a RecursionError.
@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"algorithm": {"name": ["fedavg"]}}, r"\[algorithm\] name must be a string"),
        ({"algorithm": {"name": {"a": 1}}}, r"\[algorithm\] name must be a string"),
        ({"model": {"name": "mlp", "seed": 10**30}}, r"\[model\] seed must fit in 64 bits"),
        ({"model": {"name": "mlp", "hidden": -(10**30)}}, r"\[model\] hidden must fit in 64 bits"),
        # integers past float's range (OverflowError when turned into a float)
        ({"privacy": {"epsilon": 10**400}}, r"\[privacy\] epsilon must be a finite number"),
        ({"aggregate": {"clip": 10**400}}, r"\[aggregate\] clip must be a finite number"),
        ({"aggregate": {"norm_bound": -(10**400)}}, r"norm_bound must be a finite number"),
        (
            {"data": {"dataset": "iris", "partition": {"scheme": "iid", "alpha": 10**400}}},
            r"alpha must be a finite number",
        ),
    ],
)
def test_hostile_values_that_escaped_name_their_key(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_job(job(**tables))


@pytest.mark.parametrize(
    "text", ["x = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 3000 + "1" + "}" * 3000]
)
def test_a_deeply_nested_job_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    from shoal.cli.job import load_job

    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="too deeply"):
        load_job(path)


def test_a_data_path_that_is_not_a_readable_file_is_a_data_error(tmp_path: Path) -> None:
    from shoal.data import load_csv

    with pytest.raises(DataError, match="is not a regular file"):
        load_csv(tmp_path)
    if Path("/proc/self/mem").exists():  # lists as a regular file, reading it is EIO
        with pytest.raises(DataError, match="cannot read CSV file"):
            load_csv("/proc/self/mem")


# [engine] kind = "ray" is a simulation engine: deployed commands and vertical jobs refuse it
# with the reason instead of running as if the table were not there.
RAY_JOB = """\
[data]
dataset = "iris"
partition = { scheme = "iid", nodes = 2 }
[engine]
kind = "ray"
address = "127.0.0.1:6379"
"""


@pytest.mark.parametrize("command", ["coordinator", "node"])
def test_deployed_commands_refuse_the_ray_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(RAY_JOB)
    if command == "coordinator":
        argv = ["coordinator", "--job", str(path), "--insecure", "--listen", "127.0.0.1:0"]
        argv += ["--store", str(tmp_path / "s.db")]
    else:
        argv = ["node", "--coordinator", "127.0.0.1:1", "--insecure", "--job", str(path)]
        argv += ["--key", str(tmp_path / "none.key"), "--partition", "0/2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"`shoal {command}` deploys it with real nodes" in err
    assert "Remove kind, address and actors from [engine]" in err
    assert not (tmp_path / "s.db").exists()  # refused before a store was opened


def test_the_coordinator_says_which_engine_keys_only_simulations_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(RAY_JOB.replace('kind = "ray"\naddress = "127.0.0.1:6379"', "workers = 4"))
    argv = ["coordinator", "--job", str(path), "--insecure", "--listen", "127.0.0.1:0"]
    # An unknown run to resume stops it right after the notes, before it listens.
    argv += ["--store", str(tmp_path / "s.db"), "--resume", "nope"]
    assert main(argv) == 2
    assert "[engine] workers only applies to simulations" in capsys.readouterr().out


def test_a_vertical_job_refuses_the_ray_engine(tmp_path: Path) -> None:
    from shoal.vertical.job import parse_vertical_job

    raw: dict[str, Any] = {
        "vertical": {
            "id_column": "id",
            "parties": [
                {"name": "bank", "role": "guest", "path": "bank.csv", "label": "y"},
                {"name": "insurer", "role": "host", "path": "insurer.csv"},
            ],
        },
        "engine": {"kind": "ray"},
    }
    with pytest.raises(ConfigError, match=r"a vertical job .* has no Ray engine"):
        parse_vertical_job(raw, base_dir=tmp_path)
    raw["engine"] = {"kind": "local"}
    assert parse_vertical_job(raw, base_dir=tmp_path).name == "vertical"


# Red team: values that passed the type check and then failed with a traceback at run time.
@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            {"data": {"dataset": "iris", "partition": {"scheme": "iid", "nodes": 10**19}}},
            r"cannot give 10000000000000000000 nodes 1 sample\(s\) each",
        ),
        ({"engine": {"workers": 2**63}}, r"workers must be at most 1024"),
        (
            {"privacy": {"noise_multiplier": 1e308, "delta": 1e-5}},
            r"noise_multiplier must be at most",
        ),
    ],
)
def test_huge_values_fail_before_they_are_used(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ShoalError, match=message):
        simulate_job(parse_job(job(**tables)))
