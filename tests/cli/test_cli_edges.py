"""The CLI's small edges: quiet output, stores that are not there, runs that were killed,
Ctrl-C, wide tables, what "loss" means, and the opt-in centralized baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.cli.main import main
from shoal.runtime import Store

SRC = Path(__file__).resolve().parents[2] / "src"

LONG_JOB = """\
[job]
name = "long-{tag}"
[data]
dataset = "iris"
partition = {{ scheme = "iid", nodes = 4 }}
[algorithm]
name = "fedavg"
rounds = 100000
nodes_per_round = 2
"""


def test_quiet_still_prints_the_result_and_run_id(tmp_path, capsys) -> None:
    store = tmp_path / "s.db"
    assert main(["demo", "--rounds", "2", "--quiet", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "round " not in out  # no per-round lines
    with Store(store) as s:
        (record,) = s.list_runs()
    assert "federated accuracy" in out and f"run {record.id}" in out


def test_runs_with_a_mistyped_store_creates_nothing(tmp_path, capsys) -> None:
    typo = tmp_path / "typo.db"
    assert main(["runs", "--store", str(typo)]) == 2
    assert not typo.exists()
    err = capsys.readouterr().err
    assert "no store at" in err and "typo.db" in err
    assert main(["runs", "show", "x", "--store", str(typo)]) == 2
    assert not typo.exists()


def test_unknown_run_points_at_the_command_not_a_function(tmp_path, capsys) -> None:
    store = tmp_path / "s.db"
    Store(store).close()
    assert main(["runs", "show", "nope", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "shoal runs --store" in err and "()" not in err


def test_json_names_both_losses_and_says_whether_the_baseline_ran(tmp_path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[data]\ndataset = "iris"\npartition = { scheme = "iid", nodes = 4 }\n'
        '[algorithm]\nname = "fedavg"\nrounds = 2\nnodes_per_round = 2\n'
    )
    out = tmp_path / "out.json"
    store = str(tmp_path / "s.db")
    assert main(["run", str(job), "--store", store, "--json", str(out), "--quiet"]) == 0
    summary = json.loads(out.read_text())
    assert summary["baseline"] is False and summary["centralized_accuracy"] is None
    assert "loss" not in summary and summary["test_loss"] > 0 and summary["train_loss"] > 0
    assert all("loss" not in r and "test_loss" in r for r in summary["history"])
    argv = ["run", str(job), "--store", store, "--json", str(out), "--quiet", "--baseline"]
    assert main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["baseline"] is True and 0 < summary["centralized_accuracy"] <= 1


def test_tables_are_not_cut_at_80_columns_when_piped(tmp_path) -> None:
    store = tmp_path / "s.db"
    name = "a-job-name-long-enough-to-push-the-table-well-past-eighty-columns-xyz"
    with Store(store) as s:
        s.create_run(name=name, config={})
    proc = _shoal(["runs", "--store", str(store)], capture=True)
    assert proc.returncode == 0, proc.stderr
    assert name in proc.stdout  # on one line, not folded or cut with an ellipsis


def _shoal(argv: list[str], *, capture: bool = False, **kw):  # type: ignore[no-untyped-def]
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "80"}
    # Python installs its Ctrl-C handler only if SIGINT was not ignored when it started, and a
    # test runner launched with `&` from a script passes SIGINT on ignored: install it here, so
    # the Ctrl-C tests do not depend on how the runner was started.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from shoal.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [sys.executable, "-c", code, *argv]
    if capture:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _start_long_run(tmp_path: Path, tag: str) -> tuple[subprocess.Popen[str], Path]:
    job = tmp_path / f"{tag}.toml"
    job.write_text(LONG_JOB.format(tag=tag))
    store = tmp_path / "s.db"
    proc = _shoal(["run", str(job), "--store", str(store)])
    assert proc.stdout is not None
    for _ in range(200):  # wait for the first round, bounded
        line = proc.stdout.readline()
        if line.startswith("round"):
            return proc, store
        if not line and proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=30)
    raise AssertionError(f"no round started: {err}")


@pytest.mark.integration
def test_a_run_killed_with_sigkill_shows_as_interrupted(tmp_path, capsys) -> None:
    proc, store = _start_long_run(tmp_path, "kill")
    with Store(store) as s:
        (record,) = s.list_runs()
        assert record.status == "running"
    # While its process lives, `shoal runs` leaves it running.
    assert main(["runs", "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "running"
    proc.kill()
    proc.communicate(timeout=30)  # reaps it and closes the pipes
    assert main(["runs", "--store", str(store), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["status"] == "interrupted"
    assert record.id in captured.err and "--resume" in captured.err


@pytest.mark.integration
def test_ctrl_c_prints_the_run_id_and_how_to_resume(tmp_path) -> None:
    proc, store = _start_long_run(tmp_path, "int")
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    with Store(store) as s:
        (record,) = s.list_runs()
    assert record.status == "interrupted"
    assert f"--resume {record.id}" in err and "shoal run" in err
    assert "Traceback" not in err


def test_fedadagrad_defaults_work_on_the_demo() -> None:
    from shoal.cli.job import parse_job, simulate_job
    from shoal.cli.learn import DEMO_JOB

    raw = json.loads(json.dumps(DEMO_JOB))
    raw["algorithm"].update(name="fedadagrad", rounds=5)  # its own server_lr and tau
    accuracy = simulate_job(parse_job(raw)).metrics["accuracy"]
    assert accuracy > 0.85  # FedAdam's defaults gave it 0.61; the others reach about 0.90


def test_coordinator_resume_of_an_unknown_run_names_the_command(tmp_path, capsys) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[data]\ndataset = "iris"\npartition = { scheme = "iid", nodes = 2 }\n')
    store = tmp_path / "s.db"
    Store(store).close()
    argv = ["coordinator", "--job", str(job), "--insecure", "--store", str(store)]
    assert main([*argv, "--listen", "127.0.0.1:0", "--resume", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "shoal runs --store" in err and "()" not in err
