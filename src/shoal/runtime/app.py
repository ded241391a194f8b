"""NodeApp: the registry of named tasks a node's owner allows, and how one task is run.

A node never executes code sent by the server: it runs only the functions registered here,
and each task's release policy (see :mod:`shoal.runtime.policy`) decides how its result may
leave. Every way out is checked here: direct replies, ``send`` receipts, ``shoal.fetch``,
protocol inputs read through :func:`read_held`, and sealed forwards (``shoal.forward``).
Refusals raise ReleaseRefused and go into the node's audit log.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.errors import (
    ConfigError,
    PrivacyBudgetExceeded,
    ReleaseRefused,
    ShoalError,
    TaskError,
    UnknownTask,
    WireError,
)
from shoal.runtime.engine import Buffer
from shoal.runtime.nodestate import NODE_STATE_KEY, NodeState
from shoal.runtime.policy import ReleasePolicy, Use
from shoal.runtime.request import request_digest
from shoal.wire import WireLimits, decode, encode
from shoal.wire.codec import dtype_str

__all__ = [
    "FETCH_TASK",
    "FORWARD_TASK",
    "KEPT_STATE_KEY",
    "SEND_KEY",
    "SENT_PREFIX",
    "Guard",
    "NodeApp",
    "NodeCheck",
    "NoiseBinding",
    "Prepared",
    "TaskContext",
    "TaskFn",
    "TaskSpec",
    "read_held",
]

FETCH_TASK = "shoal.fetch"
# Releases fields whose policy is sealed for a role: the coordinator relays them to it.
FORWARD_TASK = "shoal.forward"
KEPT_STATE_KEY = "shoal.kept"
# A payload entry naming result fields the node sends back with its receipt: the server's
# code asked for them in the clear (a plain aggregate follows), saving a fetch round trip.
SEND_KEY = "shoal.send"
SENT_PREFIX = "sent/"


class TaskContext:
    """What a task sees of its node: its id, private data, persistent state and randomness."""

    __slots__ = (
        "_data",
        "_load",
        "_rng",
        "_seed",
        "node_id",
        "noise",
        "request",
        "state",
        "task_id",
    )

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
        self.noise: NoiseBinding | None = None
        # The digest a kept result carries (runtime/request.py): by default the request's
        # own; a task whose result comes from an earlier request (FedBuff's upload) sets it.
        self.request: str | None = None

    @property
    def node_state(self) -> NodeState:
        """The node's privacy ledger and audit log (in memory unless the node has a file)."""
        found = self.state.get(NODE_STATE_KEY)
        if found is None:
            found = self.state[NODE_STATE_KEY] = NodeState(node_id=self.node_id)
        return found

    def bind_noise(
        self, *, clip: float, std: float, applied: bool = False, share_std: float | None = None
    ) -> None:
        """Bind this task's result to the noise its privacy charge assumed.

        Called by the guard that charged the request, before the task runs. ``std`` is the
        noise the charge counted; ``share_std`` (distributed DP) is this node's share of it,
        accepted only as the input of a secure sum, whose other shares make up the rest.
        ``applied``: the task itself adds the noise (DP-SGD; only the share when there is
        one), so its noised fields may leave as they are (into a secure sum only, for a
        share); otherwise they leave only clipped to ``clip`` with at least the noise the way
        out needs, fresh Gaussian, added by the node, once.
        """
        self.noise = NoiseBinding.of(clip=clip, std=std, applied=applied, share_std=share_std)

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


@dataclass(frozen=True, kw_only=True)
class NoiseBinding:
    """What a held value's privacy charge assumed: clip bound and the noise std it counted.

    ``share``: this node's smaller share of distributed noise, enough only inside a secure
    sum (None: the node's own noise must be the full ``std``).
    """

    clip: float
    std: float
    applied: bool = False
    share: float | None = None

    @property
    def applied_in_full(self) -> bool:
        """The task added all the charged noise itself: noised fields may leave as they are."""
        return self.applied and self.share is None

    @classmethod
    def of(
        cls, *, clip: float, std: float, applied: bool = False, share_std: float | None = None
    ) -> NoiseBinding:
        """The binding :meth:`TaskContext.bind_noise` sets (validated; one per distinct
        value: a guard makes it once for every node a request reaches)."""
        return _binding(float(clip), float(std), bool(applied), share_std)

    def needed(self, use: str, group: int | None = None) -> float:
        """The noise std a release by ``use`` must add. Alone: the full ``std``. Into a
        secure sum over ``group`` participants (the protocol's own list, as the node sees
        it): std / sqrt(group), so that the group's shares add up to the full noise. A
        secure protocol that does not say its group gets no discount."""
        if use != "secure" or group is None or group < 1:
            return self.std
        return self.std / math.sqrt(group)


