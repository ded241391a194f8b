"""Helpers every subcommand shares: option parsers, where the store lives, run liveness."""

from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store (and NumPy behind it) loads only when a command opens it
    from shoal.runtime import Store

__all__ = [
    "default_store_path",
    "open_store",
    "positive_float",
    "positive_int",
    "reconcile_runs",
    "record_process",
]

# The audit entry that names the process running a run, so that `shoal runs` can tell a
# run whose process died (kill -9, power loss) from one still training.
PROCESS_ACTION = "run.process"


def default_store_path() -> Path:
    """Where runs are recorded unless --store says otherwise (``$SHOAL_STORE`` overrides)."""
    env = os.environ.get("SHOAL_STORE")
    return Path(env) if env else Path.home() / ".shoal" / "store.db"


def open_store(path: str | None, *, create: bool = True) -> Store:
    """The store at ``path`` (or the default), creating its folder if needed.

    With ``create=False`` (commands that only read) a missing store file is a ConfigError,
    so a mistyped ``--store`` does not leave an empty store behind.
    """
    from shoal.errors import ConfigError
    from shoal.runtime import Store

    target = Path(path) if path else default_store_path()
    try:
        exists = target.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(
            f"--store {str(target)[:200]!r} cannot be opened: {exc.strerror}"
        ) from None
    if not create and not exists:
        raise ConfigError(
            f"no store at {str(target)!r}: no run has been recorded there; check --store "
            f"(the default is {default_store_path()})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return Store(target)


def record_process(store: Store, run_id: str | None) -> None:
    """Note in the audit log which process runs ``run_id`` (see :func:`reconcile_runs`)."""
    if run_id is None:
        return
    import psutil

    me = psutil.Process()
    store.audit(
        actor="shoal",
        action=PROCESS_ACTION,
        detail={"pid": me.pid, "host": socket.gethostname(), "started": me.create_time()},
        run_id=run_id,
    )


def reconcile_runs(store: Store) -> list[str]:
    """Mark 'interrupted' every 'running' run whose process on this host is gone.

    A run is judged only by the process that last recorded itself for it on this host (same
    pid and start time, so a reused pid does not count); runs started elsewhere, or by
    library code that records no process, are left as they are. Returns the ids marked.
    """
    import psutil

    host = socket.gethostname()
    marked: list[str] = []
    for record in store.list_runs(limit=1000, status="running"):
        entries = [e for e in store.audit_log(record.id, limit=1000) if e.action == PROCESS_ACTION]
        if not entries:
            continue
        detail = entries[-1].detail
        if detail.get("host") != host:
            continue
        try:
            alive = psutil.Process(int(detail["pid"])).create_time() == detail.get("started")
        except (psutil.Error, KeyError, TypeError, ValueError):
            alive = False
        if not alive and store.mark_interrupted(record.id):
            marked.append(record.id)
    return marked


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def count(text: str) -> int:
    """A whole number, 0 or more (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value
