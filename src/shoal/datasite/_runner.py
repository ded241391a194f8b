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
sys.path.insert(0, SPEC["shoal_path"])

# everything the code may reasonably use is imported before the process loses access to
# the interpreter's own directories (without bwrap, they may be readable by root only)
import bisect
import collections
import contextlib
import dataclasses
import datetime
import decimal
import fractions
import functools
import heapq
import itertools
import math
import operator
import random
import re
import statistics
import string
import textwrap
import traceback
import typing

import numpy as np

from shoal.datasite import dp
from shoal.datasite.table import Table, decode_table
from shoal.wire import WireLimits, encode

_PRELOADED = (
    bisect,
    collections,
    contextlib,
    dataclasses,
    datetime,
    decimal,
    fractions,
    functools,
    heapq,
    itertools,
    math,
    operator,
    random,
    re,
    statistics,
    string,
    textwrap,
    typing,
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


def main() -> int:
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
    if SPEC.get("audit_hooks", True):
        sys.addaudithook(_hook)
    namespace: dict[str, object] = {"__name__": "request", "np": np, "dp": dp, "Table": Table}
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
        if SPEC["mode"] == "declare":
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
        if SPEC["mode"] == "declare":
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
