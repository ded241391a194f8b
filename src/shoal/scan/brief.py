"""Bounded text for values a file built, for refusal messages.

``repr`` of a value from a hostile pickle can be unbounded: a tuple that holds the same tuple
twice, forty times over, is a few hundred bytes of pickle and 2**40 items of text. Messages
quote file values only through ``brief``, which stops a few levels and items deep.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["brief"]


class _Brief(reprlib.Repr):
    def repr_instance(self, x: Any, level: int) -> str:
        # builtins' own reprs are bounded; an object array's repr would quote every element
        if type(x) in (float, complex, bool, type(None)):
            return repr(x)
        shape = getattr(x, "shape", None)
        return f"<{type(x).__name__} {shape}>" if type(shape) is tuple else f"<{type(x).__name__}>"


_REPR = _Brief()
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = 6
_REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 6
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def brief(value: Any, width: int = 80) -> str:
    """At most ``width`` characters describing ``value``, in bounded time whatever it holds."""
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int past sys.get_int_max_str_digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[: width - 3] + "..."
