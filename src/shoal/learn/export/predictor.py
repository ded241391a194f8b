"""A NumPy-only predictor: what a device needs to run an exported model, without torch or ONNX.

A predictor file is a safetensors file whose metadata holds a small program (a list of
layers: linear, relu, tanh, embedding, lstm, last, flatten) over its tensors. This module
imports NumPy and the standard library only, and reads the file with its own bounded
parser, so it can be copied to a device on its own. Weights quantized to int8 (one scale
per output row) are dequantized once, when the file is opened.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FORMAT", "NumpyPredictor", "PredictorError", "read_safetensors", "run_program"]

FORMAT = "shoal.numpy-predictor/1"
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}
_MAX_HEADER = 16 * 2**20  # bytes of JSON header a predictor file may have
OPS = ("flatten", "linear", "relu", "tanh", "embedding", "lstm", "last")
INPUT_DTYPES = ("float32", "float64", "int64", "int32")
_LSTM_KEYS = ("w_ih", "w_hh", "b_ih", "b_hh")


try:  # inside shoal, one error tree; copied to a device on its own, a plain ValueError
    from shoal.errors import ShoalError as _Base
except ImportError:  # pragma: no cover - only outside shoal
    _Base = Exception  # type: ignore[misc,assignment]


class PredictorError(_Base, ValueError):
    """A predictor file or program that cannot be run as it is."""


def _json(text: str | bytes, what: str) -> Any:
    """JSON from an untrusted file: every failure (deep nesting too) is a PredictorError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise PredictorError(f"{what} is nested too deeply to be a predictor's") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PredictorError(f"{what} is not JSON ({exc})") from None


