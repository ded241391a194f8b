"""Where tasks run: NodeApp (the node's task registry), the Engine contract and its engines."""

from __future__ import annotations

from shoal.runtime.app import (
    FETCH_TASK,
    SEND_KEY,
    SENT_PREFIX,
    Guard,
    NodeApp,
    TaskContext,
    TaskFn,
    kept_value,
)
from shoal.runtime.engine import (
    DECLINED_DETAIL,
    Buffer,
    DispatchResult,
    Engine,
    Failure,
    FailureKind,
    Reply,
    Task,
)
from shoal.runtime.local import Faults, LocalEngine
from shoal.runtime.store import Checkpoint, RoundRecord, RunRecord, Store

__all__ = [
    "DECLINED_DETAIL",
    "FETCH_TASK",
    "SEND_KEY",
    "SENT_PREFIX",
    "Buffer",
    "Checkpoint",
    "DispatchResult",
    "Engine",
    "Failure",
    "FailureKind",
    "Faults",
    "Guard",
    "LocalEngine",
    "NodeApp",
    "Reply",
    "RoundRecord",
    "RunRecord",
    "Store",
    "Task",
    "TaskContext",
    "TaskFn",
    "kept_value",
]
