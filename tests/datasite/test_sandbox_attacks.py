"""Hostile code in the sandbox: every attack is contained, killed or refused, and says so.

Each attack runs twice where it matters: with the interpreter's audit hooks (the first
fence) and without them, so the operating system's limits are shown to hold on their own.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from shoal.datasite.reap import JobHandle
from shoal.datasite.sandbox import SandboxLimits, bwrap_available, run_sandboxed
from shoal.datasite.table import Table, encode_table
from shoal.wire import decode

pytestmark = pytest.mark.integration
needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bwrap cannot make namespaces")

TABLE = {
    "t": encode_table(Table(name="t", columns={"x": np.arange(5.0), "s": np.array(list("abcde"))}))
}
FAST = SandboxLimits(wall_seconds=8, cpu_seconds=8, memory_bytes=1 << 30)
NO_HOOKS = SandboxLimits(wall_seconds=8, cpu_seconds=8, memory_bytes=1 << 30, audit_hooks=False)


def run(body: str, limits: SandboxLimits = FAST, isolate: bool | None = None, **kw: object):
    source = "def f(assets):\n" + "\n".join("    " + line for line in body.splitlines())
    return run_sandboxed(
        source=source, entrypoint="f", inputs=TABLE, params={}, limits=limits, isolate=isolate, **kw
    )


def test_a_plain_job_runs_and_its_prints_go_to_the_log() -> None:
    out = run(
        "print('hello')\nreturn {'sum': float(assets['t']['x'].sum()), 's': list(assets['t']['s'])}"
    )
    assert out.state == "succeeded", out.reason + out.logs
    assert decode(out.output) == {"sum": 10.0, "s": list("abcde")}
    assert "hello" in out.logs


@needs_bwrap
@pytest.mark.parametrize("limits", [FAST, NO_HOOKS], ids=["hooks", "os-only"])
def test_reading_files_outside_the_inputs_fails(limits: SandboxLimits, tmp_path: Path) -> None:
    secret = tmp_path / "datasite.db"
    secret.write_text("private rows")
    secret.chmod(0o600)
    out = run(
        f"found = {{}}\nfor p in ['/etc/passwd', {str(secret)!r}, '/root/.bashrc']:\n"
        "    try:\n        found[p] = open(p).read()[:20]\n"
        "    except OSError as e:\n        found[p] = 'refused: ' + type(e).__name__\n"
        "return found",
        limits,
        isolate=True,
    )
    assert out.state == "succeeded", out.reason + out.logs
    got = decode(out.output)
    assert all(v.startswith("refused") for v in got.values()), got
    assert out.isolated


def _listener() -> tuple[socket.socket, list[bytes]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    seen: list[bytes] = []

    def accept() -> None:
        for _ in range(60):
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            seen.append(conn.recv(100))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, seen


def test_a_socket_is_refused_by_the_interpreter() -> None:
    server, seen = _listener()
    port = server.getsockname()[1]
    out = run(
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.send(b'leak')"
    )
    server.close()
    assert out.state == "failed"
    assert "refuses" in out.logs and "socket" in out.logs
    assert seen == []


@needs_bwrap
def test_a_socket_has_no_network_to_reach_even_without_hooks() -> None:
    server, seen = _listener()
    port = server.getsockname()[1]
    out = run(
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.send(b'leak')",
        NO_HOOKS,
        isolate=True,
    )
    server.close()
    assert out.state == "failed"
    assert "ConnectionRefusedError" in out.logs or "unreachable" in out.logs, out.logs
    assert seen == []


def test_fork_is_refused_by_the_interpreter() -> None:
    out = run("import os\nwhile True:\n    os.fork()")
    assert out.state == "failed"
    assert "os.fork" in out.logs


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "no-bwrap"])
def test_a_fork_bomb_hits_the_process_limit_and_is_killed(isolate: bool | None) -> None:
    limits = SandboxLimits(wall_seconds=6, cpu_seconds=6, processes=8, audit_hooks=False)
    groups: list[JobHandle] = []
    out = run(
        "import os\nwhile True:\n    os.fork()", limits, isolate=isolate, on_start=groups.append
    )
    assert out.state in ("failed", "timeout")
    assert (
        "BlockingIOError" in out.logs
        or "Resource temporarily unavailable" in out.logs
        or (out.state == "timeout")
    )
    # nothing of it is left: every process of its group is gone (under bwrap the forks live
    # in a PID namespace that dies with it)
    assert _live_members(groups[0].pid) == []


def _live_members(pgid: int) -> list[int]:
    """Processes of a group that are not zombies (those wait only for init to reap them)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return alive


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "no-bwrap"])
def test_allocating_20_gb_runs_out_of_memory(isolate: bool | None) -> None:
    out = run(
        "import numpy as np\nx = np.ones(20 * 2**30 // 8)\nreturn {'n': int(x.size)}",
        isolate=isolate,
    )
    assert out.state == "out-of-memory", out.reason + out.logs


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "no-bwrap"])
def test_an_endless_loop_is_killed_at_the_deadline(isolate: bool | None) -> None:
    limits = SandboxLimits(wall_seconds=1.5, cpu_seconds=30)
    out = run("while True:\n    pass", limits, isolate=isolate)
    assert out.state == "timeout"
    assert "wall-clock" in out.reason


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "no-bwrap"])
def test_the_cpu_limit_ends_a_job_as_a_timeout(isolate: bool | None) -> None:
    out = run(
        "while True:\n    pass", SandboxLimits(wall_seconds=30, cpu_seconds=1), isolate=isolate
    )
    assert out.state == "timeout", out.reason
    assert "CPU limit" in out.reason


