"""A job's ``[transfer]`` table as a value, and the model it turns a plain model into.

``apply_transfer(model, spec)`` loads a pretrained file (scanned first), adds LoRA adapters,
and splits the weights into frozen, shared and personal parts (:class:`PartialModel`). Every
node and the server build the same model from the same spec.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError
from shoal.learn.model import Model
from shoal.learn.transfer.parts import PartialModel
from shoal.learn.transfer.pretrained import PretrainedFactory, check_vocabulary, read_weights

__all__ = ["TransferSpec", "apply_transfer"]


@dataclass(frozen=True, kw_only=True)
class TransferSpec:
    """Where the weights start and which of them train where (see docs/export.md)."""

    pretrained: str | None = None  # a weights file or a model folder
    skip: tuple[str, ...] = ()  # left at their fresh initialization (a new head)
    prefix: str = ""  # stripped from the file's keys
    freeze: tuple[str, ...] = ()  # frozen; every other weight trains
    personal: tuple[str, ...] = ()  # trained at each node, never sent (FedPer/FedRep)
    mode: str = "fedper"
    personal_epochs: int = 1
    lora_rank: int | None = None  # LoRA adapters on the linear layers matching lora_targets
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("*",)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], *, base_dir: Path = Path(".")) -> TransferSpec:
        """From a job's ``[transfer]`` table; ``pretrained`` is relative to ``base_dir``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} in [transfer]; allowed: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for key, value in table.items():
            default = cls.__dataclass_fields__[key].default
            if isinstance(default, tuple):
                if isinstance(value, str) or not isinstance(value, list):
                    raise ConfigError(
                        f"[transfer] {key} is a list of name patterns, e.g. ['head.*']"
                    )
                if not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"[transfer] {key} must hold non-empty strings")
                value = tuple(value)
            elif key in ("pretrained", "prefix", "mode") and not isinstance(value, str):
                raise ConfigError(f"[transfer] {key} must be a string")
            elif key in ("lora_rank", "personal_epochs") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"[transfer] {key} must be a positive integer")
            elif key == "lora_alpha" and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ConfigError("[transfer] lora_alpha must be a positive number")
            values[key] = value
        if values.get("mode", "fedper") not in ("fedper", "fedrep"):
            raise ConfigError(
                f"[transfer] mode must be 'fedper' or 'fedrep', got {values['mode']!r}"
            )
        if "pretrained" in values:
            values["pretrained"] = str(base_dir / values["pretrained"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """For the model card: what was transferred (the pretrained file by name only)."""
        out: dict[str, Any] = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in self.__dict__.items()
            if v not in (None, (), "") and k != "pretrained"
        }
        if self.pretrained:
            out["pretrained"] = Path(self.pretrained).name
        return out


def _pretrained_vocab(path: Path) -> list[str] | None:
    """The vocabulary a shoal hub folder records (None for any other file or folder)."""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file() or config.stat().st_size > 2**24:
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    vocab = data.get("vocab") if isinstance(data, dict) else None
    return vocab if isinstance(vocab, list) else None


def apply_transfer(
    model: Model, spec: TransferSpec, *, vocab: Sequence[str] | None = None
) -> Model:
    """``model`` (a PyTorch model) started from ``spec.pretrained`` and split as ``spec`` says.

    ``vocab`` is the data's vocabulary (text): checked against one the pretrained folder
    records; an embedding of another size is refused in any case (VocabularyMismatch).
    """
    from shoal.learn.torch import TorchModel

    if not isinstance(model, TorchModel):
        raise ConfigError(
            f"[transfer] needs a PyTorch model (mlp, cnn, char_lstm, ...), not {model!r}"
        )
    weights = None
    if spec.pretrained is not None:
        path = Path(spec.pretrained)
        known = _pretrained_vocab(path)
        if known is not None and vocab is not None:
            check_vocabulary(known, list(vocab))
        weights = read_weights(path)
    then = None
    if spec.lora_rank is not None:
        from shoal.learn.transfer.lora import add_lora

        rank, alpha, targets = spec.lora_rank, spec.lora_alpha, spec.lora_targets
        then = lambda module: add_lora(module, rank=rank, alpha=alpha, targets=targets)  # noqa: E731
    factory = PretrainedFactory(
        model.module_factory, weights, skip=spec.skip, prefix=spec.prefix, then=then
    )
    built = TorchModel(
        factory,
        loss=model.loss,
        optimizer=model.optimizer,
        momentum=model.momentum,
        device=str(model.device),
        seed=model.seed,
        token_inputs=model.token_inputs,
    )
    if not (spec.freeze or spec.personal or spec.lora_rank):
        return built  # full fine-tuning: every weight federated
    names = list(built.get_weights())
    for pattern in spec.freeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"[transfer] freeze pattern {pattern!r} matches no weight; the model's are {names}"
            )
    lora_bases = set()  # the layers LoRA wraps are frozen: only their adapters train
    if then is not None:
        from shoal.learn.transfer.lora import LoRALinear

        for module_name, layer in built.module.named_modules():
            if isinstance(layer, LoRALinear):
                prefix = f"{module_name}.base." if module_name else "base."
                lora_bases |= {n for n in names if n.startswith(prefix)}
    frozen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec.freeze)}
    frozen |= lora_bases
    personal = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec.personal)}
    shared = tuple(n for n in names if n not in frozen and n not in personal)
    if not shared:
        raise ConfigError("[transfer] freezes or personalizes every weight: nothing to federate")
    return PartialModel(
        built,
        shared=shared,
        personal=spec.personal,
        mode=spec.mode,  # type: ignore[arg-type]
        personal_epochs=spec.personal_epochs,
    )
