"""What `shoal datasite requests show|diff` and `jobs logs` print of a scientist's text: no
character a terminal acts on (hostile15, issue 15)."""

from __future__ import annotations

from shoal.cli.text import inert as _plain


def test_terminal_controls_in_a_scientists_text_are_shown_not_acted_on():
    # logs are whatever the scientist's code printed: ESC [1A ESC [2K moves up and erases a line
    logs = "row 1\n\x1b[1A\x1b[2Kall good\rshown\x9b2K\tend\n"
    out = _plain(logs)
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out
    assert out == "row 1\n\\u001b[1A\\u001b[2Kall good\\u000dshown\\u009b2K\tend\n"


def test_ordinary_text_is_unchanged():
    text = "def f(assets):\n\treturn {'city': '東京', 'é': 1}\n"
    assert _plain(text) == text
