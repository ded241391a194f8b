"""Write a NumPy predictor file for a model (see :mod:`shoal.learn.export.predictor`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from shoal.learn.export.convert import input_dtype, numpy_program
from shoal.learn.export.predictor import FORMAT, NumpyPredictor, dequantize
from shoal.learn.export.quantize import quantize_int8
from shoal.learn.model import Model

__all__ = ["predictor_for", "write_predictor"]


def _used(
    program: list[dict[str, Any]], tensors: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    names: set[str] = set()
    for step in program:
        names.update(step[k] for k in ("weight", "bias") if step.get(k))
        for layer in step.get("layers", ()):
            names.update(layer.values())
    return {k: v for k, v in tensors.items() if k in names}


def write_predictor(
    path: str | os.PathLike[str],
    model: Model,
    *,
    int8: bool = False,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as one predictor file; ``int8`` stores weight matrices in int8."""
    from safetensors.numpy import save_file

    program, tensors = numpy_program(model)
    tensors = _used(program, tensors)
    stored = quantize_int8(tensors) if int8 else tensors
    save_file(
        {k: np.ascontiguousarray(v) for k, v in stored.items()},
        os.fspath(path),
        metadata={
            "format": FORMAT,
            "program": json.dumps(program),
            "input_dtype": input_dtype(model),
            "info": json.dumps(dict(info or {})),
        },
    )


def predictor_for(model: Model, *, int8: bool = False) -> NumpyPredictor:
    """The predictor a file written for ``model`` would load, without writing it."""
    program, tensors = numpy_program(model)
    tensors = _used(program, tensors)
    stored = quantize_int8(tensors) if int8 else tensors
    return NumpyPredictor(
        program=program, tensors=dequantize(stored), input_dtype=input_dtype(model)
    )
