"""Shared fixtures for the scanner tests: a hostile pickle and a zip builder."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import pytest


class Evil:
    """Pickles as a call to os.system; only ever dumped, never loaded."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo should-not-run",))


@pytest.fixture
def evil() -> Evil:
    return Evil()


@pytest.fixture
def evil_pickle() -> bytes:
    return pickle.dumps(Evil(), protocol=2)


def _make_zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def make_zip() -> Callable[..., bytes]:
    return _make_zip
