"""``shoal audit``: verify, anchor or show an audit trail, the coordinator's or a node's.

``verify`` recomputes the hash chain and checks its sealed head with the audit key, and
reports every edited, removed or reordered entry (exit status 1 if any); ``anchor`` exports
the heads to a file kept elsewhere, which ``verify --anchor`` then holds the chain to;
``tail`` prints the newest entries.
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
  shoal audit anchor --state node.db --out /elsewhere/node-anchor.json
  shoal audit verify --state node.db --anchor /elsewhere/node-anchor.json
  shoal audit tail --state node.db -n 50

The head of each chain is sealed with an HMAC under the audit key (FILE.audit-key beside
the database unless --key names it): rewriting entries, or cutting the tail and lowering
the recorded head with SQL, fails verify without that key. Whoever holds the key (or
restores an older copy of both files) is caught only by an anchor exported before.
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
    actions = {"verify": _verify, "anchor": _anchor, "tail": _tail}
    for name, help_text in (
        ("verify", "check every link of the chain; exit 1 if any entry was tampered with"),
        ("anchor", "export the chain heads to a file, for a later verify --anchor"),
        ("tail", "show the newest entries"),
    ):
        sub = commands.add_parser(name, help=help_text)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--store", help="a coordinator's store file")
        where.add_argument("--state", help="a node's state file (shoal node --state)")
        if name != "tail":
            sub.add_argument(
                "--key", metavar="FILE", help="the audit key (default: the file + .audit-key)"
            )
        if name == "verify":
            sub.add_argument(
                "--anchor", metavar="FILE", help="also check the heads `shoal audit anchor` saved"
            )
        if name == "anchor":
            sub.add_argument("--out", required=True, metavar="FILE", help="where to write it")
        if name == "tail":
            sub.add_argument("-n", type=positive_int, default=20, help="entries (default 20)")
            sub.add_argument("--run", help="only entries of this run (--store)")
        sub.set_defaults(func=actions[name])


def _existing(path: str) -> Path:
    target = Path(path)
    if not target.is_file():
        raise ConfigError(f"{path!r} does not exist; give the file to check")
    return target


def _verify(args: argparse.Namespace) -> int:
    from shoal.runtime.audit import read_anchor

    anchor = read_anchor(args.anchor) if args.anchor else None
    if args.store:
        from shoal.runtime import Store

        with Store(_existing(args.store), audit_key=args.key) as store:
            report = store.verify_audit(anchor=anchor)
        what = f"store {args.store}"
    else:
        from shoal.runtime import NodeStateFile

        with NodeStateFile(_existing(args.state), owner=None, key_path=args.key) as file:
            report = file.verify(anchor=anchor)
            what = f"node state {args.state} (owner {file.owner or '?'})"
    if report.ok:
        against = f", holds anchor {args.anchor}" if anchor is not None else ""
        print(
            f"ok: {what}: {report.entries} entries, chain intact, head sealed{against}, "
            f"head {report.head}"
        )
        return 0
    print(f"TAMPERED: {what}: {len(report.problems)} problem(s) in {report.entries} entries")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


def _anchor(args: argparse.Namespace) -> int:
    from shoal.runtime.audit import write_anchor

    if args.store:
        from shoal.runtime import Store

        with Store(_existing(args.store), audit_key=args.key) as store:
            anchor = store.audit_anchor()
    else:
        from shoal.runtime import NodeStateFile

        with NodeStateFile(_existing(args.state), owner=None, key_path=args.key) as file:
            anchor = file.anchor()
    write_anchor(args.out, anchor)
    heads = ", ".join(
        f"{k or 'head'} = entry {seq}" for k, (seq, _) in sorted(anchor.heads.items())
    )
    print(f"anchored {len(anchor.heads)} chain(s) in {args.out}: {heads}")
    print("keep that file where whoever can write the database cannot (or send it to a peer)")
    return 0


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