@functools.lru_cache(maxsize=256)
def _binding(clip: float, std: float, applied: bool, share_std: float | None) -> NoiseBinding:
    # Every node of a round binds the same few values: one frozen binding each, made once.
    values = (clip, std, 0.0 if share_std is None else share_std)
    if not (clip > 0 and all(v >= 0 and math.isfinite(v) for v in values)):
        raise ConfigError(
            f"a noise binding needs clip > 0 and std >= 0, got {clip}, {std}, {share_std}"
        )
    share = None if share_std is None or share_std >= std else float(share_std)
    return NoiseBinding(clip=clip, std=std, applied=applied, share=share)


TaskFn = Callable[[TaskContext, dict[str, Any]], Mapping[str, Any] | None]


@dataclass(frozen=True)
class TaskSpec:
    """A task function with its release policy, for :meth:`NodeApp.install`."""

    fn: TaskFn
    release: Mapping[str, str] | None = None

    def __call__(self, ctx: TaskContext, payload: dict[str, Any]) -> Mapping[str, Any] | None:
        return self.fn(ctx, payload)


class _Held:
    """A result kept at the node, with the policy and noise binding of the task behind it."""

    __slots__ = ("noise", "noised_once", "policy", "request", "summed", "values")

    def __init__(
        self,
        values: dict[str, Any],
        policy: ReleasePolicy,
        noise: NoiseBinding | None,
        request: str | None = None,
    ) -> None:
        self.values = values
        self.policy = policy
        self.noise = noise
        # The digest of the request that produced the value (runtime/request.py): a secure
        # sum states the digest every participant's value must carry.
        self.request = request
        self.noised_once = False
        # Fields that entered a secure sum: a second sum over another group would give
        # this node's value away as the difference of the two sums. An empty frozenset
        # until then (shared, not a set per held value: most values never enter one).
        self.summed: frozenset[str] = frozenset()


# A guard sees each request before its task runs and raises to refuse it
# (PrivacyBudgetExceeded to decline on the owner's policy).
Guard = Callable[[str, TaskContext, Mapping[str, Any]], None]
# What a node still checks of a request whose node-independent part a guard prepared once
# (``guard.prepare(task, payload)``): called like a guard, with the node's context and
# its own copy of the request.
NodeCheck = Callable[[TaskContext, Mapping[str, Any]], None]


@dataclass(frozen=True, eq=False)
class Prepared:
    """A request's guard work done once for every node of a dispatch (:meth:`NodeApp.prepare`).

    Valid only for the app that made it, the task it names, the guards the app had then, and
    a payload equal to ``request``; :meth:`NodeApp.handle` runs every guard in full for any
    other. An app made of other apps (NodeApps) prepares each of them when first asked
    (:meth:`part`).
    """

    app: NodeApp
    task: str
    request: Mapping[str, Any]  # the payload prepared for (read, never changed)
    guards: tuple[Guard, ...]  # the app's guards when prepared (a new tuple once one is added)
    checks: tuple[NodeCheck, ...]
    _parts: dict[int, Prepared] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def part(self, app: NodeApp) -> Prepared:
        """``app``'s own preparation of the same request, made once."""
        found = self._parts.get(id(app))
        if found is None:
            with self._lock:
                found = self._parts.get(id(app))
                if found is None:
                    found = self._parts[id(app)] = app.prepare(self.task, self.request)
        return found


