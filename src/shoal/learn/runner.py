"""Drive an algorithm for its rounds on any Federation: evaluate, record, checkpoint, resume.

The same Trainer runs a simulation (LocalEngine) and a deployment (GrpcEngine); every round
is recorded in the Store with its checkpoint in one transaction, so a run interrupted at any
point resumes from its last completed round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from shoal.core import Federation
from shoal.errors import ConfigError, StoreError
from shoal.learn.algorithms import Algorithm, ServerState
from shoal.learn.model import Model, Weights
from shoal.learn.tasks import EVALUATE, prefixed
from shoal.runtime.store import Store

__all__ = ["RoundReport", "Trainer", "TrainingResult"]

_STATUS = {"rejected": "error", "invalid": "error"}
# Metrics some models' evaluate() adds (language models: perplexity), kept in RoundReport.extra.
_EXTRA_METRICS = ("perplexity",)
# Bytes on the wire in the round's training (payloads to and from the nodes; the most any one
# node uploaded is what a slow uplink waits for), recorded with the round's metrics.
_WIRE_METRICS = ("downlink_bytes", "uplink_bytes", "uplink_bytes_max_node", "virtual_s")


@dataclass(frozen=True, kw_only=True)
class RoundReport:
    round: int
    train_loss: float
    participants: int
    failed: int
    wall_s: float
    accuracy: float | None = None
    loss: float | None = None
    federated_accuracy: float | None = None
    federated_loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # node -> why it failed this round (for display; the store keeps its own record)
    failures: Mapping[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        # The fields are numbers: read them as they are (asdict deep-copied every field,
        # the failures' mapping included, twice a round).
        out = {name: value for name in _REPORT_FIELDS if (value := getattr(self, name)) is not None}
        out.update(self.extra)
        return out


_REPORT_FIELDS = tuple(f.name for f in fields(RoundReport) if f.name not in ("extra", "failures"))


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    metrics: dict[str, Any]
    history: list[RoundReport]
    weights: Weights
    state: ServerState
    run_id: str | None


class Trainer:
    """Runs ``algorithm`` on ``federation`` and evaluates ``model`` on the server's test set."""

    def __init__(
        self,
        *,
        federation: Federation,
        algorithm: Algorithm,
        model: Model,
        test: Any | None = None,
        store: Store | None = None,
        run_name: str = "run",
        config: Mapping[str, Any] | None = None,
        federated_eval_every: int = 0,
        eval_every: int = 1,
        seed: int = 0,
        on_round: Callable[[RoundReport], None] | None = None,
        on_start: Callable[[str | None], None] | None = None,
    ) -> None:
        if eval_every < 1:
            raise ConfigError(f"eval_every must be at least 1 (every round), got {eval_every}")
        self.federation = federation
        self.algorithm = algorithm
        self.model = model
        self.test = test
        self.store = store
        self.run_name = run_name
        self.config = dict(config or {})
        self.federated_eval_every = federated_eval_every
        # The server evaluates its test set every eval_every rounds and after the last round
        # (a text test split of 205k windows costs more than a round's training).
        self.eval_every = eval_every
        self.seed = seed
        self.on_round = on_round
        self.on_start = on_start  # called with the run id once the run is recorded
        self._evaluator = model.clone()

    def evaluate(self, weights: Weights) -> dict[str, float]:
        if self.test is None:
            return {}
        self._evaluator.set_weights(weights)
        return self._evaluator.evaluate(self.test)

    def federated_evaluate(self, state: ServerState) -> tuple[dict[str, float], ServerState]:
        """Metrics on the nodes' own held-out data, through the privacy plan's aggregate.

        Without privacy the nodes' metrics are averaged in the clear, weighted by their
        example counts; under a secure aggregate they are summed securely; under DP they
        are noised and their cost is added to the run's epsilon (returned in the state).
        """
        plan = self.algorithm.plan
        evaluation = plan.evaluation(self.federation)
        group = self.federation.all()
        weights = prefixed("w", state.weights)
        if evaluation.aggregator is None:
            out = group.map(EVALUATE, group.broadcast(**weights), send=["accuracy", "loss", "n"])
            metrics = {
                "federated_accuracy": float(out["accuracy"].mean(weights=out["n"])),
                "federated_loss": float(out["loss"].mean(weights=out["n"])),
            }
            return metrics, state
        request = group.broadcast(**weights, private=True, noise_std=evaluation.node_noise_std)
        out = group.map(EVALUATE, request)
        metrics = evaluation.decode(out["metrics"].aggregate(evaluation.aggregator))
        meta = plan.account_evaluation(state.meta)
        return metrics, replace(state, meta=meta)

    def _start(self, resume: str | None) -> tuple[ServerState, str | None]:
        if resume is None:
            state = self.algorithm.init(self.model.get_weights())
            run_id = None
            if self.store is not None:
                run_id = self.store.create_run(name=self.run_name, config=self.config)
            return state, run_id
        if self.store is None:
            raise StoreError("resuming a run needs a store")
        self.store.mark_interrupted(resume)
        self.store.resume_run(resume)
        try:
            checkpoint = self.store.load_checkpoint(resume)
        except StoreError:  # interrupted before its first round: start it afresh
            return self.algorithm.init(self.model.get_weights()), resume
        state = ServerState.from_arrays(checkpoint.round, checkpoint.arrays, checkpoint.state)
        return state, resume

    def run(self, *, resume: str | None = None) -> TrainingResult:
        state, run_id = self._start(resume)
        if run_id is not None and self.store is not None:  # one audit trail: the Store's
            self.federation.trail = self.store.audit_trail(run_id)
        history: list[RoundReport] = []
        if run_id is not None and self.store is not None and resume is not None:
            history = [_report_from(r.metrics, r.round) for r in self.store.round_metrics(run_id)]
        try:
            if self.on_start is not None:
                self.on_start(run_id)
            while state.round < self.algorithm.rounds:
                report, state = self._round(state, run_id)
                history.append(report)
        except BaseException as exc:
            if self.store is not None and run_id is not None:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                self.store.finish_run(run_id, status=status, summary={"error": str(exc)})
            raise
        final = history[-1].metrics() if history else {}
        if self.store is not None and run_id is not None:
            self.store.finish_run(run_id, status="finished", summary=final)
        return TrainingResult(
            metrics=final, history=history, weights=state.weights, state=state, run_id=run_id
        )

    def _round(self, state: ServerState, run_id: str | None) -> tuple[RoundReport, ServerState]:
        started = time.time()
        t0 = time.perf_counter()
        traffic = getattr(self.federation, "traffic", None)
        before = traffic.snapshot() if traffic is not None else None
        result = self.algorithm.round(
            self.federation, state, seed=self.seed * 1_000_003 + state.round
        )
        wire: dict[str, float] = {}
        if traffic is not None and before is not None:
            down0, up0, _, up_nodes0 = before
            down1, up1, _, up_nodes1 = traffic.snapshot()
            busiest = max((v - up_nodes0.get(k, 0) for k, v in up_nodes1.items()), default=0)
            wire = {
                "downlink_bytes": float(down1 - down0),
                "uplink_bytes": float(up1 - up0),
                "uplink_bytes_max_node": float(busiest),
            }
        engine = getattr(self.federation, "engine", None)
        if getattr(engine, "devices", None) is not None:  # simulated links and device speeds
            wire["virtual_s"] = float(engine.clock.now)  # type: ignore[union-attr]
        new_state = result.state
        due = new_state.round % self.eval_every == 0 or new_state.round >= self.algorithm.rounds
        evaluation = self.evaluate(new_state.weights) if due else {}
        epsilon = result.epsilon
        if self.federated_eval_every and new_state.round % self.federated_eval_every == 0:
            federated, new_state = self.federated_evaluate(new_state)
            evaluation.update(federated)
            epsilon = new_state.meta.get("epsilon", epsilon)
        report = RoundReport(
            round=new_state.round,
            train_loss=result.train_loss,
            participants=len(result.participants),
            failed=len(result.failures),
            wall_s=time.perf_counter() - t0,
            accuracy=evaluation.get("accuracy"),
            loss=evaluation.get("loss"),
            federated_accuracy=evaluation.get("federated_accuracy"),
            federated_loss=evaluation.get("federated_loss"),
            epsilon=epsilon,
            delta=result.delta,
            extra={**{k: float(evaluation[k]) for k in _EXTRA_METRICS if k in evaluation}, **wire},
            failures=dict(result.failures),
        )
        if self.store is not None and run_id is not None:
            participants = dict.fromkeys(result.participants, "ok")
            details = {}
            for node, reason in result.failures.items():
                kind = reason.split(":", 1)[0]
                participants[node] = _STATUS.get(kind, kind)
                details[node] = reason
            self.store.record_round(
                run_id,
                new_state.round,
                metrics=report.metrics(),
                participants=participants,
                details=details,
                checkpoint=new_state.to_arrays(),
                state=dict(new_state.meta),
                started_at=started,
            )
        if self.on_round is not None:
            self.on_round(report)
        return report, new_state


def _report_from(metrics: Mapping[str, Any], round_num: int) -> RoundReport:
    known = {k: metrics[k] for k in RoundReport.__dataclass_fields__ if k in metrics}
    known.setdefault("train_loss", float("nan"))
    known.setdefault("participants", 0)
    known.setdefault("failed", 0)
    known.setdefault("wall_s", 0.0)
    known["round"] = round_num
    extra = {k: metrics[k] for k in (*_EXTRA_METRICS, *_WIRE_METRICS) if k in metrics}
    return RoundReport(**known, extra=extra)
