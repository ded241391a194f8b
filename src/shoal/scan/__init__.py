"""Model-file scanner and safe loading.

``scan_file`` / ``scan_bytes`` report what loading a file would import or run (pickles, torch,
joblib, NumPy, zip/tar archives, Keras, safetensors, ONNX) without executing anything;
``load`` builds a file's contents only when the scan finds nothing at ``MEDIUM`` or above, with
an interpreter that calls nothing the file names (see ``shoal.scan.unpickle``).
"""

from __future__ import annotations

from shoal.errors import UnsafeModelError
from shoal.scan.allowlist import SAFE_GLOBALS, classify_global, is_allowed
from shoal.scan.load import load, loads, restricted_loads
from shoal.scan.report import FileReport, Finding, ScanLimits, Severity
from shoal.scan.scanner import MissingPath, iter_files, scan_bytes, scan_file, scan_paths

__all__ = [
    "SAFE_GLOBALS",
    "FileReport",
    "Finding",
    "MissingPath",
    "ScanLimits",
    "Severity",
    "UnsafeModelError",
    "classify_global",
    "is_allowed",
    "iter_files",
    "load",
    "loads",
    "restricted_loads",
    "scan_bytes",
    "scan_file",
    "scan_paths",
]
