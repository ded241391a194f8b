"""Run submitted code in a separate, limited process; the server never runs it itself.

One job is one ``python -I`` process with an empty environment, a fresh working directory,
read-only copies of its inputs, ``setrlimit`` limits (CPU, address space, file size,
processes, open files), a wall-clock timeout that kills its process group, and, where
Debian's ``bwrap`` (bubblewrap) is installed, its own network, PID, IPC and mount namespaces
as the unprivileged user ``nobody``. Its only output is one ``shoal.wire`` payload, size-capped,
decoded by the server with the wire format's checks. docs/datasite.md states what holds
without ``bwrap``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.datasite.reap import JobHandle, read_child_pid

__all__ = ["JobOutcome", "SandboxLimits", "bwrap_available", "readable_by_jobs", "run_sandboxed"]

NOBODY = 65534
RUNNER = Path(__file__).with_name("_runner.py")
# exit codes the runner uses to say how the code ended (the process cannot be trusted to
# tell the truth about its result, only about its own failure, which costs nothing to believe)
EXIT_ERROR = 1
EXIT_MEMORY = 3
EXIT_OUTPUT = 4


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """What one job may use. The defaults suit the analyses of one table on one machine."""

    wall_seconds: float = 60.0
    cpu_seconds: int = 60
    memory_bytes: int = 2 << 30  # address space, RLIMIT_AS
    file_bytes: int = 64 << 20  # any one file the job writes, RLIMIT_FSIZE
    disk_bytes: int = 256 << 20  # the whole working directory, checked while it runs
    processes: int = 16  # RLIMIT_NPROC for the sandbox user
    open_files: int = 64
    output_bytes: int = 16 << 20  # the encoded result
    log_bytes: int = 64 << 10  # stderr kept; the rest is drained and dropped
    audit_hooks: bool = True  # refuse ctypes, sockets, subprocesses in the interpreter too

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    """How a job ended: ``state`` is succeeded, failed, timeout or out-of-memory."""

    state: str
    output: bytes | None
    logs: str
    reason: str
    exit_code: int | None
    seconds: float
    isolated: bool  # ran inside bwrap's namespaces
    detail: Mapping[str, Any] = field(default_factory=dict)


def bwrap_available() -> bool:
    """Whether ``bwrap`` is installed and can make namespaces here (checked once)."""
    global _BWRAP
    if _BWRAP is None:
        path = shutil.which("bwrap")
        ok = False
        if path:
            try:
                probe = subprocess.run(
                    [path, "--unshare-net", "--ro-bind", "/", "/", "true"],
                    capture_output=True,
                    timeout=10,
                    env={},
                )
                ok = probe.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _BWRAP = ok
    return _BWRAP


_BWRAP: bool | None = None


def _read_only_roots() -> list[Path]:
    """Directories the interpreter needs: its prefixes, numpy's and shoal's source."""
    import numpy

    import shoal

    roots = {
        Path(sys.base_prefix).resolve(),
        Path(sys.prefix).resolve(),
        Path(numpy.__file__).resolve().parent.parent,
        Path(shoal.__file__).resolve().parent.parent,
        Path(sys.executable).resolve().parent.parent,
    }
    kept: list[Path] = []
    for root in sorted(roots, key=lambda p: len(p.parts)):
        if not any(root == k or k in root.parents for k in kept):
            kept.append(root)
    return kept


def readable_by_jobs(path: str | os.PathLike[str], *, isolated: bool) -> bool:
    """Whether a job's code could open ``path`` itself, bypassing its read-only inputs: under
    bwrap only what is bound into its mount namespace is there at all; as root the job is
    ``nobody``, who reads a file only through others' read bit on it and search bit on every
    directory above it; otherwise the job runs as the server's own user and reads what it
    reads."""
    target = Path(path).resolve()
    if isolated:
        bound = [Path("/usr"), *(Path("/") / n for n in ("lib", "lib64", "bin", "lib32"))]
        bound += _read_only_roots()
        if not any(root == target or root in target.parents for root in bound):
            return False
    if os.getuid() != 0:
        return True
    try:
        if not target.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in target.parents)
    except OSError:
        return False


def _bwrap_args(work: Path, info_fd: int) -> list[str]:
    args = [
        shutil.which("bwrap") or "bwrap",
        "--info-fd",  # where bwrap writes its child's pid: the namespace's init, killed by pid
        str(info_fd),
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        # only to become `nobody` in the runner's first lines; dropped with the uid change
        "--cap-add",
        "CAP_SETUID",
        "--cap-add",
        "CAP_SETGID",
        "--ro-bind",
        "/usr",
        "/usr",
        # before the binds: a source tree or interpreter under /tmp stays visible over it
        "--tmpfs",
        "/tmp",
    ]
    for name in ("lib", "lib64", "bin", "lib32"):
        target = Path("/") / name
        if target.is_symlink():
            args += ["--symlink", os.readlink(target), str(target)]
        elif target.is_dir():
            args += ["--ro-bind", str(target), str(target)]
    made: set[Path] = {Path("/"), Path("/usr"), Path("/tmp")}
    for root in _read_only_roots():
        if root == Path("/usr") or Path("/usr") in root.parents:
            continue
        for parent in reversed(root.parents):
            if parent not in made:
                # bwrap makes missing parents 0700: `nobody` could not walk through them
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        args += ["--ro-bind", str(root), str(root)]
        made.add(root)
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--bind",
        str(work),
        "/job",
        "--chdir",
        "/job",
    ]
    return args


def _tree_bytes(root: Path, cap: int) -> int:
    total = 0
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
                    if total > cap:
                        return total
        except OSError:
            continue
    return total


class _Drain(threading.Thread):
    """Read a pipe to its end, keeping at most ``cap`` bytes; ``over`` is set past the cap."""

    def __init__(self, stream: Any, cap: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.cap = stream, cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.over = threading.Event()

    def run(self) -> None:
        while True:
            try:
                chunk = self.stream.read1(1 << 16)
            except (OSError, ValueError):
                break
            if not chunk:
                break
            if self.size + len(chunk) > self.cap:
                self.chunks.append(chunk[: max(self.cap - self.size, 0)])
                self.size = self.cap
                self.over.set()
                continue  # keep draining so the job cannot block on a full pipe
            self.chunks.append(chunk)
            self.size += len(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


def run_sandboxed(
    *,
    source: str,
    entrypoint: str,
    inputs: Mapping[str, bytes],
    params: Mapping[str, Any],
    mode: str = "run",
    limits: SandboxLimits | None = None,
    isolate: bool | None = None,
    on_start: Any = None,
) -> JobOutcome:
    """Run ``entrypoint(assets, **params)`` from ``source`` on ``inputs`` (wire-encoded tables).

    ``mode="run"`` returns the function's result as a wire payload; ``mode="declare"``
    returns the DP or threshold queries it declares (see ``shoal.datasite.dp``).
    ``isolate=None`` uses bwrap when it works here; ``True`` requires it.
    ``on_start(handle)`` is called once the process exists with a
    :class:`~shoal.datasite.reap.JobHandle` whose ``kill()`` ends the job and all it started.
    """
    limits = limits or SandboxLimits()
    use_bwrap = bwrap_available() if isolate is None else isolate
    if use_bwrap and not bwrap_available():
        from shoal.errors import ConfigError

        raise ConfigError(
            "isolation was required but bwrap cannot make namespaces here; install Debian's "
            "bubblewrap (apt-get install bubblewrap)"
        )
    base = Path(tempfile.mkdtemp(prefix="shoal-job-"))
    work = base / "job"
    work.mkdir()
    started = time.monotonic()
    info_read = info_write = -1
    try:
        inputs_dir = work / "inputs"
        inputs_dir.mkdir()
        names: dict[str, str] = {}
        for i, (name, blob) in enumerate(inputs.items()):
            path = inputs_dir / f"asset-{i}.wire"
            path.write_bytes(blob)
            path.chmod(0o444)
            names[name] = f"inputs/asset-{i}.wire"
        inputs_dir.chmod(0o555)
        (work / "source.py").write_text(source, encoding="utf-8")
        (work / "source.py").chmod(0o444)
        spec = {
            "entrypoint": entrypoint,
            "params": dict(params),
            "assets": names,
            "mode": mode,
            "output_bytes": limits.output_bytes,
            "audit_hooks": limits.audit_hooks,
            # as root, the job becomes `nobody` (so RLIMIT_NPROC and file modes bind it)
            "drop_to": NOBODY if os.getuid() == 0 else None,
            "shoal_path": str(Path(_shoal_root()).parent),
            "numpy_path": _numpy_parent(),
            "limits": limits.to_dict(),
            "preload": not use_bwrap,
        }
        (work / "job.json").write_text(json.dumps(spec), encoding="utf-8")
        (work / "job.json").chmod(0o444)
        if os.getuid() == 0:
            # `nobody` may write only here, not to the inputs
            os.chown(work, NOBODY, NOBODY)
        where = "/job" if use_bwrap else str(work)
        command = [sys.executable, "-I", "-S", "-B", str(RUNNER), where]
        if use_bwrap:
            info_read, info_write = os.pipe()
        if use_bwrap:
            command = [*_bwrap_args(work, info_write), *command]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd=str(work),
            start_new_session=True,  # its own process group, killed as one
            close_fds=True,
            pass_fds=(info_write,) if use_bwrap else (),
        )
        child = None
        if use_bwrap:
            os.close(info_write)
            info_write = -1
            child = read_child_pid(info_read, started + limits.wall_seconds)
        handle = JobHandle(proc=proc, child=child)
        if on_start is not None:
            on_start(handle)
        out = _Drain(proc.stdout, limits.output_bytes + (1 << 16))
        err = _Drain(proc.stderr, limits.log_bytes)
        out.start()
        err.start()
        deadline = started + limits.wall_seconds
        why: str | None = None
        next_disk = 0.0
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                why = "timeout"
            elif out.over.is_set():
                why = "output"
            elif now >= next_disk:
                next_disk = now + 0.25
                if _tree_bytes(work, limits.disk_bytes) > limits.disk_bytes:
                    why = "disk"
            if why:
                handle.kill()
                break
            time.sleep(0.005 if now - started < 0.5 else 0.05)
        proc.wait()
        handle.kill()  # anything the job left behind: its namespace, its group
        out.join(0.5)
        err.join(0.5)
        if out.is_alive() or err.is_alive():
            # a process the kills missed still holds the output pipes
            handle.kill_pipe_holders()
            out.join(5)
            err.join(5)
        for drain in (out, err):
            if not drain.is_alive():  # closing a stream a reader blocks on would block too
                drain.stream.close()
        seconds = time.monotonic() - started
        logs = err.data().decode("utf-8", "replace")
        code = proc.returncode
        isolated = use_bwrap
        if why == "timeout":
            return JobOutcome(
                state="timeout",
                output=None,
                logs=logs,
                reason=f"killed after the wall-clock limit of {limits.wall_seconds:g} s",
                exit_code=code,
                seconds=seconds,
                isolated=isolated,
            )
        if why == "output" or out.over.is_set():
            return JobOutcome(
                state="failed",
                output=None,
                logs=logs,
                reason=f"killed: the output passed the cap of {limits.output_bytes} bytes",
                exit_code=code,
                seconds=seconds,
                isolated=isolated,
            )
        if why == "disk":
            return JobOutcome(
                state="failed",
                output=None,
                logs=logs,
                reason=f"killed: its files passed the disk cap of {limits.disk_bytes} bytes",
                exit_code=code,
                seconds=seconds,
                isolated=isolated,
            )
        return _ended(code, out.data(), logs, seconds, isolated, limits)
    finally:
        for fd in {info_read, info_write} - {-1}:
            with contextlib.suppress(OSError):  # info_write is closed once bwrap has it
                os.close(fd)
        _remove(base)


def _ended(
    code: int | None,
    output: bytes,
    logs: str,
    seconds: float,
    isolated: bool,
    limits: SandboxLimits,
) -> JobOutcome:
    def outcome(state: str, reason: str, data: bytes | None = None) -> JobOutcome:
        return JobOutcome(
            state=state,
            output=data,
            logs=logs,
            reason=reason,
            exit_code=code,
            seconds=seconds,
            isolated=isolated,
        )

    if code == 0:
        from shoal.errors import WireError
        from shoal.wire import WireLimits, decode

        try:
            decode(output, limits=WireLimits(max_bytes=limits.output_bytes))
        except WireError as exc:
            return outcome("failed", f"the job's output is not a wire payload: {exc}")
        return outcome("succeeded", "", output)
    if code == EXIT_MEMORY:
        return outcome("out-of-memory", "the code ran out of memory (MemoryError)")
    if code == EXIT_OUTPUT:
        return outcome("failed", _last_line(logs) or "the result could not be encoded")
    if isolated and code is not None and code > 128 and code - 128 in _SIGNALS:
        # bwrap reports a child killed by signal N as its own exit status 128 + N
        code = -(code - 128)
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and "SIGXCPU" in logs):
            return outcome("timeout", f"killed after the CPU limit of {limits.cpu_seconds} s")
        if sig == signal.SIGXFSZ:
            return outcome("failed", f"killed: a file passed the limit of {limits.file_bytes} B")
        if sig == signal.SIGSEGV:
            return outcome("failed", "the process crashed (SIGSEGV)")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        return outcome("failed", f"killed by signal {name}")
    return outcome("failed", _last_line(logs) or f"the code exited with status {code}")


_SIGNALS = frozenset(int(s) for s in signal.Signals)


def _last_line(logs: str) -> str:
    lines = [line for line in logs.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _numpy_parent() -> str:
    import numpy

    return str(Path(numpy.__file__).resolve().parent.parent)


def _shoal_root() -> str:
    import shoal

    return str(Path(shoal.__file__).resolve().parent)


def _remove(base: Path) -> None:
    # the job may have made its files read-only; make them writable so they can be removed
    for here, dirs, _files in os.walk(base):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(here, name), 0o700)
    with contextlib.suppress(OSError):
        os.chmod(base, 0o700)
    shutil.rmtree(base, ignore_errors=True)
