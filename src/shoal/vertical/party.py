"""A vertical party's own table: ids, numeric feature columns and (guest only) the label.

Loaded from a CSV at the party; bad tables are refused before any protocol starts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.errors import DataError

__all__ = ["PartyData"]


@dataclass(frozen=True, kw_only=True)
class PartyData:
    """Rows keyed by ``ids``; ``y`` is set only at the guest (the label holder)."""

    ids: tuple[str, ...]
    x: np.ndarray
    columns: tuple[str, ...]
    y: np.ndarray | None = None
    # NaN features allowed (trees learn a direction for them); linear models refuse them
    missing_ok: bool = False
    # columns (by index) holding category codes 0..k-1: this party's own business, which
    # SecureBoost splits one category against the rest without telling the other parties
    categorical: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape[0] != len(self.ids):
            raise DataError(f"{len(self.ids)} ids but features of shape {self.x.shape}")
        if len(set(self.ids)) != len(self.ids):
            seen: set[str] = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise DataError(f"duplicate id {dup!r}: each row needs its own id to align records")
        if np.isinf(self.x).any() or (not self.missing_ok and np.isnan(self.x).any()):
            raise DataError("features hold NaN or infinite values; impute them first")
        if self.y is not None and len(self.y) != len(self.ids):
            raise DataError("the label column does not match the rows")
        bad = [j for j in self.categorical if not 0 <= j < self.x.shape[1]]
        if bad or len(set(self.categorical)) != len(self.categorical):
            raise DataError(
                f"categorical columns {list(self.categorical)} must be distinct column indices "
                f"below {self.x.shape[1]}"
            )

    @classmethod
    def from_columns(
        cls,
        ids: Sequence[object],
        x: np.ndarray,
        *,
        columns: Sequence[str] | None = None,
        y: np.ndarray | None = None,
        missing_ok: bool = False,
        categorical: Sequence[int] = (),
    ) -> PartyData:
        x = np.asarray(x, dtype=np.float64)
        names = tuple(columns) if columns is not None else tuple(f"x{i}" for i in range(x.shape[1]))
        return cls(
            ids=tuple(str(i) for i in ids),
            x=x,
            columns=names,
            y=None if y is None else np.asarray(y, dtype=np.float64),
            missing_ok=missing_ok,
            categorical=tuple(int(j) for j in categorical),
        )

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        id_column: str,
        label: str | None = None,
        missing_ok: bool = False,
        categorical: Mapping[str, Sequence[str] | None] | None = None,
    ) -> PartyData:
        """Read a party's CSV: the id column, the label (guest) and numeric features (an
        empty feature field is missing, NaN, where ``missing_ok``). Columns of this file
        named in ``categorical`` hold category labels, coded by the list given for the
        column or else by this file's own sorted labels (a column lives at one party only,
        so no other party's codes need to agree)."""
        path = Path(path)
        try:
            with path.open(newline="") as fh:
                rows = list(csv.reader(fh))
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if not rows:
            raise DataError(f"{path} is empty")
        header, body = rows[0], rows[1:]
        if id_column not in header:
            raise DataError(f"{path} has no id column {id_column!r}; columns: {header[:10]}")
        if label is not None and label not in header:
            raise DataError(f"{path} has no label column {label!r}")
        id_at = header.index(id_column)
        label_at = header.index(label) if label is not None else None
        feat = [i for i in range(len(header)) if i not in (id_at, label_at)]
        if not feat:
            raise DataError(f"{path} has no feature columns besides the id and label")
        x = np.empty((len(body), len(feat)))
        y = np.empty(len(body)) if label_at is not None else None
        for r, row in enumerate(body):
            if len(row) != len(header):
                raise DataError(f"{path}: row {r + 2} has {len(row)} fields, not {len(header)}")
        tables = {
            c: _category_codes(path, header[i], [row[i] for row in body], categorical[header[i]])
            for c, i in enumerate(feat)
            if categorical and header[i] in categorical
        }
        for r, row in enumerate(body):
            for c, i in enumerate(feat):
                if c in tables:
                    x[r, c] = tables[c](row[i], r, missing_ok)
                    continue
                empty = missing_ok and not row[i].strip()
                x[r, c] = math.nan if empty else _number(row[i], path, header[i], r)
            if y is not None and label_at is not None:
                y[r] = _number(row[label_at], path, header[label_at], r)
        return cls(
            ids=tuple(row[id_at] for row in body),
            x=x,
            columns=tuple(header[i] for i in feat),
            y=y,
            missing_ok=missing_ok,
            categorical=tuple(sorted(tables)),
        )


def _category_codes(
    path: Path, column: str, fields: list[str], declared: Sequence[str] | None
) -> Callable[[str, int, bool], float]:
    """A field -> code function for one categorical column (empty: missing)."""
    labels = list(declared) if declared is not None else sorted({f for f in fields if f.strip()})
    codes = {label: float(k) for k, label in enumerate(labels)}

    def code(text: str, row: int, missing_ok: bool) -> float:
        if not text.strip():
            if missing_ok:
                return math.nan
            raise DataError(f"{path}: row {row + 2}, column {column!r} is empty")
        if text not in codes:
            raise DataError(
                f"{path}: row {row + 2}, column {column!r} holds a category not in the job's "
                f"list for it ([model] categories.{column}); add it there"
            )
        return codes[text]

    return code


def _number(text: str, path: Path, column: str, row: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{path}: column {column!r} is not numeric (row {row + 2}: {text[:20]!r}); "
            "encode categories as numbers before a vertical job"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{path}: column {column!r} holds {text!r} at row {row + 2}")
    return value
