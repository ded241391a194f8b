"""Transfer learning and personalization: pretrained backbones, frozen layers, LoRA, FedPer/FedRep.

LoRA and PyTorch state dicts need the ``torch`` extra (imported only when used);
PartialModel's personal layers work with any model adapter. Pretrained files are scanned
(``shoal.scan``) before loading.
"""

from __future__ import annotations

from typing import Any

from shoal.learn.transfer.parts import PartialModel
from shoal.learn.transfer.pretrained import (
    PretrainedFactory,
    VocabularyMismatch,
    check_vocabulary,
    load_into,
    read_weights,
    weights_file,
)
from shoal.learn.transfer.spec import TransferSpec, apply_transfer

__all__ = [
    "LORA_PATTERNS",
    "LoRALinear",
    "PartialModel",
    "PretrainedFactory",
    "TransferSpec",
    "VocabularyMismatch",
    "add_lora",
    "apply_transfer",
    "check_vocabulary",
    "load_into",
    "merge_lora",
    "read_weights",
    "weights_file",
]

_LORA = ("LORA_PATTERNS", "LoRALinear", "add_lora", "merge_lora")


def __getattr__(name: str) -> Any:
    if name in _LORA:  # imports torch: only when asked for
        from shoal.learn.transfer import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'shoal.learn.transfer' has no attribute {name!r}")
