"""Pretrained weights from a file or a folder, scanned before a byte of them is loaded.

A safetensors file, a PyTorch state dict (scanned by ``shoal.scan``, then read by
``torch.load(weights_only=True)``), an ``.npz`` file, or a Hugging Face-format folder
(``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``). :func:`load_into`
copies them into a module and names every key or shape that does not fit.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import ConfigError, UnsafeModelError
from shoal.scan import Severity, scan_file

__all__ = [
    "PretrainedFactory",
    "VocabularyMismatch",
    "check_vocabulary",
    "inside",
    "load_into",
    "read_weights",
    "weights_file",
]

# Where a Hugging Face-format folder keeps its weights, preferred first.
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")
_NUMPY_DTYPES = {
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
}
_MAX_KEYS = 12  # how many keys an error lists before it says "and N more"


class VocabularyMismatch(ConfigError):
    """A pretrained embedding or output layer sized for another vocabulary than the data's."""


def check_vocabulary(pretrained: Sequence[str], data: Sequence[str]) -> None:
    """Raise VocabularyMismatch unless the data indexes tokens as the pretrained model did."""
    if len(pretrained) != len(data):
        raise VocabularyMismatch(
            f"the pretrained model has a vocabulary of {len(pretrained)} tokens but the data's "
            f"has {len(data)}; build the data with the pretrained model's vocabulary"
        )
    for i, (theirs, ours) in enumerate(zip(pretrained, data)):
        if theirs != ours:
            raise VocabularyMismatch(
                f"the pretrained model and the data both have {len(data)} tokens, but token "
                f"{i} is {theirs!r} in the model and {ours!r} in the data: the ids would mean "
                "other tokens; build the data with the pretrained model's vocabulary"
            )


