"""`shoal demo`, `shoal run` and `shoal runs`, called through the real entry point."""

from __future__ import annotations

import json

import pytest

from shoal.cli.main import main


def test_demo_writes_a_summary_and_records_the_run(tmp_path, capsys) -> None:
    store = tmp_path / "store.db"
    out = tmp_path / "demo.json"
    code = main(["demo", "--rounds", "4", "--store", str(store), "--json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    for key in ("accuracy", "centralized_accuracy", "rounds", "nodes", "wall_s", "run_id"):
        assert key in summary
    assert summary["rounds"] == 4 and summary["nodes"] == 20
    assert 0.5 < summary["accuracy"] <= 1.0
    assert "round   4/4" in capsys.readouterr().out

    assert main(["runs", "--store", str(store), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == [summary["run_id"]]
    assert main(["runs", "show", summary["run_id"], "--store", str(store), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["rounds"]) == 4 and shown["status"] == "finished"


def test_run_reports_a_bad_job_clearly(tmp_path, capsys) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[algorithm]\nname = "fedsgd"\n[data]\ndataset = "iris"\n')
    assert main(["run", str(path), "--store", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err
    assert "fedsgd" in err and "fedavg" in err


def test_runs_show_unknown_run(tmp_path, capsys) -> None:
    assert main(["runs", "show", "nope", "--store", str(tmp_path / "s.db")]) == 2
    assert "no run" in capsys.readouterr().err


def test_help_shows_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "shoal demo --json" in capsys.readouterr().out


def test_bad_option_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--rounds", "zero"])
    assert info.value.code == 2
    assert "whole number" in capsys.readouterr().err
