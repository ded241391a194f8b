"""Tests of ``shoal privacy epsilon`` and ``shoal privacy noise``."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from shoal.cli import privacy as privacy_cli
from shoal.errors import ShoalError
from shoal.privacy import epsilon


def main(argv: list[str]) -> int:
    """What ``shoal.cli.main.main`` does with a subcommand, without importing its siblings."""
    parser = argparse.ArgumentParser(prog="shoal")
    privacy_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
    return code


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_epsilon_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_json(
        capsys,
        [
            "privacy", "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.1",
            "--steps", "1000", "--delta", "1e-5", "--json",
        ],
    )  # fmt: skip
    assert data["epsilon"] == pytest.approx(
        epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=1000, delta=1e-5)
    )
    assert data["noise_multiplier"] == 1.1
    assert data["sample_rate"] == 0.01 and data["steps"] == 1000 and data["delta"] == 1e-5
    assert data["accountant"] == "rdp"


def test_noise_json_meets_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_json(
        capsys,
        [
            "privacy", "noise", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01",
            "--steps", "500", "--accountant", "pld", "--json",
        ],
    )  # fmt: skip
    assert data["accountant"] == "pld"
    assert data["target_epsilon"] == 2.0
    eps = data["epsilon"]
    z = data["noise_multiplier"]
    assert isinstance(eps, float) and isinstance(z, float)
    assert 0.99 * 2 <= eps <= 2
    assert 0.3 < z < 3


def test_noise_with_a_small_pld_target_refines_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_json(
        capsys,
        [
            "privacy", "noise", "--epsilon", "0.2", "--delta", "1e-5", "--sample-rate", "0.05",
            "--steps", "10", "--accountant", "pld", "--json",
        ],
    )  # fmt: skip
    assert 0.99 * 0.2 <= data["epsilon"] <= 0.2  # type: ignore[operator]


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "epsilon", "--sample-rate", "0.5", "--noise-multiplier", "0"]
    assert main([*argv, "--steps", "3", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "infinite" in out and "RDP accountant" in out
    assert main([*argv, "--steps", "3", "--delta", "1e-5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["epsilon", "--sample-rate", "0", "--noise-multiplier", "1"], "sample_rate"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "-1"], "noise_multiplier"),
        (["noise", "--epsilon", "-1", "--sample-rate", "0.1"], "epsilon"),
        (["noise", "--epsilon", "1", "--sample-rate", "1.5"], "sample_rate"),
    ],
)
def test_invalid_values_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code = main(["privacy", *argv, "--steps", "10", "--delta", "1e-5"])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "must be" in err


def test_bad_delta_and_steps_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["privacy", "epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1"]
    assert main([*base, "--steps", "0", "--delta", "1e-5"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main([*base, "--steps", "10", "--delta", "2"]) == 2
    assert "delta" in capsys.readouterr().err


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["privacy", "epsilon", "--sample-rate", "abc"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["privacy", "noise", "--epsilon", "1", "--accountant", "moments"])
    assert info.value.code == 2


def test_missing_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy"]) == 2
    assert "epsilon" in capsys.readouterr().out


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["privacy", "noise", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "shoal privacy noise --epsilon" in out
