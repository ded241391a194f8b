"""What a datasite does, independent of HTTP: datasets, requests, approvals, jobs, releases.

Every action is authorized by role here (the HTTP layer only finds the user), recorded in
the audit chain, and moves a request through its lifecycle. Submitted code runs only in
``sandbox.run_sandboxed`` child processes, on a small pool of worker threads.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import os
import re
import sqlite3
import threading
import time
import tokenize
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.datasite import dp as dpmod
from shoal.datasite import federated as fed
from shoal.datasite.assets import generate_mock, infer_schema, load_table, meta_from_record
from shoal.datasite.reap import JobHandle
from shoal.datasite.sandbox import (
    JobOutcome,
    SandboxLimits,
    bwrap_available,
    readable_by_jobs,
    run_sandboxed,
)
from shoal.datasite.state import ROLES, DatasiteState, hash_token, request_hash
from shoal.datasite.table import Table, decode_table, encode_table
from shoal.errors import (
    ConfigError,
    PrivacyBudgetExceeded,
    ReleaseRefused,
    ShoalError,
    UnknownTask,
    WireError,
)
from shoal.runtime.audit import parse_head
from shoal.runtime.engine import DECLINED_DETAIL
from shoal.wire import decode, encode

__all__ = ["Forbidden", "NodeFailure", "NotFound", "Service", "User"]

POLICIES = ("review", "dp", "threshold", "secure-sum")
MAX_SOURCE = 256 << 10
# requests of one user whose mock run has not finished: the job pool is first come, first
# served, so this bounds how long one user's submissions can keep everyone else's waiting
MAX_PENDING = 4
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Unicode bidirectional controls: in a comment or string they reorder how the code is *shown*
# (to the owner, on the page or in a terminal) without changing what Python runs: the owner
# would approve code other than the code that runs ("Trojan Source", CVE-2021-42574)
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# What a terminal acts on rather than shows: ESC and the other C0/C1 controls (CSI sequences
# move the cursor and erase lines), and a carriage return not ending a line (the text after it
# overwrites the line on screen, while Python reads it as a new line).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Forbidden(ShoalError, PermissionError):
    """The caller's role may not do this."""


class NotFound(ShoalError, LookupError):
    """No such request, job, dataset or user (or not one the caller may see)."""


class Conflict(ShoalError, RuntimeError):
    """The action does not fit the object's state (approving a denied request, a stale hash)."""


class NodeFailure(ShoalError, RuntimeError):
    """The site's node did not run a task: ``kind`` is rejected, declined or error (the
    Engine contract's failure kinds); the node audited it already."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def jsonable(payload: Mapping[str, Any], *, max_items: int = 200) -> dict[str, Any]:
    """A wire payload shown as JSON (arrays as nested lists, cut to ``max_items`` numbers)."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            flat = value.ravel()
            shown = flat[:max_items].tolist()
            out[key] = {
                "shape": list(value.shape),
                "dtype": value.dtype.str,
                "values": [
                    None if isinstance(v, float) and not math.isfinite(v) else v for v in shown
                ],
                "truncated": flat.size > max_items,
            }
        elif isinstance(value, float) and not math.isfinite(value):
            out[key] = None
        else:
            out[key] = value
    return out


def _secure_sum_input(output: bytes | None, federation: Mapping[str, Any]) -> str:
    """Why the job's output cannot enter the secure sum ("" when it can)."""
    if output is None:
        return "the job produced no output"
    value = decode(output).get("result")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        return "a secure-sum request returns {'result': numeric array}"
    if list(value.shape) != list(federation["shape"]):
        return f"the result has shape {list(value.shape)}, not the agreed {federation['shape']}"
    if not np.all(np.isfinite(value)):
        return "the result holds NaN or infinite values"
    return ""


def _public_reason(outcome: JobOutcome) -> str:
    if outcome.state == "succeeded":
        return ""
    if outcome.state == "timeout":
        return "the run on the real data hit the time limit"
    if outcome.state == "out-of-memory":
        return "the run on the real data ran out of memory"
    return "the run on the real data failed; its log (the owner's to read) says why"


def _job_view(job: dict[str, Any], user: User) -> dict[str, Any]:
    """A job as the caller may see it: a real run's reason and duration are the owner's."""
    if user.role != "owner" and job["kind"] != "mock":
        job["reason"] = ""
        job["seconds"] = None
    return job


def _warm_up() -> None:
    import shoal.datasite.node
    import shoal.privacy  # noqa: F401


def _number(spec: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    """A finite number of a dataset's spec (an int if ``integer``), named in the refusal."""
    value = spec.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite {'integer' if integer else 'number'}")
    return value


def _bounds(value: Any) -> dict[str, tuple[float, float]]:
    if value is None:
        return {}
    pairs = value.items() if isinstance(value, Mapping) else None
    out: dict[str, tuple[float, float]] = {}
    for column, pair in pairs or ():
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in pair)
        ):
            raise ConfigError(f"bounds of {column!r} must be [low, high], got {pair!r:.80}")
        out[str(column)] = (float(pair[0]), float(pair[1]))
    if pairs is None:
        raise ConfigError("bounds map column names to [low, high]")
    return out


def _check_reviewable(source: str) -> None:
    """Refuse source the owner could read as other code than what runs: bidirectional
    controls anywhere, control characters a terminal acts on (``shoal datasite requests show``
    prints the source), and identifiers that are not ASCII (``а`` and ``a`` are two names)."""
    control = _CONTROL.search(source)
    if control:
        line = source.count("\n", 0, control.start()) + 1
        raise ConfigError(
            f"source line {line} holds the control character U+{ord(control.group()[0]):04X}, "
            "which a terminal acts on (erasing or overwriting what the reviewer reads); remove it"
        )
    found = _BIDI.search(source)
    if found:
        line = source.count("\n", 0, found.start()) + 1
        raise ConfigError(
            f"source line {line} holds the bidirectional control U+{ord(found.group()):04X}, "
            "which makes code display differently from how it runs; remove it"
        )
    if source.isascii():
        return
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.NAME and not token.string.isascii():
                raise ConfigError(
                    f"source line {token.start[0]} names {token.string!r}: identifiers must be "
                    "ASCII, so that no two names look alike to the reviewer"
                )
    except (tokenize.TokenError, SyntaxError):
        return  # the mock run reports the syntax error itself


