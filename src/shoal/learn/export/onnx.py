"""ONNX export (the ``shoal[export]`` extra), checked against onnxruntime before it is kept.

PyTorch models go through ``torch.onnx.export``'s TorchScript exporter (it takes 0.05 s on
an MLP where the newer torch.export-based one takes seconds and needs onnxscript, and it
handles LSTMs); softmax regression is written as a two-node graph with ``onnx.helper``.
Inputs are named ``x`` with a free batch dimension, outputs ``logits``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import ConfigError
from shoal.learn.export.convert import base_model, input_dtype, model_logits, torch_module
from shoal.learn.model import Model
from shoal.learn.softmax import SoftmaxRegression

__all__ = ["OnnxCheck", "check_onnx", "export_onnx"]

OPSET = 17
TOLERANCE = 1e-5  # largest difference in predicted probabilities an export may show


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx package: pip install 'shoal[export]'"
        ) from None
    return onnx


def export_onnx(model: Model, path: str | os.PathLike[str], *, sample: np.ndarray) -> None:
    """Write ``model`` as an ONNX file; ``sample`` (a few inputs) fixes the input's shape."""
    onnx = _onnx()
    inner = base_model(model)
    if isinstance(inner, SoftmaxRegression):
        helper = onnx.helper
        features = inner.W.shape[0]
        graph = helper.make_graph(
            [
                helper.make_node("Flatten", ["x"], ["flat"], axis=1),
                helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
            ],
            "shoal_softmax_regression",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", features])],
            [
                helper.make_tensor_value_info(
                    "logits", onnx.TensorProto.FLOAT, ["batch", inner.classes]
                )
            ],
            initializer=[
                onnx.numpy_helper.from_array(inner.W.astype(np.float32), "W"),
                onnx.numpy_helper.from_array(inner.b.astype(np.float32), "b"),
            ],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        onnx.checker.check_model(proto)
        onnx.save(proto, os.fspath(path))
        return
    module = torch_module(inner)
    if module is None:
        raise ConfigError(f"cannot export {inner!r} to ONNX: not softmax_regression or PyTorch")
    import torch

    example = torch.tensor(np.asarray(sample[:2], dtype=input_dtype(inner)))
    axes = {0: "batch"}
    if input_dtype(inner) == "int64" and example.ndim == 2:
        axes[1] = "steps"  # a language model reads windows of any length
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the torch.export one (see
            # the module docstring for why it is used); its notices are not the caller's.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                os.fspath(path),
                dynamo=False,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": axes, "logits": {0: "batch"}},
                opset_version=OPSET,
            )
    except Exception as exc:  # an operator ONNX lacks, a forward torch cannot trace, ...
        if os.path.exists(path):
            os.unlink(path)
        raise ConfigError(
            f"torch.onnx could not export {type(module).__name__}: {type(exc).__name__}: {exc}"
        ) from None


@dataclass(frozen=True, kw_only=True)
class OnnxCheck:
    """How an ONNX file's outputs compare with the model's own on the same inputs."""

    examples: int
    max_logit_diff: float
    max_prob_diff: float
    same_predictions: bool

    @property
    def ok(self) -> bool:
        return self.same_predictions and self.max_prob_diff <= TOLERANCE


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    result: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return result


def check_onnx(path: str | os.PathLike[str], model: Model, x: np.ndarray) -> OnnxCheck:
    """Run the file with onnxruntime on ``x`` and compare with the model itself."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "checking an ONNX export needs onnxruntime: pip install 'shoal[export]'"
        ) from None
    inputs = np.asarray(x, dtype=input_dtype(model))
    try:
        session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        got = np.asarray(session.run(["logits"], {"x": inputs})[0], dtype=np.float64)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConfigError(
            f"{path} does not run under onnxruntime as a model of x -> logits: {exc}; the "
            "module's forward may leave torch (a traced constant) or use an unsupported op"
        ) from None
    want = model_logits(model, inputs)
    # A prediction counts as the same when the file's class is the model's, or ties with it
    # within the tolerance (float32 against float64 may break an exact tie either way).
    chosen = want[np.arange(len(want)), got.argmax(axis=1)]
    same = bool((chosen >= want.max(axis=1) - TOLERANCE).all())
    return OnnxCheck(
        examples=len(inputs),
        max_logit_diff=float(np.abs(got - want).max()),
        max_prob_diff=float(np.abs(_softmax(got) - _softmax(want)).max()),
        same_predictions=same,
    )
