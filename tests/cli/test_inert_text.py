"""Text from files, parties and scientists reaches the terminal inert (shoal.cli.text)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.cli import query
from shoal.cli.text import inert

ERASE_LINE_ABOVE = "\x1b[1A\x1b[2K"


@given(st.text())
def test_nothing_a_terminal_acts_on_survives(text: str) -> None:
    for lines in (True, False):
        shown = inert(text, lines=lines)
        allowed = "\n\t" if lines else ""
        assert all(c.isprintable() or c in allowed for c in shown)


@given(st.text(alphabet=st.characters(categories=["L", "N", "P"]) | st.just(" ")))
def test_printable_text_is_unchanged(text: str) -> None:
    assert inert(text) == text == inert(text, lines=False)


def test_controls_are_shown_as_escapes() -> None:
    assert inert(f"a{ERASE_LINE_ABOVE}b") == "a\\u001b[1A\\u001b[2Kb"
    assert inert("x\r# y") == "x\\u000d# y"
    assert inert("rtl\u202eevil") == "rtl\\u202eevil"  # a bidi override
    assert inert("a\tb\nc") == "a\tb\nc"
    assert inert("a\tb\nc", lines=False) == "a\\u0009b\\u000ac"


def test_a_query_result_from_hostile_parties_prints_inert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A party's group key, a column name, a refusal reason and a note, each carrying an ESC
    # sequence or a tab and newline that would rewrite the screen or shift the table.
    result = SimpleNamespace(
        mode="exact",
        epsilon=None,
        parties=["a", "b"],
        columns=["region", f"n{ERASE_LINE_ABOVE}"],
        rows=[[f"north{ERASE_LINE_ABOVE}", 3], ["south\tfake\nrow", 4]],
        errors=None,
        disclosed={},
        failures={"c": f"refused{ERASE_LINE_ABOVE}"},
        notes=[f"clipped\r{ERASE_LINE_ABOVE}"],
    )
    query._print(result)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert lines[1] == "region\tn\\u001b[1A\\u001b[2K"
    assert lines[2] == "north\\u001b[1A\\u001b[2K\t3"
    assert lines[3] == "south\\u0009fake\\u000arow\t4"  # one row stays one line, two cells
    assert "party c did not answer: refused\\u001b[1A\\u001b[2K" in lines
    assert "note: clipped\\u000d\\u001b[1A\\u001b[2K" in lines
