"""Pickle's opcodes as both of shoal's readers see them: the scanner and the loader.

``pickle_scan`` interprets a pickle symbolically (what would ``pickle.load`` call?) and
``unpickle`` concretely (shoal's own objects, nothing the file names); what an opcode *is*
is the same for both, so it lives here once: the opcode table (from ``pickletools``), the
binary argument formats, and the text literals, which are parsed by pickle's own C code so
that neither reader can parse ``I0x10`` or ``L1_0`` differently from ``pickle.load``.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "F8",
    "I4",
    "OPCODES",
    "PLAIN_INT",
    "U1",
    "U2",
    "U4",
    "U8",
    "dispatch_table",
    "text_literal",
]

# code -> (pickletools name, argument name or None)
OPCODES: dict[int, tuple[str, str | None]] = {
    ord(op.code.encode("latin-1")): (op.name, op.arg.name if op.arg else None)
    for op in pickletools.opcodes
}

U1 = struct.Struct("<B")
U2 = struct.Struct("<H")
I4 = struct.Struct("<i")
U4 = struct.Struct("<I")
U8 = struct.Struct("<Q")
F8 = struct.Struct(">d")  # BINFLOAT is big-endian

_T = TypeVar("_T")


def dispatch_table(cls: type[_T]) -> list[Callable[[_T], Any] | None]:
    """``cls.op_NAME`` for every opcode, indexed by its byte (None for bytes that are not
    opcodes): each reader implements every opcode, or this fails at import."""
    table: list[Callable[[_T], Any] | None] = [None] * 256
    for code, (name, _arg) in OPCODES.items():
        table[code] = getattr(cls, "op_" + name)
    return table


# INT lines that C pickle's strtol(s, 0) and Python's int() read alike: plain decimal, no
# leading zero (strtol reads 010 as octal, and pickle makes 00 and 01 the bools), no sign on 0
# (pickle makes -0 False), within a C long. Anything else goes through pickle itself.
PLAIN_INT = re.compile(rb"-?[1-9][0-9]{0,17}|0")
_BOOLS = {b"00": False, b"01": True}


def text_literal(op: bytes, line: bytes) -> Any:
    """The value of a protocol-0 literal (INT, LONG, FLOAT, STRING, UNICODE) whose text line
    is ``line``, as ``pickle.load`` parses it: a one-opcode pickle of that line, which can only
    make a str, int, bool, float or bytes. Raises whatever pickle raises for a bad literal.

    The two literals protocol 0 writes most take a shorter way with the same result: plain
    decimal INTs, and UNICODE, which pickle decodes as raw-unicode-escape (load_unicode)."""
    if op == b"V":
        return line.decode("raw-unicode-escape")
    if op == b"I":
        if PLAIN_INT.fullmatch(line) is not None:
            return int(line)
        if line in _BOOLS:  # protocol 0's True and False: strtol reads 0 or 1 from 3 bytes
            return _BOOLS[line]
    return pickle.loads(op + line + b"\n.")