class NodeApp:
    """Tasks a node is willing to run, by name.

    >>> app = NodeApp()
    >>> @app.task("train")
    ... def train(ctx, payload):
    ...     return {"n": len(ctx.data)}
    """

    def __init__(
        self,
        *,
        max_kept: int = 4,
        limits: WireLimits | None = None,
        require_release: bool = False,
    ) -> None:
        if max_kept < 1:
            raise ConfigError(f"NodeApp(max_kept) must be at least 1, got {max_kept}")
        self._tasks: dict[str, TaskFn] = {}
        self._policies: dict[str, ReleasePolicy] = {}
        # A new tuple per guard added: a preparation names the very tuple it was made for.
        self._guards: tuple[Guard, ...] = ()
        self.max_kept = max_kept
        self.limits = limits or WireLimits()
        # A task that declares no policy releases in the clear (the Core API's simple start);
        # require_release=True makes every task declare one (a deployed node's choice).
        self.require_release = require_release
        # The runtime's own tasks check what they release field by field (read_held).
        self.register(FETCH_TASK, _fetch, release=_CHECKED_INSIDE)
        self.register(FORWARD_TASK, _forward, release=_CHECKED_INSIDE)

    def task(
        self, name: str, *, release: Mapping[str, str] | None = None
    ) -> Callable[[TaskFn], TaskFn]:
        """Decorator registering ``fn(ctx, payload) -> payload`` under ``name``.

        ``release`` maps result field names (or fnmatch patterns) to how they may leave:
        ``clear``, ``secure``, ``noised``, ``sealed:<role>,...`` or ``never``.
        """

        def register(fn: TaskFn) -> TaskFn:
            self.register(name, fn, release=release)
            return fn

        return register

    def register(self, name: str, fn: TaskFn, *, release: Mapping[str, str] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"task names are non-empty strings, got {name!r}")
        if name in self._tasks:
            raise ConfigError(
                f"a task named {name!r} is already registered; give each task its own name"
            )
        if release is None:
            if self.require_release:
                raise ConfigError(
                    f"task {name!r} declares no release policy and this node requires one; "
                    "register it with release={field: kind, ...}"
                )
            policy = ReleasePolicy.clear(task=name)
        else:
            policy = ReleasePolicy(release, task=name)  # validated now, not at first use
        self._tasks[name] = fn
        self._policies[name] = policy

    def install(self, tasks: Mapping[str, TaskFn | TaskSpec]) -> None:
        """Register a feature's node-side tasks (secure aggregation, analytics, ...)."""
        for name, task in tasks.items():
            fn, release = (task.fn, task.release) if isinstance(task, TaskSpec) else (task, None)
            if self._tasks.get(name) is not fn:
                self.register(name, fn, release=release)

    def policy(self, name: str) -> ReleasePolicy:
        """The release policy of task ``name``."""
        try:
            return self._policies[name]
        except KeyError:
            raise UnknownTask(f"no task named {name!r}") from None

    def add_guard(self, guard: Guard) -> None:
        """Install ``guard``: every request passes it before its task runs. A guard with a
        ``prepare(task, payload)`` method (a budget guard) lets an in-process engine do its
        node-independent part once per dispatch; it returns the node's remaining check, or
        None when the guard does not concern the task."""
        self._guards = (*self._guards, guard)

    def prepare(self, name: str, payload: Mapping[str, Any]) -> Prepared:
        """The guards' work on task ``name`` with ``payload`` that is the same at every node
        (parsing the request, checking it against the node's plan, the charge's terms and
        noise binding), done once; :meth:`handle` with ``prepared=`` then runs only each
        node's own part (its replay check, ledger entry and binding) for a payload equal to
        this one. A guard that cannot prepare, or whose preparation raises, runs in full at
        every node, so that each node refuses, declines and audits as it would alone."""
        checks: list[NodeCheck] = []
        for guard in self._guards:
            prepare = getattr(guard, "prepare", None)
            check: NodeCheck | None
            if prepare is None:
                check = functools.partial(_unprepared, guard, name)
            else:
                try:
                    check = prepare(name, payload)
                except Exception:  # raised again by the guard itself at each node
                    check = functools.partial(_unprepared, guard, name)
            if check is not None:
                checks.append(check)
        return Prepared(
            app=self, task=name, request=payload, guards=self._guards, checks=tuple(checks)
        )

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
        decoded: dict[str, Any] | None = None,
        prepared: Prepared | None = None,
    ) -> Buffer:
        """Decode, check, run and encode one task.

        ``decoded`` is ``payload`` already decoded, as this task's own copy, which the task
        may change (an in-process engine decodes a payload shared by many nodes once and
        gives each node a copy). ``prepared``: this app's :meth:`prepare` of the same task
        and payload, done once for all the nodes that got it; only each node's own part of
        the guards then runs here. Raises UnknownTask, WireError or ReleaseRefused (the
        request is rejected), PrivacyBudgetExceeded (declined), or TaskError carrying the
        task's own exception as text. Every refusal and decline goes into the node's audit log.
        """
        try:
            fn = self._tasks.get(name)
            if fn is None:
                raise UnknownTask(
                    f"node {ctx.node_id!r} has no task named {name!r}; it runs only "
                    f"{sorted(t for t in self._tasks if not t.startswith('shoal.'))}"
                )
            args = decoded if decoded is not None else decode(payload, limits=self.limits)
            send = args.pop(SEND_KEY, None)  # a runtime instruction, not the task's argument
            if send is not None and (
                keep_as is None or type(send) is not list or any(type(f) is not str for f in send)
            ):
                raise WireError(
                    f"{SEND_KEY!r} must list field names, with a value kept at the node"
                )
            guards = self._guards
            if guards:
                if prepared is not None and prepared.guards is guards and prepared.task == name:
                    # Prepared by this app for this task with these guards (no other app
                    # holds this tuple): only each node's own part is left.
                    for check in prepared.checks:
                        check(ctx, args)
                else:
                    for guard in guards:
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
            policy = self._policies[name]
            if keep_as is None:
                if not policy.all_clear:
                    _check_clear(policy, tuple(result), ctx.noise, "a direct reply")
                return self._encode(name, result)
            request = ctx.request or request_digest(name, payload)
            held = _Held(dict(result), policy, ctx.noise, request)
            receipt = _keep(ctx, keep_as, held, self.max_kept)
            if send:
                fields = [f for f in send if f in result]
                if not policy.all_clear:
                    _check_clear(policy, tuple(fields), ctx.noise, f"{SEND_KEY} with the receipt")
                for field in fields:
                    receipt[SENT_PREFIX + field] = result[field]
            return self._encode(name, receipt)
        except (ReleaseRefused, UnknownTask, WireError, PrivacyBudgetExceeded) as exc:
            action = "declined" if isinstance(exc, PrivacyBudgetExceeded) else "refused"
            ctx.node_state.audit(
                action,
                task=name[:200],
                task_id=ctx.task_id[:200],
                error=type(exc).__name__,
                reason=str(exc)[:1000],
            )
            raise

    def _encode(self, name: str, result: Mapping[str, Any]) -> Buffer:
        try:
            return encode(result, limits=self.limits)
        except WireError as exc:
            # The request was fine; the task's own result is what cannot travel.
            raise TaskError(f"task {name!r} returned a value the wire refuses: {exc}") from None


