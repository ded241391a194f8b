"""Dispatch: send each task to its node's session the cheapest way its size allows, wait for
the outcomes until the deadline, cancel the late ones, return them in task order.

Transfer planning: a payload of at most INLINE_MAX_BYTES rides inside its task header; a
larger one goes on the session's bulk lane when it has one (the same encoded bytes sent to
every node from one buffer, without a copy), and otherwise follows its header as chunk
frames, built once and shared by every node that takes that way (SharedFrames).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.runtime.engine import (
    DispatchResult,
    Failure,
    FailureKind,
    Reply,
    Task,
    check_dispatch,
)
from shoal.runtime.grpc.bulk import SessionLane
from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.lane import LANE_MIN_BYTES
from shoal.runtime.grpc.pending import Pending, Waiter
from shoal.runtime.grpc.proto import shoal_pb2 as pb
from shoal.runtime.grpc.protocol import INLINE_MAX_BYTES, TO_NODE_CHUNK, SharedFrames
from shoal.runtime.grpc.registry import AdmittedNodes
from shoal.runtime.grpc.sessions import Session, SessionTable

__all__ = ["Dispatcher"]


@dataclass(frozen=True)
class _Target:
    """A task on its way: the session it goes to and how its payload travels."""

    task: Task
    session: Session
    pending: Pending
    size: int
    inline: bool
    lane: SessionLane | None


class Dispatcher:
    """Runs tasks on connected sessions (the Engine contract's ``dispatch``)."""

    def __init__(
        self, *, config: CoordinatorConfig, table: SessionTable, admitted: AdmittedNodes
    ) -> None:
        self.config = config
        self.table = table
        self.admitted = admitted
        self._dispatches = 0
        self._lock = threading.Lock()

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        # Unknown ids are the registry's to judge: it re-reads itself before refusing one.
        check_dispatch(tasks, deadline_s, known=None)
        self.admitted.check_known([t.node_id for t in tasks])
        with self._lock:
            self._dispatches += 1
            number = self._dispatches
        waiter = Waiter()
        started = time.monotonic()
        targets = self._plan(tasks, number, waiter, started)
        self._send(targets, number, deadline_s)
        deadline = started + deadline_s
        with waiter.cond:
            while len(waiter.outcomes) < len(tasks):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiter.cond.wait(remaining)
        for target in targets:
            pending = target.pending
            if pending.fail(FailureKind.TIMEOUT, f"no answer within {deadline_s} s"):
                target.session.pop_pending(pending.wire_id)
                cancel = pb.CoordinatorFrame(cancel=pb.Cancel(task_id=pending.wire_id))
                target.session.send(cancel.SerializeToString())
        replies: dict[str, Reply] = {}
        failures: dict[str, Failure] = {}
        for task in tasks:  # task order, whatever the arrival order: sums stay reproducible
            outcome = waiter.outcomes[task.node_id]
            if isinstance(outcome, Reply):
                replies[task.node_id] = outcome
            else:
                failures[task.node_id] = outcome
        return DispatchResult(replies=replies, failures=failures)

    def _plan(
        self, tasks: Sequence[Task], number: int, waiter: Waiter, started: float
    ) -> list[_Target]:
        """Each task's session and way; a task whose node is not connected fails at once."""
        targets: list[_Target] = []
        for task in tasks:
            session = self.table.get(task.node_id)
            pending = Pending(
                task=task, wire_id=f"{number}:{task.task_id}", waiter=waiter, started=started
            )
            if session is None or not session.add_pending(pending):
                pending.fail(FailureKind.DROPPED, "node is not connected")
                continue
            size = memoryview(task.payload).nbytes
            inline = 0 < size <= INLINE_MAX_BYTES
            lane = session.lane
            if inline or lane is None or not lane.ready or size < LANE_MIN_BYTES:
                lane = None
            targets.append(_Target(task, session, pending, size, inline, lane))
        return targets

    def _send(self, targets: list[_Target], number: int, deadline_s: float) -> None:
        # How many sessions take each payload as chunk frames: the frames are dropped once
        # the last of them has taken it.
        consumers = Counter(id(t.task.payload) for t in targets if t.lane is None and not t.inline)
        shared: dict[int, SharedFrames] = {}
        for target in targets:
            task, session, wire_id = target.task, target.session, target.pending.wire_id
            header = pb.TaskHeader(
                task_id=wire_id,
                name=task.name,
                size=target.size,
                seed=[self.config.seed, self._index(session), number],
                deadline_s=deadline_s,
                lane=target.lane is not None,
            )
            if task.keep_as is not None:
                header.keep_as = task.keep_as
            if target.inline:
                header.inline = bytes(task.payload)
            head = pb.CoordinatorFrame(task=header).SerializeToString()
            if target.inline:
                session.send(head)
                continue
            if target.lane is not None:
                with session.send_lock:
                    session.send(head)
                    target.lane.out.put((wire_id, task.payload))
                continue
            frames = shared.get(id(task.payload))
            if frames is None:
                frames = SharedFrames(
                    task.payload,
                    tag=TO_NODE_CHUNK,
                    chunk_bytes=self.config.chunk_bytes,
                    consumers=consumers[id(task.payload)],
                )
                shared[id(task.payload)] = frames
            with session.send_lock:
                session.send(itertools.chain((head,), frames.frames()))

    def _index(self, session: Session) -> int:
        """The node's place in the federation, as a simulation numbers it (for its seed)."""
        if session.partition_index is not None:
            return session.partition_index
        return self.admitted.index(session.node_id)
