"""NodeApp: the registry of named tasks a node's owner allows, and how one task is run.

A node never executes code sent by the server: it runs only the functions registered here.
The runtime's own tasks (``shoal.fetch``) are registered on every app; features such as
secure aggregation install theirs with :meth:`NodeApp.install`.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shoal.errors import (
    ConfigError,
    PrivacyBudgetExceeded,
    ShoalError,
    TaskError,
    UnknownTask,
    WireError,
)
from shoal.runtime.engine import Buffer
from shoal.wire import WireLimits, decode, encode

__all__ = [
    "FETCH_TASK",
    "KEPT_STATE_KEY",
    "SEND_KEY",
    "SENT_PREFIX",
    "Guard",
    "NodeApp",
    "TaskContext",
    "TaskFn",
]

FETCH_TASK = "shoal.fetch"
KEPT_STATE_KEY = "shoal.kept"
# A payload entry naming result fields the node sends back with its receipt: the server's
# code asked for them in the clear (a plain aggregate follows), saving a fetch round trip.
SEND_KEY = "shoal.send"
SENT_PREFIX = "sent/"


class TaskContext:
    """What a task sees of its node: its id, private data, persistent state and randomness."""

    __slots__ = ("_data", "_load", "_rng", "_seed", "node_id", "state", "task_id")

    def __init__(
        self,
        *,
        node_id: str,
        data: Any = None,
        state: dict[str, Any],
        task_id: str,
        seed: int | tuple[int, ...] | None = None,
        load_data: Callable[[], Any] | None = None,
    ) -> None:
        self.node_id = node_id
        self._data = data
        self._load = load_data
        self.state = state
        self.task_id = task_id
        self._seed = seed
        self._rng: np.random.Generator | None = None

    @property
    def data(self) -> Any:
        """The node's private data, loaded on first use (runtime tasks never touch it)."""
        if self._load is not None:
            self._data, self._load = self._load(), None
        return self._data

    @property
    def rng(self) -> np.random.Generator:
        """Randomness for learning (shuffling, dropout); deterministic in simulation.

        Not for keys or masks: cryptography draws from the ``cryptography`` package.
        """
        if self._rng is None:  # created lazily: most tasks never use it and it costs ~10 us
            self._rng = np.random.default_rng(self._seed)
        return self._rng


TaskFn = Callable[[TaskContext, dict[str, Any]], Mapping[str, Any] | None]
# A guard sees each request before its task runs and raises to refuse it
# (PrivacyBudgetExceeded to decline on the owner's policy).
Guard = Callable[[str, TaskContext, Mapping[str, Any]], None]