def _unprepared(guard: Guard, name: str, ctx: TaskContext, payload: Mapping[str, Any]) -> None:
    guard(name, ctx, payload)  # a guard that prepares nothing runs in full at each node


# The runtime's own tasks (fetch, forward) check each field they release against the policy
# of the task that produced it, so their replies need no second check.
_CHECKED_INSIDE = {"*": "clear"}


def _check_clear(
    policy: ReleasePolicy, fields: tuple[str, ...], noise: NoiseBinding | None, path: str
) -> None:
    """Fields leaving in the clear: ``clear`` ones, and ``noised`` ones the task noised."""
    if policy.all_clear or not fields:
        return
    policy.check_clear(fields, path=path, noised=noise is not None and noise.applied_in_full)


def _keep(ctx: TaskContext, handle: str, held: _Held, max_kept: int) -> dict[str, Any]:
    """Hold a result at the node and describe it, without revealing any value."""
    kept: OrderedDict[str, _Held] | None = ctx.state.get(KEPT_STATE_KEY)
    if kept is None:
        kept = ctx.state[KEPT_STATE_KEY] = OrderedDict()
    kept[handle] = held
    while len(kept) > max_kept:
        kept.popitem(last=False)
    # Compact on purpose (name -> "dtype:d0,d1"): every node sends one receipt per map.
    fields: dict[str, Any] = {}
    for key, value in held.values.items():
        if type(value) is np.ndarray or isinstance(value, (np.ndarray, np.generic)):
            fields[key] = _describe(dtype_str(value.dtype), value.shape)
        else:
            fields[key] = "json:"
    return {"kept": handle, "fields": fields}


@functools.lru_cache(maxsize=1024)
def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    # Every node of a map describes the same few (dtype, shape) pairs.
    return f"{dtype}:{','.join(map(str, shape))}"


def _held(ctx: TaskContext, handle: str) -> _Held:
    kept = ctx.state.get(KEPT_STATE_KEY, {})
    held = kept.get(handle) if isinstance(handle, str) else None
    if held is None:
        raise TaskError(
            f"node {ctx.node_id!r} no longer holds value {handle!r}: nodes keep only their "
            "most recent results, so aggregate a map's output before mapping again many times"
        )
    return held


