"""A table as submitted code sees it: named NumPy columns, sent to the sandbox as wire bytes.

Numeric columns travel as arrays; text columns as integer codes plus their categories, so a
table is one ``shoal.wire`` payload (no pickle, no files the job could misread).
Imports only NumPy and ``shoal.wire``: the sandbox loads it before the submitted code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from shoal.errors import DataError
from shoal.wire import WireLimits, decode, encode

__all__ = ["TABLE_LIMITS", "Table", "decode_table", "encode_table"]

# tables are written by the datasite itself, so they may be larger than a network message
TABLE_LIMITS = WireLimits(max_header_bytes=1 << 30, max_string_chars=1 << 24)
_META = "__table__"


class Table(Mapping[str, np.ndarray]):
    """Columns by name (``t["age"]``), all of one length; ``t.name`` is the asset's name."""

    def __init__(self, *, name: str, columns: Mapping[str, np.ndarray]) -> None:
        self.name = name
        self._columns = {str(k): np.asarray(v) for k, v in columns.items()}
        lengths = {len(v) for v in self._columns.values()}
        if len(lengths) > 1:
            raise DataError(f"table {name!r}: columns have different lengths {sorted(lengths)}")
        self.rows = lengths.pop() if lengths else 0

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._columns[key]
        except KeyError:
            raise KeyError(
                f"table {self.name!r} has no column {key!r}; columns: {list(self._columns)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def __repr__(self) -> str:
        return f"Table({self.name!r}, rows={self.rows}, columns={self.columns})"


def encode_table(table: Table) -> bytes:
    """The table as one wire payload."""
    payload: dict[str, Any] = {}
    kinds: dict[str, Any] = {}
    for i, (name, column) in enumerate(table._columns.items()):
        key = f"c{i}"
        if column.dtype.kind in "biuf":
            payload[key] = np.ascontiguousarray(column)
            kinds[name] = [key, "num"]
        else:
            values = [("" if v is None else str(v)) for v in column.tolist()]
            categories = sorted(set(values))
            index = {c: j for j, c in enumerate(categories)}
            payload[key] = np.array([index[v] for v in values], dtype=np.int32)
            payload[key + "_cats"] = categories
            kinds[name] = [key, "text"]
    payload[_META] = {"name": table.name, "columns": kinds}
    return bytes(encode(payload, limits=TABLE_LIMITS))


def decode_table(blob: bytes) -> Table:
    """The table :func:`encode_table` wrote."""
    payload = decode(blob, limits=TABLE_LIMITS)
    meta = payload.get(_META)
    if not isinstance(meta, dict):
        raise DataError("not a datasite table: its description is missing")
    columns: dict[str, np.ndarray] = {}
    for name, (key, kind) in meta["columns"].items():
        if kind == "num":
            columns[name] = payload[key]
        else:
            categories = np.asarray(payload[key + "_cats"], dtype=str)
            codes = payload[key]
            columns[name] = categories[codes] if len(categories) else codes.astype(str)
    return Table(name=str(meta["name"]), columns=columns)
