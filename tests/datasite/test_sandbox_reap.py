"""A job is ended with everything it started, and the server's worker never waits on it.

Found when a kill reached bwrap in the moment before its child in the new PID namespace set
``--die-with-parent``: the job (``time.sleep(3600)``) outlived bwrap, the owner's kill and the
wall-clock limit, and the server's worker blocked for good on the output pipe it held.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.datasite.reap import JobHandle, pipe_holders, read_child_pid
from shoal.datasite.sandbox import SandboxLimits, bwrap_available, run_sandboxed
from shoal.wire import decode

pytestmark = pytest.mark.integration

SLEEPER = "def f(assets):\n    import time\n    time.sleep(3600)\n"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_in_thread(**kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: box.setdefault("out", run_sandboxed(inputs={}, params={}, **kw)),
        daemon=True,
    )
    thread.start()
    return thread, box


@given(
    pid=st.integers(1, 2**22),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    tail=st.sampled_from([b"\n}\n", b',\n    "net-namespace": 4026532\n}\n', b"}"]),
)
def test_the_child_pid_is_read_however_bwrap_splits_its_writes(
    pid: int, cuts: list[int], tail: bytes
) -> None:
    text = b'{\n    "child-pid": ' + str(pid).encode() + tail
    read, write = os.pipe()
    at = 0
    for cut in sorted(cuts):
        os.write(write, text[at:cut])
        at = max(at, cut)
    os.write(write, text[at:])
    os.close(write)
    assert read_child_pid(read, time.monotonic() + 5) == pid
    os.close(read)


def test_no_child_pid_is_none_at_eof_and_at_the_deadline() -> None:
    read, write = os.pipe()
    os.write(write, b'{\n    "child-pid": 12')  # cut mid-number, then bwrap died
    os.close(write)
    assert read_child_pid(read, time.monotonic() + 5) == 12
    os.close(read)
    read, write = os.pipe()
    os.write(write, b"garbage")
    os.close(write)
    assert read_child_pid(read, time.monotonic() + 5) is None
    os.close(read)
    read, write = os.pipe()
    started = time.monotonic()
    assert read_child_pid(read, started + 0.2) is None  # bwrap never wrote
    assert time.monotonic() - started < 5
    os.close(write)
    os.close(read)


@pytest.mark.skipif(not bwrap_available(), reason="bwrap cannot make namespaces")
def test_the_namespace_dies_even_when_bwrap_is_already_gone() -> None:
    """The lost race, made certain: bwrap's own process is stopped, so its death cannot be
    what ends the child; the handle kills the namespace's init by pid."""
    handles: list[JobHandle] = []
    thread, box = _run_in_thread(
        source=SLEEPER, entrypoint="f", limits=SandboxLimits(wall_seconds=600),
        on_start=handles.append,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not handles and time.monotonic() < deadline:
        time.sleep(0.01)
    (handle,) = handles
    child = handle._child
    assert child is not None and _alive(child)
    with open(f"/proc/{child}/status") as f:
        assert any(line.split()[1:] == [str(child), "1"] for line in f if line.startswith("NSpid"))
    os.kill(handle.pid, signal.SIGSTOP)  # bwrap can neither die nor pass on a death now
    handle.kill_namespace()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the namespace outlived the kill of its init"
    handle.kill()  # and bwrap, stopped or not
    thread.join(30)
    assert not thread.is_alive(), "the worker still waits on the job"
    assert box["out"].state == "failed" and "SIGKILL" in box["out"].reason


def test_a_job_that_leaves_its_group_is_ended_by_its_pipes() -> None:
    """Without bwrap (and without the audit hooks that refuse fork) a job can leave its
    process group with setsid; its child keeps the output pipe. Before: the worker waited
    until that child exited (here an hour)."""
    source = (
        "def f(assets):\n"
        "    import os, time\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(3600)\n"
        "    return {'child': child}\n"
    )
    thread, box = _run_in_thread(
        source=source, entrypoint="f", isolate=False,
        limits=SandboxLimits(wall_seconds=20, audit_hooks=False),
    )  # fmt: skip
    thread.join(60)
    assert not thread.is_alive(), "the worker still waits on the job's escaped child"
    assert box["out"].state == "succeeded", box["out"].reason
    child = int(decode(box["out"].output)["child"])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the escaped child outlived its job"


def test_pipe_holders_names_the_writers_only() -> None:
    read, write = os.pipe()
    inode = os.fstat(read).st_ino
    pid = os.fork()
    if pid == 0:  # the child keeps only the write end, as a job does
        os.close(read)
        time.sleep(30)
        os._exit(0)
    os.close(write)
    try:
        assert pipe_holders([inode]) == [pid]  # not this process, which holds the read end
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