def read_held(
    ctx: TaskContext,
    handle: str,
    fields: Sequence[str],
    *,
    use: Use,
    clip: float | None = None,
    noise_std: float | None = None,
    role: str | None = None,
    group: int | None = None,
    request: str | None = None,
) -> dict[str, Any]:
    """The one way node-side code reads a value the node holds, checked against its policy.

    ``use`` says how the fields are about to leave: ``"clear"`` (to the coordinator as they
    are), ``"secure"`` (as the input of a secure-sum protocol) or ``"forward"`` (sealed, to
    ``role``). ``noised`` fields need ``clip`` and ``noise_std``: the caller promises to
    clip them jointly to ``clip`` and add N(0, noise_std**2) of fresh noise, and the node
    checks both against what the privacy charge assumed, then lets them out once. ``group``
    is the number of participants of the secure sum as the node's own protocol state lists
    them (never the coordinator's claim): a noise share is checked against it. A value whose
    charge bound noise the task did not add in full enters a secure sum only with that
    noise, whatever its fields' kind. ``request``: for ``"secure"``, the digest of the
    producing request that the secure sum's parameters state for every participant; a value
    produced by another request does not enter the sum. Raises ReleaseRefused (with the
    reason) or TaskError (no such value or field).
    """
    held = _held(ctx, handle)
    if use == "secure" and held.request is not None and request != held.request:
        raise ReleaseRefused(
            f"request digest mismatch: value {handle!r} was produced by a request with digest "
            f"{held.request[:16]}..., but the secure sum's parameters state "
            f"{(request or 'none')[:16]}...: the participants computed their inputs from "
            "different requests (a coordinator could otherwise send every other node a "
            "request that makes its input zero and read this node's value as the sum)"
        )
    values = held.values
    try:
        out = {f: values[f] for f in fields}
    except KeyError:
        missing = [f for f in fields if f not in values]
        raise TaskError(
            f"value {handle!r} has no field(s) {missing}; it has {sorted(values)}"
        ) from None
    policy = held.policy
    if policy.all_clear:
        return out
    route = policy.route(tuple(out), use, role)  # positional: a call per node and release
    if route.free:  # every field may leave this way as it is (clear, or sealed to role)
        return out
    if route.refused:
        refused = dict(route.refused)
        how = {"clear": "in the clear", "secure": "into a secure sum", "forward": f"to {role!r}"}
        raise ReleaseRefused(
            f"task {policy.task!r} releases "
            + ", ".join(f"{f!r} as {k}" for f, k in sorted(refused.items()))
            + f"; the node refuses to send {sorted(refused)} {how[use]}"
        )
    summed = route.secure
    if summed:
        again = sorted(held.summed.intersection(summed))
        if again:
            raise ReleaseRefused(
                f"value {handle!r} already entered a secure sum with {again}; a second sum "
                "(over another group) would reveal this node's value as the difference, so "
                "each secure field joins one secure sum"
            )
    charged = held.noise
    if route.noised or (summed and charged is not None and not charged.applied_in_full):
        _check_noise(held, handle, clip, noise_std, use, group)
    if summed:
        held.summed = held.summed.union(summed)
    return out


