"""Ending a job and everything it started, whatever it did to escape its process group.

Killing bwrap's process group is not enough: bwrap's child in the new PID namespace runs in
a session of its own, and dies with bwrap only through ``--die-with-parent``, which it sets
just after it is cloned; a kill in that window orphaned a sleeping job, and the server's
worker then waited forever on the job's open output pipe. So a job is ended three ways: the
namespace's init (the pid bwrap reports on ``--info-fd``; the kernel ends every process of a
PID namespace with its init), the process group, and any process still holding the job's
pipes (a job without bwrap can leave its group with ``setsid``).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterable

__all__ = ["JobHandle", "pipe_holders", "read_child_pid"]

_CHILD_PID = re.compile(rb'"child-pid"\s*:\s*(\d+)\s*[,}\n]')


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22), or None if gone:
    a pid is killed only while it still names the process it named when recorded."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after the last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def read_child_pid(fd: int, deadline: float) -> int | None:
    """The ``child-pid`` bwrap writes on ``--info-fd``, or None if bwrap ended or
    ``deadline`` (``time.monotonic()``) passed first. The caller closes ``fd`` once bwrap
    has ended: bwrap writes more after the pid, and a closed pipe would kill it (SIGPIPE)."""
    data = b""
    while len(data) < 4096:
        found = _CHILD_PID.search(data)
        if found:
            return int(found.group(1))
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            found = _CHILD_PID.search(data + b"\n")
            return int(found.group(1)) if found else None
        data += chunk
    return None


def _writes(pid: str, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE == os.O_WRONLY
    return False


def pipe_holders(inodes: Iterable[int]) -> list[int]:
    """The pids holding the write end of any of these pipes (the job's side: the server
    holds only read ends, and so would a process it is just forking)."""
    wanted = {f"pipe:[{i}]" for i in inodes}
    found: list[int] = []
    try:
        pids = os.listdir("/proc")
    except OSError:  # no /proc (not Linux): the group and namespace kills are all there is
        return found
    for pid in pids:
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted and _writes(pid, fd):
                        found.append(int(pid))
                        break
    return found


class JobHandle:
    """A started job: ``pid`` is the process group the server started; :meth:`kill` ends
    the job and everything it started. Safe to call from any thread, any number of times."""

    def __init__(self, *, proc: subprocess.Popen[bytes], child: int | None) -> None:
        self.pid = proc.pid
        self._proc = proc
        self._child = child
        self._child_start = None if child is None else _start_time(child)
        self._lock = threading.Lock()

    def kill_namespace(self) -> None:
        """Kill bwrap's child, the PID namespace's init: its death ends the namespace."""
        with self._lock:
            if self._child is not None and self._child_start is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if _start_time(self._child) == self._child_start:
                        os.kill(self._child, signal.SIGKILL)

    def kill(self) -> None:
        self.kill_namespace()
        with self._lock:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def kill_pipe_holders(self) -> list[int]:
        """Kill whatever still holds the job's output pipes once the job has ended (a
        process that left the group and the namespace's kill); returns their pids."""
        inodes = [
            os.fstat(stream.fileno()).st_ino
            for stream in (self._proc.stdout, self._proc.stderr)
            if stream is not None and not stream.closed
        ]
        holders = pipe_holders(inodes) if inodes else []
        for pid in holders:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return holders
