"""Imports are classified once per name and the answer kept (pickle_scan._IMPORTS): every
later import of the name, in the same file or another, must still be reported as its own,
and a full cache must change nothing but speed."""

from __future__ import annotations

import pytest

from shoal.scan import Severity, pickle_scan, scan_bytes

GLOBAL = b"\x80\x02cos\nsystem\nq\x00N\x85R."
STACK_GLOBAL = b"\x80\x04\x8c\x02os\x8c\x06system\x93N\x85R."
BOTH = b"\x80\x04cos\nsystem\n0\x8c\x02os\x8c\x06system\x93N\x85R."
SAFE = b"\x80\x04ccollections\nOrderedDict\n)R."


def _imports(data: bytes) -> list[str]:
    report = scan_bytes(data)
    return [f.detail for f in report.findings if f.kind == "unsafe-import"]


@pytest.mark.parametrize("full", [False, True])
def test_every_import_of_a_name_is_reported(monkeypatch, full: bool) -> None:
    if full:  # no room left: every import is classified afresh
        cache = {(f"m{i}", "x"): pickle_scan._classified("json", "loads") for i in range(4096)}
        monkeypatch.setattr(pickle_scan, "_IMPORTS", cache)
    for _ in range(3):
        assert _imports(GLOBAL) == ["GLOBAL os.system comes from os, which can run code or do I/O"]
        (stack,) = _imports(STACK_GLOBAL)
        assert stack.startswith("STACK_GLOBAL os.system")
        both = _imports(BOTH)
        assert [d.split()[0] for d in both] == ["GLOBAL", "STACK_GLOBAL"], both
        assert scan_bytes(SAFE).severity == Severity.NONE
    assert len(pickle_scan._IMPORTS) <= 4096


def test_a_module_that_cannot_be_imported_is_never_cached() -> None:
    bad = b"\x80\x04\x8c\x04os-x\x8c\x06system\x93N\x85R."
    for _ in range(2):
        report = scan_bytes(bad)
        assert any("cannot be imported" in f.detail for f in report.findings), report
    assert ("os-x", "system") not in pickle_scan._IMPORTS


def test_python2_names_are_cached_under_what_the_file_wrote() -> None:
    data = b"\x80\x02c__builtin__\neval\nq\x00N\x85R."
    for _ in range(2):
        (detail,) = [f.detail for f in scan_bytes(data).findings if f.kind == "unsafe-import"]
        assert "builtins.eval" in detail
