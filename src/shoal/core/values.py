"""NodeValues: results placed at the nodes, which the server reaches only through aggregates.

A map leaves each node's result at that node; a NodeValues object is the server's handle on
them. Aggregators gather them (plain ones fetch them, secure ones run their own protocol);
``reveal()`` is the one explicit, logged way to read them one by one, for debugging.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.errors import AggregationError, NotEnoughNodes
from shoal.runtime import FETCH_TASK, Failure, FailureKind
from shoal.wire.codec import dtype_str

if TYPE_CHECKING:
    from shoal.core.aggregator import Aggregator
    from shoal.core.federation import Federation, NodeGroup

__all__ = ["FieldSpec", "Gathered", "Layout", "NodeValues", "unflatten"]

log = logging.getLogger("shoal.core")


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """The public shape of a result field: dtype string ("json" for JSON values) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Gathered:
    """What a plain aggregator works on: one row per valid node, plus the nodes excluded.

    ``rows`` has shape (n, d): each node's selected fields flattened and concatenated (floats
    keep their dtype, integers become float64); ``layout`` says how to cut a d-vector back
    into named arrays.
    """

    node_ids: tuple[str, ...]
    rows: np.ndarray
    weights: np.ndarray | None
    layout: tuple[tuple[str, tuple[int, ...], str], ...]
    excluded: Mapping[str, str]

    def unflatten(self, vector: np.ndarray) -> dict[str, Any]:
        return unflatten(vector, self.layout)


Layout = tuple[tuple[str, tuple[int, ...], str], ...]


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, Any]:
    """Cut an aggregated vector back into named fields (floats keep their dtype)."""
    out: dict[str, Any] = {}
    position = 0
    for name, shape, dtype in layout:
        if dtype == "json":
            out[name] = float(vector[position])
            position += 1
            continue
        size = int(np.prod(shape, dtype=np.int64))
        part = vector[position : position + size].reshape(shape)
        out[name] = part.astype(dtype) if np.dtype(dtype).kind in "fc" else part
        position += size
    return out