def inside(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder / name``, refused if a symlink takes it out of the folder.

    A downloaded model folder is untrusted: its ``model.safetensors`` may be a link to any
    file of the machine, which loading would read (and a training run would then share).
    """
    base = Path(folder)
    path = base / name
    if path.is_symlink() or path.exists():
        real, root = path.resolve(), base.resolve()
        if real != root and root not in real.parents:
            raise UnsafeModelError(
                f"{path} is a link to {real}, outside the model folder; refusing to read it "
                "(copy the file into the folder if you trust it)"
            )
    return path


def weights_file(path: str | os.PathLike[str]) -> Path:
    """The weights file of ``path``: the file itself, or the weights inside a model folder."""
    target = Path(path)
    if target.is_dir():
        for name in _FOLDER_FILES:
            if inside(target, name).is_file():
                return target / name
        raise ConfigError(
            f"{str(target)!r} is a folder without weights: a model folder holds one of "
            f"{', '.join(_FOLDER_FILES)} (sharded checkpoints are not supported)"
        )
    if not target.is_file():
        raise ConfigError(f"pretrained weights {str(target)!r} do not exist")
    return target


def read_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Named arrays from a pretrained file or folder; refused if the scanner finds code.

    A torch checkpoint that wraps its state dict (``{"state_dict": {...}}`` or
    ``{"model": {...}}``, as training scripts often save them) is unwrapped.
    """
    file = weights_file(path)
    report = scan_file(file)
    if report.severity >= Severity.MEDIUM:
        worst = max(report.findings, key=lambda f: f.severity)
        raise UnsafeModelError(
            f"{file}: refusing to load pretrained weights: {worst.severity.label} "
            f"{worst.kind}: {worst.detail}; run `shoal scan {file}` for the full report"
        )
    fmt = report.format.partition("+")[0]
    if fmt == "safetensors":
        return _safetensors(file)
    if fmt in ("torch", "torch-legacy"):
        raw = _torch_load(file)
    elif fmt == "npz":
        from shoal.scan import load

        raw = load(file)
    else:
        raise ConfigError(
            f"{file}: pretrained weights must be safetensors, a PyTorch state dict or .npz, "
            f"not {report.format}"
        )
    return _state_dict(raw, str(file))


def _safetensors(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays; dtypes NumPy lacks (bfloat16, float8) through torch."""
    from safetensors.numpy import load_file

    try:
        arrays = dict(load_file(str(file)))
        # ml_dtypes (imported by onnx, jax) adds bfloat16 and float8 to NumPy as opaque
        # dtypes torch cannot take: those go the torch way too
        if all(a.dtype in _NUMPY_DTYPES for a in arrays.values()):
            return arrays
    except (TypeError, AttributeError):  # numpy has no bfloat16 or float8 dtype
        pass
    except Exception as exc:  # SafetensorError and friends: the scanner missed a defect
        raise UnsafeModelError(f"{file}: safetensors refused to load it: {exc}") from None
    try:
        from safetensors.torch import load_file as load_torch
    except ImportError:
        raise ConfigError(
            f"{file} holds bfloat16 or float8 tensors, which NumPy cannot read; install the "
            "torch extra (pip install 'shoal[torch]') or save the weights as float32"
        ) from None
    try:
        raw = load_torch(str(file))
    except Exception as exc:
        raise UnsafeModelError(f"{file}: safetensors refused to load it: {exc}") from None
    return _state_dict(raw, str(file))


def _torch_load(file: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"{file} is a PyTorch checkpoint; install the torch extra: pip install 'shoal[torch]'"
        ) from None
    try:
        # The scan found nothing; weights_only is the second lock on the same door.
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or hostile file: torch raises many builtin types
        raise UnsafeModelError(f"{file}: torch refused to load it: {exc}") from None


def _state_dict(raw: Any, where: str) -> dict[str, np.ndarray]:
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where} holds no state dict (a mapping of names to tensors)")
    out: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: state dict keys are strings, got {name!r}")
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().to("cpu")
            if value.is_floating_point() and str(value.dtype) not in _NUMPY_FLOATS:
                value = value.float()  # bfloat16, float8: NumPy has no such dtype
            value = value.numpy()
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            raise ConfigError(
                f"{where}: {name!r} is a {type(value).__name__}, not a numeric tensor; "
                "a state dict maps names to tensors"
            )
        out[name] = value
    return out


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_KEYS])
    return shown + (f" and {len(names) - _MAX_KEYS} more" if len(names) > _MAX_KEYS else "")


def load_into(
    module: Any,
    weights: Mapping[str, np.ndarray],
    *,
    skip: Sequence[str] = (),
    prefix: str = "",
) -> list[str]:
    """Copy ``weights`` into ``module`` (a ``torch.nn.Module``); return the names loaded.

    ``skip`` (fnmatch patterns of the module's names) stay as initialized: a new head.
    ``prefix`` is stripped from the file's keys (``"backbone."``). Every other key must
    match in name and shape; otherwise a ConfigError lists the unexpected keys, the
    missing ones and the shape mismatches (a :class:`VocabularyMismatch` when an
    embedding's or output layer's vocabulary size differs).
    """
    import torch

    state = module.state_dict()
    given = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    wanted = {k for k in state if not any(fnmatch.fnmatchcase(k, p) for p in skip)}
    unexpected = sorted(k for k in given if k not in state)
    missing = sorted(k for k in wanted if k not in given)
    shapes = sorted(
        f"{k} (file {tuple(given[k].shape)}, model {tuple(state[k].shape)})"
        for k in wanted & set(given)
        if tuple(given[k].shape) != tuple(state[k].shape)
    )
    _check_vocabulary(module, given, state)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (in the file, not the model): {_listed(unexpected)}")
    if missing:
        problems.append(f"missing keys (in the model, not the file): {_listed(missing)}")
    if shapes:
        problems.append(f"shape mismatches: {_listed(shapes)}")
    if problems:
        raise ConfigError(
            "pretrained weights do not fit the model: "
            + "; ".join(problems)
            + ". Build the model with the pretrained architecture, strip a key prefix with "
            "prefix=, or leave new layers out with skip=[patterns]"
        )
    loaded = sorted(wanted)
    with torch.no_grad():
        for name in loaded:
            target = state[name]
            target.copy_(torch.as_tensor(np.array(given[name])).to(target.dtype))
    return loaded


def _check_vocabulary(
    module: Any, given: Mapping[str, np.ndarray], state: Mapping[str, Any]
) -> None:
    """The one shape mismatch worth its own message: a vocabulary of another size."""
    from torch import nn

    for name, layer in module.named_modules():
        key = f"{name}.weight" if name else "weight"
        if key not in given or key not in state:
            continue
        if not isinstance(layer, nn.Embedding):
            continue
        theirs, ours = given[key].shape[0], state[key].shape[0]
        if theirs != ours:
            raise VocabularyMismatch(
                f"the pretrained model has a vocabulary of {theirs} tokens ({key} is "
                f"{tuple(given[key].shape)}) but the data's vocabulary has {ours}; build the "
                "data with the pretrained model's vocabulary (or retrain the embedding)"
            )


@dataclass(frozen=True)
class PretrainedFactory:
    """A module factory that loads pretrained weights into each module it builds.

    ``TorchModel(PretrainedFactory(build, read_weights(path), skip=("head.*",)))`` starts
    every node (and the server) from the same backbone, read and scanned once.
    """

    build: Callable[[], Any]
    weights: Mapping[str, np.ndarray] | None = field(repr=False)  # None: nothing to load
    skip: tuple[str, ...] = ()
    prefix: str = ""
    then: Callable[[Any], Any] | None = None  # changes the module in place: add LoRA adapters

    def __call__(self) -> Any:
        module = self.build()
        if self.weights is not None:
            load_into(module, self.weights, skip=self.skip, prefix=self.prefix)
        if self.then is not None:
            self.then(module)
        return module
