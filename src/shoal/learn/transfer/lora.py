"""LoRA adapters (Hu et al. 2021) on a module's linear layers: only the adapters train.

``add_lora(module, rank=4)`` wraps each matching ``nn.Linear`` in :class:`LoRALinear`, whose
output is ``base(x) + (alpha / rank) * x A^T B^T`` with the base frozen, ``A`` random and
``B`` zero (so the wrapped module starts as the pretrained one). Federating only the
adapters sends ``rank * (in + out)`` numbers per layer instead of ``in * out``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from shoal.errors import ConfigError

__all__ = ["LORA_PATTERNS", "LoRALinear", "add_lora", "merge_lora"]

# The state-dict names of every adapter add_lora makes (for PartialModel(shared=...)).
LORA_PATTERNS = ("*lora_a", "*lora_b")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
        if rank > min(base.in_features, base.out_features):
            raise ConfigError(
                f"LoRA rank {rank} exceeds the layer's smaller side "
                f"({base.in_features}x{base.out_features}); a low-rank update must be lower"
            )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded in (for export)."""
        out = nn.Linear(
            self.base.in_features, self.base.out_features, bias=self.base.bias is not None
        )
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def add_lora(
    module: nn.Module, *, rank: int = 4, alpha: float = 8.0, targets: Sequence[str] = ("*",)
) -> list[str]:
    """Wrap every ``nn.Linear`` whose module name matches a pattern of ``targets``; in place.

    Returns the wrapped layers' names; a ConfigError if none matched (a typo in ``targets``).
    """
    chosen = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear)
        and name
        and any(fnmatch.fnmatchcase(name, p) for p in targets)
    ]
    if not chosen:
        linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"add_lora: no linear layer matches {list(targets)}; the module's linear layers "
            f"are {linear}"
        )
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(getattr(parent, child), rank=rank, alpha=alpha))
    return chosen


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer, in place; the result has no LoRA modules."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.merged())
    return module