class NodeValues:
    """Per-node results held at the nodes (not readable by the server).

    Index with a field name (``out["delta"]``) or select several fields to treat them as
    one vector (``out.select("w", "b")``: clipping and robust rules then see the whole update).
    """

    def __init__(
        self,
        *,
        federation: Federation,
        handle: str,
        node_ids: Sequence[str],
        specs: Mapping[str, Mapping[str, FieldSpec]],
        failures: Mapping[str, Failure],
        fields: tuple[str, ...] | None = None,
        exclusions: dict[str, str] | None = None,
        sent: Mapping[str, Mapping[str, Any]] | None = None,
        elapsed: Mapping[str, float] | None = None,
        request: str | None = None,
    ) -> None:
        self.federation = federation
        # The digest of the request every holder's value came from (runtime/request.py): a
        # secure sum states it, and each node checks its own value's before masking.
        self.request = request
        self.handle = handle
        self._node_ids = tuple(node_ids)
        self._specs = specs
        self._failures = dict(failures)
        self._fields = fields
        # Shared by every selection of one map, so the round can report all exclusions.
        self._exclusions: dict[str, str] = {} if exclusions is None else exclusions
        # Fields the map asked nodes to send along (map(send=...)): they need no fetch.
        self._sent: Mapping[str, Mapping[str, Any]] = sent or {}
        self._names: tuple[str, ...] | None = None  # field_names, once collected
        self._elapsed: Mapping[str, float] = elapsed or {}

    def __repr__(self) -> str:
        what = ", ".join(self._fields) if self._fields else "all fields"
        return f"<NodeValues {what} at {len(self)} nodes ({len(self._failures)} failed)>"

    def __len__(self) -> int:
        return len(self._node_ids)

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Nodes holding a value (which nodes answered is not private; their values are)."""
        return self._node_ids

    @property
    def elapsed_s(self) -> Mapping[str, float]:
        """Each holder's time for the map's task, as its engine reports it (on a simulated
        engine: virtual seconds, download and upload included). Public, like who answered."""
        return self._elapsed

    @property
    def failures(self) -> Mapping[str, Failure]:
        return self._failures

    @property
    def exclusions(self) -> Mapping[str, str]:
        """Nodes whose value an aggregate of this map rejected, with the reason."""
        return self._exclusions

    def record_exclusions(self, reasons: Mapping[str, str]) -> None:
        """Note nodes an aggregator left out (invalid values, dropped out of a protocol)."""
        for node, reason in reasons.items():
            if node not in self._failures:
                self._exclusions[node] = reason

    @property
    def field_names(self) -> tuple[str, ...]:
        if self._fields is not None:
            return self._fields
        # Specs are fixed once the map returns; every selection (out["n"], out.select(...))
        # asks for the names, and collecting them walks every node's receipt.
        cached = self._names
        if cached is None:
            names: dict[str, None] = {}
            for spec in self._specs.values():
                names.update(dict.fromkeys(spec))
            cached = self._names = tuple(names)
        return cached

    def __getitem__(self, field: str) -> NodeValues:
        return self.select(field)

    def select(self, *fields: str) -> NodeValues:
        if not fields:
            raise AggregationError("select at least one field")
        known = set(self.field_names)
        unknown = [f for f in fields if f not in known]
        if unknown:
            raise AggregationError(
                f"no field(s) {unknown} in these values; the task returned {sorted(known)}"
            )
        return NodeValues(
            federation=self.federation,
            handle=self.handle,
            node_ids=self._node_ids,
            specs=self._specs,
            failures=self._failures,
            fields=tuple(fields),
            exclusions=self._exclusions,
            sent=self._sent,
            request=self.request,
        )

    def spec(self, node_id: str, field: str) -> FieldSpec:
        return self._specs[node_id][field]

    def without(self, node_ids: Sequence[str], kind: FailureKind, reason: str) -> NodeValues:
        """The same values with ``node_ids`` moved to the failures (excluded from aggregates)."""
        drop = set(node_ids)
        failures = dict(self._failures)
        for node_id in drop & set(self._node_ids):
            failures[node_id] = Failure(node_id=node_id, task_id="", kind=kind, detail=reason)
        return NodeValues(
            federation=self.federation,
            handle=self.handle,
            node_ids=[n for n in self._node_ids if n not in drop],
            specs=self._specs,
            failures=failures,
            fields=self._fields,
            exclusions=self._exclusions,
            sent=self._sent,
            request=self.request,
        )

    def to(
        self,
        group: NodeGroup,
        *,
        task: str,
        min_nodes: int | None = None,
        deadline_s: float | None = None,
        send: Sequence[str] = (),
        **values: Any,
    ) -> NodeValues:
        """Move these (sealed) fields from their holders to ``task`` at ``group``'s nodes.

        Holders release only fields whose policy is ``sealed`` for the group's role; the
        coordinator relays the bytes and audits the move. The task reads them with
        :func:`shoal.core.routing.received`; its results stay at the destination.
        """
        from shoal.core.routing import route  # local import: routing imports this module

        return route(
            self,
            group,
            task=task,
            min_nodes=min_nodes,
            deadline_s=deadline_s,
            send=send,
            **values,
        )

    def discard(self) -> None:
        """Let the holders forget this map's values: the code is done with them (see
        :meth:`Federation.discard`; a no-op on engines whose nodes keep their own)."""
        self.federation.discard({node: [self.handle] for node in self._node_ids})

    # -- aggregates ---------------------------------------------------------------------

    def aggregate(self, aggregator: Aggregator, *, weights: NodeValues | None = None) -> Any:
        return aggregator.aggregate(self, weights=weights)

    def sum(self, *, secure: Aggregator | None = None) -> Any:
        """The sum; ``secure=SecureSum(...)`` computes it without the server seeing any value."""
        if secure is not None:
            return secure.aggregate(self)
        from shoal.core.reduce import plain_sum  # local import: reduce imports this module

        return plain_sum(self)

    def mean(self, *, weights: NodeValues | None = None) -> Any:
        from shoal.core.reduce import plain_mean

        return plain_mean(self, weights=weights)

    # -- reading values ------------------------------------------------------------------

    def reveal(self) -> dict[str, Any]:
        """Every node's value, one by one. For debugging only: logged and audited."""
        fields = list(self.field_names)
        log.warning(
            "reveal(): the server reads %d nodes' individual values of %s", len(self), fields
        )
        self.federation.audit("reveal", handle=self.handle, fields=fields, nodes=len(self))
        fetched = self._fetch(fields)
        if self._fields is not None and len(self._fields) == 1:
            return {node: payload[fields[0]] for node, payload in fetched.items()}
        return fetched

    def gather(
        self, *, weights: NodeValues | None = None, min_nodes: int | None = None
    ) -> Gathered:
        """Fetch and validate values for a plain aggregate (meant for Aggregator authors).

        Nodes whose value has a different shape or dtype kind than the majority, holds NaN or
        infinity, or whose weight is not a finite non-negative number are excluded with the
        reason recorded; fewer than ``min_nodes`` valid values raise NotEnoughNodes.
        """
        fields = list(self.field_names)
        if self._fields is None:  # a whole result: aggregate its arrays, not its JSON fields
            fields = [f for f in fields if not self._is_json_everywhere(f)] or fields
        weight_field: str | None = None
        if weights is not None:
            if weights.handle != self.handle or weights.federation is not self.federation:
                raise AggregationError("weights must come from the same map as the values")
            if len(weights.field_names) != 1:
                raise AggregationError("weights must be a single field, e.g. out['n']")
            weight_field = weights.field_names[0]
        wanted = fields + ([weight_field] if weight_field and weight_field not in fields else [])
        holders = set(self._node_ids)
        fetched = self._fetch(wanted)
        excluded: dict[str, str] = {
            node: f"{failure.kind.value}: {failure.detail}"
            for node, failure in self._failures.items()
            if node in holders and node not in fetched
        }
        needed = self.federation.min_nodes if min_nodes is None else min_nodes
        if len(fetched) < max(needed, 1):
            # Report the failed fetches, not a misleading complaint about the values' types.
            raise NotEnoughNodes(
                f"only {len(fetched)} node(s) gave a value, fewer than the minimum of "
                f"{needed}; excluded: {_summarize(excluded)}"
            )
        layout = self._majority_layout(fetched, fields)
        matrix, problems = _matrix(list(fetched.values()), layout)
        kept: list[int] = []
        kept_ids: list[str] = []
        weight_values: list[float] = []
        for i, (node, payload) in enumerate(fetched.items()):
            problem = problems.get(i)
            weight = 1.0
            if problem is None and weight_field is not None:
                problem, weight = _weight(payload[weight_field])
            if problem is not None:
                excluded[node] = problem
                self._exclusions[node] = problem
                log.warning("excluding node %s from the aggregate: %s", node, problem)
                continue
            kept.append(i)
            kept_ids.append(node)
            weight_values.append(weight)
        if len(kept) < max(needed, 1):
            raise NotEnoughNodes(
                f"only {len(kept)} node(s) gave a valid value, fewer than the minimum of "
                f"{needed}; excluded: {_summarize(excluded)}"
            )
        if weight_field is not None and sum(weight_values) <= 0:
            raise AggregationError("the weights of the valid nodes sum to zero")
        stacked = matrix if len(kept) == len(matrix) else matrix[kept]
        return Gathered(
            node_ids=tuple(kept_ids),
            rows=stacked,
            weights=np.asarray(weight_values) if weight_field is not None else None,
            layout=layout,
            excluded=excluded,
        )

    def _is_json_everywhere(self, field: str) -> bool:
        return all(
            field not in spec or spec[field].dtype == "json" for spec in self._specs.values()
        )

    def _majority_layout(
        self, fetched: Mapping[str, Mapping[str, Any]], fields: list[str]
    ) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        votes: Counter[tuple[tuple[str, tuple[int, ...], str], ...]] = Counter()
        for payload in fetched.values():
            signature = []
            for field in fields:
                value = payload.get(field)
                # Complex arrays are refused: a real-valued row would drop the imaginary part.
                if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                    signature.append((field, value.shape, dtype_str(value.dtype)))
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    signature.append((field, (), "json"))
                else:
                    break
            else:
                votes[tuple(signature)] += 1
        if not votes:
            raise AggregationError(
                f"no node returned numeric values for {fields}; aggregates need real-valued "
                "arrays (bool, int, float) or numbers"
            )
        return votes.most_common(1)[0][0]

    def _fetch(self, fields: list[str]) -> dict[str, dict[str, Any]]:
        if not self._node_ids:
            return {}
        have: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        for node in self._node_ids:
            sent = self._sent.get(node)
            if sent is None:
                missing.append(node)
                continue
            try:  # one pass per node: a field it did not send makes it fetch them all
                have[node] = {f: sent[f] for f in fields}
            except KeyError:
                missing.append(node)
        if not missing:
            return have
        replies, failures = self.federation._dispatch(
            missing, FETCH_TASK, common={"handle": self.handle, "fields": fields}
        )
        if failures:
            self._failures.update(failures)
            self._node_ids = tuple(n for n in self._node_ids if n not in failures)
        have.update(replies)
        return {node: have[node] for node in self._node_ids if node in have}


