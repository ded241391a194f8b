"""Tasks in flight: a dispatch's Waiter collects outcomes, a Pending is one task at one node.

Whoever learns a task's outcome first (its reply, the session ending, the deadline) resolves
it; later outcomes for the same task are ignored.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from shoal.runtime.engine import Failure, FailureKind, Reply, Task

__all__ = ["MAX_DETAIL", "Pending", "Waiter"]

MAX_DETAIL = 4000


class Waiter:
    """The outcomes of one dispatch; the first outcome for a node wins."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.outcomes: dict[str, Reply | Failure] = {}

    def resolve(self, node_id: str, outcome: Reply | Failure) -> bool:
        with self.cond:
            if node_id in self.outcomes:
                return False
            self.outcomes[node_id] = outcome
            self.cond.notify_all()
            return True


@dataclass(frozen=True, kw_only=True)
class Pending:
    """One task sent to one session; ``wire_id`` is its id on the wire (dispatch-numbered)."""

    task: Task
    wire_id: str
    waiter: Waiter
    started: float

    def fail(self, kind: FailureKind, detail: str) -> bool:
        failure = Failure(
            node_id=self.task.node_id,
            task_id=self.task.task_id,
            kind=kind,
            detail=detail[:MAX_DETAIL],
        )
        return self.waiter.resolve(self.task.node_id, failure)
