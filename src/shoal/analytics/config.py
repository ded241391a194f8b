"""What an analytics job declares: the table, the privacy unit, bounds, categories, parties.

The bounds and categories are public: every party clamps to the same bounds, and group keys
with declared categories need no key selection. ``Privacy`` is the per-query DP setting; a job
without it gets exact answers protected only by the secure sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.errors import ConfigError

__all__ = ["AnalyticsConfig", "Party", "Privacy"]

Mode = Literal["distributed", "central"]
MAX_GROUPS = 20_000
MAX_SKETCH_CELLS = 1 << 23  # one party's key-selection vector: at most 64 MiB of float64


@dataclass(frozen=True, kw_only=True)
class Party:
    """One party's data: a DuckDB or SQLite database file, or a CSV/Parquet file."""

    name: str
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a party needs a non-empty name, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"party {self.name!r} needs a path to its data")


@dataclass(frozen=True, kw_only=True)
class Privacy:
    """Epsilon-DP per query. ``distributed``: each party adds a share of the noise inside the
    secure sum; ``central``: the coordinator adds it after the sum. ``noise``: ``laplace``
    (pure epsilon-DP, continuous shares) or ``skellam`` (distributed only: integer-scaled
    statistics with integer Skellam shares, (epsilon, delta)-DP; key selection stays
    Laplace)."""

    epsilon: float
    mode: Mode = "distributed"
    delta: float = 0.0  # Laplace: only for the ledger's (epsilon, delta) reading
    key_selection_share: float = 0.5  # of epsilon, for GROUP BY on undeclared keys
    noise: str = "laplace"

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < math.inf):
            raise ConfigError(f"[privacy] epsilon must be a positive number, got {self.epsilon!r}")
        if self.mode not in ("distributed", "central"):
            raise ConfigError(
                f"[privacy] mode must be 'distributed' or 'central', got {self.mode!r}"
            )
        if not 0 < self.key_selection_share < 1:
            raise ConfigError("[privacy] key_selection_share must be in (0, 1)")
        if self.noise not in ("laplace", "skellam"):
            raise ConfigError(f"[privacy] noise must be 'laplace' or 'skellam', got {self.noise!r}")
        if self.noise == "skellam":
            if self.mode != "distributed":
                raise ConfigError(
                    "[privacy] noise = 'skellam' is distributed noise: use mode = 'distributed'"
                )
            if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
                raise ConfigError(
                    "[privacy] noise = 'skellam' is (epsilon, delta)-DP: give delta in (0, 1), "
                    "e.g. delta = 1e-6"
                )


