"""The `shoal scan` command: exit codes, JSON shape and the text table."""

from __future__ import annotations

import json
import pickle

import pytest

from shoal.cli.main import main


@pytest.fixture
def files(tmp_path, evil_pickle):
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.pkl").write_bytes(pickle.dumps({"a": [1, 2]}))
    (good / "sub").mkdir()
    (good / "sub" / "b.pkl").write_bytes(pickle.dumps([3]))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(evil_pickle)
    return good, bad


def test_clean_folder_exits_zero(files, capsys):
    good, _bad = files
    assert main(["scan", str(good)]) == 0
    out = capsys.readouterr().out
    assert "a.pkl" in out and "b.pkl" in out


def test_a_long_path_is_printed_whole(tmp_path, capsys):
    # piped output is 80 columns wide: a longer path was broken across lines ("a.pk\nl"),
    # which failed the test above whenever its temporary folder's path was long
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    (deep / "a.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    assert main(["scan", str(deep)]) == 0
    out = capsys.readouterr().out
    assert str(deep / "a.pkl") in out.splitlines()[0], out


def test_unsafe_file_exits_one_with_exact_json(files, capsys):
    good, bad = files
    assert main(["scan", "--format", "json", str(bad), str(good)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"files"}
    assert [f["path"] for f in doc["files"]] == [
        str(bad),
        str(good / "a.pkl"),
        str(good / "sub" / "b.pkl"),
    ]
    first = doc["files"][0]
    assert set(first) == {"path", "format", "severity", "findings"}
    assert first["format"] == "pickle"
    assert first["severity"] == "critical"
    finding = first["findings"][0]
    assert set(finding) == {"severity", "kind", "detail", "offset"}
    assert finding["severity"] == "critical"
    assert isinstance(finding["offset"], int)
    assert doc["files"][1]["findings"] == []
    assert doc["files"][1]["severity"] == "none"


def test_missing_path_exits_two(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_option_exits_two(files, capsys):
    good, _bad = files
    assert main(["scan", "--max-depth", "0", str(good)]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--format", "xml", str(good)])
    assert exc.value.code == 2


def test_text_output_names_the_finding(files, capsys):
    _good, bad = files
    assert main(["scan", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "critical" in out and "system" in out


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_limits_from_the_command_line(tmp_path, capsys):
    import bz2

    bomb = tmp_path / "bomb.pkl.bz2"
    frames = b"\x95" + bytes(8)  # 32 MiB of empty FRAME opcodes
    bomb.write_bytes(bz2.compress(b"\x80\x04" + frames * ((32 << 20) // 9) + b"N."))
    assert main(["scan", "--format", "json", "--max-ratio", "10", str(bomb)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert any("expands more than 10 times" in f["detail"] for f in doc["files"][0]["findings"])
    assert main(["scan", "--max-seconds", "0", str(bomb)]) == 2
    assert "max_seconds must be positive" in capsys.readouterr().err


def test_the_json_report_is_json_dumps_with_indent_2() -> None:
    """shoal scan --format json writes its report without json's pure-Python encoder: the text
    must be exactly json.dumps(..., indent=2) of the reports' dicts, for any text in them."""
    import json as _json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from shoal.cli.scan import report_json
    from shoal.scan import FileReport, Finding, Severity

    text = st.text(max_size=30)
    findings = st.builds(
        Finding,
        st.sampled_from(list(Severity)),
        text,
        text,
        st.one_of(st.none(), st.integers(0, 2**64)),
    )
    reports = st.builds(
        FileReport,
        text,
        text,
        st.sampled_from(list(Severity)),
        st.lists(findings, max_size=3).map(tuple),
    )

    @settings(max_examples=300, deadline=None)
    @given(st.lists(reports, max_size=4))
    def check(rs: list[FileReport]) -> None:
        want = _json.dumps({"files": [r.to_dict() for r in rs]}, indent=2)
        assert report_json(rs) == want

    check()
