"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous federated learning with a buffer.

Up to ``concurrency`` nodes train at once, each on the model version it downloaded. The
server takes their updates in order of arrival and, every ``nodes_per_round`` (K) arrivals,
steps with the mean of the buffer, each update weighted by its staleness t (versions since
its download) as (1 + t)^-a, and updates more than ``max_staleness`` versions old left out.
The buffer goes through the job's aggregate: a plain or clipped mean, a SecAgg+ secure sum
over the K nodes, or DP-FedBuff's clipped and noised sum. One ``round`` is one server step.

Time is the engine's: on a simulated engine with a virtual clock (LocalEngine), arrivals are
the start time plus each node's virtual task time (download, compute at its speed, upload),
and availability is checked at each start. On an engine without one, arrivals are ordered
by the times the nodes report, within each wave of starts.
"""

from __future__ import annotations

import heapq
import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from shoal.aggregate import compresses
from shoal.core import Aggregator, Broadcast, Federation, NodeGroup
from shoal.errors import ConfigError, NotEnoughNodes
from shoal.learn.algorithms import ALGORITHMS, Algorithm, RoundResult, ServerState
from shoal.learn.tasks import (
    MAX_STALENESS,
    TRAIN,
    UPLOAD,
    buffered_rule,
    encode_weights,
    staleness_weight,
    unprefixed,
)
from shoal.privacy.plans import NodeDP, NoPrivacy
from shoal.wire import decode

__all__ = ["FedBuff", "staleness_weight"]


@dataclass
class _Flight:
    """The server's view of the nodes training right now (not checkpointed: a resumed run
    starts a fresh wave at its last virtual time)."""

    now: float
    rng: np.random.Generator
    arrivals: list[tuple[float, int, str, int]] = field(default_factory=list)
    receipts: dict[str, str] = field(default_factory=dict)  # node -> its train map's handle
    busy: set[str] = field(default_factory=set)
    sequence: int = 0
    broadcast: tuple[int, Broadcast] | None = None
    rule: str | None = None  # buffered_rule of the training requests (every version's)
    losses: list[tuple[float, int]] = field(default_factory=list)  # (mean, nodes) per wave


# One flight per (federation, algorithm); dropped with the federation.
_FLIGHTS: weakref.WeakKeyDictionary[Federation, dict[int, _Flight]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True)
class FedBuff(Algorithm):
    """Buffered asynchronous FL; ``nodes_per_round`` is the buffer size K."""

    name: ClassVar[str] = "fedbuff"
    concurrency: int | None = None  # nodes training at once; default 2 * K
    max_staleness: int = 10
    staleness_exponent: float = 0.5
    # Virtual seconds to wait when no node is training and none is online to start.
    idle_s: float = 60.0
    max_idle_waits: int = 10_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"fedbuff: concurrency must be at least 1, got {self.concurrency}")
        if not 0 <= self.max_staleness <= MAX_STALENESS:
            raise ConfigError(f"fedbuff: max_staleness must be in [0, {MAX_STALENESS}]")
        if not 0.0 <= self.staleness_exponent <= 1.0:
            raise ConfigError("fedbuff: staleness_exponent must be in [0, 1]")
        if not (self.idle_s > 0 and math.isfinite(self.idle_s)) or self.max_idle_waits < 1:
            raise ConfigError("fedbuff: idle_s must be positive and max_idle_waits >= 1")
        if isinstance(self.plan, NodeDP):
            self.plan.buffered_request()  # refuses adaptive clipping now, not mid-run
        elif not isinstance(self.plan, NoPrivacy):
            raise ConfigError(
                "fedbuff takes node-level DP (DP-FedBuff: [privacy] level = 'node') or no "
                "DP; example-level DP-SGD plans are accounted per synchronous round"
            )

    @property
    def slots(self) -> int:
        return self.concurrency or 2 * self.nodes_per_round

    def _buffer_aggregator(self) -> Aggregator:
        plan = self.plan
        if isinstance(plan, NodeDP):  # Clip | (Distributed)Noise | (Secure)Sum | MeanOver(K)
            return plan.aggregator(expected=float(self.nodes_per_round))
        assert isinstance(plan, NoPrivacy)
        return plan.aggregator

    def _flight(self, fed: Federation, state: ServerState, seed: int | None) -> _Flight:
        flights = _FLIGHTS.setdefault(fed, {})
        flight = flights.get(id(self))
        if flight is None:
            start = float(state.meta.get("virtual_s", 0.0))
            flight = _Flight(now=start, rng=np.random.default_rng([seed or 0, state.round]))
            flights[id(self)] = flight
        return flight

    def round(self, fed: Federation, state: ServerState, *, seed: int | None = None) -> RoundResult:
        flight = self._flight(fed, state, seed)
        failures: dict[str, str] = {}
        idle = 0
        while True:
            buffer: list[str] = []
            while len(buffer) < self.nodes_per_round:
                self._start(fed, state, flight, failures, seed)
                if not flight.arrivals:
                    idle += 1
                    if idle > self.max_idle_waits:
                        raise NotEnoughNodes(
                            f"fedbuff: no node online to train after {self.max_idle_waits} "
                            f"waits of {self.idle_s:g} virtual s"
                        )
                    flight.now += self.idle_s
                    continue
                arrival, _, node, version = heapq.heappop(flight.arrivals)
                flight.now = max(flight.now, arrival)
                staleness = state.round - version
                if staleness > self.max_staleness:
                    flight.busy.discard(node)
                    failures[node] = (
                        f"stale: trained on version {version}, {staleness} behind "
                        f"(max_staleness {self.max_staleness})"
                    )
                    continue
                # A buffered node stays busy until its upload: it adds at most one update
                # to a buffer, and a new start would replace its pending one.
                buffer.append(node)
            try:
                return self._step(fed, state, flight, buffer, failures)
            except NotEnoughNodes as exc:  # the whole buffer dropped out: collect another
                for node in buffer:
                    failures.setdefault(node, f"dropped: {exc}")
            finally:
                flight.busy.difference_update(buffer)

    def _start(
        self,
        fed: Federation,
        state: ServerState,
        flight: _Flight,
        failures: dict[str, str],
        seed: int | None,
    ) -> None:
        """Fill free training slots with online nodes, on the current model version."""
        free = self.slots - len(flight.busy)
        if free <= 0:
            return
        _set_clock(fed, flight.now)
        candidates = [n for n in fed.node_ids if n not in flight.busy]
        if not candidates:
            return
        picked = flight.rng.choice(len(candidates), size=min(free, len(candidates)), replace=False)
        group = NodeGroup(fed, [candidates[i] for i in sorted(picked)])
        track = self._tracks_loss()
        out = group.map(
            TRAIN,
            self._broadcast(group, state, flight, seed),
            min_nodes=0,
            send=["loss", "n"] if track else (),
        )
        if track and len(out):
            # Only an aggregate over the wave: the server never reads one node's loss.
            wave = float(out["loss"].mean(weights=out["n"]))
            flight.losses.append((wave, len(out)))
        for node in out.node_ids:
            flight.sequence += 1
            arrival = flight.now + float(out.elapsed_s.get(node, 0.0))
            heapq.heappush(flight.arrivals, (arrival, flight.sequence, node, state.round))
            flight.busy.add(node)
            flight.receipts[node] = out.handle
        for node, failure in out.failures.items():
            failures[node] = f"{failure.kind.value}: {failure.detail}"

    def _tracks_loss(self) -> bool:
        return self.track_loss and isinstance(self.plan, NoPrivacy) and not self.plan.private

    def _broadcast(
        self, group: NodeGroup, state: ServerState, flight: _Flight, seed: int | None
    ) -> Broadcast:
        if flight.broadcast is not None and flight.broadcast[0] == state.round:
            return flight.broadcast[1]  # one encoding per model version
        extra: dict[str, Any] = {}
        if isinstance(self.plan, NodeDP):
            extra["dp"] = self.plan.buffered_request().to_json()
        broadcast = group.broadcast(
            **encode_weights(state.weights, self.downlink_bits),
            epochs=self.local_epochs,
            lr=self.lr_at(state.round + 1),
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            seed=None if seed is None else seed * 1_000_003 + state.round,
            keep_optimizer_state=self.keep_optimizer_state,
            **({"track_loss": True} if self._tracks_loss() else {}),
            buffered={
                "version": state.round,
                "max_staleness": self.max_staleness,
                "exponent": self.staleness_exponent,
            },
            **extra,
        )
        flight.broadcast = (state.round, broadcast)
        if flight.rule is None:  # the same for every version: computed once per run
            flight.rule = buffered_rule(decode(broadcast.encoded))
        return broadcast

    def _step(
        self,
        fed: Federation,
        state: ServerState,
        flight: _Flight,
        buffer: list[str],
        failures: dict[str, str],
    ) -> RoundResult:
        """Upload the buffer (each node weights its own update) and step the server."""
        _set_clock(fed, flight.now)
        fields = self.released(state)
        aggregator = self._buffer_aggregator()
        # Updates in the clear travel with the receipts, unless the aggregate has the nodes
        # compress them first (then it fetches them itself).
        clear = (
            isinstance(self.plan, NoPrivacy)
            and not self.plan.private
            and not compresses(aggregator)
        )
        out = NodeGroup(fed, buffer).map(
            UPLOAD, version=state.round, send=fields if clear else (), min_nodes=1
        )
        # Each upload is the value its node's training produced: a secure sum of the buffer
        # fixes the training requests' rule, which every node checks before masking.
        out.request = flight.rule
        aggregated = out.select(*fields).aggregate(aggregator)
        if not isinstance(aggregated, dict):  # a single-array model comes back unnamed
            aggregated = {fields[0]: aggregated}
        clock = getattr(fed.engine, "clock", None)
        if clock is not None:  # the upload (and a secure sum's rounds) took virtual time
            flight.now = max(flight.now, float(clock.now))
        # Each node forgets its train receipt and its upload (in simulation, where the
        # coordinator's process holds every node's kept values).
        fed.discard(
            {n: [flight.receipts.pop(n, ""), out.handle] for n in buffer if n in out.node_ids}
        )
        participants = tuple(n for n in out.node_ids if n not in out.exclusions)
        for node, failure in out.failures.items():
            failures[node] = f"{failure.kind.value}: {failure.detail}"
        for node, reason in out.exclusions.items():
            failures.setdefault(node, f"excluded: {reason}")
        share = len(participants) / max(len(fed.node_ids), 1)
        new_state = self.server_update(state, {"d": unprefixed("d", aggregated)}, share=share)
        meta = dict(state.meta)
        if isinstance(self.plan, NodeDP):
            meta = self.plan.account_buffered(
                meta, contributors=participants, steps=new_state.round
            )
        meta["virtual_s"] = flight.now
        # The training loss of the nodes started since the last step (their waves' means).
        waves, flight.losses = flight.losses, []
        count = sum(n for _, n in waves)
        loss = sum(mean * n for mean, n in waves) / count if count else math.nan
        return RoundResult(
            state=replace(new_state, meta=meta),
            train_loss=loss,
            participants=participants,
            failures=failures,
            epsilon=meta.get("epsilon"),
            delta=self.plan.delta,
        )


def _set_clock(fed: Federation, t: float) -> None:
    clock = getattr(fed.engine, "clock", None)
    if clock is not None:
        clock.set(t)


ALGORITHMS[FedBuff.name] = FedBuff  # job files name it like the synchronous algorithms
