"""Write a NumPy predictor file for a model (see :mod:`shoal.learn.export.predictor`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import ConfigError
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
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{str(target)!r} is a folder; give --out a file name")
    # Written beside the target and renamed: a failure never leaves half a file behind.
    try:
        fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; choose another --out"
        ) from None
    os.close(fd)
    try:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in stored.items()},
            staging,
            metadata={
                "format": FORMAT,
                "program": json.dumps(program),
                "input_dtype": input_dtype(model),
                "info": json.dumps(dict(info or {})),
            },
        )
        os.chmod(staging, 0o644)  # mkstemp made it private; a predictor is for sharing
        os.replace(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def predictor_for(model: Model, *, int8: bool = False) -> NumpyPredictor:
    """The predictor a file written for ``model`` would load, without writing it."""
    program, tensors = numpy_program(model)
    tensors = _used(program, tensors)
    stored = quantize_int8(tensors) if int8 else tensors
    return NumpyPredictor(
        program=program, tensors=dequantize(stored), input_dtype=input_dtype(model)
    )