class NodeApp:
    """Tasks a node is willing to run, by name.

    >>> app = NodeApp()
    >>> @app.task("train")
    ... def train(ctx, payload):
    ...     return {"n": len(ctx.data)}
    """

    def __init__(self, *, max_kept: int = 4, limits: WireLimits | None = None) -> None:
        if max_kept < 1:
            raise ConfigError(f"NodeApp(max_kept) must be at least 1, got {max_kept}")
        self._tasks: dict[str, TaskFn] = {FETCH_TASK: _fetch}
        self._guards: list[Guard] = []
        self.max_kept = max_kept
        self.limits = limits or WireLimits()

    def task(self, name: str) -> Callable[[TaskFn], TaskFn]:
        """Decorator registering ``fn(ctx, payload) -> payload`` under ``name``."""

        def register(fn: TaskFn) -> TaskFn:
            self.register(name, fn)
            return fn

        return register

    def register(self, name: str, fn: TaskFn) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"task names are non-empty strings, got {name!r}")
        if name in self._tasks:
            raise ConfigError(
                f"a task named {name!r} is already registered; give each task its own name"
            )
        self._tasks[name] = fn

    def install(self, tasks: Mapping[str, TaskFn]) -> None:
        """Register a feature's node-side tasks (secure aggregation, analytics, ...)."""
        for name, fn in tasks.items():
            if self._tasks.get(name) is not fn:
                self.register(name, fn)

    def add_guard(self, guard: Guard) -> None:
        self._guards.append(guard)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    def handle(
        self,
        ctx: TaskContext,
        name: str,
        payload: Buffer,
        *,
        keep_as: str | None = None,
        decoded: Mapping[str, Any] | None = None,
    ) -> Buffer:
        """Decode, check, run and encode one task.

        ``decoded`` is ``payload`` already decoded (an in-process engine decodes a payload
        shared by many nodes once). Raises UnknownTask or WireError (the request is
        rejected), PrivacyBudgetExceeded (declined), or TaskError carrying the task's own
        exception as text.
        """
        fn = self._tasks.get(name)
        if fn is None:
            raise UnknownTask(
                f"node {ctx.node_id!r} has no task named {name!r}; it runs only "
                f"{sorted(t for t in self._tasks if not t.startswith('shoal.'))}"
            )
        args = dict(decoded) if decoded is not None else decode(payload, limits=self.limits)
        send = args.pop(SEND_KEY, None)  # a runtime instruction, not the task's argument
        if send is not None and (
            keep_as is None or type(send) is not list or any(type(f) is not str for f in send)
        ):
            raise WireError(f"{SEND_KEY!r} must list field names, with a value kept at the node")
        for guard in self._guards:
            guard(name, ctx, args)
        try:
            result = fn(ctx, args)
        except (PrivacyBudgetExceeded, ShoalError):
            raise
        except Exception as exc:  # a task's bug must become a reported failure, not a crash
            raise TaskError(f"task {name!r} raised {type(exc).__name__}: {exc}") from exc
        if result is None:
            result = {}
        if type(result) is not dict and not isinstance(result, Mapping):
            raise TaskError(
                f"task {name!r} returned {type(result).__name__}; tasks return a mapping of "
                "names to arrays or JSON values"
            )
        try:
            if keep_as is None:
                return encode(result, limits=self.limits)
            receipt = _keep(ctx, keep_as, dict(result), self.max_kept)
            for field in send or ():
                if field in result:
                    receipt[SENT_PREFIX + field] = result[field]
            return encode(receipt, limits=self.limits)
        except WireError as exc:
            # The request was fine; the task's own result is what cannot travel.
            raise TaskError(f"task {name!r} returned a value the wire refuses: {exc}") from None


def _keep(ctx: TaskContext, handle: str, result: dict[str, Any], max_kept: int) -> dict[str, Any]:
    """Hold ``result`` at the node and describe it, without revealing any value."""
    kept: OrderedDict[str, dict[str, Any]] | None = ctx.state.get(KEPT_STATE_KEY)
    if kept is None:
        kept = ctx.state[KEPT_STATE_KEY] = OrderedDict()
    kept[handle] = result
    while len(kept) > max_kept:
        kept.popitem(last=False)
    # Compact on purpose (name -> "dtype:d0,d1"): every node sends one receipt per map.
    fields: dict[str, Any] = {}
    for key, value in result.items():
        if type(value) is np.ndarray or isinstance(value, (np.ndarray, np.generic)):
            fields[key] = _describe(value.dtype.str, value.shape)
        else:
            fields[key] = "json:"
    return {"kept": handle, "fields": fields}


@functools.lru_cache(maxsize=1024)
def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    # Every node of a map describes the same few (dtype, shape) pairs.
    return f"{dtype}:{','.join(map(str, shape))}"


def kept_value(ctx: TaskContext, handle: str) -> dict[str, Any]:
    """The result a node holds under ``handle`` (for node-side tasks such as secure sums)."""
    kept = ctx.state.get(KEPT_STATE_KEY, {})
    if handle not in kept:
        raise TaskError(
            f"node {ctx.node_id!r} no longer holds value {handle!r}: nodes keep only their "
            "most recent results, so aggregate a map's output before mapping again many times"
        )
    value: dict[str, Any] = kept[handle]
    return value


def _fetch(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    handle, fields = payload.get("handle"), payload.get("fields")
    if not isinstance(handle, str) or not isinstance(fields, list):
        raise WireError("shoal.fetch takes {'handle': str, 'fields': [str, ...]}")
    value = kept_value(ctx, handle)
    missing = [f for f in fields if f not in value]
    if missing:
        raise TaskError(f"value {handle!r} has no field(s) {missing}; it has {sorted(value)}")
    return {f: value[f] for f in fields}
