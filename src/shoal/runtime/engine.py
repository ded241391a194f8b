"""The Engine contract: run named tasks on nodes and bring back replies or failures.

Every engine (in-process, Ray, gRPC) implements :class:`Engine`; code above the runtime
never knows which one it is talking to. Payloads cross the contract as wire-encoded bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, Union, runtime_checkable

__all__ = [
    "DECLINED_DETAIL",
    "Buffer",
    "DispatchResult",
    "Engine",
    "Failure",
    "FailureKind",
    "Reply",
    "Task",
]

Buffer = Union[bytes, memoryview]  # noqa: UP007 (a runtime alias on Python 3.10)

# All a coordinator learns when a node declines: the owner's budget and spending stay private.
DECLINED_DETAIL = "declined by the node's owner (privacy budget)"


class FailureKind(str, Enum):
    """Why a node produced no reply for a task."""

    DROPPED = "dropped"  # unreachable, disconnected, or a simulated dropout
    TIMEOUT = "timeout"  # answered after the deadline, or never
    ERROR = "error"  # the task raised at the node
    DECLINED = "declined"  # the node refused on its owner's policy (e.g. privacy budget)
    REJECTED = "rejected"  # the node refused the request itself (unknown task, bad payload)
    INVALID = "invalid"  # the reply could not be decoded or failed validation


@dataclass(frozen=True, kw_only=True)
class Task:
    """One task for one node. ``keep_as`` asks the node to hold the result instead of sending it."""

    node_id: str
    name: str
    payload: Buffer
    task_id: str
    keep_as: str | None = None


@dataclass(frozen=True, kw_only=True)
class Reply:
    node_id: str
    task_id: str
    payload: Buffer
    elapsed_s: float


@dataclass(frozen=True, kw_only=True)
class Failure:
    node_id: str
    task_id: str
    kind: FailureKind
    detail: str


@dataclass(frozen=True, kw_only=True)
class DispatchResult:
    """Replies and failures of one dispatch, keyed by node id."""

    replies: Mapping[str, Reply] = field(default_factory=dict)
    failures: Mapping[str, Failure] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """Runs tasks on nodes. One task per node per dispatch."""

    def node_ids(self) -> Sequence[str]:
        """Nodes currently available to receive tasks, in a stable order."""
        ...

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        """Run ``tasks``; each node gets ``deadline_s`` seconds to answer before it is a failure."""
        ...

    def close(self) -> None: ...
