"""Scan results: severities, findings and per-file reports, plus the scanner's resource limits.

These are plain frozen dataclasses so reports can be compared, hashed and turned into JSON
without touching the scanned file again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ConfigError

__all__ = ["FileReport", "Finding", "ScanLimits", "Severity"]


class Severity(enum.IntEnum):
    """How bad a finding is; ordered, so ``max()`` and comparisons work.

    ``MEDIUM`` and above mean "do not load": either code would run or the scanner could not
    verify that none would.
    """

    NONE = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.label for s in cls)
            raise ConfigError(f"unknown severity {text!r}; expected one of {names}") from None


@dataclass(frozen=True)
class Finding:
    """One thing the scanner noticed: ``offset`` is a byte offset in the (decoded) stream."""

    severity: Severity
    kind: str
    detail: str
    offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.label,
            "kind": self.kind,
            "detail": self.detail,
            "offset": self.offset,
        }


@dataclass(frozen=True)
class FileReport:
    """Everything found in one file; ``severity`` is the worst finding (``NONE`` if none)."""

    path: str
    format: str
    severity: Severity
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def safe(self) -> bool:
        """True when nothing reaches ``MEDIUM``: the file may be loaded with ``shoal.scan.load``."""
        return self.severity < Severity.MEDIUM

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "severity": self.severity.label,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class ScanLimits:
    """Bounds that keep a hostile file from exhausting memory, disk or time.

    Exceeding one is reported as a ``MEDIUM`` "limit" finding: the part beyond it was not verified.
    """

    max_depth: int = 6  # nested archives / compressed streams
    max_members: int = 100_000  # entries per archive
    max_member_bytes: int = 64 * 2**30  # decompressed bytes read from one member or stream
    max_spool_bytes: int = 4 * 2**30  # bytes copied to a temp file to make a stream seekable
    max_pickle_stack: int = 1_000_000  # pickle stack (and MARK nesting) entries
    max_pickles_per_stream: int = 10_000  # concatenated pickles in one stream
    max_header_bytes: int = 100_000_000  # safetensors / npy / keras JSON headers
    max_findings: int = 500  # per file, after de-duplication
    max_total_bytes: int = 4 * 2**30  # decompressed bytes across all streams of one file
    # decompressed / compressed bytes of a stream, once it made 16 MiB of bytes read as opcodes,
    # headers or records, or ratio_after_bytes in all (raw array data included)
    max_ratio: int = 1000
    ratio_after_bytes: int = 256 << 20
    max_pickle_ops: int = 200_000_000  # opcodes analysed in one pickle stream
    max_memo: int = 1 << 22  # memo entries, and the largest memo index
    max_container_items: int = 20_000_000  # items in all tuples, lists, dicts and sets
    max_load_bytes: int = 64 * 2**30  # bytes of arrays and tensors one load may build
    max_object_bytes: int = 2**30  # estimated bytes of Python objects one load may build
    max_key_collisions: int = 64  # keys of one dict or set (load) that share one hash value
    # bytes kept, after the first joblib array header of a stream that cannot be read twice,
    # for pickle.load's reading of it (which reads the array data as opcodes)
    max_plain_reading_bytes: int = 64 << 20
    # containers nested in one value: what a caller does with it (repr, ==, json.dumps) recurses
    max_value_depth: int = 500
    max_seconds: float = 120.0  # time budget per file, for the scan and for the load

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if not getattr(self, name) > 0:  # NaN too: it compares false, so it bounded nothing
                raise ConfigError(f"ScanLimits.{name} must be positive, got {getattr(self, name)}")
