"""``shoal datasite``: create and serve a datasite, and every owner and scientist action on it.

``init`` and ``serve`` work on the datasite's directory; every other verb talks to a running
datasite over HTTPS with a token (``--url``/``--token``/``--ca`` or ``SHOAL_DATASITE_URL``,
``SHOAL_DATASITE_TOKEN``, ``SHOAL_DATASITE_CA``); ``audit verify --dir`` reads the file itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from shoal.cli.options import positive_float, positive_int
from shoal.cli.text import inert
from shoal.errors import ConfigError

__all__ = ["register"]

EPILOG = """\
an owner (see docs/datasite.md):
  shoal datasite init site/ --host data.example.org     # prints the owner's token once
  shoal datasite serve site/ --listen 0.0.0.0:8443
  export SHOAL_DATASITE_URL=https://data.example.org:8443 SHOAL_DATASITE_CA=site/certs/ca.pem
  export SHOAL_DATASITE_TOKEN=<owner token>
  shoal datasite users add alice --role scientist       # prints alice's token once
  shoal datasite datasets add patients --file patients.csv --bounds age=0:120 --unit id
  shoal datasite requests list --state mock-run
  shoal datasite requests show 3 ; shoal datasite requests diff 3
  shoal datasite requests approve 3 --hash <code hash> --reason "aggregate only"
  shoal datasite audit head --dir site/                   # SEQ:HASH: keep it elsewhere
  shoal datasite audit verify --dir site/ --anchor SEQ:HASH