@dataclass(frozen=True, kw_only=True)
class AnalyticsConfig:
    """The public declarations every party and the analyst share."""

    table: str
    privacy_unit: str | None = None
    max_contributions: int = 1
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    categories: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    join_tables: tuple[str, ...] = ()
    parties: tuple[Party, ...] = ()
    bins: int = 1000  # quantiles and histograms: bins over each column's bounds
    max_rows: int = 10**7  # public bound on one party's rows (scales the secure sum)
    max_groups: int = 1000  # key selection keeps at most this many keys
    max_key_bytes: int = 24  # key selection: longest key (UTF-8 bytes) it can find
    sketch_depth: int = 3  # key selection: Count-Min rows (hash functions) per level
    sketch_width: int | None = None  # columns per row; None: 16 x max_groups, a power of 2

    def __post_init__(self) -> None:
        if not isinstance(self.table, str) or not self.table:
            raise ConfigError("[analytics] table must name the table every party holds")
        if self.privacy_unit is not None and not isinstance(self.privacy_unit, str):
            raise ConfigError("[analytics] privacy_unit must be a column name")
        m = self.max_contributions
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"[analytics] max_contributions must be an int >= 1, got {m!r}")
        bounds = {}
        for col, pair in dict(self.bounds).items():
            try:
                lo, hi = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"[analytics] bounds.{col} must be [low, high], got {pair!r}"
                ) from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"[analytics] bounds.{col} needs finite low < high, got {pair!r}")
            bounds[col.lower()] = (lo, hi)
        object.__setattr__(self, "bounds", bounds)
        cats = {}
        for col, values in dict(self.categories).items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"[analytics] categories.{col} must be a non-empty list")
            if len(set(values)) != len(values):
                raise ConfigError(f"[analytics] categories.{col} lists a value twice")
            cats[col.lower()] = tuple(values)
        object.__setattr__(self, "categories", cats)
        object.__setattr__(self, "join_tables", tuple(self.join_tables))
        object.__setattr__(self, "parties", tuple(self.parties))
        names = [p.name for p in self.parties]
        if len(set(names)) != len(names):
            raise ConfigError("[analytics] parties must have distinct names")
        for name, value, low in (
            ("bins", self.bins, 2),
            ("max_rows", self.max_rows, 1),
            ("max_groups", self.max_groups, 1),
            ("max_key_bytes", self.max_key_bytes, 1),
            ("sketch_depth", self.sketch_depth, 1),
            ("sketch_width", 16 if self.sketch_width is None else self.sketch_width, 16),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"[analytics] {name} must be an int >= {low}, got {value!r}")
        if self.max_groups > MAX_GROUPS:
            raise ConfigError(
                f"[analytics] max_groups is at most {MAX_GROUPS} (key selection asks 257 "
                f"children of every surviving prefix), got {self.max_groups}"
            )
        cells = (self.max_key_bytes + 1) * self.sketch_depth * self.sketch_columns
        if self.sketch_depth > 16 or cells > MAX_SKETCH_CELLS:
            raise ConfigError(
                f"[analytics] key selection's sketches would have {cells} cells "
                f"((max_key_bytes + 1) x sketch_depth x sketch_width, depth at most 16); "
                f"keep them within {MAX_SKETCH_CELLS}"
            )

    @property
    def sketch_columns(self) -> int:
        """The sketch width in use: declared, or 16 x max_groups rounded up to a power of 2
        (at most 2^16), so that few absent keys collide with present ones in every row."""
        if self.sketch_width is not None:
            return self.sketch_width
        return int(min(1 << 16, 1 << max(4, math.ceil(math.log2(16 * self.max_groups)))))

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.table, *self.join_tables)

    def to_json(self) -> dict[str, Any]:
        """The public declarations a node needs to answer a query (parties' paths excluded)."""
        return {
            "table": self.table,
            "privacy_unit": self.privacy_unit,
            "max_contributions": self.max_contributions,
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "categories": {k: list(v) for k, v in self.categories.items()},
            "join_tables": list(self.join_tables),
            "bins": self.bins,
            "max_rows": self.max_rows,
            "max_groups": self.max_groups,
            "max_key_bytes": self.max_key_bytes,
            "sketch_depth": self.sketch_depth,
            "sketch_width": self.sketch_width,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, where: str = "[analytics]") -> AnalyticsConfig:
        allowed = {
            "table",
            "privacy_unit",
            "max_contributions",
            "bounds",
            "categories",
            "join_tables",
            "parties",
            "bins",
            "max_rows",
            "max_groups",
            "max_key_bytes",
            "sketch_depth",
            "sketch_width",
        }
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "table" not in raw:
            raise ConfigError(f"{where} needs 'table', the table every party holds")
        parties = []
        for i, p in enumerate(raw.get("parties", [])):
            if not isinstance(p, Mapping) or set(p) != {"name", "path"}:
                raise ConfigError(
                    f"{where} parties[{i}] must be {{ name = ..., path = ... }}, got {p!r}"
                )
            parties.append(Party(name=str(p["name"]), path=str(p["path"])))
        kwargs = {k: v for k, v in raw.items() if k != "parties"}
        return cls(**kwargs, parties=tuple(parties))


def privacy_from_dict(raw: Mapping[str, Any] | None) -> Privacy | None:
    """The ``[privacy]`` table of an analytics job (None: exact, secure-sum-only answers)."""
    if raw is None:
        return None
    allowed = {"epsilon", "delta", "mode", "key_selection_share", "noise"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"[privacy]: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if "epsilon" not in raw:
        raise ConfigError("[privacy] needs epsilon (per query)")
    return Privacy(**raw)