def _check_noise(
    held: _Held,
    handle: str,
    clip: float | None,
    noise_std: float | None,
    use: Use,
    group: int | None = None,
) -> None:
    binding = held.noise
    if binding is None:
        raise ReleaseRefused(
            f"value {handle!r} holds noised fields but no privacy charge was made for it; "
            "the node releases noised fields only under a DP request its ledger charged"
        )
    if binding.applied:
        if binding.share is None:
            return  # the task added the charged noise itself: the sample that was paid for
        if use != "secure":
            # The task added only its share of distributed noise: alone it is under-noised.
            raise ReleaseRefused(
                f"value {handle!r} carries only this node's share (std {binding.share:g}) of "
                f"the noise its privacy charge counted (std {binding.std:g}); the node "
                "releases it only into a secure sum, where the other shares make up the rest"
            )
        needed = binding.needed(use, group)
        if binding.share < needed * (1 - 1e-9):
            raise ReleaseRefused(
                f"value {handle!r} carries a noise share of std {binding.share:g}, but a secure "
                f"sum over the {group or 1} participant(s) this node sees needs std >= "
                f"{needed:g} from each for the sum to carry the charged {binding.std:g}; the "
                "node refuses to release with less noise than it charged (was the group size "
                "the request stated larger than the real one?)"
            )
        if held.noised_once:
            raise ReleaseRefused(
                f"value {handle!r} entered a secure sum with its noise share once already; a "
                "second sum (over another group) is a second noisy sample without a charge"
            )
        held.noised_once = True
        return
    if clip is None or noise_std is None:
        raise ReleaseRefused(
            f"value {handle!r} holds noised fields: release them with the clip and noise the "
            "charge assumed (the node adds the noise)"
        )
    # A hair of float tolerance: a request recomputed by the coordinator may differ in the ulp.
    needed = binding.needed(use, group)
    if clip > binding.clip * (1 + 1e-9) or noise_std < needed * (1 - 1e-9):
        alone = (
            f" (a secure sum over the {group} participant(s) this node sees)"
            if use == "secure" and group
            else " (a release outside a secure sum needs the full std)"
            if use != "secure"
            else ""
        )
        raise ReleaseRefused(
            f"the request releases value {handle!r} clipped to {clip:g} with noise std "
            f"{noise_std:g}, but its privacy charge assumed clip <= {binding.clip:g} and noise "
            f"std >= {needed:g}{alone}; the node refuses to release with less noise than it "
            "charged"
        )
    if held.noised_once:
        raise ReleaseRefused(
            f"value {handle!r} was released with noise once already; a second noisy sample "
            "would average the noise away without a charge"
        )
    held.noised_once = True


def add_noise(values: Mapping[str, Any], *, clip: float, std: float) -> dict[str, Any]:
    """Clip ``values`` jointly to L2 norm ``clip`` and add N(0, std**2) from OS entropy."""
    parts = [np.asarray(v, dtype=np.float64).ravel() for v in values.values()]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise ReleaseRefused("a noised field holds NaN or infinity; it cannot be released")
    if norm > clip:
        flat = flat * (clip / norm)
    # DP noise must be unknown to the coordinator: fresh OS entropy, never a sent seed.
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    flat = flat + rng.normal(0.0, std, size=flat.shape)
    out: dict[str, Any] = {}
    position = 0
    for name, value in values.items():
        array = np.asarray(value)
        part = flat[position : position + array.size]
        position += array.size
        is_number = not isinstance(value, np.ndarray)  # a JSON number stays a number
        out[name] = float(part[0]) if is_number else part.reshape(array.shape)
    return out


def _fetch(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    handle, fields = payload.get("handle"), payload.get("fields")
    if not isinstance(handle, str) or not isinstance(fields, list):
        raise WireError("shoal.fetch takes {'handle': str, 'fields': [str, ...]}")
    noise = payload.get("noise")
    if noise is None:
        return read_held(ctx, handle, fields, use="clear")
    clip, std = _noise_request(noise)
    values = read_held(ctx, handle, fields, use="clear", clip=clip, noise_std=std)
    held = _held(ctx, handle)
    noised = [f for f in fields if held.policy.kind_of(f).kind == "noised"]
    if held.noise is not None and held.noise.applied_in_full:
        return values
    values.update(add_noise({f: values[f] for f in noised}, clip=clip, std=std))
    ctx.node_state.audit(
        "release.noised", task_id=ctx.task_id, handle=handle, fields=noised, clip=clip, std=std
    )
    return values


def _noise_request(noise: Any) -> tuple[float, float]:
    if not isinstance(noise, Mapping):
        raise WireError("'noise' must be {'clip': number, 'std': number}")
    raw = noise.get("clip"), noise.get("std")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw):
        raise WireError("'noise' must be {'clip': number, 'std': number}")
    clip, std = float(raw[0]), float(raw[1])  # type: ignore[arg-type]
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(std) and std >= 0):
        raise WireError(f"'noise' needs clip > 0 and std >= 0, got {clip}, {std}")
    return clip, std


def _forward(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    handle, fields, role = payload.get("handle"), payload.get("fields"), payload.get("role")
    if (
        not isinstance(handle, str)
        or not isinstance(fields, list)
        or not all(isinstance(f, str) for f in fields)
        or not isinstance(role, str)
    ):
        raise WireError("shoal.forward takes {'handle': str, 'fields': [str, ...], 'role': str}")
    values = read_held(ctx, handle, fields, use="forward", role=role)
    ctx.node_state.audit(
        "release.forward", task_id=ctx.task_id[:200], handle=handle, fields=fields, role=role
    )
    return values
