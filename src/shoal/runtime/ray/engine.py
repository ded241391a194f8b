"""RayEngine: LocalEngine's virtual nodes, spread over the actors of a Ray cluster.

Node i lives in slot ``i % actors``; each slot is one Ray actor (a NodeHost) that keeps its
nodes' state (held values, ledgers) and a bounded cache of their data between dispatches. A
dispatch sends each actor one batch, so 10^5 nodes cost a handful of Ray calls, not 10^5. A
payload shared by several tasks (a broadcast) goes into Ray's object store once per
dispatch. Faults are drawn here, exactly as LocalEngine draws them, and each node's task is
seeded as in LocalEngine, so a job gives the same result on either engine.

When an actor dies (its machine went away), the tasks it was running fail as DROPPED and
its slot moves to the next live slot's actor: the moved nodes start again from their data
description, with fresh state, as a restarted node would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from shoal.data.spec import DataSpec
from shoal.errors import ConfigError, TransportError
from shoal.runtime.availability import Availability
from shoal.runtime.devices import Devices, VirtualClock
from shoal.runtime.engine import (
    DispatchResult,
    Failure,
    FailureKind,
    Reply,
    Task,
    check_dispatch,
)
from shoal.runtime.local import Faults, draw_faults, inject, virtual_outcome
from shoal.runtime.recipe import Recipe

__all__ = ["RayEngine"]

DEFAULT_PORT = 6379  # Ray's default GCS port, for an address given as a bare host
CLOSE_WAIT_S = 30.0  # how long close() waits for killed actors to die (a bound, not a delay)
# How long a new engine waits for a closed one's CPUs to be free again (a bound, not a delay):
# on a loaded machine Ray took over 10 s to return a dead actor's CPU.
FREE_CPU_WAIT_S = 30.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "RayEngine needs Ray, which is not installed: pip install 'shoal[ray]'"
        ) from None
    return ray


class RayEngine:
    """Virtual nodes on Ray. ``app`` and ``data`` are recipes, built on every actor.

    ``app`` is a :class:`Recipe` for a function returning the NodeApp. ``data`` is a
    :class:`~shoal.data.spec.DataSpec` (node i gets its partition i) or a Recipe for a
    function returning ``f(node_id) -> data``. ``address``: None starts a private Ray on
    this machine; ``"auto"`` joins the cluster this machine belongs to; ``"host"`` or
    ``"host:port"`` joins that cluster's head. Not reachable within ``connect_timeout_s``:
    a TransportError. ``actors`` defaults to one per CPU of the cluster.
    """

    def __init__(
        self,
        *,
        app: Recipe,
        data: DataSpec | Recipe | None = None,
        nodes: int | Sequence[str] | None = None,
        address: str | None = None,
        actors: int | None = None,
        workers: int = 1,
        seed: int = 0,
        faults: Faults | None = None,
        cache_size: int = 256,
        connect_timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
        availability: Availability | None = None,
        devices: Devices | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        if not isinstance(app, Recipe):
            raise ConfigError(
                "RayEngine takes app=Recipe('module:function') that builds the NodeApp on each "
                f"worker (objects are never pickled), got {type(app).__name__}"
            )
        if data is not None and not isinstance(data, (DataSpec, Recipe)):
            raise ConfigError(
                "RayEngine takes data=DataSpec(...) or a Recipe for f(node_id) -> data, never "
                f"the data itself; got {type(data).__name__}"
            )
        if nodes is None:
            if not isinstance(data, DataSpec):
                raise ConfigError("give RayEngine nodes=N (or data=DataSpec(...) with its nodes)")
            nodes = data.nodes
        ids = tuple(f"n{i}" for i in range(nodes)) if isinstance(nodes, int) else tuple(nodes)
        if not ids:
            raise ConfigError("a federation needs at least one node")
        if len(set(ids)) != len(ids):
            raise ConfigError("node ids must be unique")
        if isinstance(data, DataSpec) and data.nodes != len(ids):
            raise ConfigError(f"the data description has {data.nodes} nodes, not {len(ids)}")
        if actors is not None and actors < 1:
            raise ConfigError(f"actors must be at least 1, got {actors}")
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        if cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0, got {cache_size}")
        if not connect_timeout_s > 0:
            raise ConfigError(f"connect_timeout_s must be positive, got {connect_timeout_s}")
        if devices is not None and devices.nodes not in (None, len(ids)):
            raise ConfigError(f"Devices describe {devices.nodes} nodes, not {len(ids)}")
        # The virtual clock, availability and devices stay here, in the driver: actors only
        # measure compute, and every node's time is judged as LocalEngine judges it.
        self.availability = availability
        self.devices = devices
        self.clock = clock if clock is not None else VirtualClock()
        self._lock = threading.Lock()
        self.faults = faults
        self._ids = ids
        self._index = {node_id: i for i, node_id in enumerate(ids)}
        self._seed = seed
        self._dispatches = 0
        self._offline: set[str] = set()
        self._ray = _import_ray()
        self._started_ray = _connect(self._ray, address, connect_timeout_s)
        self._hosts: list[Any] = []
        try:
            count = actors or max(1, int(self._ray.cluster_resources().get("CPU", 1)))
            free = _free_cpus(self._ray, count, wait_s=FREE_CPU_WAIT_S)
            if free < count:
                raise ConfigError(
                    f"{count} actors need {count} free CPUs, but the Ray cluster has {free:g} "
                    "free (another engine or job holds the rest); lower actors= or close it"
                )
            config = json.dumps(
                {
                    "app": app.to_json(),
                    "data": _describe(data),
                    "nodes": nodes if isinstance(nodes, int) else list(ids),
                    "seed": seed,
                    "cache_size": cache_size,
                    "workers": workers,
                }
            )
            from shoal.runtime.ray.host import NodeHost

            # Spread: one machine's loss then takes as few slots as possible with it.
            remote = self._ray.remote(NodeHost).options(
                num_cpus=1, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD"
            )
            self._hosts = [remote.remote(config) for _ in range(count)]
            self._slots: list[int] = list(range(count))  # slot -> index of its live host
            self._alive = [True] * count
            self._check_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _check_ready(self, timeout_s: float) -> None:
        ray = self._ray
        refs = [host.ready.remote() for host in self._hosts]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise TransportError(
                f"{len(pending)} of {len(refs)} Ray actors did not start within {timeout_s} s; "
                "does the cluster have a free CPU per actor? (lower actors=)"
            )
        for problem in ray.get(refs):
            if problem is not None:
                raise ConfigError(problem)

    # -- the Engine contract -------------------------------------------------------------

    def node_ids(self) -> Sequence[str]:
        """Nodes online now: not taken offline, and online at ``clock.now`` by availability."""
        ids: Sequence[str] = self._ids
        mask = self._online(self.clock.now)
        if mask is not None:
            ids = tuple(itertools.compress(ids, mask))
        if self._offline:
            ids = tuple(i for i in ids if i not in self._offline)
        return ids

    def _online(self, t: float) -> np.ndarray | None:
        if self.availability is None:
            return None
        mask = np.asarray(self.availability.online(t, len(self._ids)), dtype=bool)
        if mask.shape != (len(self._ids),):
            raise ConfigError(f"availability gave a mask of shape {mask.shape}")
        return mask

    def node_audit(self, node_id: str) -> list[tuple[str, dict[str, Any]]]:
        """A node's own audit log as (action, detail), oldest first: read from the actor
        hosting it (tests and debugging only: servers never see it)."""
        if node_id not in self._index:
            raise ConfigError(f"no node {node_id!r} in this federation")
        host = self._host_of(node_id)
        if host is None:
            return []
        text = self._ray.get(self._hosts[host].audit.remote(node_id))
        return [(action, detail) for action, detail in json.loads(text)]

    def set_offline(self, node_ids: Collection[str], offline: bool = True) -> None:
        """Take nodes out of (or back into) the federation, as if they disconnected."""
        if offline:
            self._offline.update(node_ids)
        else:
            self._offline.difference_update(node_ids)

    @property
    def live_actors(self) -> int:
        return sum(self._alive)

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        check_dispatch(tasks, deadline_s, known=self._index)
        if not self._hosts:
            raise ConfigError("this RayEngine is closed")
        with self._lock:  # dispatches from several threads each get their own number
            self._dispatches += 1
            dispatch = self._dispatches
        draws = draw_faults(self.faults, self._seed, dispatch, len(tasks))
        start = self.clock.now
        online = self._online(start)
        failures: dict[str, Failure] = {}
        runnable: list[tuple[Task, float]] = []
        batches: dict[int, list[tuple[Task, float]]] = {}
        index, slots, alive = self._index, self._slots, self._alive
        # Without faults or nodes taken offline, inject() gives every task no delay and no
        # failure: skipping it saves a call per node (10^4 of them a round).
        injecting = self.faults is not None or bool(self._offline)
        for i, task in enumerate(tasks):
            at = index[task.node_id]
            if online is not None and not online[at]:
                failures[task.node_id] = _failure(
                    task, FailureKind.DROPPED, f"node is offline at t={start:.6g} s"
                )
                continue
            delay = 0.0
            if injecting:
                delay, failure = inject(self.faults, task, draws[i], deadline_s, self._offline)
                if failure is not None:
                    failures[task.node_id] = failure
                    continue
            host = slots[at % len(slots)]  # as _host_of
            if not alive[host]:
                failures[task.node_id] = _failure(task, FailureKind.DROPPED, "no live Ray actor")
            else:
                runnable.append((task, delay))
                batches.setdefault(host, []).append((task, delay))
        answered, failed = self._run(batches, deadline_s, dispatch)
        replies: dict[str, Reply] = {}
        ends: dict[str, float] = {}
        # Its measured compute is a node's virtual time unless devices, availability or an
        # injected delay say otherwise (virtual_outcome's own first case, without the call).
        plain = self.devices is None and self.availability is None
        for task, delay in runnable:
            node_id = task.node_id
            got = answered.get(node_id)
            if got is None:
                kind, detail = failed[node_id]
                failures[node_id] = _failure(task, FailureKind(kind), detail)
                continue
            body, measured = got
            answer = Reply(node_id=node_id, task_id=task.task_id, payload=body, elapsed_s=measured)
            if plain and not delay and measured <= deadline_s:
                ends[node_id] = measured
                replies[node_id] = answer
                continue
            judged = virtual_outcome(
                answer,
                task=task,
                index=index[node_id],
                nodes=len(self._ids),
                delay=delay,
                deadline_s=deadline_s,
                start=start,
                ends=ends,
                devices=self.devices,
                availability=self.availability,
            )
            if isinstance(judged, Reply):
                replies[node_id] = judged
            else:
                failures[node_id] = judged
        # As in LocalEngine: the dispatch ends with its slowest answer (a timeout: at the
        # deadline), as if every node had run in parallel.
        for node_id, failure in failures.items():
            if failure.kind is FailureKind.TIMEOUT:
                ends[node_id] = deadline_s
        self.clock.now = start + max(ends.values(), default=0.0)
        if failures:
            order = {task.node_id: i for i, task in enumerate(tasks)}
            failures = dict(sorted(failures.items(), key=lambda item: order[item[0]]))
        return DispatchResult(replies=replies, failures=failures)

    def forget(self, handles: Mapping[str, Sequence[str]]) -> None:
        """Drop values nodes keep (``handles[node]``) once the coordinator is done with them,
        as :meth:`LocalEngine.forget` does, in the actors that host those nodes.

        One call per actor concerned, waited for: once this returns, a fetch of a forgotten
        value fails at the node. Unknown nodes and handles, and nodes of a lost actor (whose
        values went with it), are skipped. Forgetting releases nothing, so no release policy
        is involved.
        """
        if not self._hosts:
            return
        by_host: dict[int, dict[str, list[str]]] = {}
        for node_id, names in handles.items():
            if node_id not in self._index or not names:
                continue
            host = self._host_of(node_id)
            if host is not None:
                by_host.setdefault(host, {})[node_id] = [str(name) for name in names]
        calls = {
            self._hosts[host].forget.remote(json.dumps(part)): host
            for host, part in by_host.items()
        }
        for call, host in calls.items():
            try:
                self._ray.get(call)
            except self._ray.exceptions.RayActorError:
                self._lost(host)  # its nodes' values are gone with it

    def close(self) -> None:
        """Kill the actors and wait until they are dead (or ``CLOSE_WAIT_S`` has passed);
        stop the private Ray if this engine started it. Idempotent.

        ``ray.kill`` only asks Ray's control store to kill an actor and returns before the
        actor's process has died: a call sent to the actor in that window is still run, and
        its CPU is not yet free for the next engine. So close sends each killed actor a probe
        until the probe fails with the actor's death.
        """
        hosts, self._hosts = self._hosts, []
        for host in hosts:
            with contextlib.suppress(Exception):  # already gone with its machine
                self._ray.kill(host)
        # An actor already found dead (its machine lost) needs no probe: that one could
        # wait until Ray notices the machine is gone.
        alive = getattr(self, "_alive", [True] * len(hosts))
        live = [host for host, up in zip(hosts, alive) if up]
        if live and self._ray.is_initialized():
            self._await_death(live, time.monotonic() + CLOSE_WAIT_S)
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_ray = False

    def _await_death(self, hosts: Sequence[Any], deadline: float) -> None:
        ray = self._ray
        living = list(hosts)
        while living and time.monotonic() < deadline:
            probes = {host.ready.remote(): host for host in living}
            living = []
            for probe, host in probes.items():
                try:
                    ray.get(probe, timeout=max(0.1, deadline - time.monotonic()))
                except ray.exceptions.RayActorError:
                    continue  # dead: the probe failed with its death
                except ray.exceptions.GetTimeoutError:
                    pass  # neither answered nor failed before the deadline
                except Exception:  # the cluster itself is gone, and the actor with it
                    continue
                living.append(host)  # answered: the kill has not reached it yet
            for host in living:  # a kill lost on the way is sent again
                with contextlib.suppress(Exception):
                    ray.kill(host)
            if living:
                time.sleep(0.02)

    # -- placement and batches -----------------------------------------------------------

    def _host_of(self, node_id: str) -> int | None:
        host = self._slots[self._index[node_id] % len(self._slots)]
        return host if self._alive[host] else None

    def _lost(self, host: int) -> None:
        """Move every slot of a dead host to the next live host, in slot order."""
        with self._lock:
            self._move_slots(host)

    def _move_slots(self, host: int) -> None:
        self._alive[host] = False
        count = len(self._slots)
        for slot, current in enumerate(self._slots):
            if current != host:
                continue
            for step in range(1, count + 1):
                candidate = (slot + step) % count
                if self._alive[self._slots[candidate]]:
                    self._slots[slot] = self._slots[candidate]
                    break

    def _run(
        self, batches: dict[int, list[tuple[Task, float]]], deadline_s: float, dispatch: int
    ) -> tuple[dict[str, tuple[bytes, float]], dict[str, tuple[str, str]]]:
        """Send each host its batch; (reply bytes, measured compute) per node that replied,
        (FailureKind value, detail) per node that did not.

        Hosts get no injected delay: they measure compute only (and abandon a task that
        really hangs past the deadline); the driver judges each answer on the virtual clock.
        """
        ray = self._ray
        everything = [task for batch in batches.values() for task, _ in batch]
        counts = Counter(id(task.payload) for task in everything)
        shared_refs: dict[int, Any] = {}
        for task in everything:  # a broadcast: into the object store once, not once per node
            key = id(task.payload)
            if counts[key] > 1 and key not in shared_refs:
                shared_refs[key] = ray.put(_as_bytes(task.payload))
        calls: dict[Any, tuple[int, list[tuple[Task, float]]]] = {}
        for host, batch in batches.items():
            refs: list[Any] = []  # this batch's shared payloads, in first-use order
            slot_of: dict[int, int] = {}
            for task, _ in batch:
                key = id(task.payload)
                if key in shared_refs and key not in slot_of:
                    slot_of[key] = len(refs)
                    refs.append(shared_refs[key])
            inline: list[bytes] = []
            rows = []
            for task, _ in batch:
                slot = slot_of.get(id(task.payload))
                if slot is None:
                    slot = len(refs) + len(inline)
                    inline.append(_as_bytes(task.payload))
                rows.append((task.node_id, task.name, task.task_id, task.keep_as, slot, 0.0))
            call = self._hosts[host].run.remote(rows, inline, deadline_s, dispatch, *refs)
            calls[call] = (host, batch)
        answered: dict[str, tuple[bytes, float]] = {}
        failed: dict[str, tuple[str, str]] = {}
        # A host runs its batch one task at a time, each bounded by the deadline at the host:
        # past that (plus start-up slack) the host itself is stuck or gone.
        budget = max(deadline_s * len(b) for b in batches.values()) + 60.0 if batches else 0.0
        end = time.monotonic() + budget
        pending = list(calls)
        while pending:
            done, pending = ray.wait(
                pending, num_returns=1, timeout=max(0.0, end - time.monotonic())
            )
            if not done:
                break
            for call in done:
                host, batch = calls[call]
                try:
                    _unpack(ray.get(call), answered, failed)
                except ray.exceptions.RayActorError as exc:
                    self._lost(host)
                    reason = f"Ray actor lost: {_first_line(exc)}"
                    for task, _ in batch:
                        failed[task.node_id] = (FailureKind.DROPPED.value, reason)
                except (ray.exceptions.RayError, TransportError) as exc:
                    reason = f"Ray failed the batch: {_first_line(exc)}"
                    for task, _ in batch:
                        failed[task.node_id] = (FailureKind.DROPPED.value, reason)
        late = (FailureKind.TIMEOUT.value, f"no answer from its Ray actor in {budget:.0f} s")
        for call in pending:
            for task, _ in calls[call][1]:
                failed.setdefault(task.node_id, late)
        return answered, failed


def _unpack(
    outcome: Any, answered: dict[str, tuple[bytes, float]], failed: dict[str, tuple[str, str]]
) -> None:
    """A host's batch outcome (``host.BatchOutcome``) into (reply bytes, measured compute)
    and (FailureKind value, detail) per node. Each reply is copied out of the batch buffer,
    so no reply keeps Ray's object holding the whole batch alive."""
    ids, elapsed, sizes, blob, failures = outcome
    view = memoryview(blob).cast("B")
    if not len(ids) == len(elapsed) == len(sizes) or sum(sizes) != view.nbytes:
        raise TransportError(
            f"a Ray actor returned a malformed batch ({len(ids)} replies, {len(sizes)} sizes, "
            f"{view.nbytes} bytes for {sum(sizes)})"
        )
    offset = 0
    for node_id, took, size in zip(ids, elapsed, sizes):
        answered[node_id] = (view[offset : offset + size].tobytes(), took)
        offset += size
    for node_id, kind, detail in failures:
        failed[node_id] = (kind, detail)


