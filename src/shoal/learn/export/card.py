"""The model card of a hub export: README.md with YAML metadata recording how it was trained.

The metadata is written as JSON values under YAML keys (JSON scalars and flow collections
are YAML 1.2), so no YAML library is needed to write it and any YAML parser reads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

__all__ = ["TrainingRecord", "card_metadata", "render_card"]

_SECURE_PROTOCOL = "SecAgg+ (Bell et al. 2020): pairwise masks, Shamir-shared seeds"


@dataclass(frozen=True, kw_only=True)
class TrainingRecord:
    """What a run recorded: its job's sections (with defaults filled in) and its metrics."""

    run_id: str
    name: str
    status: str
    data: Mapping[str, Any]
    partition: Mapping[str, Any]
    model: Mapping[str, Any]
    algorithm: Mapping[str, Any]
    aggregate: Mapping[str, Any]
    privacy: Mapping[str, Any] | None
    rounds_completed: int
    final: Mapping[str, Any] = field(default_factory=dict)  # the last round's metrics
    history: Sequence[Mapping[str, Any]] = ()
    transfer: Mapping[str, Any] | None = None  # [transfer]: where the weights started


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def card_metadata(record: TrainingRecord) -> dict[str, Any]:
    """The card's YAML metadata as a dict (the hub reads ``library_name``, ``tags``, ...)."""
    data = record.data
    # A file's name, not its path: the card is published, the folder layout is not.
    path = PurePath(str(data["path"])).name if data.get("path") else None
    source = " ".join(str(v) for v in (data.get("dataset"), path and f"({path})") if v)
    privacy = record.privacy or {}
    dp = privacy.get("epsilon") is not None or privacy.get("noise_multiplier") is not None
    spent = record.final.get("epsilon")
    metrics = {
        k: _finite(v)
        for k, v in record.final.items()
        if k in ("accuracy", "loss", "perplexity", "federated_accuracy", "federated_loss")
    }
    return {
        "library_name": "shoal",
        "tags": ["federated-learning", "shoal", *(["differential-privacy"] if dp else [])],
        "federated_training": {
            "run_id": record.run_id,
            "status": record.status,
            "data": {
                "source": source or "unknown",
                "test_fraction": data.get("test_fraction"),
                **{k: data[k] for k in ("tokens", "seq_len", "min_lines") if data.get(k)},
                "partition": dict(record.partition),
            },
            "nodes": record.partition.get("nodes"),
            "nodes_per_round": record.algorithm.get("nodes_per_round"),
            "rounds": record.rounds_completed,
            "rounds_planned": record.algorithm.get("rounds"),
            "algorithm": dict(record.algorithm),
            "aggregator": {
                "rule": record.aggregate.get("rule", "mean"),
                "clip": record.aggregate.get("clip"),
                "norm_bound": record.aggregate.get("norm_bound"),
            },
            "secure_aggregation": {
                "enabled": bool(record.aggregate.get("secure")),
                "protocol": _SECURE_PROTOCOL if record.aggregate.get("secure") else None,
                "clip": record.aggregate.get("clip") if record.aggregate.get("secure") else None,
            },
            "differential_privacy": {
                "enabled": dp,
                "level": privacy.get("level") if dp else None,
                "mode": privacy.get("mode") if dp else None,
                "epsilon_target": privacy.get("epsilon") if dp else None,
                "epsilon_spent": _finite(spent) if dp else None,
                "delta": privacy.get("delta") if dp else None,
                "accountant": privacy.get("accountant") if dp else None,
                "noise_multiplier": privacy.get("noise_multiplier") if dp else None,
                "clip": privacy.get("clip") if dp else None,
            },
            "transfer": dict(record.transfer or {}),
            "metrics": metrics,
        },
    }


def _yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for nested mappings; JSON for every scalar and list."""
    pad = "  " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(item, indent + 1))
        else:
            lines.append(f"{pad}{key}: {_scalar(item)}")
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    """JSON, except that an exponent float keeps a dot (YAML 1.1 reads ``1e-05`` as text)."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        mantissa, _, exponent = text.partition("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def render_card(record: TrainingRecord, *, title: str, files: Mapping[str, int]) -> str:
    """README.md of a hub folder: metadata, then what the model is and how it was trained."""
    meta = card_metadata(record)
    fed = meta["federated_training"]
    dp = fed["differential_privacy"]
    secure = fed["secure_aggregation"]
    lines = [
        "---",
        _yaml(meta),
        "---",
        "",
        f"# {title}",
        "",
        f"A `{record.model.get('name')}` model trained with federated learning by "
        f"[shoal](https://pypi.org/project/shoal/): the training data never left the "
        f"{fed['nodes']} nodes that held it; only model updates were aggregated.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| data | {fed['data']['source']}, partitioned `{fed['data']['partition'].get('scheme')}` "
        f"over {fed['nodes']} nodes |",
        f"| algorithm | {record.algorithm.get('name')}, {fed['rounds']} rounds of "
        f"{fed['nodes_per_round']} nodes |",
        f"| aggregator | {fed['aggregator']['rule']}"
        + (f", clipped to {fed['aggregator']['clip']}" if fed["aggregator"]["clip"] else "")
        + " |",
        "| secure aggregation | "
        + (f"yes: {secure['protocol']}" if secure["enabled"] else "no")
        + " |",
        *(
            [
                f"| transfer | from `{record.transfer.get('pretrained', 'scratch')}`; "
                + ", ".join(f"{k} {v}" for k, v in record.transfer.items() if k != "pretrained")
                + " |"
            ]
            if record.transfer
            else []
        ),
        "| differential privacy | "
        + (
            f"{dp['level']}-level, epsilon {dp['epsilon_spent']} spent "
            f"(target {dp['epsilon_target']}), delta {dp['delta']}, {dp['accountant']} accountant"
            if dp["enabled"]
            else "none"
        )
        + " |",
        "",
        "## Metrics (server test set, last round)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in fed["metrics"].items()),
        "",
        "## Files",
        "",
        *(f"- `{name}` ({size:,} bytes)" for name, size in files.items()),
        "",
        "## Use",
        "",
        "```python",
        "from shoal.learn.torch import load_pretrained",
        "model = load_pretrained('this-folder')   # scanned before it is loaded",
        "```",
        "",
        "Upload with `huggingface-cli upload <repo-id> <this-folder>`.",
        "",
    ]
    return "\n".join(lines)
