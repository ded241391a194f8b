"""int8 weight quantization for export: symmetric, one scale per output row.

Each row ``r`` of a weight matrix (a linear layer's output unit, an embedding's token, an
LSTM gate unit) is stored as ``round(r / s)`` in int8 with ``s = max|r| / 127``: the file
shrinks about 4x against float32 and a weight moves by at most ``s / 2``. Biases and other
vectors stay float32 (they are a small part of the size and quantize badly).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["quantize_int8"]


def quantize_int8(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float matrix as int8 plus a float32 ``<name>.scale`` per row; the rest float32."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.ndim < 2:
            out[name] = array.astype(np.float32) if array.dtype.kind == "f" else array
            continue
        rows = array.reshape(len(array), -1).astype(np.float64)
        peak = np.abs(rows).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0)
        q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
        out[name] = q.reshape(array.shape)
        out[name + ".scale"] = scale.astype(np.float32)
    return out
