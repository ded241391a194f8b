"""``shoal audit``: verify or show an audit trail, the coordinator's or a node's.

``verify`` recomputes the hash chain and reports every edited, removed or reordered entry
(exit status 1 if any); ``tail`` prints the newest entries.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from shoal.cli.options import positive_int
from shoal.errors import ConfigError

__all__ = ["register"]

EPILOG = """\
examples:
  shoal audit verify --store fl.db       the coordinator's trail
  shoal audit verify --state node.db     a node's ledger and audit log
  shoal audit tail --state node.db -n 50
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` with its ``verify`` and ``tail`` subcommands."""
    parser = subparsers.add_parser(
        "audit",
        help="verify or show an audit trail (a coordinator's store or a node's state)",
        description="Verify or show a hash-chained audit trail.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    for name, help_text in (
        ("verify", "check every link of the chain; exit 1 if any entry was tampered with"),
        ("tail", "show the newest entries"),
    ):
        sub = commands.add_parser(name, help=help_text)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--store", help="a coordinator's store file")
        where.add_argument("--state", help="a node's state file (shoal node --state)")
        if name == "tail":
            sub.add_argument("-n", type=positive_int, default=20, help="entries (default 20)")
            sub.add_argument("--run", help="only entries of this run (--store)")
        sub.set_defaults(func=_verify if name == "verify" else _tail)


def _existing(path: str) -> Path:
    target = Path(path)
    if not target.is_file():
        raise ConfigError(f"{path!r} does not exist; give the file to check")
    return target


def _verify(args: argparse.Namespace) -> int:
    if args.store:
        from shoal.runtime import Store

        with Store(_existing(args.store)) as store:
            report = store.verify_audit()
        what = f"store {args.store}"
    else:
        from shoal.runtime import NodeStateFile

        with NodeStateFile(_existing(args.state), owner=None) as file:
            report = file.verify()
            what = f"node state {args.state} (owner {file.owner or '?'})"
    if report.ok:
        print(f"ok: {what}: {report.entries} entries, chain intact, head {report.head}")
        return 0
    print(f"TAMPERED: {what}: {len(report.problems)} problem(s) in {report.entries} entries")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


def _tail(args: argparse.Namespace) -> int:
    rows: Sequence[tuple[int, float, str, str, str]]
    if args.store:
        from shoal.runtime import Store

        with Store(_existing(args.store)) as store:
            records = store.audit_log(args.run, limit=args.n)
        rows = [
            (r.seq, r.ts, r.actor, r.action, json.dumps(r.detail, sort_keys=True)) for r in records
        ]
    else:
        from shoal.runtime import NodeStateFile

        if args.run:
            raise ConfigError("--run applies to a store; a node's state has no runs")
        with NodeStateFile(_existing(args.state), owner=None) as file:
            entries = [e for node in file.nodes() for e in file.read(node)]
        entries.sort(key=lambda e: e.ts)
        rows = [
            (e.seq, e.ts, e.actor, e.action, json.dumps(dict(e.detail), sort_keys=True))
            for e in entries[-args.n :]
        ]
    for seq, ts, actor, action, detail in rows:
        when = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        print(f"{seq:>6}  {when}  {actor:<14.14}  {action:<20}  {detail[:160]}")
    if not rows:
        print("(no entries)")
    return 0
