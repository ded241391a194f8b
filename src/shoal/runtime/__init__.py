"""Where tasks run: NodeApp (the node's task registry), the Engine contract and its engines."""

from __future__ import annotations

from shoal.runtime.app import (
    FETCH_TASK,
    FORWARD_TASK,
    SEND_KEY,
    SENT_PREFIX,
    Guard,
    NodeApp,
    NoiseBinding,
    TaskContext,
    TaskFn,
    TaskSpec,
    read_held,
)
from shoal.runtime.audit import AuditEntry, ChainReport, MemoryAuditLog, verify_chain
from shoal.runtime.availability import (
    Availability,
    Diurnal,
    RandomAvailability,
    TraceAvailability,
)
from shoal.runtime.devices import Devices, VirtualClock
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
from shoal.runtime.nodestate import NodeState, NodeStateFile, open_node_state
from shoal.runtime.policy import Release, ReleasePolicy
from shoal.runtime.recipe import Recipe
from shoal.runtime.store import Checkpoint, RoundRecord, RunRecord, Store

__all__ = [
    "DECLINED_DETAIL",
    "FETCH_TASK",
    "FORWARD_TASK",
    "SEND_KEY",
    "SENT_PREFIX",
    "AuditEntry",
    "Availability",
    "Buffer",
    "ChainReport",
    "Checkpoint",
    "Devices",
    "DispatchResult",
    "Diurnal",
    "Engine",
    "Failure",
    "FailureKind",
    "Faults",
    "Guard",
    "LocalEngine",
    "MemoryAuditLog",
    "NodeApp",
    "NodeState",
    "NodeStateFile",
    "NoiseBinding",
    "RandomAvailability",
    "Recipe",
    "Release",
    "ReleasePolicy",
    "Reply",
    "RoundRecord",
    "RunRecord",
    "Store",
    "Task",
    "TaskContext",
    "TaskFn",
    "TaskSpec",
    "TraceAvailability",
    "VirtualClock",
    "open_node_state",
    "read_held",
    "verify_chain",
]
