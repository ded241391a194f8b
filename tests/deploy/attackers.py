"""What the flood tests share: an attacker script in its own process, and polling a condition.

The attacker runs with only shoal's own source tree on its path (the test run's sys.path
holds test folders whose names shadow packages: a "grpc" folder made `import grpc` a
namespace package), and prints its counts as JSON on its last line when it stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import shoal


def shoal_env() -> dict[str, str]:
    """This environment with PYTHONPATH set to shoal's source tree alone."""
    return {**os.environ, "PYTHONPATH": str(Path(shoal.__file__).resolve().parents[1])}


@contextlib.contextmanager
def attacker(
    script: Path, args: list[str], *, seconds: float, until_exit: bool = False
) -> Iterator[dict[str, Any]]:
    """``script`` running for ``seconds``; the yielded dict holds its counts once it stopped.

    ``until_exit``: stop it (SIGTERM) when the ``with`` block ends, for a test whose
    question is answered inside the block while the attack still runs: waiting out the
    rest of ``seconds`` adds nothing to it. The counts are then what it did until stopped.
    It is stopped so on an exception too.
    """
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--seconds", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=shoal_env(),
    )
    result: dict[str, Any] = {"proc": proc}
    failed = True
    try:
        yield result
        failed = False
    finally:
        if (until_exit or failed) and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=seconds + 30)
        # on the test's own failure the attacker may have printed nothing yet: its error,
        # not a parse error of empty output, is what the test reports
        if out.strip() or not failed:
            result.update(json.loads(out.strip().splitlines()[-1]))


def wait(condition: Callable[[], object], timeout_s: float, *, poll_s: float = 0.02) -> bool:
    """Whether ``condition()`` became true within ``timeout_s`` (polled every ``poll_s``)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
