"""The Engine contract: run named tasks on nodes and bring back replies or failures.

Every engine (in-process, Ray, gRPC) implements :class:`Engine`; code above the runtime
never knows which one it is talking to. Payloads cross the contract as wire-encoded bytes.
The contract is written out on :class:`Engine` and tested, clause by clause, by one suite
that every engine must pass (``tests/runtime/contract/``).
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, Union, runtime_checkable

from shoal.errors import ConfigError

__all__ = [
    "DECLINED_DETAIL",
    "Buffer",
    "DispatchResult",
    "Engine",
    "Failure",
    "FailureKind",
    "Reply",
    "Task",
    "check_dispatch",
]

Buffer = Union[bytes, memoryview]  # noqa: UP007 (a runtime alias on Python 3.10)

# All a coordinator learns when a node declines: the owner's budget and spending stay private.
DECLINED_DETAIL = "declined by the node's owner (privacy budget)"


class FailureKind(str, Enum):
    """Why a node produced no reply for a task.

    An engine reports the first five; INVALID comes from whoever validates the reply: the
    engine when its transport's own check fails (GrpcEngine: a reply whose bytes do not
    match the tag the node signed), the Federation when the bytes do not decode.
    """

    DROPPED = "dropped"  # unreachable, disconnected, or a simulated dropout
    TIMEOUT = "timeout"  # answered after the deadline, or never
    ERROR = "error"  # the task raised at the node (or a value it no longer holds was asked for)
    DECLINED = "declined"  # the node refused on its owner's policy (e.g. privacy budget)
    # The node refused the request itself: unknown task, undecodable payload, a payload over
    # its limits, or a result field its release policy does not let out that way.
    REJECTED = "rejected"
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
    """Runs tasks on nodes. One task per node per dispatch.

    The contract every engine keeps (each clause is a test in ``tests/runtime/contract/``):

    - **Nodes.** :meth:`node_ids` lists the nodes available now, in an order that does not
      change while the set does not.
    - **Dispatch and replies.** Each task runs the node's registered task ``name`` on its
      payload, seeing ``task_id`` as given. The result has exactly one outcome per task, a
      :class:`Reply` or a :class:`Failure` (never both, never none), keyed by node id, each
      mapping in task order whatever the arrival order (sums over replies are reproducible),
      each carrying its task's ``task_id``. Reply bytes are the node's, unchanged: decoding
      them is the caller's job. A payload object shared by several tasks (a broadcast) is
      decoded into a private copy per node: one node's task cannot change another's input.
    - **Refused calls.** A non-positive deadline, two tasks for one node, or a node id the
      engine never knew raise ConfigError before any task runs. A known node that is not
      available is a DROPPED failure, not an exception.
    - **Deadlines.** A node whose answer takes more than ``deadline_s`` seconds is a TIMEOUT
      failure, and the others' replies are returned. (Real time since the dispatch began in a
      deployment; in a simulation, the node's own compute time plus any simulated delay, as
      if all nodes ran in parallel, and a task really running past the deadline is
      abandoned.) A late answer is discarded, never mistaken for the answer to a later task,
      and the node serves later dispatches.
    - **Failures.** A task that raises is ERROR (the detail carries the exception's text);
      a guard's PrivacyBudgetExceeded is DECLINED with :data:`DECLINED_DETAIL` only (the
      owner's budget stays private); an unknown task, an undecodable or over-limit payload,
      or a release the task's policy forbids is REJECTED with the node's reason; an
      unreachable or disconnected node is DROPPED. Refusals and declines are written to the
      node's own audit log before the coordinator hears of them. A failure is one node's:
      the others' replies in the same dispatch are unaffected, and the failed node serves the
      next dispatch.
    - **Per-node state.** ``TaskContext.state`` of a node persists across dispatches to that
      node (the same node in every dispatch, whatever other nodes or tasks ran in between)
      and is never shared between nodes. So do held values: a task run with ``keep_as``
      replies with a receipt naming its fields and none of their values, and the value stays
      at the node for later ``shoal.fetch`` / ``shoal.forward`` tasks, which release each
      field only as the producing task's release policy allows. A node that loses its
      process may lose its state; it must then answer such requests with an error, never
      with another node's values.
    - **Roles.** Each node runs its own app: a task registered for one role is unknown (so
      REJECTED) at nodes of another; a field sealed for a role is forwarded only to it.
    - **Large payloads.** Payloads of any size up to the node's wire limits arrive whole, in
      both directions; one over the node's limit is REJECTED and the node goes on serving.
    - **Concurrency.** ``dispatch`` may be called from several threads at once for disjoint
      sets of nodes; each call gets its own outcomes. (Two concurrent dispatches to one node
      are the caller's mistake: a node's state is not locked against itself.)
    - **Close.** :meth:`close` releases what the engine started (threads, listening ports,
      worker processes) and may be called twice. Released means gone when it returns, not
      asked to go: nothing it started answers a call afterwards.

    Outside the contract, a simulation engine may offer two extensions, which callers find
    with ``getattr``: ``clock``, a :class:`~shoal.runtime.devices.VirtualClock` whose ``now``
    each dispatch starts at and moves to its slowest answer (``Reply.elapsed_s`` then being
    the node's virtual time: transfers over its link and compute at its speed), which FedBuff
    sets to each event's time; and ``forget(handles)``, dropping held values the coordinator
    is done with (``{node: [handle, ...]}``, unknown nodes and handles ignored; once it
    returns, a fetch of a forgotten value is an ERROR at that node, and every other value
    stays), which ``Federation.discard`` calls. LocalEngine and RayEngine offer both, and the
    contract suite holds them to ``forget``; GrpcEngine offers neither: deployed nodes keep
    their own values (dropping the oldest past ``max_kept``) on real time.
    """

    def node_ids(self) -> Sequence[str]:
        """Nodes currently available to receive tasks, in a stable order."""
        ...

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        """Run ``tasks``; each node gets ``deadline_s`` seconds to answer before it is a failure."""
        ...

    def close(self) -> None:
        """Release everything the engine started; idempotent."""
        ...


def check_dispatch(
    tasks: Sequence[Task],
    deadline_s: float,
    *,
    known: Container[str] | None,
    noun: str = "node",
    where: str = "in this federation",
) -> None:
    """The contract's refused calls, checked before any task runs (every engine's one copy).

    ``known`` None leaves unknown ids to the engine (a registry that must be re-read first).
    """
    if deadline_s <= 0:
        raise ConfigError(f"deadline_s must be positive, got {deadline_s}")
    seen: set[str] = set()
    for task in tasks:
        node_id = task.node_id
        if known is not None and node_id not in known:
            raise ConfigError(f"no {noun} {node_id!r} {where}")
        if node_id in seen:
            raise ConfigError(f"{noun} {node_id!r} got two tasks in one dispatch")
        seen.add(node_id)
