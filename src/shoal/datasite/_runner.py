"""The sandbox's first and only trusted code: load inputs, lock down, run the request, encode.

Started by ``sandbox.run_sandboxed`` as ``python -I -B _runner.py WORKDIR``, never imported
by the server. It becomes ``nobody`` when started as root, installs audit hooks that refuse
ctypes, sockets, subprocesses and forks, calls the entrypoint, and writes one wire payload
to the pipe it was given. Every check that matters is repeated by the server on the bytes.
"""

# ruff: noqa: E402  (the path must be fixed before shoal can be imported)
from __future__ import annotations

import json
import os
import sys

sys.path.pop(0)  # the directory of this script: nothing there is meant to be importable
WORK = sys.argv[1]
os.chdir(WORK)
with open("job.json", encoding="utf-8") as _f:
    SPEC = json.load(_f)
# started with -S: no site module, no .pth files; exactly these two directories are added
sys.path[:0] = [SPEC["shoal_path"], SPEC["numpy_path"]]

# everything the code may reasonably use is imported before the process loses access to
# the interpreter's own directories (without bwrap, they may be readable by root only)
import contextlib
import resource
import traceback

import numpy as np

from shoal.datasite.table import Table, decode_table
from shoal.wire import WireLimits, encode

PRELOAD = (
    "bisect",
    "collections",
    "contextlib",
    "dataclasses",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "textwrap",
    "typing",
)

EXIT_ERROR, EXIT_MEMORY, EXIT_OUTPUT = 1, 3, 4
BLOCKED_MODULES = frozenset(
    {"ctypes", "_ctypes", "socket", "_socket", "subprocess", "_posixsubprocess", "multiprocessing"}
)
BLOCKED_EVENTS = (
    "ctypes.",
    "socket.",
    "subprocess.",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "sys.addaudithook",
    "sys.setprofile",
    "sys.settrace",
)


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event == "import" and args and str(args[0]).split(".")[0] in BLOCKED_MODULES:
        raise PermissionError(f"the datasite sandbox refuses to import {args[0]}")
    if event.startswith(BLOCKED_EVENTS):
        raise PermissionError(f"the datasite sandbox refuses {event}")


def _limit() -> None:
    """The job's limits, set here, before the code loads (the parent is never slowed by a
    pre-exec hook, and bwrap itself runs unlimited)."""
    limits = SPEC["limits"]
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # counts the processes of the user the job runs as (`nobody` below)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)


def main() -> int:
    if SPEC.get("preload"):
        # without bwrap, the interpreter's own directories may be closed to `nobody`: load
        # what code may reasonably import while they are still open
        for name in PRELOAD:
            __import__(name)
    declare = SPEC["mode"] == "declare"
    if declare:
        from shoal.datasite import dp
    tables = {}
    for name, path in SPEC["assets"].items():
        with open(path, "rb") as f:
            tables[name] = decode_table(f.read())
    with open("source.py", encoding="utf-8") as f:
        source = f.read()
    result_fd = os.dup(1)
    os.dup2(2, 1)  # print() in the code goes to the log, never into the result
    if SPEC.get("drop_to") is not None and os.getuid() == 0:
        uid = int(SPEC["drop_to"])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _limit()
    if SPEC.get("audit_hooks", True):
        sys.addaudithook(_hook)
    namespace: dict[str, object] = {"__name__": "request", "np": np, "Table": Table}
    if declare:
        namespace["dp"] = dp
    try:
        code = compile(source, "<request>", "exec")
        exec(code, namespace)
        fn = namespace.get(SPEC["entrypoint"])
        if not callable(fn):
            print(f"the source defines no function {SPEC['entrypoint']!r}", file=sys.stderr)
            return EXIT_ERROR
        result = fn(tables, **SPEC["params"])
    except MemoryError:
        print("MemoryError: the code ran out of memory", file=sys.stderr)
        return EXIT_MEMORY
    except BaseException as exc:  # report it, whatever it is, and fail the job
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            print("the code called exit() before returning a result", file=sys.stderr)
        traceback.print_exc(limit=-8)
        return EXIT_ERROR
    try:
        if declare:
            payload = {"plan": dp.plan_from_result(result)}
        elif isinstance(result, dict):
            payload = result
        else:
            payload = {"result": result}
        if isinstance(payload, dict):
            payload = {
                k: (v.tolist() if isinstance(v, np.generic) else v) for k, v in payload.items()
            }
        data = encode(payload, limits=WireLimits(max_bytes=int(SPEC["output_bytes"])))
    except MemoryError:
        return EXIT_MEMORY
    except Exception as exc:
        if declare:
            print(f"the code must return dp queries: {exc}", file=sys.stderr)
        else:
            print(
                f"the result is not a wire payload (arrays and JSON values): {exc}", file=sys.stderr
            )
        return EXIT_OUTPUT
    view = memoryview(data)
    while view:
        written = os.write(result_fd, view)
        view = view[written:]
    return 0


if __name__ == "__main__":
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing more to say
            stream.flush()
    os._exit(code)