def test_a_sleeping_job_is_killed_at_the_deadline_too() -> None:
    out = run("import time\ntime.sleep(600)", SandboxLimits(wall_seconds=1.0))
    assert out.state == "timeout"


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "no-bwrap"])
def test_writing_10_gb_to_a_file_is_stopped_at_the_file_size_limit(isolate: bool | None) -> None:
    limits = SandboxLimits(wall_seconds=20, file_bytes=8 << 20, disk_bytes=64 << 20)
    out = run(
        "block = b'0' * (1 << 20)\nwith open('big.bin', 'wb') as f:\n"
        "    for _ in range(10 * 1024):\n        f.write(block)",
        limits,
        isolate=isolate,
    )
    assert out.state == "failed"
    assert "file" in out.reason or "File too large" in out.logs, out.reason + out.logs


def test_many_files_are_stopped_at_the_disk_limit() -> None:
    limits = SandboxLimits(wall_seconds=20, file_bytes=4 << 20, disk_bytes=24 << 20)
    out = run(
        "block = b'0' * (4 << 20 - 1)\nfor i in range(2560):\n"
        "    with open(f'f{i}', 'wb') as f:\n        f.write(block)\n"
        "import time\ntime.sleep(30)",
        limits,
    )
    assert out.state == "failed"
    assert "disk" in out.reason


def test_flooding_the_output_pipe_is_cut_at_the_cap() -> None:
    limits = SandboxLimits(wall_seconds=20, output_bytes=1 << 20)
    out = run(
        "import os\nblock = b'x' * (1 << 16)\nfor _ in range(160000):\n    os.write(3, block)",
        limits,
    )
    assert out.state == "failed"
    assert "output" in out.reason
    assert out.output is None


def test_flooding_the_log_keeps_only_the_cap() -> None:
    limits = SandboxLimits(wall_seconds=2, log_bytes=4096)
    out = run("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)", limits)
    assert out.state == "timeout"
    assert len(out.logs) <= 4096


def test_returning_a_non_wire_object_is_refused() -> None:
    out = run("return {'obj': object()}")
    assert out.state == "failed"
    assert "wire" in out.reason
    out = run("return {'objs': __import__('numpy').array([object()])}")
    assert out.state == "failed"


def test_forged_bytes_on_the_result_pipe_are_refused_by_the_server() -> None:
    # the code skips the runner's encoder and writes its own bytes: the server decodes them
    out = run("import os\nos.write(3, b'SHWL' + b'\\xff' * 64)\nos._exit(0)")
    assert out.state == "failed"
    assert "not a wire payload" in out.reason


def test_ctypes_is_refused_by_the_interpreter() -> None:
    out = run("import ctypes\nreturn {'x': ctypes.CDLL(None).getpid()}")
    assert out.state == "failed"
    assert "refuses" in out.logs and "ctypes" in out.logs


@needs_bwrap
def test_ctypes_without_hooks_gains_nothing() -> None:
    out = run(
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "return {'setuid': libc.setuid(0), 'open': libc.open(b'/etc/shadow', 0), "
        "'uid': __import__('os').getuid()}",
        NO_HOOKS,
        isolate=True,
    )
    assert out.state == "succeeded", out.reason + out.logs
    got = decode(out.output)
    assert got == {"setuid": -1, "open": -1, "uid": 65534}


def test_the_inputs_are_read_only() -> None:
    out = run(
        "import os\nresults = []\nfor p in os.listdir('inputs'):\n"
        "    try:\n        open('inputs/' + p, 'ab').write(b'x'); results.append('wrote')\n"
        "    except OSError:\n        results.append('refused')\nreturn {'r': results}",
        NO_HOOKS,
    )
    assert decode(out.output)["r"] == ["refused"]
