"""Text that files, parties and scientists wrote, made inert before a terminal shows it."""

from __future__ import annotations

__all__ = ["inert"]


def inert(text: str, *, lines: bool = True) -> str:
    """``text`` with every character a terminal acts on (ESC, a lone carriage return, bidi
    overrides, other control and format characters) shown as a ``\\uXXXX`` escape: an ESC
    sequence erases and overwrites what the user reads. With ``lines`` newlines and tabs stay
    (source code, logs, messages); without, they are escaped too, so that a value keeps to its
    cell and its line (tab-separated rows, one-line notes)."""
    keep = "\n\t" if lines else ""
    return "".join(c if c.isprintable() or c in keep else f"\\u{ord(c):04x}" for c in text)