def _free_cpus(ray: Any, wanted: int, *, wait_s: float) -> float:
    """The cluster's free CPUs, waiting a little for a closed engine's actors to let go."""
    end = time.monotonic() + wait_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free >= wanted or time.monotonic() > end:
            return free
        time.sleep(0.2)


def _describe(data: DataSpec | Recipe | None) -> dict[str, str] | None:
    if data is None:
        return None
    if isinstance(data, DataSpec):
        return {"kind": "spec", "body": data.to_json()}
    return {"kind": "recipe", "body": data.to_json()}


def _as_bytes(payload: bytes | memoryview) -> bytes:
    return payload if isinstance(payload, bytes) else bytes(payload)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _failure(task: Task, kind: FailureKind, detail: str) -> Failure:
    return Failure(node_id=task.node_id, task_id=task.task_id, kind=kind, detail=detail)


def _connect(ray: Any, address: str | None, timeout_s: float) -> bool:
    """Join (or start) Ray; True when this engine started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": "ERROR",
        "configure_logging": True,
    }
    if address is None:
        # "local": a new private instance even if a cluster runs on this machine (ray.init()
        # alone would join it).
        ray.init(address="local", **options)
        return True
    target = _resolve(address)
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise TransportError(
            f"Ray is not reachable at {address!r} ({target}): {exc}. Start the cluster first "
            "(ray start --head on the head machine) or check the address and port"
        ) from None
    ray.init(address=target, **options)
    return False


def _resolve(address: str) -> str:
    """ "auto", "host" or "host:port" -> "host:port" of the cluster's head."""
    if address == "auto":
        import os

        found = os.environ.get("RAY_ADDRESS")
        if not found:
            try:  # the file `ray start` leaves on every machine of a cluster
                from ray._private.services import canonicalize_bootstrap_address

                found = canonicalize_bootstrap_address("auto")
            except Exception:
                found = None
        if not found:
            raise TransportError(
                "address = 'auto' found no running Ray cluster on this machine; start one "
                "(ray start --head) or give the head's host:port"
            )
        address = found
    if address.startswith("ray://"):
        raise ConfigError("Ray Client addresses (ray://) are not supported; give host:port")
    if ":" not in address:
        address = f"{address}:{DEFAULT_PORT}"
    return address
