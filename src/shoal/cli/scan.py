"""The ``shoal scan`` subcommand: check model files for code that would run when loaded."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shoal.errors import ConfigError
from shoal.scan import FileReport, MissingPath, ScanLimits, Severity, scan_paths

__all__ = ["register", "report_json", "run"]

EPILOG = """\
examples:
  shoal scan model.pt                      one file (format sniffed from content)
  shoal scan models/ --format json         every file under a folder, as JSON
  shoal scan a.pkl b.joblib c.npz          several files
  shoal scan model.keras --max-depth 2     limit archive nesting
  shoal scan big.joblib --max-seconds 600  a larger time budget (every limit: docs/scan.md)

exit codes:
  0  nothing at medium or above      1  something medium, high or critical
  2  usage error (missing path, bad option)
"""

_STYLE = {
    Severity.NONE: "green",
    Severity.LOW: "cyan",
    Severity.MEDIUM: "yellow",
    Severity.HIGH: "red",
    Severity.CRITICAL: "bold red",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="check model files for code that would run when they are loaded",
        description=(
            "Scan model files and folders (pickle, PyTorch, joblib, NumPy, zip/tar, Keras, "
            "safetensors, ONNX) without executing them. Formats are sniffed from content."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to scan")
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (default text)"
    )
    parser.add_argument(
        "--max-depth",
        type=int,
        default=ScanLimits().max_depth,
        help="how deep to open nested archives and compressed streams (default %(default)s)",
    )
    defaults = ScanLimits()
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=defaults.max_seconds,
        help="time budget per file (default %(default)s)",
    )
    parser.add_argument(
        "--max-decompressed-mb",
        type=int,
        default=defaults.max_total_bytes >> 20,
        help="decompressed MiB one file may expand to (default %(default)s)",
    )
    parser.add_argument(
        "--max-ratio",
        type=int,
        default=defaults.max_ratio,
        help="largest decompression ratio once a stream passes 16 MiB (default %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        limits = ScanLimits(
            max_depth=args.max_depth,
            max_seconds=args.max_seconds,
            max_total_bytes=args.max_decompressed_mb << 20,
            max_ratio=args.max_ratio,
        )
    except ConfigError as exc:
        print(f"shoal scan: error: {exc}", file=sys.stderr)
        return 2
    try:
        reports = scan_paths(args.paths, limits=limits)
    except MissingPath as exc:
        print(f"shoal scan: error: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        sys.stdout.write(report_json(reports) + "\n")
    else:
        _print_text(reports)
    return 1 if any(r.severity >= Severity.MEDIUM for r in reports) else 0


def report_json(reports: list[FileReport]) -> str:
    """``json.dumps({"files": [r.to_dict() for r in reports]}, indent=2)``, the same text,
    written directly: with ``indent`` json falls back to its pure-Python encoder, which took
    longer than the scan of a small file for each report (tests/scan/test_scan_cli.py checks
    the two agree)."""
    if not reports:
        return '{\n  "files": []\n}'
    dumps = json.dumps
    out = ['{\n  "files": [']
    for k, r in enumerate(reports):
        out.append(
            f'{"," if k else ""}\n    {{\n      "path": {dumps(r.path)},\n'
            f'      "format": {dumps(r.format)},\n'
            f'      "severity": {dumps(r.severity.label)},\n      "findings": '
        )
        if not r.findings:
            out.append("[]\n    }")
            continue
        out.append("[")
        for j, f in enumerate(r.findings):
            offset = "null" if f.offset is None else dumps(f.offset)
            out.append(
                f"{',' if j else ''}\n        {{\n"
                f'          "severity": {dumps(f.severity.label)},\n'
                f'          "kind": {dumps(f.kind)},\n          "detail": {dumps(f.detail)},\n'
                f'          "offset": {offset}\n        }}'
            )
        out.append("\n      ]\n    }")
    out.append("\n  ]\n}")
    return "".join(out)


def _shown(text: str) -> str:
    """File-controlled text (paths, member and global names) as inert characters: rich reads
    ``[...]`` as markup (``[/bold]`` in a member name crashed the report, ``[white on white]`` hid
    text) and passes ESC through to the terminal (``\\x1b[1A\\x1b[2K`` erases the line above);
    control and format characters (bidi overrides too) are shown as escapes."""
    from rich.markup import escape

    from shoal.cli.text import inert

    return escape(inert(text, lines=False))


def _print_text(reports: list[FileReport]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False)
    for report in reports:
        style = _STYLE[report.severity]
        # soft_wrap: a path longer than the terminal (80 columns when piped) stays on one
        # line, whole, so it can be read, copied and grepped
        console.print(
            f"[bold]{_shown(report.path)}[/bold]  format={_shown(report.format)}  "
            f"severity=[{style}]{report.severity.label}[/{style}]",
            soft_wrap=True,
        )
        if not report.findings:
            console.print("  no findings")
            continue
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("severity")
        table.add_column("kind")
        table.add_column("offset", justify="right")
        table.add_column("detail", overflow="fold")
        for f in report.findings:
            s = _STYLE[f.severity]
            offset = "" if f.offset is None else str(f.offset)
            table.add_row(f"[{s}]{f.severity.label}[/{s}]", f.kind, offset, _shown(f.detail))
        console.print(table)
    bad = sum(1 for r in reports if r.severity >= Severity.MEDIUM)
    console.print(f"{len(reports)} file(s) scanned, {bad} unsafe or unverified")