def _matrix(
    payloads: Sequence[Mapping[str, Any]], layout: Layout
) -> tuple[np.ndarray, dict[int, str]]:
    """One row per payload: its layout fields flattened side by side (floats keep their
    precision, integers and booleans become float64), and what is wrong with each payload
    that does not fit the layout. Rows are written into one matrix and checked for NaN and
    infinity all at once: a concatenation and a check per node dominated large rounds."""
    offsets, position = [], 0
    for _, shape, _ in layout:
        size = 1
        for d in shape:
            size *= d
        offsets.append((position, position + size))
        position += size
    kinds = [None if dtype == "json" else np.dtype(dtype).kind for _, _, dtype in layout]
    problems: dict[int, str] = {}
    seen: set[np.dtype[Any]] = set()
    for i, payload in enumerate(payloads):
        for (name, shape, wanted), kind in zip(layout, kinds):
            value = payload.get(name)
            problem = None
            if kind is None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problem = f"field {name!r} is not a number"
            elif not isinstance(value, np.ndarray):
                problem = f"field {name!r} is not an array"
            elif value.shape != shape:
                problem = f"field {name!r} has shape {value.shape}, expected {shape}"
            elif value.dtype.kind != kind:
                problem = f"field {name!r} has dtype {value.dtype}, expected {np.dtype(wanted)}"
            else:
                seen.add(value.dtype)
            if problem is not None:
                problems[i] = problem
                break
    json_fields = any(kind is None for kind in kinds)
    dtype = np.dtype(np.float64)
    if seen:
        dtype = np.result_type(*seen, *([dtype] if json_fields else []))
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    n = len(payloads)
    matrix = np.zeros((n, position), dtype=dtype)
    # Each field's columns seen as an (n, *shape) view: a node's value is then written with
    # one integer index, as it is (a slice and a reshape per node cost three times more).
    blocks = []
    for (_, shape, _), kind, (a, b) in zip(layout, kinds, offsets):
        block = matrix[:, a] if kind is None else matrix[:, a:b].reshape((n, *shape))
        if block.size and not np.may_share_memory(block, matrix):  # a guard: C order views
            raise AssertionError("a field's columns could not be viewed in place")
        blocks.append(block)
    names = [name for name, _, _ in layout]
    for i, payload in enumerate(payloads):
        if i in problems:
            continue
        for name, block in zip(names, blocks):
            try:
                block[i] = payload[name]
            except OverflowError:  # an integer beyond float64 range, from a faulty or hostile node
                problems[i] = f"field {name!r} is a number too large for float64"
                break
    if len(payloads):
        finite = np.isfinite(matrix).all(axis=1)
        for i in np.flatnonzero(~finite).tolist():
            if i in problems:
                continue
            for (name, _, _), (a, b) in zip(layout, offsets):
                if not np.isfinite(matrix[i, a:b]).all():
                    problems[i] = f"field {name!r} holds NaN or infinity"
                    break
    return matrix, problems


def _weight(value: Any) -> tuple[str | None, float]:
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "weight is not a number", 0.0
    try:
        value = float(value)
    except OverflowError:
        return "weight is a number too large for float64", 0.0
    if not math.isfinite(value) or value < 0:
        return f"weight {value!r} is not a finite non-negative number", 0.0
    return None, float(value)


def _summarize(excluded: Mapping[str, str], limit: int = 5) -> str:
    if not excluded:
        return "none"
    items = [f"{node} ({why})" for node, why in list(excluded.items())[:limit]]
    more = len(excluded) - limit
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")