class Service:
    """One datasite: its state, its worker pool, its sandbox limits."""

    def __init__(
        self,
        state: DatasiteState,
        *,
        limits: SandboxLimits | None = None,
        workers: int = 2,
        isolate: bool | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.state = state
        self.max_pending = max_pending
        self.limits = limits or SandboxLimits()
        self.isolate = isolate
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datasite-job")
        self._running: dict[int, JobHandle] = {}
        self._pids_lock = threading.Lock()
        self._doomed: set[int] = set()
        self._users: dict[str, User] = {}
        self.identity = fed.SiteIdentity.load_or_create(state.directory, state.name)
        # the site's shoal node for federated requests (built on first use: it imports
        # SecAgg+), with one node state per request
        self._node: Any = None
        self._nodes: OrderedDict[int, tuple[threading.Lock, dict[str, Any]]] = OrderedDict()
        self._node_lock = threading.Lock()
        # the DP and SecAgg+ modules take about a second of CPU to import: do it now, in the
        # background, rather than inside the first request that needs them
        threading.Thread(target=_warm_up, name="datasite-warm-up", daemon=True).start()
        self._recover()

    @property
    def node(self) -> Any:
        """The site's NodeApp (:func:`shoal.datasite.node.site_app`)."""
        with self._node_lock:
            if self._node is None:
                from shoal.datasite.node import site_app

                self._node = site_app(self.identity, self._hold)
            return self._node

    def close(self) -> None:
        with self._pids_lock:
            for handle in self._running.values():
                handle.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _recover(self) -> None:
        """Jobs that were running when the server stopped did not finish: say so."""
        with self.state.tx() as conn:
            for row in conn.execute(
                "SELECT id, request_id FROM jobs WHERE state IN ('queued', 'running')"
            ).fetchall():
                conn.execute(
                    "UPDATE jobs SET state='failed', reason='the server stopped during the job', "
                    "finished=? WHERE id=?",
                    (time.time(), row[0]),
                )
                conn.execute(
                    "UPDATE requests SET state='failed', reason='the server stopped during the "
                    "job; submit it again', updated=? WHERE id=? AND state IN ('queued','running')",
                    (time.time(), row[1]),
                )
            # a submission whose mock run never ran: run it now
            pending = conn.execute("SELECT id FROM requests WHERE state='submitted'").fetchall()
        for (rid,) in pending:
            self._pool.submit(self._mock_job, int(rid))

    # -- users -------------------------------------------------------------------------------

    def authenticate(self, token: str) -> User:
        # users are never removed or changed, so a token once checked stays good; the cache
        # is keyed by the token's digest, like the table
        digest = hash_token(token)
        user = self._users.get(digest)
        if user is None:
            row = self.state.user_for(token)
            user = User(int(row["id"]), str(row["name"]), str(row["role"]))
            if len(self._users) < 10_000:
                self._users[digest] = user
        return user

    @staticmethod
    def require(user: User, *roles: str) -> None:
        if user.role not in roles:
            raise Forbidden(
                f"{user.name} is a {user.role}; this needs the role {' or '.join(roles)}"
            )

    def add_user(self, user: User, name: str, role: str) -> str:
        self.require(user, "owner")
        if role not in ROLES:
            raise ConfigError(f"role must be one of {list(ROLES)}, got {role!r}")
        return self.state.add_user(name, role, actor=user.name)

    def users(self, user: User) -> list[dict[str, Any]]:
        self.require(user, "owner")
        rows = self.state.query("SELECT id, name, role, created FROM users ORDER BY id")
        return [dict(r) for r in rows]

    # -- datasets ----------------------------------------------------------------------------

    def add_dataset(self, user: User, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Register a table the owner holds, with its description, mock and DP metadata."""
        self.require(user, "owner")
        name = str(spec.get("name", ""))
        if not _NAME.match(name):
            raise ConfigError(f"a dataset name is letters, digits, . _ - (got {name!r})")
        path = Path(str(spec.get("path", ""))).expanduser().resolve()
        table = load_table(path, name=name, fmt=spec.get("format"), table=spec.get("table"))
        self._check_hidden({f"the file of dataset {name!r}": path})
        bounds = _bounds(spec.get("bounds"))
        categories = spec.get("categories") or {}
        if not isinstance(categories, Mapping) or not all(
            isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v)
            for v in categories.values()
        ):
            raise ConfigError("categories map column names to lists of strings")
        schema = infer_schema(table, bounds=bounds, categories=categories)
        unit = spec.get("unit")
        if unit is not None and (not isinstance(unit, str) or unit not in table):
            raise ConfigError(f"privacy unit {unit!r} is not a column of {name!r}")
        max_eps = _number(spec, "max_epsilon", 1.0)
        delta = _number(spec, "delta", 1e-6)
        default_eps = _number(spec, "default_epsilon", 0.1)
        contributions = int(_number(spec, "max_contributions", 1, integer=True))
        threshold = int(_number(spec, "threshold", 10, integer=True))
        if not (
            max_eps > 0
            and 0 < delta < 1
            and default_eps > 0
            and contributions >= 1
            and threshold >= 1
        ):
            raise ConfigError(
                "max_epsilon and default_epsilon must be > 0, delta in (0, 1), "
                "max_contributions and threshold >= 1"
            )
        dp = {
            "unit": unit,
            "max_contributions": contributions,
            "max_epsilon": max_eps,
            "delta": delta,
            "default_epsilon": default_eps,
            "threshold": threshold,
        }
        if spec.get("mock_path"):
            mock = load_table(Path(str(spec["mock_path"])), name=name, fmt=spec.get("mock_format"))
            if mock.columns != table.columns:
                raise ConfigError(
                    f"the mock's columns {mock.columns} differ from the data's {table.columns}"
                )
            origin = "owner"
        else:
            rows = int(_number(spec, "mock_rows", 100, integer=True))
            if not 1 <= rows <= 100_000:
                raise ConfigError("mock_rows must be in [1, 100000]")
            mock = generate_mock(schema, name=name, rows=rows, unit=unit)
            origin = "generated"
        with self.state.tx() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE name=?", (name,)).fetchone():
                raise Conflict(f"a dataset named {name!r} exists already")
            conn.execute(
                "INSERT INTO datasets (name, description, path, format, source_table, schema, "
                "dp, mock, mock_origin, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    str(spec.get("description", "")),
                    str(path),
                    spec.get("format") or path.suffix.lstrip(".") or "csv",
                    spec.get("table"),
                    json.dumps(schema),
                    json.dumps(dp),
                    encode_table(mock),
                    origin,
                    time.time(),
                ),
            )
            self.state._audit(
                conn, user.name, "dataset.add", {"name": name, "rows": table.rows, "mock": origin}
            )
        return self.dataset(user, name)

    def datasets(self, user: User) -> list[dict[str, Any]]:
        rows = self.state.query("SELECT name FROM datasets ORDER BY name")
        return [self.dataset(user, r["name"]) for r in rows]

    def dataset(self, user: User, name: str) -> dict[str, Any]:
        row = self.state.one("SELECT * FROM datasets WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"no dataset {name!r}")
        info = {
            "name": row["name"],
            "description": row["description"],
            "schema": json.loads(row["schema"]),
            "dp": json.loads(row["dp"]),
            "mock": row["mock_origin"],
        }
        if user.role == "owner":
            info["path"] = row["path"]
        return info

    def mock_bytes(self, user: User, name: str) -> bytes:
        row = self.state.one("SELECT mock FROM datasets WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"no dataset {name!r}")
        return bytes(row["mock"])

    def _metas(self, names: list[str]) -> dict[str, dpmod.DatasetMeta]:
        out = {}
        for name in names:
            row = self.state.one("SELECT schema, dp FROM datasets WHERE name=?", (name,))
            if row is None:
                raise NotFound(f"no dataset {name!r}")
            out[name] = meta_from_record(name, json.loads(row["schema"]), json.loads(row["dp"]))
        return out

    def _tables(self, names: list[str], *, mock: bool) -> dict[str, Table]:
        out = {}
        for name in names:
            row = self.state.one(
                "SELECT path, format, source_table, mock FROM datasets WHERE name=?", (name,)
            )
            if row is None:
                raise NotFound(f"no dataset {name!r}")
            if mock:
                out[name] = decode_table(bytes(row["mock"]))
            else:
                fmt = row["format"] if row["format"] in ("csv", "parquet", "sqlite") else None
                out[name] = load_table(row["path"], name=name, fmt=fmt, table=row["source_table"])
        return out

    # -- requests ----------------------------------------------------------------------------

    def _check_policy(self, policy: Any, assets: list[str]) -> dict[str, Any]:
        if isinstance(policy, str):
            policy = {"kind": policy}
        if not isinstance(policy, Mapping) or policy.get("kind") not in POLICIES:
            raise ConfigError(f"policy kind must be one of {list(POLICIES)}, got {policy!r}")
        kind = policy["kind"]
        out: dict[str, Any] = {"kind": kind}
        if kind == "dp":
            eps = policy.get("epsilon")
            if eps is None:
                defaults = [float(self._dp_of(a)["default_epsilon"]) for a in assets]
                eps = min(defaults)
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                raise ConfigError(f"epsilon must be a number, got {eps!r}")
            if not (math.isfinite(eps) and eps > 0):
                raise ConfigError(f"epsilon must be a positive finite number, got {eps!r}")
            out["epsilon"] = float(eps)
        elif kind == "threshold":
            floor = max(int(self._dp_of(a)["threshold"]) for a in assets)
            k = policy.get("k", floor)
            if isinstance(k, bool) or not isinstance(k, int) or k < floor:
                raise ConfigError(f"k must be an int of at least the owner's {floor}, got {k!r}")
            out["k"] = k
        elif kind == "secure-sum":
            out["federation"] = fed.check_federation(
                policy.get("federation"), me=self.identity.name, my_key=self.identity.public_hex
            )
        extra = set(policy) - {"kind", "epsilon", "k", "federation"}
        if extra:
            raise ConfigError(f"unknown policy fields {sorted(extra)}")
        return out

    def _dp_of(self, asset: str) -> dict[str, Any]:
        row = self.state.one("SELECT dp FROM datasets WHERE name=?", (asset,))
        if row is None:
            raise NotFound(f"no dataset {asset!r}")
        return dict(json.loads(row["dp"]))

    def submit(self, user: User, body: Mapping[str, Any]) -> dict[str, Any]:
        """A scientist's code request: stored, hashed, and its mock run queued."""
        self.require(user, "scientist", "owner")
        source = body.get("source")
        entrypoint = body.get("entrypoint")
        assets = body.get("assets")
        params = body.get("params") or {}
        if not isinstance(source, str) or not source.strip():
            raise ConfigError("source must be the function's Python source text")
        if len(source.encode("utf-8")) > MAX_SOURCE:
            raise ConfigError(f"source is larger than {MAX_SOURCE} bytes")
        _check_reviewable(source)
        if not isinstance(entrypoint, str) or not _IDENT.match(entrypoint):
            raise ConfigError("entrypoint must be the name of the function in source")
        if (
            not isinstance(assets, list)
            or not assets
            or not all(isinstance(a, str) for a in assets)
            or len(set(assets)) != len(assets)
        ):
            raise ConfigError("assets must be a non-empty list of distinct dataset names")
        if not isinstance(params, dict) or not all(_IDENT.match(str(k)) for k in params):
            raise ConfigError("params must map identifiers to JSON values")
        try:
            params_text = json.dumps(params, allow_nan=False)
        except ValueError as exc:
            raise ConfigError(f"params must be plain JSON: {exc}") from None
        if len(params_text) > 64 << 10:
            raise ConfigError("params are larger than 64 KiB")
        for asset in assets:
            self._dp_of(asset)
        policy = self._check_policy(body.get("policy", "review"), assets)
        name = str(body.get("name") or entrypoint)[:128]
        if _BIDI.search(name) or any(c < " " for c in name):
            raise ConfigError("a request's name has no control or bidirectional characters")
        federation = body.get("federation")
        if federation is not None and not isinstance(federation, dict):
            raise ConfigError("federation must be an object")
        digest = request_hash(
            source=source, entrypoint=entrypoint, assets=assets, params=params, policy=policy
        )
        now = time.time()
        with self.state.tx() as conn:
            pending = conn.execute(
                "SELECT COUNT(*) FROM requests WHERE user_id=? AND state='submitted'", (user.id,)
            ).fetchone()[0]
            if pending >= self.max_pending:
                raise Conflict(
                    f"{user.name} has {pending} requests whose mock runs have not finished "
                    f"(at most {self.max_pending}); submit again when one has"
                )
            cursor = conn.execute(
                "INSERT INTO requests (user_id, name, source, entrypoint, assets, params, "
                "policy, code_hash, state, federation, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'submitted', ?, ?, ?)",
                (
                    user.id,
                    name,
                    source,
                    entrypoint,
                    json.dumps(assets),
                    params_text,
                    json.dumps(policy),
                    digest,
                    None if federation is None else json.dumps(federation),
                    now,
                    now,
                ),
            )
            rid = int(cursor.lastrowid or 0)
            self.state._audit(
                conn,
                user.name,
                "request.submit",
                {"request": rid, "code_hash": digest, "assets": assets, "policy": policy},
            )
        self._pool.submit(self._mock_job, rid)
        return self.request(user, rid)

    def _row(self, user: User, rid: int) -> sqlite3.Row:
        row = self.state.one(
            "SELECT r.*, u.name AS scientist FROM requests r JOIN users u ON u.id = r.user_id "
            "WHERE r.id=?",
            (rid,),
        )
        if row is None or (user.role != "owner" and row["user_id"] != user.id):
            raise NotFound(
                f"no request {rid} of yours"
            )  # not "forbidden": it does not exist for them
        if user.role == "guest":
            raise Forbidden("guests cannot see requests")
        return row

    def request(self, user: User, rid: int) -> dict[str, Any]:
        row = self._row(user, rid)
        jobs = self.state.query(
            "SELECT id, kind, state, reason, isolated, seconds FROM jobs WHERE request_id=? "
            "ORDER BY id",
            (rid,),
        )
        return {
            "id": row["id"],
            "name": row["name"],
            "scientist": row["scientist"],
            "state": row["state"],
            "reason": row["reason"],
            "code_hash": row["code_hash"],
            "approved_hash": row["approved_hash"],
            "source": row["source"],
            "entrypoint": row["entrypoint"],
            "assets": json.loads(row["assets"]),
            "params": json.loads(row["params"]),
            "policy": json.loads(row["policy"]),
            "plan": _json(row["plan"]),
            "federation": _json(row["federation"]),
            "created": row["created"],
            "updated": row["updated"],
            "jobs": [_job_view(dict(j), user) for j in jobs],
        }

    def status(self, user: User, rid: int) -> dict[str, Any]:
        """A request's state alone: what clients poll, so one small indexed read."""
        row = self.state.one("SELECT user_id, state, reason FROM requests WHERE id=?", (rid,))
        if row is None or (user.role != "owner" and row["user_id"] != user.id):
            raise NotFound(f"no request {rid} of yours")
        if user.role == "guest":
            raise Forbidden("guests cannot see requests")
        return {"id": rid, "state": row["state"], "reason": row["reason"]}

    def requests(self, user: User, *, state: str | None = None) -> list[dict[str, Any]]:
        self.require(user, "owner", "scientist")
        sql = "SELECT r.id, r.name, r.state, r.code_hash, r.policy, r.created, u.name AS scientist "
        sql += "FROM requests r JOIN users u ON u.id = r.user_id WHERE 1=1"
        args: list[Any] = []
        if user.role != "owner":
            sql += " AND r.user_id=?"
            args.append(user.id)
        if state:
            sql += " AND r.state=?"
            args.append(state)
        rows = self.state.query(sql + " ORDER BY r.id", tuple(args))
        return [{**dict(r), "policy": json.loads(r["policy"])} for r in rows]

    def diff(self, user: User, rid: int) -> dict[str, Any]:
        """The code against the same scientist's latest earlier request (same name if any)."""
        row = self._row(user, rid)
        earlier = self.state.query(
            "SELECT id, name, source FROM requests WHERE user_id=? AND id<? ORDER BY id DESC",
            (row["user_id"], rid),
        )
        base = next((e for e in earlier if e["name"] == row["name"]), None) or (
            earlier[0] if earlier else None
        )
        if base is None:
            return {"against": None, "diff": ""}
        lines = difflib.unified_diff(
            base["source"].splitlines(keepends=True),
            row["source"].splitlines(keepends=True),
            fromfile=f"request {base['id']}",
            tofile=f"request {rid}",
        )
        return {"against": base["id"], "diff": "".join(lines)}

    def _set(
        self, conn: sqlite3.Connection, rid: int, state: str, reason: str = "", **extra: Any
    ) -> None:
        sets = ", ".join(f"{k}=?" for k in extra)
        conn.execute(
            f"UPDATE requests SET state=?, reason=?, updated=?{', ' + sets if sets else ''} "
            "WHERE id=?",
            (state, reason, time.time(), *extra.values(), rid),
        )

    def decide(
        self, user: User, rid: int, *, approve: bool, code_hash: str | None, reason: str
    ) -> dict[str, Any]:
        """Approve (for exactly ``code_hash``) or deny, with a reason."""
        self.require(user, "owner")
        row = self._row(user, rid)
        if row["state"] != "mock-run":
            raise Conflict(
                f"request {rid} is {row['state']}; only a request whose mock run has finished "
                "can be approved or denied"
            )
        if approve:
            if code_hash != row["code_hash"]:
                with self.state.tx() as conn:
                    self.state._audit(
                        conn,
                        user.name,
                        "request.approve-refused",
                        {
                            "request": rid,
                            "given": str(code_hash)[:80],
                            "code_hash": row["code_hash"],
                        },
                    )
                raise Conflict(
                    f"the approval is for code hash {str(code_hash)[:16]}..., but request {rid} "
                    f"has {row['code_hash'][:16]}...; review the request as it is now and approve "
                    "its hash"
                )
            policy = json.loads(row["policy"])
            if policy["kind"] in ("dp", "threshold") and not row["plan"]:
                raise Conflict(
                    f"request {rid} declared no valid {policy['kind']} queries in its mock run; "
                    "deny it"
                )
        with self.state.tx() as conn:
            # checked again inside the transaction: two owners deciding at once decide once
            now = conn.execute("SELECT state FROM requests WHERE id=?", (rid,)).fetchone()
            if now is None or now[0] != "mock-run":
                raise Conflict(f"request {rid} was decided meanwhile")
            if approve:
                self._set(conn, rid, "approved", reason, approved_hash=row["code_hash"])
            else:
                self._set(conn, rid, "denied", reason)
            self.state._audit(
                conn,
                user.name,
                "request.approve" if approve else "request.deny",
                {"request": rid, "code_hash": row["code_hash"], "reason": reason},
            )
            if approve:
                self._set(conn, rid, "queued", reason)
        if approve:
            self._pool.submit(self._real_job, rid)
        return self.request(user, rid)

    def release(self, user: User, rid: int, *, release: bool, reason: str) -> dict[str, Any]:
        """The owner's decision on a review-policy result: release it or withhold it."""
        self.require(user, "owner")
        row = self._row(user, rid)
        kind = json.loads(row["policy"])["kind"]
        if row["state"] != "succeeded" or kind not in ("review", "secure-sum"):
            raise Conflict(
                f"request {rid} is {row['state']}; only a finished review-policy request waits "
                "for release"
            )
        if release and kind == "secure-sum":
            raise Conflict(
                f"request {rid} is part of a secure sum: its result leaves only inside the sum "
                "(withhold it to keep it out)"
            )
        with self.state.tx() as conn:
            now = conn.execute("SELECT state FROM requests WHERE id=?", (rid,)).fetchone()
            if now is None or now[0] != "succeeded":
                raise Conflict(f"request {rid} was decided meanwhile")
            self._set(conn, rid, "released" if release else "withheld", reason)
            self.state._audit(
                conn,
                user.name,
                "result.release" if release else "result.withhold",
                {"request": rid, "code_hash": row["code_hash"], "reason": reason},
            )
        return self.request(user, rid)

    def result_bytes(self, user: User, rid: int, *, kind: str) -> bytes:
        """``kind="mock"``: the mock run's result. ``"real"``: the scientist gets it only once
        released; the owner sees it to review it."""
        row = self._row(user, rid)
        if (
            kind == "real"
            and user.role != "owner"
            and json.loads(row["policy"])["kind"] == "secure-sum"
        ):
            raise ReleaseRefused(
                f"request {rid} is part of a secure sum: its result is never released alone"
            )
        if kind == "real" and user.role != "owner" and row["state"] != "released":
            raise ReleaseRefused(
                f"request {rid} is {row['state']}: its result has not been released"
                + (f" ({row['reason']})" if row["reason"] else "")
            )
        res = self.state.one(
            "SELECT payload FROM results WHERE request_id=? AND kind=?", (rid, kind)
        )
        if res is None:
            raise NotFound(f"request {rid} has no {kind} result (yet)")
        if kind == "real" and user.role != "owner":
            with self.state.tx() as conn:
                self.state._audit(conn, user.name, "result.fetch", {"request": rid})
        return bytes(res["payload"])

    def preview(self, user: User, rid: int, kind: str) -> dict[str, Any]:
        return jsonable(decode(self.result_bytes(user, rid, kind=kind)))

    # -- jobs --------------------------------------------------------------------------------

    def jobs(self, user: User) -> list[dict[str, Any]]:
        self.require(user, "owner")
        rows = self.state.query(
            "SELECT id, request_id, kind, state, reason, isolated, seconds, created, finished "
            "FROM jobs ORDER BY id"
        )
        return [dict(r) for r in rows]

    def job_logs(self, user: User, jid: int) -> str:
        row = self.state.one("SELECT request_id, kind, logs FROM jobs WHERE id=?", (jid,))
        if row is None:
            raise NotFound(f"no job {jid}")
        # a real run's log may hold private values; the scientist sees only mock runs' logs
        if user.role != "owner":
            self._row(user, int(row["request_id"]))
            if row["kind"] != "mock":
                raise Forbidden("only the owner reads the log of a run on the real data")
        return str(row["logs"])

    def kill(self, user: User, jid: int) -> dict[str, Any]:
        self.require(user, "owner")
        row = self.state.one("SELECT state FROM jobs WHERE id=?", (jid,))
        if row is None:
            raise NotFound(f"no job {jid}")
        with self._pids_lock:
            handle = self._running.get(jid)
            if handle is None:
                if row["state"] != "running":
                    raise Conflict(f"job {jid} is not running (it is {row['state']})")
                self._doomed.add(jid)  # its process is being started: killed as it starts
        if handle is not None:
            handle.kill()
        self.state.audit(user.name, "job.kill", {"job": jid})
        return {"job": jid, "killed": True}

    def _new_job(self, rid: int, kind: str) -> int:
        with self.state.tx() as conn:
            cursor = conn.execute(
                "INSERT INTO jobs (request_id, kind, state, created) VALUES (?, ?, 'running', ?)",
                (rid, kind, time.time()),
            )
            return int(cursor.lastrowid or 0)

    def _end_job(self, jid: int, state: str, reason: str, outcome: JobOutcome | None) -> None:
        with self.state.tx() as conn:
            conn.execute(
                "UPDATE jobs SET state=?, reason=?, logs=?, isolated=?, seconds=?, finished=? "
                "WHERE id=?",
                (
                    state,
                    reason[:2000],
                    outcome.logs if outcome else "",
                    None if outcome is None else int(outcome.isolated),
                    None if outcome is None else outcome.seconds,
                    time.time(),
                    jid,
                ),
            )

    def _isolated(self) -> bool:
        return bwrap_available() if self.isolate is None else self.isolate

    def _check_hidden(self, paths: Mapping[str, Path]) -> None:
        """Refuse to run code that could open a private file itself (a mock run is code
        nobody approved, and its result goes straight to the scientist)."""
        isolated = self._isolated()
        for what, path in paths.items():
            if readable_by_jobs(path, isolated=isolated):
                how = (
                    "it is inside what the sandbox's mount namespace shows"
                    if isolated
                    else "without bwrap the sandbox sees the host's files"
                    + ("" if os.getuid() == 0 else ", as the server's own user")
                )
                raise ConfigError(
                    f"a job's code could read {what} directly ({how}); make it "
                    "unreadable to others (chmod o-r, or a 0700 directory above it) or run the "
                    "datasite with bubblewrap"
                )

    def _sandbox(self, jid: int, row: sqlite3.Row, *, mock: bool, mode: str) -> JobOutcome:
        assets = json.loads(row["assets"])
        # every private file, not only this request's: modes can change after a dataset
        # was added, and code may open any path it can
        private = {
            f"the file of dataset {r['name']!r}": Path(r["path"])
            for r in self.state.query("SELECT name, path FROM datasets")
        }
        self._check_hidden({"the datasite's database": self.state.path, **private})
        tables = self._tables(assets, mock=mock)

        def started(handle: JobHandle) -> None:
            with self._pids_lock:
                self._running[jid] = handle
                doomed = jid in self._doomed
                self._doomed.discard(jid)
            if doomed:
                handle.kill()

        try:
            return run_sandboxed(
                source=row["source"],
                entrypoint=row["entrypoint"],
                inputs={name: encode_table(t) for name, t in tables.items()},
                params=json.loads(row["params"]),
                mode=mode,
                limits=self.limits,
                isolate=self.isolate,
                on_start=started,
            )
        finally:
            with self._pids_lock:
                self._running.pop(jid, None)

    def _mock_job(self, rid: int) -> None:
        row = self.state.one("SELECT * FROM requests WHERE id=?", (rid,))
        if row is None:
            return
        jid = self._new_job(rid, "mock")
        policy = json.loads(row["policy"])
        declare = policy["kind"] in ("dp", "threshold")
        try:
            outcome = self._sandbox(jid, row, mock=True, mode="declare" if declare else "run")
        except Exception as exc:  # the datasite's own failure: record it, keep serving
            self._end_job(jid, "failed", f"could not start the job: {exc}", None)
            with self.state.tx() as conn:
                self._set(conn, rid, "mock-run", f"the mock run could not start: {exc}")
            return
        reason = outcome.reason
        payload = outcome.output
        plan_json: str | None = None
        if outcome.state == "succeeded" and declare and payload is not None:
            try:
                plan = dpmod.parse_plan(decode(payload).get("plan"))
                assets = json.loads(row["assets"])
                metas = self._metas(assets)
                dpmod.check_plan(plan, metas, policy=policy["kind"])
                preview = dpmod.evaluate_plan(
                    plan, self._tables(assets, mock=True), metas, policy="exact"
                )
                payload = bytes(encode(preview.payload))
                plan_json = json.dumps([{"name": n, **q.to_dict()} for n, q in plan])
            except ShoalError as exc:
                reason = f"the declared queries are not allowed: {exc}"
                payload = None
        self._end_job(
            jid,
            outcome.state if payload or outcome.state != "succeeded" else "failed",
            reason,
            outcome,
        )
        with self.state.tx() as conn:
            if payload is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO results (request_id, kind, payload, created) "
                    "VALUES (?, 'mock', ?, ?)",
                    (rid, payload, time.time()),
                )
            self._set(conn, rid, "mock-run", reason, plan=plan_json)
            self.state._audit(
                conn,
                "datasite",
                "job.mock",
                {"request": rid, "job": jid, "state": outcome.state, "isolated": outcome.isolated},
            )

    def _real_job(self, rid: int) -> None:
        row = self.state.one("SELECT * FROM requests WHERE id=?", (rid,))
        if row is None or row["state"] != "queued":
            return
        policy = json.loads(row["policy"])
        jid = self._new_job(rid, "run" if policy["kind"] == "review" else policy["kind"])
        # the approval holds for one hash: recompute it from what is stored now
        now_hash = request_hash(
            source=row["source"],
            entrypoint=row["entrypoint"],
            assets=json.loads(row["assets"]),
            params=json.loads(row["params"]),
            policy=policy,
        )
        if now_hash != row["approved_hash"] or now_hash != row["code_hash"]:
            reason = (
                "refused: the request's code, assets or parameters changed after approval "
                f"(hash {now_hash[:16]}... is not the approved {str(row['approved_hash'])[:16]}...)"
            )
            self._end_job(jid, "failed", reason, None)
            with self.state.tx() as conn:
                self._set(conn, rid, "failed", reason)
                self.state._audit(
                    conn, "datasite", "job.refused", {"request": rid, "job": jid, "hash": now_hash}
                )
            return
        with self.state.tx() as conn:
            self._set(conn, rid, "running")
        try:
            if policy["kind"] in ("review", "secure-sum"):
                self._run_review(rid, jid, row, policy)
            else:
                self._run_declared(rid, jid, row, policy)
        except Exception as exc:  # the datasite's own failure: record it, keep serving
            self._end_job(jid, "failed", f"the datasite failed: {exc}", None)
            with self.state.tx() as conn:
                self._set(conn, rid, "failed", f"the datasite failed: {exc}")

    def _run_review(self, rid: int, jid: int, row: sqlite3.Row, policy: dict[str, Any]) -> None:
        outcome = self._sandbox(jid, row, mock=False, mode="run")
        if outcome.state == "succeeded" and policy["kind"] == "secure-sum":
            problem = _secure_sum_input(outcome.output, policy["federation"])
            if problem:
                outcome = JobOutcome(
                    state="failed",
                    output=None,
                    logs=outcome.logs,
                    reason=problem,
                    exit_code=outcome.exit_code,
                    seconds=outcome.seconds,
                    isolated=outcome.isolated,
                )
        self._end_job(jid, outcome.state, outcome.reason, outcome)
        with self.state.tx() as conn:
            if outcome.state == "succeeded" and outcome.output is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO results (request_id, kind, payload, created) "
                    "VALUES (?, 'real', ?, ?)",
                    (rid, outcome.output, time.time()),
                )
            # the reason of a failed real run comes from the code's own output (an exception
            # message can carry private values): the scientist is told only how it ended
            self._set(conn, rid, outcome.state, _public_reason(outcome))
            self.state._audit(
                conn,
                "datasite",
                "job.run",
                {
                    "request": rid,
                    "job": jid,
                    "state": outcome.state,
                    "reason": outcome.reason[:300],
                    "isolated": outcome.isolated,
                },
            )

    def _run_declared(self, rid: int, jid: int, row: sqlite3.Row, policy: dict[str, Any]) -> None:
        """dp / threshold: the datasite answers the approved plan itself; no submitted code
        runs on the real data. Under dp the ledger is charged in the transaction that
        releases."""
        assets = json.loads(row["assets"])
        plan = dpmod.parse_plan(json.loads(row["plan"]))
        metas = self._metas(assets)
        started = time.monotonic()
        evaluation = dpmod.evaluate_plan(
            plan,
            self._tables(assets, mock=False),
            metas,
            policy=policy["kind"],
            epsilon=policy.get("epsilon"),
            threshold=policy.get("k"),
        )
        blob = bytes(encode(evaluation.payload))
        seconds = time.monotonic() - started
        reason = ""
        charges: dict[str, float] = {}
        try:
            with self.state.tx() as conn:
                self._set(conn, rid, "succeeded")
                if policy["kind"] == "dp":
                    charges = self._charge(conn, int(row["user_id"]), assets, evaluation)
                conn.execute(
                    "INSERT OR REPLACE INTO results (request_id, kind, payload, created) "
                    "VALUES (?, 'real', ?, ?)",
                    (rid, blob, time.time()),
                )
                self._set(conn, rid, "released")
                self.state._audit(
                    conn,
                    "datasite",
                    "result.release",
                    {
                        "request": rid,
                        "job": jid,
                        "policy": policy,
                        "statistics": evaluation.statistics,
                        "epsilon_spent": charges,
                        "suppressed": evaluation.suppressed,
                    },
                )
        except PrivacyBudgetExceeded as exc:
            reason = str(exc)
            with self.state.tx() as conn:
                self._set(conn, rid, "withheld", reason)
                self.state._audit(
                    conn, "datasite", "result.withhold", {"request": rid, "reason": reason[:300]}
                )
        with self.state.tx() as conn:
            conn.execute(
                "UPDATE jobs SET state=?, reason=?, seconds=?, isolated=0, finished=? WHERE id=?",
                (
                    "succeeded",  # the evaluation ran; a withheld release is the request's state
                    reason,
                    seconds,
                    time.time(),
                    jid,
                ),
            )

    def _charge(
        self,
        conn: sqlite3.Connection,
        user_id: int,
        assets: list[str],
        evaluation: dpmod.Evaluation,
    ) -> dict[str, float]:
        """Charge every asset's ledger for this scientist (m Laplace releases at epsilon/m
        each); raises PrivacyBudgetExceeded, rolling back the transaction, if any is short."""
        from shoal.privacy import NodeBudget

        assert evaluation.epsilon_each is not None
        spent: dict[str, float] = {}
        for asset in assets:
            dp = self._dp_of(asset)
            got = conn.execute(
                "SELECT budget FROM ledgers WHERE user_id=? AND dataset=?", (user_id, asset)
            ).fetchone()
            budget = (
                NodeBudget.from_dict(json.loads(got[0]))
                if got
                else NodeBudget(
                    max_epsilon=float(dp["max_epsilon"]),
                    max_delta=float(dp["delta"]),
                    accountant="rdp",
                )
            )
            charge = budget.charge(
                sample_rate=1.0,
                noise_multiplier=1.0 / evaluation.epsilon_each,
                steps=evaluation.statistics,
                mechanism="laplace",
            )
            conn.execute(
                "INSERT OR REPLACE INTO ledgers (user_id, dataset, budget) VALUES (?, ?, ?)",
                (user_id, asset, json.dumps(budget.to_dict())),
            )
            spent[asset] = charge.total_epsilon
        return spent

    # -- federated requests: this site's part of a SecAgg+ round ----------------------------

    def identity_info(self) -> dict[str, str]:
        return {"name": self.identity.name, "public_key": self.identity.public_hex}

    def node_task(
        self, user: User, rid: int, *, task: str, task_id: str, keep_as: str | None, body: bytes
    ) -> bytes:
        """One shoal task for the site's node, on behalf of the scientist's secure-sum request
        ``rid`` (wire bytes in and out). Raises what :meth:`NodeApp.handle` raises: the node
        has audited its refusals and declines by then."""
        from shoal.datasite.node import FEDERATION_KEY, SiteNodeState
        from shoal.runtime.app import TaskContext
        from shoal.runtime.nodestate import NODE_STATE_KEY

        row = self._row(user, rid)
        if row["user_id"] != user.id:
            raise Forbidden("only the scientist who submitted a request runs its secure sum")
        policy = json.loads(row["policy"])
        if policy["kind"] != "secure-sum":
            raise Conflict(f"request {rid} is not a secure-sum request")
        for label, text in (("task", task), ("task_id", task_id), ("keep_as", keep_as or "-")):
            if not text or len(text) > 200:
                raise ConfigError(f"{label} is a non-empty string of at most 200 characters")
        if task == fed.HOLD_TASK and keep_as is None:
            # its result is the site's value itself: it is only ever kept, never answered
            raise ConfigError(f"{fed.HOLD_TASK} keeps the result at the site: give keep_as")
        app = self.node
        with self._node_lock:
            entry = self._nodes.get(rid)
            if entry is None:
                state: dict[str, Any] = {
                    FEDERATION_KEY: policy["federation"],
                    NODE_STATE_KEY: SiteNodeState(
                        state=self.state, node_id=self.identity.name, request=rid
                    ),
                }
                entry = self._nodes[rid] = (threading.Lock(), state)
                while len(self._nodes) > 256:  # idle requests' secrets do not pile up
                    self._nodes.popitem(last=False)
        lock, state = entry
        ctx = TaskContext(
            node_id=self.identity.name, data=(rid, user), state=state, task_id=task_id
        )
        with lock:  # a node's state is not locked against itself: one task at a time
            try:
                return bytes(app.handle(ctx, task, body, keep_as=keep_as))
            except PrivacyBudgetExceeded:
                raise NodeFailure("declined", DECLINED_DETAIL) from None
            except (UnknownTask, WireError, ReleaseRefused) as exc:
                raise NodeFailure("rejected", str(exc)) from None
            except ShoalError as exc:
                raise NodeFailure("error", str(exc)) from None

    def _hold(self, ctx: Any) -> dict[str, Any]:
        """The node's ``datasite.hold``: the approved result, once per request, with its
        noise share bound and the ledger charged first."""
        rid, user = ctx.data
        row = self._row(user, rid)
        federation = json.loads(row["policy"])["federation"]
        if row["state"] == "released":
            raise ReleaseRefused(
                f"request {rid} has joined a secure sum already; a site's result joins one "
                "(a second sum over other sites would give it away as the difference)"
            )
        if row["state"] != "succeeded":
            raise ReleaseRefused(
                f"request {rid} is {row['state']}: only an approved request that ran "
                "contributes to a secure sum"
            )
        res = self.state.one(
            "SELECT payload FROM results WHERE request_id=? AND kind='real'", (rid,)
        )
        if res is None:
            raise NotFound(f"request {rid} has no result to contribute")
        value = np.asarray(decode(bytes(res["payload"]))["result"], dtype=np.float64)
        z = float(federation["noise_multiplier"])
        total = fed.total_noise_std({"min_sites": len(federation["sites"]), **federation})
        try:
            with self.state.tx() as conn:
                now = conn.execute("SELECT state FROM requests WHERE id=?", (rid,)).fetchone()
                if now is None or now[0] != "succeeded":
                    raise ReleaseRefused(f"request {rid} was contributed meanwhile")
                spent: dict[str, float] = {}
                if z > 0:
                    spent = self._charge_gaussian(
                        conn, int(row["user_id"]), json.loads(row["assets"]), z
                    )
                self._set(conn, rid, "released", "into the secure sum only")
                self.state._audit(
                    conn,
                    user.name,
                    "result.secure-sum",
                    {
                        "request": rid,
                        "task_id": ctx.task_id[:200],
                        "sites": sorted(federation["sites"]),
                        "epsilon_spent": spent,
                        "noise_total_std": total,
                    },
                )
        except PrivacyBudgetExceeded as exc:
            with self.state.tx() as conn:
                self._set(conn, rid, "withheld", str(exc))
            raise
        if total > 0:
            # the node lets the value out only clipped to the agreed norm with at least this
            # site's share (for the group it validates) of the noise the charge counted
            ctx.bind_noise(clip=float(federation["clip"]), std=total)
        return {"result": value.reshape(-1)}

    def _charge_gaussian(
        self, conn: sqlite3.Connection, user_id: int, assets: list[str], z: float
    ) -> dict[str, float]:
        from shoal.privacy import NodeBudget

        spent: dict[str, float] = {}
        for asset in assets:
            dp = self._dp_of(asset)
            got = conn.execute(
                "SELECT budget FROM ledgers WHERE user_id=? AND dataset=?", (user_id, asset)
            ).fetchone()
            budget = (
                NodeBudget.from_dict(json.loads(got[0]))
                if got
                else NodeBudget(max_epsilon=float(dp["max_epsilon"]), max_delta=float(dp["delta"]))
            )
            charge = budget.charge(sample_rate=1.0, noise_multiplier=z, steps=1)
            conn.execute(
                "INSERT OR REPLACE INTO ledgers (user_id, dataset, budget) VALUES (?, ?, ?)",
                (user_id, asset, json.dumps(budget.to_dict())),
            )
            spent[asset] = charge.total_epsilon
        return spent

    def budget(self, user: User) -> list[dict[str, Any]]:
        """Per scientist and dataset: epsilon spent and left."""
        from shoal.privacy import NodeBudget

        self.require(user, "owner", "scientist")
        sql = (
            "SELECT u.name AS scientist, l.user_id, l.dataset, l.budget FROM ledgers l "
            "JOIN users u ON u.id = l.user_id"
        )
        rows = self.state.query(sql)
        out = []
        for r in rows:
            if user.role != "owner" and r["user_id"] != user.id:
                continue
            budget = NodeBudget.from_dict(json.loads(r["budget"]))
            out.append(
                {
                    "scientist": r["scientist"],
                    "dataset": r["dataset"],
                    "spent_epsilon": budget.spent(),
                    "max_epsilon": budget.max_epsilon,
                    "delta": budget.max_delta,
                    "remaining_epsilon": budget.remaining(),
                    "releases": budget.ledger.steps,
                }
            )
        return out

    # -- audit -------------------------------------------------------------------------------

    def audit(self, user: User, limit: int = 200) -> list[dict[str, Any]]:
        self.require(user, "owner")
        return [
            {
                "seq": e.seq,
                "ts": e.ts,
                "actor": e.actor,
                "action": e.action,
                "detail": dict(e.detail),
                "hash": e.hash,
            }
            for e in self.state.audit_entries(limit)
        ]

    def verify(self, user: User, anchor: str | None = None) -> dict[str, Any]:
        """The chain checked (against ``anchor``, ``SEQ:HASH``, when given)."""
        self.require(user, "owner")
        held = None
        if anchor:
            held = parse_head(anchor)
        report = self.state.verify(anchor=held)
        return {
            "ok": report.ok,
            "entries": report.entries,
            "last_seq": report.last_seq,
            "head": report.head,
            "anchor": f"{report.last_seq}:{report.head}",
            "problems": list(report.problems),
        }