"""


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get("SHOAL_DATASITE_URL"), help="https://HOST:PORT"
    )
    parser.add_argument(
        "--token", default=os.environ.get("SHOAL_DATASITE_TOKEN"), help="your token"
    )
    parser.add_argument("--ca", default=os.environ.get("SHOAL_DATASITE_CA"), help="ca.pem")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "datasite",
        help="serve data for remote data science: code requests, approval, sandbox",
        description="A datasite holds private datasets; scientists submit code, the owner "
        "approves it, a sandbox runs it, results leave under a policy.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    verbs = parser.add_subparsers(dest="datasite_command", metavar="VERB", required=True)

    init = verbs.add_parser("init", help="create a datasite directory, its owner and certificates")
    init.add_argument("dir", help="the datasite's directory")
    init.add_argument("--owner", default="owner", help="the owner's user name")
    init.add_argument("--name", help="the site's name in federations (default: DIR's name)")
    init.add_argument("--host", action="append", default=[], help="a name clients use (repeat)")
    init.set_defaults(func=_init)

    serve = verbs.add_parser("serve", help="serve the API and the owner's web page")
    serve.add_argument("dir", help="the datasite's directory")
    serve.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT")
    serve.add_argument("--certs", help="certificate directory (default DIR/certs)")
    serve.add_argument(
        "--insecure", action="store_true", help="plain HTTP, loopback addresses only (tests)"
    )
    serve.add_argument("--wall-seconds", type=positive_float, default=60.0, help="per job")
    serve.add_argument("--memory-mb", type=positive_int, default=2048, help="per job")
    serve.set_defaults(func=_serve)

    users = verbs.add_parser("users", help="list or add users (owner)")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    ul = users_sub.add_parser("list")
    _client_options(ul)
    ul.set_defaults(func=lambda a: _show(_site(a).call("GET", "/api/users")))
    ua = users_sub.add_parser("add")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=["owner", "scientist", "guest"])
    _client_options(ua)
    ua.set_defaults(func=_users_add)

    ds = verbs.add_parser("datasets", help="list datasets, or add one (owner)")
    ds_sub = ds.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    dl = ds_sub.add_parser("list")
    _client_options(dl)
    dl.set_defaults(func=lambda a: _show(_site(a).call("GET", "/api/datasets")))
    da = ds_sub.add_parser("add", help="register a table on the datasite's machine")
    da.add_argument("name")
    da.add_argument("--file", required=True, help="CSV, Parquet or SQLite file (server path)")
    da.add_argument("--format", choices=["csv", "parquet", "sqlite"])
    da.add_argument("--table", help="the table, for SQLite")
    da.add_argument("--description", default="")
    da.add_argument("--bounds", action="append", default=[], metavar="COL=LO:HI")
    da.add_argument("--categories", action="append", default=[], metavar="COL=A,B,C")
    da.add_argument("--unit", help="the privacy unit's id column")
    da.add_argument("--max-contributions", type=positive_int, default=1)
    da.add_argument("--max-epsilon", type=positive_float, default=1.0, help="per scientist")
    da.add_argument("--delta", type=positive_float, default=1e-6)
    da.add_argument("--default-epsilon", type=positive_float, default=0.1, help="per request")
    da.add_argument("--threshold", type=positive_int, default=10, help="smallest count shown")
    da.add_argument("--mock", help="the owner's own mock file (else generated from the schema)")
    da.add_argument("--mock-rows", type=positive_int, default=100)
    _client_options(da)
    da.set_defaults(func=_datasets_add)

    rq = verbs.add_parser("requests", help="list, show, diff, approve, deny, release requests")
    rq_sub = rq.add_subparsers(dest="requests_command", metavar="ACTION", required=True)
    rl = rq_sub.add_parser("list")
    rl.add_argument("--state")
    _client_options(rl)
    rl.set_defaults(func=_requests_list)
    for name in ("show", "diff", "approve", "deny", "release", "withhold"):
        sub = rq_sub.add_parser(name)
        sub.add_argument("id", type=positive_int)
        if name == "approve":
            sub.add_argument("--hash", required=True, help="the code hash you reviewed")
        if name in ("approve", "deny", "release", "withhold"):
            sub.add_argument("--reason", default="", required=name in ("deny", "withhold"))
        _client_options(sub)
        sub.set_defaults(func=_requests_action, action=name)

    jobs = verbs.add_parser("jobs", help="list jobs, read a job's log, kill a job (owner)")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    jl = jobs_sub.add_parser("list")
    _client_options(jl)
    jl.set_defaults(func=lambda a: _show(_site(a).call("GET", "/api/jobs")))
    for name in ("logs", "kill"):
        sub = jobs_sub.add_parser(name)
        sub.add_argument("id", type=positive_int)
        _client_options(sub)
        sub.set_defaults(func=_jobs_action, action=name)

    res = verbs.add_parser("results", help="a request's result (released, or mock)")
    res.add_argument("id", type=positive_int)
    res.add_argument("--mock", action="store_true", help="the result on mock data")
    _client_options(res)
    res.set_defaults(func=_results)

    bud = verbs.add_parser("budget", help="privacy budget spent and left, per scientist")
    _client_options(bud)
    bud.set_defaults(func=lambda a: _show(_site(a).budget()))

    audit = verbs.add_parser("audit", help="verify or show the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    av = audit_sub.add_parser("verify", help="recompute the hash chain; exit 1 if tampered")
    av.add_argument("--dir", help="read the datasite's directory directly (trusts no server)")
    av.add_argument(
        "--anchor",
        metavar="SEQ:HASH|FILE",
        help="the head `audit head` printed earlier: any rewrite up to it is found",
    )
    _client_options(av)
    av.set_defaults(func=_audit_verify)
    ah = audit_sub.add_parser(
        "head", help="print the chain's head as SEQ:HASH, to keep elsewhere for verify --anchor"
    )
    ah.add_argument("--dir", help="read the datasite's directory directly (trusts no server)")
    ah.add_argument("--out", metavar="FILE", help="also write it as a `shoal audit` anchor file")
    _client_options(ah)
    ah.set_defaults(func=_audit_head)
    at = audit_sub.add_parser("show", help="the newest entries")
    at.add_argument("-n", type=positive_int, default=50)
    _client_options(at)
    at.set_defaults(func=lambda a: _show(_site(a).call("GET", f"/api/audit?limit={a.n}")))


def _show(value: Any) -> int:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))
    return 0


def _site(args: argparse.Namespace) -> Any:
    from shoal.datasite.client import connect

    if not args.url or not args.token:
        raise ConfigError(
            "give --url and --token (or set SHOAL_DATASITE_URL and SHOAL_DATASITE_TOKEN)"
        )
    return connect(args.url, args.token, ca=args.ca)


def _init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.datasite.state import DB_NAME, DatasiteState
    from shoal.runtime.grpc.certs import make_certs

    directory = Path(args.dir)
    if (directory / DB_NAME).exists():
        raise ConfigError(f"{args.dir!r} is a datasite already; serve it, or pick a new directory")
    with DatasiteState(directory, create=True) as state:
        token = state.add_user(args.owner, "owner", actor="init")
        if args.name:
            state.set_name(args.name)
    files = make_certs(directory / "certs", hosts=args.host)
    print(
        f"created datasite {directory} (certificates in {files.directory}; clients need {files.ca})"
    )
    print(f"owner {args.owner!r} token (shown once, stored only hashed):\n{token}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from shoal.cli.options import port_number
    from shoal.datasite.sandbox import SandboxLimits, bwrap_available
    from shoal.datasite.server import serve

    host, _, port = args.listen.rpartition(":")
    limits = SandboxLimits(
        wall_seconds=args.wall_seconds,
        cpu_seconds=max(1, int(args.wall_seconds)),
        memory_bytes=args.memory_mb << 20,
    )
    if args.insecure:
        print(
            "WARNING: --insecure: plain HTTP; tokens cross the wire unencrypted (loopback only)",
            file=sys.stderr,
        )
    if not bwrap_available():
        print(
            "WARNING: bwrap is not available: jobs run without their own network, PID and mount "
            "namespaces (docs/datasite.md says what still holds); apt-get install bubblewrap",
            file=sys.stderr,
        )
    scheme = "http" if args.insecure else "https"
    print(f"datasite {args.dir} serving on {scheme}://{host.strip('[]')}:{port}", flush=True)
    serve(
        args.dir,
        host=host.strip("[]"),
        port=port_number(port),
        certs=args.certs,
        insecure=args.insecure,
        limits=limits,
    )
    return 0


def _users_add(args: argparse.Namespace) -> int:
    got = _site(args).call("POST", "/api/users", {"name": args.name, "role": args.role})
    print(f"{got['role']} {got['name']!r} token (shown once, stored only hashed):\n{got['token']}")
    return 0


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} takes COLUMN=VALUE, got {item!r}")
        out[key] = value
    return out


def _datasets_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    bounds = {}
    for col, text in _pairs(args.bounds, "--bounds").items():
        lo, _, hi = text.partition(":")
        try:
            bounds[col] = [float(lo), float(hi)]
        except ValueError:
            raise ConfigError(f"--bounds {col}= takes LOW:HIGH, got {text!r}") from None
    body = {
        "name": args.name,
        "path": str(Path(args.file).resolve()),
        "format": args.format,
        "table": args.table,
        "description": args.description,
        "bounds": bounds,
        "categories": {c: v.split(",") for c, v in _pairs(args.categories, "--categories").items()},
        "unit": args.unit,
        "max_contributions": args.max_contributions,
        "max_epsilon": args.max_epsilon,
        "delta": args.delta,
        "default_epsilon": args.default_epsilon,
        "threshold": args.threshold,
        "mock_path": str(Path(args.mock).resolve()) if args.mock else None,
        "mock_rows": args.mock_rows,
    }
    return _show(_site(args).call("POST", "/api/datasets", body))


def _requests_list(args: argparse.Namespace) -> int:
    rows = _site(args).requests(args.state)
    for r in rows:
        print(
            f"{r['id']:>5}  {r['state']:<14}  {r['scientist']:<12.12}  {r['policy']['kind']:<9}  "
            f"{r['code_hash'][:16]}  {r['name']}"
        )
    if not rows:
        print("(no requests)")
    return 0


def _requests_action(args: argparse.Namespace) -> int:
    site = _site(args)
    rid = args.id
    if args.action == "show":
        info = site.call("GET", f"/api/requests/{rid}")
        source = info.pop("source")
        _show(info)
        print("--- source ---")
        print(inert(source))
        try:
            print("--- mock result ---")
            _show(site.call("GET", f"/api/requests/{rid}/preview/mock"))
        except Exception as exc:  # no mock result yet is worth saying, not failing on
            print(f"(none: {exc})")
        return 0
    if args.action == "diff":
        got = site.call("GET", f"/api/requests/{rid}/diff")
        print(inert(got["diff"]) or "(no earlier request by this scientist to compare with)")
        return 0
    if args.action == "approve":
        return _show(site.approve(rid, args.hash, args.reason))
    if args.action == "deny":
        return _show(site.deny(rid, args.reason))
    if args.action == "release":
        return _show(site.release(rid, args.reason))
    return _show(site.withhold(rid, args.reason))


def _jobs_action(args: argparse.Namespace) -> int:
    site = _site(args)
    if args.action == "logs":
        print(inert(site.call("GET", f"/api/jobs/{args.id}/logs")["logs"]))
        return 0
    return _show(site.call("POST", f"/api/jobs/{args.id}/kill"))


def _results(args: argparse.Namespace) -> int:
    site = _site(args)
    if args.mock:
        return _show(site.call("GET", f"/api/requests/{args.id}/preview/mock"))
    from shoal.datasite.service import jsonable
    from shoal.wire import decode

    return _show(jsonable(decode(site.call("GET", f"/api/requests/{args.id}/result", raw=True))))


def _audit_verify(args: argparse.Namespace) -> int:
    from shoal.runtime.audit import one_head, parse_anchor

    anchor = parse_anchor(args.anchor, source="datasite") if args.anchor else None
    if args.dir:
        from shoal.datasite.state import DatasiteState

        with DatasiteState(args.dir) as state:
            report = state.verify(anchor=anchor)
        ok, entries, head, problems = report.ok, report.entries, report.head, report.problems
    else:
        path = "/api/audit/verify"
        held = one_head(anchor, of="a datasite")
        if held is not None:
            path += f"?anchor={held[0]}:{held[1]}"
        got = _site(args).call("GET", path)
        ok, entries, head, problems = got["ok"], got["entries"], got["head"], got["problems"]
    if ok:
        against = f", holds anchor entry {anchor.heads[''][0]}" if anchor is not None else ""
        print(f"ok: {entries} entries, chain intact{against}, head {head}")
        if anchor is None:
            print(
                "  (without an anchor, a chain rewritten with recomputed hashes passes: "
                "keep `shoal datasite audit head` elsewhere and give it as --anchor)"
            )
        return 0
    print(f"TAMPERED: {len(problems)} problem(s) in {entries} entries")
    for problem in problems:
        print(f"  {problem}")
    return 1


def _audit_head(args: argparse.Namespace) -> int:
    from shoal.runtime.audit import Anchor, write_anchor

    if args.dir:
        from shoal.datasite.state import DatasiteState

        with DatasiteState(args.dir) as state:
            anchor = state.anchor()
    else:
        got = _site(args).call("GET", "/api/audit/verify")
        if not got["ok"]:
            print("TAMPERED: the chain fails verification, so it is not anchored")
            for problem in got["problems"]:
                print(f"  {problem}")
            return 1
        anchor = Anchor(source="datasite", heads={"": (int(got["last_seq"]), str(got["head"]))})
    seq, digest = anchor.heads[""]
    if args.out:
        write_anchor(args.out, anchor)
    print(f"{seq}:{digest}")
    return 0
