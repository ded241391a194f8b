"""LocalEngine: thousands of virtual nodes in one process, for simulation and tests.

Nodes are materialized lazily: a node's data comes from a factory (or a sequence) when it
gets a task, and only a bounded cache of data sets is held. Payloads are wire-encoded both
ways, exactly as in deployment. Latency is simulated on a virtual clock (``engine.clock``): a
node's time is its compute (measured, or nominal with ``devices``) divided by its speed, plus
its payload's download and its reply's upload over its link, plus injected straggler delay,
compared against the deadline as if all nodes had run in parallel; each dispatch moves the
clock to its slowest answer. With ``availability``, a node offline when a task starts is
dropped, and so is one that goes offline before its task ends. A task that really hangs is
abandoned once the (real) deadline passes.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import (
    ConfigError,
    PrivacyBudgetExceeded,
    ReleaseRefused,
    UnknownTask,
    WireError,
)
from shoal.runtime.app import KEPT_STATE_KEY, SEND_KEY, NodeApp, Prepared, TaskContext
from shoal.runtime.availability import Availability
from shoal.runtime.devices import Devices, VirtualClock
from shoal.runtime.engine import (
    DECLINED_DETAIL,
    DispatchResult,
    Failure,
    FailureKind,
    Reply,
    Task,
    check_dispatch,
)
from shoal.runtime.nodestate import NODE_STATE_KEY, NodeStateFile
from shoal.wire import decode
from shoal.wire.codec import copy_json

__all__ = ["Faults", "LocalEngine", "draw_faults", "inject", "virtual_outcome"]


MAX_WORKERS = 1024  # worker threads one LocalEngine may start


@dataclass(frozen=True, kw_only=True)
class Faults:
    """Fault injection for simulated rounds; all draws are deterministic for a seed.

    ``tasks`` limits the faults to those task names (e.g. one phase of secure aggregation);
    ``nodes`` limits them to those node ids; ``always_drop`` nodes never answer.
    """

    drop: float = 0.0
    straggle: float = 0.0
    straggle_s: float = 10.0
    error: float = 0.0
    tasks: frozenset[str] | None = None
    nodes: frozenset[str] | None = None
    always_drop: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "straggle", "error"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"Faults.{name} is a probability in [0, 1], got {value}")
        if self.straggle_s < 0:
            raise ConfigError(f"Faults.straggle_s must be >= 0, got {self.straggle_s}")

    def applies(self, task: Task) -> bool:
        return (self.tasks is None or task.name in self.tasks) and (
            self.nodes is None or task.node_id in self.nodes
        )


DataSource = Sequence[Any] | Callable[[str], Any]
# A payload shared by a dispatch's tasks, decoded once, the names of its JSON containers
# (each task gets its own copy of those), and the app's guards prepared once for it (for the
# task name of the first task that carries it).
_Shared = tuple[dict[str, Any], tuple[str, ...], Prepared]


class LocalEngine:
    """In-process engine over ``nodes`` virtual nodes.

    ``data`` is a sequence (node i gets ``data[i]``) or a factory ``f(node_id) -> data``
    called when a node needs its data; at most ``cache_size`` data sets are kept.
    Each node's ledger and audit log live in memory, or in ``node_states`` (one SQLite file
    for all virtual nodes) when given.

    Cross-device simulation: ``availability`` says when each node is online (diurnal,
    random, a trace), ``devices`` its compute speed and bandwidth; both act on the virtual
    ``clock``. An idle node costs its id and index entry (~0.2 KB): its state dict is made
    when it first runs a task, its data when a task first reads it.
    """

    def __init__(
        self,
        app: NodeApp,
        *,
        data: DataSource | None = None,
        nodes: int | Sequence[str] | None = None,
        workers: int = 1,
        seed: int = 0,
        faults: Faults | None = None,
        cache_size: int = 256,
        node_states: NodeStateFile | None = None,
        availability: Availability | None = None,
        devices: Devices | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        if nodes is None:
            if data is None or callable(data):
                raise ConfigError("give LocalEngine nodes=N (or a sequence of per-node data)")
            nodes = len(data)
        self._ids: tuple[str, ...] = (
            tuple(f"n{i}" for i in range(nodes)) if isinstance(nodes, int) else tuple(nodes)
        )
        if not self._ids:
            raise ConfigError("a federation needs at least one node")
        if len(set(self._ids)) != len(self._ids):
            raise ConfigError("node ids must be unique")
        if data is not None and not callable(data) and len(data) != len(self._ids):
            raise ConfigError(f"{len(data)} data sets for {len(self._ids)} nodes")
        if workers < 1:
            raise ConfigError("workers must be at least 1")
        if workers > MAX_WORKERS:
            # each worker is a thread of this process: 2**63 of them failed part way with a
            # traceback, and close() then failed too
            raise ConfigError(
                f"workers must be at most {MAX_WORKERS} (threads of this process), got {workers}"
            )
        if cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0, got {cache_size}")
        if devices is not None and devices.nodes not in (None, len(self._ids)):
            raise ConfigError(f"Devices describe {devices.nodes} nodes, not {len(self._ids)}")
        if availability is not None and not isinstance(availability, Availability):
            raise ConfigError("availability must be an Availability (Diurnal, a trace, ...)")
        self.app = app
        self.faults = faults
        self.workers = workers
        self._seed = seed
        self._data = data
        self._index = {node_id: i for i, node_id in enumerate(self._ids)}
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._states: dict[str, dict[str, Any]] = {}
        self._node_states = node_states
        self._lock = threading.Lock()
        self._dispatches = 0
        self._offline: set[str] = set()
        self._shared: dict[int, _Shared | None] = {}
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] | None = None
        self.availability = availability
        self.devices = devices
        self.clock = clock if clock is not None else VirtualClock()
        self._online_cache: tuple[float, np.ndarray] | None = None

    def _online(self, t: float) -> np.ndarray | None:
        """The availability mask at virtual time ``t`` (cached: asked several times a round)."""
        if self.availability is None:
            return None
        cached = self._online_cache
        if cached is None or cached[0] != t:
            mask = np.asarray(self.availability.online(t, len(self._ids)), dtype=bool)
            if mask.shape != (len(self._ids),):
                raise ConfigError(f"availability gave a mask of shape {mask.shape}")
            cached = self._online_cache = (t, mask)
        return cached[1]

    def node_ids(self) -> Sequence[str]:
        """Nodes online now: not taken offline, and online at ``clock.now`` by availability."""
        mask = self._online(self.clock.now)
        ids: Sequence[str] = self._ids
        if mask is not None:
            ids = tuple(itertools.compress(ids, mask))
        if self._offline:
            ids = tuple(i for i in ids if i not in self._offline)
        return ids

    def set_offline(self, node_ids: Collection[str], offline: bool = True) -> None:
        """Take nodes out of (or back into) the federation, as if they disconnected."""
        if offline:
            self._offline.update(node_ids)
        else:
            self._offline.difference_update(node_ids)

    def close(self) -> None:
        self._retire_pool()
        self._cache.clear()

    def forget(self, handles: Mapping[str, Sequence[str]]) -> None:
        """Drop values nodes keep (``handles[node]``) once the coordinator is done with them.

        Not part of the Engine contract: only an engine that hosts its nodes' state in this
        process needs it (held, 10^5 idle nodes' last updates would be most of its memory).
        Forgetting releases nothing, so no release policy is involved.
        """
        for node_id, names in handles.items():
            state = self._states.get(node_id)
            kept = state.get(KEPT_STATE_KEY) if state is not None else None
            if kept:
                for name in names:
                    kept.pop(name, None)

    def node_state(self, node_id: str) -> dict[str, Any]:
        """A node's persistent state (tests and debugging only: servers never see it)."""
        state = self._states.get(node_id)
        return state if state is not None else self._new_state(node_id)

    def _new_state(self, node_id: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._node_states is not None:
            state[NODE_STATE_KEY] = self._node_states.state(node_id)
        return self._states.setdefault(node_id, state)

    def _node_data(self, node_id: str) -> Any:
        if self._data is None:
            return None
        if not callable(self._data):
            return self._data[self._index[node_id]]
        with self._lock:
            if node_id in self._cache:
                self._cache.move_to_end(node_id)
                return self._cache[node_id]
        value = self._data(node_id)
        with self._lock:
            self._cache[node_id] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        check_dispatch(tasks, deadline_s, known=self._index)
        self._dispatches += 1
        draws = draw_faults(self.faults, self._seed, self._dispatches, len(tasks))
        start = self.clock.now
        online = self._online(start)
        replies: dict[str, Reply] = {}
        failures: dict[str, Failure] = {}
        runnable: list[tuple[Task, float]] = []
        ends: dict[str, float] = {}  # each task's virtual duration
        for i, task in enumerate(tasks):
            if online is not None and not online[self._index[task.node_id]]:
                failures[task.node_id] = _failure(
                    task, FailureKind.DROPPED, f"node is offline at t={start:.6g} s"
                )
                continue
            delay, failure = inject(self.faults, task, draws[i], deadline_s, self._offline)
            if failure is not None:
                failures[task.node_id] = failure
            else:
                runnable.append((task, delay))
        try:
            if runnable:
                self._shared = self._decode_shared([task for task, _ in runnable])
                self._run_all(
                    runnable, deadline_s, self._dispatches, replies, failures, start, ends
                )
            # The dispatch ends with its slowest answer (a timeout: at the deadline), as if
            # every node had run in parallel.
            for node_id, failure in failures.items():
                if failure.kind is FailureKind.TIMEOUT:
                    ends[node_id] = deadline_s
            self.clock.now = start + max(ends.values(), default=0.0)
        finally:
            self._shared = {}
        if failures and runnable:  # injected ones came first: put them all in task order
            failures = {t.node_id: failures[t.node_id] for t in tasks if t.node_id in failures}
        return DispatchResult(replies=replies, failures=failures)

    def _decode_shared(self, tasks: list[Task]) -> dict[int, _Shared | None]:
        """Decode once each payload that several tasks share (a broadcast, a fetch request),
        and prepare the app's guards for it once: what they check of the request alike at
        every node (its parse, the noise floor, the charge's terms) is done here, and each
        node then runs only its own part (replay check, ledger entry, binding).

        A payload that fails to decode is left for each task to decode and be rejected.
        """
        counts = Counter(id(task.payload) for task in tasks)
        shared: dict[int, _Shared | None] = {}
        for task in tasks:
            key = id(task.payload)
            if counts[key] > 1 and key not in shared:
                try:
                    decoded = decode(task.payload, limits=self.app.limits)
                except WireError:
                    shared[key] = None
                    continue
                # The runtime's send list is read, never changed (NodeApp.handle takes it out
                # before the task runs): only the task's own containers need a copy per node.
                containers = tuple(
                    k for k, v in decoded.items() if type(v) in (list, dict) and k != SEND_KEY
                )
                # The guards see the request as each node's task does: without the send list.
                request = {k: v for k, v in decoded.items() if k != SEND_KEY}
                shared[key] = (decoded, containers, self.app.prepare(task.name, request))
        return shared

    def _private_copy(self, task: Task) -> tuple[dict[str, Any] | None, Prepared | None]:
        """This node's own copy of a shared decoded payload (arrays are read-only views;
        JSON containers are copied so that one node's changes never reach another), and the
        guards prepared for it (NodeApp.handle uses them only for the task name they were
        prepared for)."""
        found = self._shared.get(id(task.payload))
        if found is None:
            return None, None
        decoded, containers, prepared = found
        copy = dict(decoded)
        for key in containers:
            copy[key] = copy_json(copy[key])
        return copy, prepared

    def run(
        self, runnable: Sequence[tuple[Task, float]], *, deadline_s: float, dispatch: int
    ) -> DispatchResult:
        """Run tasks already past fault injection (each with its injected delay) as this
        engine's ``dispatch``-th dispatch, which seeds each task's randomness; no
        availability check and no clock. A RayEngine's actor runs its batches so: nodes get
        the same seeds as in a LocalEngine, and the driver keeps the virtual clock.
        """
        replies: dict[str, Reply] = {}
        failures: dict[str, Failure] = {}
        if runnable:
            self._shared = self._decode_shared([task for task, _ in runnable])
            try:
                self._run_all(list(runnable), deadline_s, dispatch, replies, failures)
            finally:
                self._shared = {}
        return DispatchResult(replies=replies, failures=failures)

    def _run_one(
        self,
        task: Task,
        delay: float,
        deadline_s: float,
        dispatch: int,
        start: float = 0.0,
        ends: dict[str, float] | None = None,
    ) -> Reply | Failure:
        ends = {} if ends is None else ends
        node_id = task.node_id
        index = self._index[node_id]
        state = self._states.get(node_id)
        if state is None:
            state = self._new_state(node_id)
        ctx = TaskContext(
            node_id=node_id,
            # Loaded on first use: runtime tasks (fetching a kept value) never need the data,
            # and a factory that raises fails that node's task like any other task error.
            load_data=lambda: self._node_data(node_id),
            state=state,
            task_id=task.task_id,
            seed=(self._seed, index, dispatch),
        )
        t0 = time.perf_counter()
        try:
            decoded, prepared = self._private_copy(task)
            payload = self.app.handle(
                ctx,
                task.name,
                task.payload,
                keep_as=task.keep_as,
                decoded=decoded,
                prepared=prepared,
            )
        except PrivacyBudgetExceeded:
            return _failure(task, FailureKind.DECLINED, DECLINED_DETAIL)
        except (UnknownTask, WireError, ReleaseRefused) as exc:
            return _failure(task, FailureKind.REJECTED, str(exc))
        except Exception as exc:  # any task failure is the node's, never the engine's
            return _failure(task, FailureKind.ERROR, str(exc) or type(exc).__name__)
        measured = time.perf_counter() - t0
        return virtual_outcome(
            Reply(node_id=node_id, task_id=task.task_id, payload=payload, elapsed_s=measured),
            task=task,
            index=index,
            nodes=len(self._ids),
            delay=delay,
            deadline_s=deadline_s,
            start=start,
            ends=ends,
            devices=self.devices,
            availability=self.availability,
        )

    def _run_all(
        self,
        runnable: list[tuple[Task, float]],
        deadline_s: float,
        dispatch: int,
        replies: dict[str, Reply],
        failures: dict[str, Failure],
        start: float = 0.0,
        ends: dict[str, float] | None = None,
    ) -> None:
        """Run tasks on worker threads, abandoning any single task that outlives the deadline."""
        results: dict[int, Reply | Failure] = {}
        started: dict[int, float] = {}
        next_index = [0]
        cond = threading.Condition()
        abandoned: set[int] = set()

        def worker() -> None:
            while True:
                with cond:
                    i = next_index[0]
                    if i >= len(runnable):
                        return
                    next_index[0] += 1
                    started[i] = time.monotonic()
                task, delay = runnable[i]
                outcome = self._run_one(task, delay, deadline_s, dispatch, start, ends)
                with cond:
                    if i in abandoned:
                        return  # a replacement worker carries on; this result arrived too late
                    results[i] = outcome
                    del started[i]
                    if len(results) == len(runnable):
                        cond.notify_all()

        def start_worker() -> None:  # stands in for a worker stuck in an abandoned task
            threading.Thread(target=worker, daemon=True, name="shoal-local-node").start()

        for _ in range(min(self.workers, len(runnable))):
            self._submit(worker)
        with cond:
            while len(results) < len(runnable):
                # Sleep until the earliest running task's deadline or the last result: a
                # short fixed poll took the GIL from the worker every few tens of ms, and on
                # a busy machine each hand-off stalled both threads.
                now = time.monotonic()
                earliest = min(started.values(), default=now)
                cond.wait(timeout=max(earliest + deadline_s - now, 0.001))
                now = time.monotonic()
                for i, t0 in list(started.items()):
                    if now - t0 > deadline_s and i not in abandoned:
                        abandoned.add(i)
                        del started[i]
                        task = runnable[i][0]
                        results[i] = _failure(
                            task, FailureKind.TIMEOUT, f"no answer within {deadline_s} s"
                        )
                        if len(results) == len(runnable):
                            break
                        start_worker()
        if abandoned:
            self._retire_pool()  # one of its threads is stuck: the next dispatch gets new ones
        # Task order, whatever finished first: sums over the replies stay reproducible.
        for i in sorted(results):
            outcome = results[i]
            if isinstance(outcome, Reply):
                replies[outcome.node_id] = outcome
            else:
                failures[outcome.node_id] = outcome

    def _submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the engine's long-lived worker threads. They outlive a dispatch, so
        per-thread state (a node app's model instance, BLAS buffers) stays warm."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            for _ in range(self.workers):
                threading.Thread(
                    target=_serve, args=(self._jobs,), daemon=True, name="shoal-local-node"
                ).start()
            # An engine dropped without close() still lets its threads go.
            self._pool_finalizer = weakref.finalize(self, _stop, self._jobs, self.workers)
        self._jobs.put(job)

    def _retire_pool(self) -> None:
        if self._jobs is not None:
            self._pool_finalizer()  # runs _stop once
            self._jobs = None


def _stop(jobs: queue.SimpleQueue[Callable[[], None] | None], workers: int) -> None:
    for _ in range(workers):
        jobs.put(None)


def _serve(jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job()
        del job  # while idle, hold no reference to the engine the job belonged to


def draw_faults(faults: Faults | None, seed: int, dispatch: int, n: int) -> np.ndarray:
    """The fault draws of an engine's ``dispatch``-th dispatch of ``n`` tasks (one row each)."""
    if faults is None or n == 0:
        return np.zeros((n, 3))
    rng = np.random.default_rng([faults.seed, seed, dispatch])
    return rng.random((n, 3))


def inject(
    faults: Faults | None,
    task: Task,
    draw: np.ndarray,
    deadline_s: float,
    offline: Collection[str] = (),
) -> tuple[float, Failure | None]:
    """A task's injected straggler delay, or the failure it was given instead."""
    if task.node_id in offline:
        return 0.0, _failure(task, FailureKind.DROPPED, "node is offline")
    if faults is None or not faults.applies(task):
        return 0.0, None
    if task.node_id in faults.always_drop or draw[0] < faults.drop:
        return 0.0, _failure(task, FailureKind.DROPPED, "simulated dropout")
    if draw[2] < faults.error:
        return 0.0, _failure(task, FailureKind.ERROR, "simulated task error")
    delay = faults.straggle_s if draw[1] < faults.straggle else 0.0
    if delay >= deadline_s:
        return 0.0, _failure(
            task, FailureKind.TIMEOUT, f"simulated straggler ({delay:.3g} s > deadline)"
        )
    return delay, None


def virtual_outcome(
    answer: Reply,
    *,
    task: Task,
    index: int,
    nodes: int,
    delay: float,
    deadline_s: float,
    start: float,
    ends: dict[str, float] | None,
    devices: Devices | None,
    availability: Availability | None,
) -> Reply | Failure:
    """A node's answer judged on the virtual clock: ``answer.elapsed_s`` is its measured
    compute; its virtual duration adds the device's speed and link and the injected delay,
    and it fails if past the deadline or if the node went offline first. Records the
    duration in ``ends``."""
    ends = {} if ends is None else ends
    node_id, payload, measured = answer.node_id, answer.payload, answer.elapsed_s
    if (
        devices is None
        and availability is None
        and not delay
        and measured <= deadline_s
        and answer.task_id == task.task_id
    ):
        ends[node_id] = measured
        return answer  # its measured compute is its virtual time: the answer as it is
    if devices is None:
        elapsed = measured + delay
    else:
        elapsed = delay + devices.duration(
            index,
            task=task.name,
            measured_s=measured,
            down_bytes=len(task.payload),
            up_bytes=len(payload),
        )
    ends[node_id] = min(elapsed, deadline_s)
    if availability is not None:
        until = availability.online_until(index, start, nodes)
        if until < start + min(elapsed, deadline_s):
            ends[node_id] = until - start
            return _failure(
                task,
                FailureKind.DROPPED,
                f"went offline {until - start:.4g} s into the task (it needed {elapsed:.4g} s)",
            )
    if elapsed > deadline_s:
        return _failure(
            task, FailureKind.TIMEOUT, f"answered after {elapsed:.3g} s (deadline {deadline_s})"
        )
    return Reply(node_id=node_id, task_id=task.task_id, payload=payload, elapsed_s=elapsed)


def _failure(task: Task, kind: FailureKind, detail: str) -> Failure:
    return Failure(node_id=task.node_id, task_id=task.task_id, kind=kind, detail=detail)