def _sizes(value: Any, count: int | None = None) -> tuple[int, ...]:
    """Non-negative ints (a JSON list of them); ValueError for anything else."""
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise ValueError(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(value)
    return tuple(value)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors file, every offset and size checked."""
    with open(path, "rb") as fh:
        blob = fh.read()
    if len(blob) < 8:
        raise PredictorError(f"{path}: too short to be a safetensors file")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(_MAX_HEADER, len(blob) - 8):
        raise PredictorError(f"{path}: header of {size} bytes does not fit the file")
    header = _json(blob[8 : 8 + size], f"{path}: header")
    if not isinstance(header, dict):
        raise PredictorError(f"{path}: header is not a JSON object")
    data = memoryview(blob)[8 + size :]
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PredictorError(f"{path}: metadata must map names to strings")
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = _sizes(info["shape"])
            start, end = _sizes(info["data_offsets"], 2)
        except (KeyError, TypeError, ValueError):
            raise PredictorError(f"{path}: tensor {name!r} has a malformed entry") from None
        if not start <= end <= len(data):
            raise PredictorError(f"{path}: tensor {name!r} lies outside the file")
        # Python ints: a shape whose product overflows int64 must not wrap to a small size
        if (end - start) != math.prod(shape) * dtype.itemsize:
            raise PredictorError(f"{path}: tensor {name!r} has {end - start} bytes for {shape}")
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    return tensors, meta


def _lstm(x: np.ndarray, layers: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """PyTorch's LSTM (gates i, f, g, o; batch first), every layer, all time steps."""
    batch, steps, _ = x.shape
    for layer in layers:
        w_ih, w_hh = layer["w_ih"], layer["w_hh"]
        n = w_hh.shape[1]
        # The input projection of every step at once: one matrix product, not `steps`.
        projected = x @ w_ih.T + (layer["b_ih"] + layer["b_hh"])
        w_hh_t = np.ascontiguousarray(w_hh.T)
        h = np.zeros((batch, n), dtype=x.dtype)
        c = np.zeros((batch, n), dtype=x.dtype)
        gates = np.empty((batch, 4 * n), dtype=x.dtype)
        out = np.empty((batch, steps, n), dtype=x.dtype)
        for t in range(steps):
            np.matmul(h, w_hh_t, out=gates)
            gates += projected[:, t]
            candidate = np.tanh(gates[:, 2 * n : 3 * n])
            # sigmoid(z) = (1 + tanh(z / 2)) / 2, in place on all four gates (the g gate's
            # sigmoid is wasted, but one pass beats three slices' worth of calls)
            gates *= 0.5
            np.tanh(gates, out=gates)
            gates *= 0.5
            gates += 0.5
            c *= gates[:, n : 2 * n]
            candidate *= gates[:, :n]
            c += candidate
            h = np.tanh(c)
            h *= gates[:, 3 * n :]
            out[:, t] = h
        x = out
    return x


def run_program(
    program: Sequence[Mapping[str, Any]], tensors: Mapping[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    """The logits of ``x`` under ``program`` (see the module docstring for the layers)."""
    for i, step in enumerate(program):
        try:
            x = _step(step, tensors, x)
        except PredictorError:
            raise
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            # a program whose sizes do not chain, or input of the wrong shape
            raise PredictorError(
                f"layer {i} ({step.get('op')!r}) cannot take input of shape {np.shape(x)}: {exc}"
            ) from None
    return x


def _step(step: Mapping[str, Any], tensors: Mapping[str, np.ndarray], x: np.ndarray) -> Any:
    op = step["op"]
    if op == "flatten":
        x = x.reshape(len(x), -1)
    elif op == "linear":
        x = x @ tensors[step["weight"]].T
        if step.get("bias"):
            x = x + tensors[step["bias"]]
    elif op == "relu":
        x = np.maximum(x, 0)
    elif op == "tanh":
        x = np.tanh(x)
    elif op == "embedding":
        table = tensors[step["weight"]]
        ids = np.asarray(x)
        if ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= len(table))):
            raise PredictorError(f"token ids must be integers in 0..{len(table) - 1}")
        x = table[ids]
    elif op == "lstm":
        layers = [{k: tensors[v] for k, v in layer.items()} for layer in step["layers"]]
        x = _lstm(x, layers)
    elif op == "last":
        x = x[:, -1]
    else:
        raise PredictorError(f"unknown layer {op!r}; a predictor knows {', '.join(OPS)}")
    return x


class NumpyPredictor:
    """Predict with an exported model using NumPy alone.

    >>> predictor = NumpyPredictor.load("model.predictor.safetensors")   # doctest: +SKIP
    >>> predictor.predict(x)                                              # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        program: Sequence[Mapping[str, Any]],
        tensors: Mapping[str, np.ndarray],
        input_dtype: str = "float32",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if input_dtype not in INPUT_DTYPES:
            raise PredictorError(
                f"input dtype {input_dtype!r} is not one a predictor reads "
                f"({', '.join(INPUT_DTYPES)})"
            )
        self.program = [dict(step) for step in program]
        self.input_dtype = np.dtype(input_dtype)
        self.meta = dict(meta or {})
        self.tensors = dict(tensors)
        for i, step in enumerate(self.program):
            _check_step(i, step, self.tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NumpyPredictor:
        tensors, meta = read_safetensors(path)
        if meta.get("format") != FORMAT:
            raise PredictorError(
                f"{path}: not a shoal predictor file (format {meta.get('format')!r}, "
                f"expected {FORMAT!r}); export one with `shoal export RUN --format numpy`"
            )
        if "program" not in meta:
            raise PredictorError(f"{path}: its program is missing")
        program = _json(meta["program"], f"{path}: its program")
        extra = _json(meta.get("info", "{}"), f"{path}: its info")
        if not isinstance(program, list) or not all(isinstance(s, dict) for s in program):
            raise PredictorError(f"{path}: its program must be a list of layers")
        return cls(
            program=program,
            tensors=dequantize(tensors),
            input_dtype=meta.get("input_dtype", "float32"),
            meta=extra if isinstance(extra, dict) else {},
        )

    def logits(self, x: Any) -> np.ndarray:
        array = np.asarray(x)
        if self.input_dtype.kind == "f":
            array = array.astype(self.input_dtype, copy=False)
        return run_program(self.program, self.tensors, array)

    def predict_proba(self, x: Any) -> np.ndarray:
        z = self.logits(x)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        result: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return result

    def predict(self, x: Any) -> np.ndarray:
        result: np.ndarray = self.logits(x).argmax(axis=1)
        return result


def _check_step(i: int, step: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Refuse a layer that names tensors it lacks or whose shapes it cannot use, at load."""
    op = step.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise PredictorError(f"layer {i}: unknown layer {op!r}; known: {', '.join(OPS)}")

    def tensor(name: Any, what: str, ndim: int) -> np.ndarray:
        if not isinstance(name, str):
            raise PredictorError(f"layer {i} ({op}): {what} must name a tensor, got {name!r}")
        if name not in tensors:
            raise PredictorError(f"layer {i} ({op}) names a missing tensor {name!r}")
        value = tensors[name]
        if value.ndim != ndim or 0 in value.shape:
            raise PredictorError(
                f"layer {i} ({op}): {what} {name!r} has shape {value.shape}, not a non-empty "
                f"{ndim}-d tensor"
            )
        return value

    if op in ("linear", "embedding"):
        weight = tensor(step.get("weight"), "weight", 2)
        if op == "linear" and step.get("bias"):
            bias = tensor(step["bias"], "bias", 1)
            if bias.shape[0] != weight.shape[0]:
                raise PredictorError(
                    f"layer {i} (linear): bias {bias.shape} does not fit weight {weight.shape}"
                )
    elif op == "lstm":
        layers = step.get("layers")
        if not isinstance(layers, list) or not layers:
            raise PredictorError(f"layer {i} (lstm): layers must be a non-empty list")
        for layer in layers:
            if not isinstance(layer, dict) or sorted(layer) != sorted(_LSTM_KEYS):
                raise PredictorError(
                    f"layer {i} (lstm): each of its layers names exactly the tensors "
                    f"{', '.join(_LSTM_KEYS)}, got {layer!r}"
                )
            w_ih, w_hh = tensor(layer["w_ih"], "w_ih", 2), tensor(layer["w_hh"], "w_hh", 2)
            b_ih, b_hh = tensor(layer["b_ih"], "b_ih", 1), tensor(layer["b_hh"], "b_hh", 1)
            gates = 4 * w_hh.shape[1]
            if {w_ih.shape[0], w_hh.shape[0], b_ih.shape[0], b_hh.shape[0]} != {gates}:
                raise PredictorError(
                    f"layer {i} (lstm): shapes w_ih {w_ih.shape}, w_hh {w_hh.shape}, b_ih "
                    f"{b_ih.shape}, b_hh {b_hh.shape} are not those of one LSTM layer"
                )


def dequantize(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 tensors from a file's int8 ones (``name`` int8 and ``name.scale`` per row)."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.endswith(".scale"):
            continue
        scale = tensors.get(name + ".scale")
        if value.dtype == np.int8 and scale is not None:
            if value.ndim == 0 or scale.shape != (len(value),):
                raise PredictorError(
                    f"{name}.scale has shape {scale.shape}; int8 {name} {value.shape} needs "
                    "one scale per row"
                )
            shape = (len(value),) + (1,) * (value.ndim - 1)
            out[name] = value.astype(np.float32) * scale.astype(np.float32).reshape(shape)
        else:
            out[name] = np.asarray(value, dtype=np.float32) if value.dtype.kind == "f" else value
    return out
