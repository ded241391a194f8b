"""Turn a trained model adapter into what export writes: a plain module, logits, a program.

Supports SoftmaxRegression and PyTorch models (TorchModel, and a PartialModel around one,
with LoRA adapters folded into their layers). :func:`numpy_program` translates the layers
the NumPy predictor knows (linear, ReLU, tanh, flatten, embedding, LSTM); other layers
(convolutions, attention) are exported to ONNX only.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from shoal.errors import ConfigError
from shoal.learn.model import Model
from shoal.learn.softmax import SoftmaxRegression

__all__ = ["base_model", "input_dtype", "model_logits", "numpy_program", "torch_module"]


def base_model(model: Model) -> Model:
    """The adapter that computes: a PartialModel's wrapped model (personal layers refused)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "shared_names"):
        if getattr(model, "personal_names", ()):
            raise ConfigError(
                "this model has personal layers that stay at each node, so the server holds "
                "no whole model to export; export at a node, with its own layers loaded"
            )
        return base_model(inner)
    return model


def torch_module(model: Model) -> Any | None:
    """An eval-mode copy of the model's torch module with LoRA folded in (None: not torch)."""
    module = getattr(base_model(model), "module", None)
    if module is None:
        return None
    from shoal.learn.transfer.lora import merge_lora

    return merge_lora(copy.deepcopy(module)).eval()


def input_dtype(model: Model) -> str:
    """What the model reads: token ids (int64) or features (float32)."""
    return "int64" if getattr(base_model(model), "token_inputs", False) else "float32"


def model_logits(model: Model, x: np.ndarray) -> np.ndarray:
    """The model's own logits for ``x``, in float64 (the reference an export is checked by)."""
    inner = base_model(model)
    if isinstance(inner, SoftmaxRegression):
        return np.asarray(x, np.float64).reshape(len(x), -1) @ inner.W + inner.b
    module = torch_module(inner)
    if module is None:
        raise ConfigError(
            f"cannot export {inner!r}: shoal exports softmax_regression and PyTorch models"
        )
    import torch

    with torch.no_grad():
        tensor = torch.tensor(np.asarray(x, dtype=input_dtype(inner)))
        out = module(tensor)
    return np.asarray(out.double().numpy())


def numpy_program(model: Model) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """(program, float32 tensors) for the NumPy predictor; ConfigError for unknown layers."""
    inner = base_model(model)
    if isinstance(inner, SoftmaxRegression):
        tensors = {"W": inner.W.T.astype(np.float32), "b": inner.b.astype(np.float32)}
        return [{"op": "flatten"}, {"op": "linear", "weight": "W", "bias": "b"}], tensors
    module = torch_module(inner)
    if module is None:
        raise ConfigError(f"no NumPy predictor for {inner!r}")
    from torch import nn

    tensors = {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}
    layers = _layers(module, nn)
    program: list[dict[str, Any]] = []
    for name, layer in layers:
        op = _op(name, layer, nn)
        if op is not None:
            program.append(op)
    return program, tensors


def _layers(module: Any, nn: Any) -> list[tuple[str, Any]]:
    if isinstance(module, nn.Sequential):
        return [(name, layer) for name, layer in module.named_children()]
    # A next-token LSTM (shoal.learn.text_models): embed -> lstm -> head on the last step.
    parts = [getattr(module, a, None) for a in ("embed", "lstm", "head")]
    if (
        isinstance(parts[0], nn.Embedding)
        and isinstance(parts[1], nn.LSTM)
        and isinstance(parts[2], nn.Linear)
        and len(list(module.children())) == 3
    ):
        return [("embed", parts[0]), ("lstm", parts[1]), ("", _Last()), ("head", parts[2])]
    raise ConfigError(
        f"no NumPy predictor for a {type(module).__name__}: it knows nn.Sequential stacks of "
        "Linear, ReLU, Tanh, Flatten, Dropout and an embedding-LSTM-head text model; "
        "export this one with --format onnx"
    )


class _Last:
    """Marks taking the last time step (the LSTM model's ``out[:, -1]``)."""


def _op(name: str, layer: Any, nn: Any) -> dict[str, Any] | None:
    prefix = f"{name}." if name else ""
    if isinstance(layer, _Last):
        return {"op": "last"}
    if isinstance(layer, nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise ConfigError(f"layer {name!r}: only Flatten() of all but the batch dimension")
        return {"op": "flatten"}
    if isinstance(layer, nn.Linear):
        bias = f"{prefix}bias" if layer.bias is not None else None
        return {"op": "linear", "weight": f"{prefix}weight", "bias": bias}
    if isinstance(layer, nn.ReLU):
        return {"op": "relu"}
    if isinstance(layer, nn.Tanh):
        return {"op": "tanh"}
    if isinstance(layer, (nn.Dropout, nn.Identity)):
        return None  # identity at inference
    if isinstance(layer, nn.Embedding):
        return {"op": "embedding", "weight": f"{prefix}weight"}
    if isinstance(layer, nn.LSTM):
        if not layer.batch_first or layer.bidirectional or layer.proj_size or not layer.bias:
            raise ConfigError(
                f"layer {name!r}: the NumPy predictor runs batch_first, one-directional LSTMs "
                "with biases and no projection"
            )
        return {
            "op": "lstm",
            "layers": [
                {
                    "w_ih": f"{prefix}weight_ih_l{k}",
                    "w_hh": f"{prefix}weight_hh_l{k}",
                    "b_ih": f"{prefix}bias_ih_l{k}",
                    "b_hh": f"{prefix}bias_hh_l{k}",
                }
                for k in range(layer.num_layers)
            ],
        }
    raise ConfigError(
        f"layer {name!r} ({type(layer).__name__}) has no NumPy version; export with --format onnx"
    )
