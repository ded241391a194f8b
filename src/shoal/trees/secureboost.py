"""SecureBoost between federation nodes: the guest and the hosts are nodes addressed by role
(``fed.role("guest")``, ``fed.role("host")``); the coordinator runs a short program of
``map`` and ``values.to`` and holds no key.

1. The parties' rows are aligned by the ECDH PSI of :mod:`shoal.vertical` (the same tasks
   and coordinator code as hetero logistic regression); each party holds its part of the
   intersection in one shared order and holds out the same rows for evaluation.
2. The guest and each host agree an AES-GCM key (X25519, public keys relayed in the clear).
   Every message between them (the Paillier ciphertexts of (g, h), node positions, packed
   histograms, chosen candidates, which rows go left) travels inside a box under that key,
   released by its sender only ``sealed`` to the other role and routed by the coordinator,
   which sees bytes and sizes and audits each move.
3. The guest grows each tree with :class:`shoal.trees.vertical.Grower`, the hosts answer
   with :class:`shoal.trees.vertical.HostParty`: the same steps as the in-process
   :func:`shoal.trees.vertical.train_secureboost`, so the trees are the centralized ones.

A party failing during a tree fails that tree; every party rolls back and the tree is grown
again, up to ``max_retries`` times. A party whose process was lost (restarted, so without
its session) makes every party align and set up again and restore the run's complete
rounds from its checkpoint store (:mod:`shoal.trees.resume`). See docs/trees.md for what
each party learns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.core import Federation
from shoal.core.routing import received
from shoal.crypto import keys
from shoal.errors import ConfigError, DataError, NotEnoughNodes, ProtocolError, ShoalError
from shoal.runtime import TaskContext, TaskSpec
from shoal.trees.objective import predict_from_margin
from shoal.trees.params import GBDTParams, declared_categories
from shoal.trees.resume import load_margin, load_records, load_round, save_records, save_round
from shoal.trees.vertical import (
    Boosting,
    GuestParty,
    HostParty,
    VerticalModel,
    _margin,
    _one_category_only,
    save_guest,
)
from shoal.vertical.checkpoint import Checkpoints, MemoryCheckpoints, check_run
from shoal.vertical.job import Party, VerticalJob
from shoal.vertical.model import held_out_rows
from shoal.vertical.party import PartyData
from shoal.vertical.protocol import align, wait_online
from shoal.vertical.tasks import aligned_rows, psi_tasks
from shoal.wire import decode, encode

__all__ = [
    "SecureBoostConfig",
    "SecureBoostResult",
    "centralized",
    "config_from_job",
    "digest",
    "evaluate",
    "secureboost_tasks",
    "simulate",
    "summarize",
    "train_routed",
]

log = logging.getLogger("shoal.trees")

_STATE = "shoal.trees.secureboost"
_CHANNEL = "secureboost-channel"
_SEQ_BYTES = 8  # a box's number on its channel, in front of it
METRICS = ("auc", "accuracy", "logloss", "rmse", "n", "digest")


@dataclass(frozen=True, kw_only=True)
class SecureBoostConfig:
    """A SecureBoost job's settings besides the tree parameters."""

    params: GBDTParams
    key_bits: int = 2048
    insecure_test_keys: bool = False
    min_overlap: int = 10
    test_fraction: float = 0.2
    seed: int = 0
    max_retries: int = 3
    retry_wait_s: float = 2.0  # before a failed roll-back is tried again (doubling, <= 30 s)
    # how long a failed tree waits for every party to be connected again (a restarted node)
    resume_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if self.key_bits < 2048 and not self.insecure_test_keys:
            raise ConfigError(
                f"key_bits={self.key_bits} is too short; use >= 2048 "
                "(or insecure_test_keys for tests)"
            )
        _one_category_only(self.params)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.min_overlap < 1 or self.max_retries < 0:
            raise ConfigError("min_overlap >= 1 and max_retries >= 0 are required")
        if not 0.0 <= self.retry_wait_s <= 3600.0:
            raise ConfigError(f"retry_wait_s must be in [0, 3600], got {self.retry_wait_s}")
        if not 0.0 <= self.resume_wait_s <= 86400.0:
            raise ConfigError(f"resume_wait_s must be in [0, 86400], got {self.resume_wait_s}")


@dataclass(kw_only=True)
class SecureBoostResult:
    intersection_size: int
    trees: int
    test: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    # the complete rounds training went on from after a party lost its process
    resumed_from: list[int] = field(default_factory=list)
    routed_bytes: int = 0
    # the parties that wrote their part of the model (each to its own --model-out file)
    saved: list[str] = field(default_factory=list)
    # this process's CPU seconds by phase (all parties' in a simulation); wall seconds
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)


# -- the channel between the guest and one host ------------------------------------------


def _channel_key(own: keys.KeyPair, peer_public: Any, guest: str, host: str) -> bytes:
    shared = keys.agree(own.private, bytes(np.asarray(peer_public, dtype=np.uint8)))
    return keys.derive_key(shared, purpose=_CHANNEL, context=f"{guest}\x00{host}".encode())


def _aad(step: str, seq: int) -> bytes:
    return f"{step}#{seq}".encode()


def _seal(key: bytes, message: Mapping[str, Any], *, step: str, seq: int) -> np.ndarray:
    """``message`` as the ``seq``-th box on its channel: the number travels in front of the
    box and is authenticated with the step, so the coordinator (which holds every box it
    relayed) cannot deliver one twice, late or as the answer to another message."""
    blob = keys.encrypt(key, bytes(encode(dict(message))), associated_data=_aad(step, seq))
    return np.frombuffer(seq.to_bytes(_SEQ_BYTES, "big") + blob, dtype=np.uint8)


def _open(key: bytes, box: Any, *, step: str) -> tuple[int, dict[str, Any]]:
    """A box's number on the channel and its message (authenticated, or ProtocolError)."""
    raw = bytes(np.asarray(box, dtype=np.uint8))
    if len(raw) <= _SEQ_BYTES:
        raise ProtocolError("a sealed box is too short to hold its number and message")
    seq = int.from_bytes(raw[:_SEQ_BYTES], "big")
    plain = keys.decrypt(key, raw[_SEQ_BYTES:], associated_data=_aad(step, seq))
    return seq, dict(decode(plain))


def _prefixed(message: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in message.items()}


def _strip(message: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in message.items() if k.startswith(prefix)}


# -- node side: the guest ------------------------------------------------------------------


def _st(ctx: TaskContext) -> dict[str, Any]:
    st: dict[str, Any] = ctx.state.setdefault(_STATE, {})
    return st


def _party(ctx: TaskContext) -> PartyData:
    if not isinstance(ctx.data, PartyData):
        raise ConfigError(f"node {ctx.node_id!r} holds no vertical party table")
    return ctx.data


def _split(ctx: TaskContext, payload: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rows = aligned_rows(ctx)
    held = held_out_rows(
        len(rows), seed=int(payload["seed"]), test_fraction=float(payload["test_fraction"])
    )
    return rows, held


def _resume_point(payload: Mapping[str, Any]) -> tuple[str, int]:
    run, complete = check_run(payload["run"]), int(payload["complete"])
    if complete < 0:
        raise ProtocolError("setup: the number of complete rounds is negative")
    return run, complete


def guest_setup(ctx: TaskContext, payload: dict[str, Any], *, store: Checkpoints) -> dict[str, Any]:
    """Keys, channels and the boosting state: fresh, or the run's first ``complete`` rounds
    from this party's checkpoint store (after a party lost its process)."""
    data = _party(ctx)
    if data.y is None:
        raise DataError("the guest holds no label column")
    rows, held = _split(ctx, payload)
    params = GBDTParams(**payload["params"])
    x, y = data.x[rows], data.y[rows]
    guest = GuestParty(
        x=x[~held], y=y[~held], params=params, key_bits=int(payload["key_bits"]),
        insecure_keys=bool(payload["insecure"]), categorical=data.categorical,
    )  # fmt: skip
    hosts = [str(h) for h in payload["hosts"]]
    widths = [int(w) for w in payload["widths"]]
    if len(widths) != len(hosts) or not hosts:
        raise ProtocolError("setup: one column count per host")
    run, complete = _resume_point(payload)
    start, margin = None, None
    if complete:
        trees = [
            load_round(store, run, r, bins=guest.bins, hosts=len(hosts))
            for r in range(1, complete + 1)
        ]
        start = VerticalModel(
            params=guest.params, bins=guest.bins, trees=tuple(trees), hosts=len(hosts)
        )
        margin = load_margin(store, run, complete, (len(guest.codes), guest.params.outputs))
    boosting = Boosting(guest, widths, start=start, margin=margin)
    own = keys.KeyPair.generate()
    channels = {h: _channel_key(own, payload[f"dh/{h}"], guest=ctx.node_id, host=h) for h in hosts}
    st = _st(ctx)
    st.clear()
    st.update(
        guest=guest, boosting=boosting, hosts=hosts, channels=channels, x_test=x[held],
        y_test=y[held], run=run, sent=dict.fromkeys(hosts, 0),
    )  # fmt: skip
    return {"dh": np.frombuffer(own.public, dtype=np.uint8)}


def _to_hosts(st: dict[str, Any], messages: Mapping[int, Mapping[str, Any]], step: str) -> dict:
    boxes = {}
    for i, h in enumerate(st["hosts"], start=1):
        st["sent"][h] += 1
        seq = st["sent"][h]
        boxes[f"box/{h}"] = _seal(st["channels"][h], messages[i], step=f"{step}>{h}", seq=seq)
    return boxes


def _from_hosts(st: dict[str, Any], payload: Mapping[str, Any], step: str) -> dict[int, dict]:
    """Each host's reply to the last box the guest sent it (an older one is refused)."""
    boxes = received(payload, "box")
    if sorted(boxes) != sorted(st["hosts"]):
        raise ProtocolError(f"expected replies from hosts {st['hosts']}, got {sorted(boxes)}")
    out = {}
    for i, h in enumerate(st["hosts"], start=1):
        seq, message = _open(st["channels"][h], boxes[h], step=f"{step}<{h}")
        if seq != st["sent"][h]:
            raise ProtocolError(
                f"host {h}'s reply answers box {seq}, not the last one sent to it "
                f"({st['sent'][h]}): replayed or reordered by the coordinator; refused"
            )
        out[i] = message
    return out


def guest_tree(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Start a tree: gradients, encrypted rows and the first level's request to each host."""
    st = _st(ctx)
    grower = st["boosting"].begin()
    st["grower"] = grower
    starts, requests = grower.start(), grower.request()
    messages = {i: {**_prefixed(starts[i], "s."), **_prefixed(requests[i], "r.")} for i in starts}
    return _to_hosts(st, messages, "tree")


def guest_choose(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    st = _st(ctx)
    grower = st.get("grower")
    if grower is None:
        raise ProtocolError("no tree under way")
    return _to_hosts(st, grower.choose(_from_hosts(st, payload, "hist")), "commit")


def guest_apply(ctx: TaskContext, payload: dict[str, Any], *, store: Checkpoints) -> dict[str, Any]:
    st = _st(ctx)
    grower = st.get("grower")
    if grower is None:
        raise ProtocolError("no tree under way")
    grower.apply(_from_hosts(st, payload, "commit"))
    if payload.get("last"):
        boosting: Boosting = st["boosting"]
        rounds = len(boosting.trees)
        boosting.end(grower)
        st["grower"] = None
        if len(boosting.trees) > rounds:  # a round complete: kept before the reply
            save_round(store, st["run"], len(boosting.trees), boosting.trees[-1], boosting.margin)
        return {}
    return _to_hosts(st, grower.request(), "hist")


def rollback(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Forget the tree under way. The guest keeps the coordinator's count of complete
    rounds (``complete``): a round whose ending reply was lost is undone too. ``session``
    says whether this party still holds its setup of the run (a restarted process does
    not: then every party sets up again from its checkpoints)."""
    st = _st(ctx)
    held = st.get("run") == payload.get("run") and ("boosting" in st or "host" in st)
    if "boosting" in st:
        keep = payload.get("complete")
        st["boosting"].abort(keep=None if keep is None else int(keep))
        st["grower"] = None
    return {"session": int(held)}


def guest_evaluate(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Score the held-out rows with the hosts' directions; release aggregate metrics and a
    digest of the predictions (so a run can be compared with another without them)."""
    st = _st(ctx)
    boosting: Boosting = st["boosting"]
    model = boosting.model()
    answers = _from_hosts(st, payload, "decide")
    x_test, y_test = st["x_test"], st["y_test"]
    n = len(y_test)
    if n == 0:
        return {"n": 0}

    def link(index: int) -> Any:
        bits = np.unpackbits(np.asarray(answers[index]["left"], np.uint8), axis=1, count=n)

        def call(method: str, request: Mapping[str, Any]) -> Mapping[str, Any]:
            wanted = np.asarray(request["records"], dtype=np.int64)
            if len(bits) and (wanted >= len(bits)).any():
                raise ProtocolError(f"host {index} sent directions for too few records")
            return {"left": bits[wanted] if len(wanted) else np.zeros((0, n), np.uint8)}

        return call

    links = [link(i) for i in range(1, len(st["hosts"]) + 1)]
    margin = _margin(model, model.bins.transform(x_test), links)
    scores = predict_from_margin(margin, model.params)
    out: dict[str, Any] = {"n": n, **_metrics(scores, y_test, model.params)}
    out["digest"] = digest(scores)
    return out


def digest(scores: np.ndarray) -> np.ndarray:
    """SHA-256 of predictions (as float64), 32 bytes: equal digests, equal predictions."""
    raw = hashlib.sha256(np.ascontiguousarray(scores, np.float64).tobytes()).digest()
    return np.frombuffer(raw, dtype=np.uint8)


def _metrics(scores: np.ndarray, y: np.ndarray, params: GBDTParams) -> dict[str, float]:
    if params.objective == "binary:logistic":
        from sklearn.metrics import roc_auc_score

        p = np.clip(scores, 1e-15, 1 - 1e-15)
        out = {
            "accuracy": float(np.mean((scores > 0.5) == y)),
            "logloss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        }
        if len(np.unique(y)) == 2:
            out["auc"] = float(roc_auc_score(y, scores))
        return out
    if params.objective == "multi:softprob":
        return {"accuracy": float(np.mean(scores.argmax(axis=1) == y))}
    return {"rmse": float(np.sqrt(np.mean((scores - y) ** 2)))}


# -- node side: a host ---------------------------------------------------------------------


def host_setup(ctx: TaskContext, payload: dict[str, Any], *, store: Checkpoints) -> dict[str, Any]:
    """Cuts, a channel key and the run's table of won splits so far (from this party's
    checkpoint store: the guest's saved trees name records in it)."""
    data = _party(ctx)
    if data.y is not None:
        raise DataError("a host holds a label column; only the guest may hold labels")
    rows, held = _split(ctx, payload)
    x = data.x[rows]
    host = HostParty(
        x=x[~held], max_bins=int(payload["max_bins"]), insecure_keys=bool(payload["insecure"]),
        categorical=data.categorical,
    )  # fmt: skip
    run, complete = _resume_point(payload)
    host.restore(load_records(store, run, complete=complete))
    own = keys.KeyPair.generate()
    st = _st(ctx)
    st.clear()
    st.update(host=host, x_test=x[held], own=own, run=run)
    return {"features": int(x.shape[1]), "dh": np.frombuffer(own.public, dtype=np.uint8)}


def host_keys(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    st = _st(ctx)
    guest = str(payload["guest"])
    st["guest_id"] = guest
    st["channel"] = _channel_key(st["own"], payload["dh"], guest=guest, host=ctx.node_id)
    st["seen"] = 0  # the number of the last box taken from the guest
    return {}


def _inbox(ctx: TaskContext, payload: Mapping[str, Any], step: str) -> dict[str, Any]:
    """The guest's box for this step; it must come after every box taken before."""
    st = _st(ctx)
    if "channel" not in st:
        raise ProtocolError("no channel with the guest: run the setup first")
    boxes = received(payload, f"box/{ctx.node_id}")
    if list(boxes) != [st["guest_id"]]:
        raise ProtocolError(f"expected one message from the guest, got {sorted(boxes)}")
    seq, message = _open(st["channel"], boxes[st["guest_id"]], step=f"{step}>{ctx.node_id}")
    if seq <= st["seen"]:
        raise ProtocolError(
            f"box {seq} from the guest arrives after box {st['seen']}: replayed or reordered "
            "by the coordinator; refused"
        )
    st["seen"] = seq  # before acting on it: a box that fails cannot be tried again
    return message


def _reply(ctx: TaskContext, message: Mapping[str, Any], step: str) -> dict[str, Any]:
    """Sealed to the guest as the answer to the last box taken from it."""
    st = _st(ctx)
    seq = int(st["seen"])
    return {"box": _seal(st["channel"], message, step=f"{step}<{ctx.node_id}", seq=seq)}


def host_tree(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    host: HostParty = _st(ctx)["host"]
    message = _inbox(ctx, payload, "tree")
    host.handle("start_tree", _strip(message, "s."))
    return _reply(ctx, host.handle("histograms", _strip(message, "r.")), "hist")


def host_histograms(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    host: HostParty = _st(ctx)["host"]
    return _reply(ctx, host.handle("histograms", _inbox(ctx, payload, "hist")), "hist")


def host_commit(ctx: TaskContext, payload: dict[str, Any], *, store: Checkpoints) -> dict[str, Any]:
    st = _st(ctx)
    host: HostParty = st["host"]
    answer = host.handle("commit", _inbox(ctx, payload, "commit"))
    save_records(store, st["run"], host.records)  # kept before the guest learns the ids
    return _reply(ctx, answer, "commit")


def host_decide(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """The direction of every record of this host for each held-out row (packed bits)."""
    st = _st(ctx)
    host: HostParty = st["host"]
    records = np.arange(len(host.records), dtype=np.int64)
    x_test = st["x_test"]
    if len(x_test) == 0:
        bits = np.zeros((len(records), 0), np.uint8)
    else:
        bits = np.asarray(host.handle("decide", {"records": records, "x": x_test})["left"])
    return _reply(ctx, {"left": np.packbits(bits.astype(np.uint8), axis=1)}, "decide")


def save_part(ctx: TaskContext, payload: dict[str, Any], *, path: Path | None) -> dict[str, Any]:
    """Write this party's part of the model to ``path``, the node's own choice (never the
    coordinator's): the guest its cuts, trees and leaves (:func:`~shoal.trees.vertical.
    load_guest`), a host its cuts and split table (:meth:`HostParty.load`). Written to a
    temporary file and renamed, so a crash leaves the old file or the new one. The reply
    is one clear bit: written or not (no path)."""
    if path is None:
        return {"saved": 0}
    st = _st(ctx)
    if st.get("grower") is not None:
        raise ProtocolError("a tree is under way: the model is saved after the last tree")
    temporary = path.with_name(f"{path.name}.tmp")
    if "boosting" in st:
        save_guest(st["boosting"].model(), temporary)
    elif "host" in st:
        st["host"].save(temporary)
    else:
        raise ProtocolError("this party holds no model of the run: it was not set up")
    os.replace(temporary, path)
    return {"saved": 1}


def writable_model_path(path: str | Path) -> Path:
    """``path`` if this party can write its model there at the end of a run; checked when
    the node starts, so a typo fails in seconds, not after hours of training."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConfigError(f"--model-out {out} is a directory: name the file to write")
    if not folder.is_dir():
        raise ConfigError(
            f"--model-out {out}: the folder {folder} does not exist; create it or name another"
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--model-out {out}: this process may not write there")
    return out


def secureboost_tasks(
    role: str, *, checkpoints: Checkpoints | None = None, model_out: str | Path | None = None
) -> dict[str, Any]:
    """The tasks a party of ``role`` installs (with the PSI tasks), each with its release
    policy: messages between the parties leave only sealed to the other role.

    ``checkpoints`` keeps the party's part of each complete round (in memory unless given,
    e.g. :class:`~shoal.vertical.checkpoint.FileCheckpoints` at a deployed party, which
    then resumes the run after a restart of its process). ``model_out`` is where the party
    writes its part of the model when the run ends (not written without it)."""
    store = checkpoints if checkpoints is not None else MemoryCheckpoints()
    out = None if model_out is None else writable_model_path(model_out)

    def save(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return save_part(ctx, payload, path=out)

    def kept(task: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def run(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            return task(ctx, payload, store=store)

        run.__name__ = task.__name__
        return run

    common = {
        **psi_tasks(),
        "secureboost.rollback": TaskSpec(rollback, {"session": "clear"}),
        "secureboost.save": TaskSpec(save, {"saved": "clear"}),
    }
    if role == "guest":
        to_hosts = {"box/*": "sealed:host"}
        return {
            **common,
            "secureboost.guest.setup": TaskSpec(kept(guest_setup), {"dh": "clear"}),
            "secureboost.guest.tree": TaskSpec(guest_tree, to_hosts),
            "secureboost.guest.choose": TaskSpec(guest_choose, to_hosts),
            "secureboost.guest.apply": TaskSpec(kept(guest_apply), to_hosts),
            "secureboost.guest.evaluate": TaskSpec(guest_evaluate, dict.fromkeys(METRICS, "clear")),
        }
    if role == "host":
        to_guest = {"box": "sealed:guest"}
        return {
            **common,
            "secureboost.host.setup": TaskSpec(
                kept(host_setup), {"features": "clear", "dh": "clear"}
            ),
            "secureboost.host.keys": TaskSpec(host_keys, {"*": "never"}),
            "secureboost.host.tree": TaskSpec(host_tree, to_guest),
            "secureboost.host.histograms": TaskSpec(host_histograms, to_guest),
            "secureboost.host.commit": TaskSpec(kept(host_commit), to_guest),
            "secureboost.host.decide": TaskSpec(host_decide, to_guest),
        }
    raise ConfigError(f"a SecureBoost party is a guest or a host, got role {role!r}")


# -- the coordinator's program ------------------------------------------------------------


def _parties(fed: Federation) -> tuple[str, list[str]]:
    if fed.roles is None:
        raise ConfigError("SecureBoost needs roles: Federation(roles={'guest': ..., 'host': ...})")
    guests = fed.roles.nodes("guest")
    hosts = list(fed.roles.nodes("host"))
    if len(guests) != 1:
        raise ConfigError(f"SecureBoost has exactly one guest (the label holder), got {guests}")
    return guests[0], hosts


def _request(fed: Federation, nodes: list[str], task: str, **kw: Any) -> dict[str, Any]:
    replies, failures = fed.request(nodes, task, **kw)
    if failures:
        first = next(iter(failures.values()))
        raise ProtocolError(f"{task} failed at {first.node_id}: {first.detail}")
    return replies


def _setup(
    fed: Federation, cfg: SecureBoostConfig, guest: str, hosts: list[str], run: str, complete: int
) -> None:
    split = {"seed": cfg.seed, "test_fraction": cfg.test_fraction, "run": run,
             "complete": complete}  # fmt: skip
    replies = _request(
        fed, hosts, "secureboost.host.setup",
        common={"max_bins": cfg.params.max_bins, "insecure": cfg.insecure_test_keys, **split},
    )  # fmt: skip
    common = {
        "params": cfg.params.to_dict(),
        "key_bits": cfg.key_bits,
        "insecure": cfg.insecure_test_keys,
        "hosts": hosts,
        "widths": [int(replies[h]["features"]) for h in hosts],
        **{f"dh/{h}": replies[h]["dh"] for h in hosts},
        **split,
    }
    dh = _request(fed, [guest], "secureboost.guest.setup", common=common)[guest]["dh"]
    _request(fed, hosts, "secureboost.host.keys", common={"guest": guest, "dh": dh})


def _tree(fed: Federation, depth: int) -> None:
    guest, hosts = fed.role("guest"), fed.role("host")
    out = guest.map("secureboost.guest.tree")
    for level in range(depth):
        task = "secureboost.host.tree" if level == 0 else "secureboost.host.histograms"
        sums = out.to(hosts, task=task, min_nodes=len(hosts))
        chosen = sums.to(guest, task="secureboost.guest.choose")
        committed = chosen.to(hosts, task="secureboost.host.commit", min_nodes=len(hosts))
        out = committed.to(guest, task="secureboost.guest.apply", last=level == depth - 1)


def evaluate(fed: Federation) -> dict[str, Any]:
    """The guest's metrics on the held-out rows (hosts send it their directions)."""
    hosts = fed.role("host")
    decided = hosts.map("secureboost.host.decide", min_nodes=len(hosts))
    out = decided.to(fed.role("guest"), task="secureboost.guest.evaluate", send=METRICS)
    # clear by the guest's policy; a mean over the one guest brings them (the digest's
    # bytes are small integers, exact in float64)
    got = out.select(*[f for f in METRICS if f in out.field_names]).mean()
    metrics: dict[str, Any] = {k: float(v) for k, v in got.items() if k != "digest"}
    if "digest" in got:
        metrics["digest"] = bytes(np.asarray(got["digest"]).astype(np.uint8)).hex()
    return metrics


def train_routed(
    fed: Federation,
    cfg: SecureBoostConfig,
    *,
    on_tree: Callable[[int, int], None] | None = None,
) -> SecureBoostResult:
    """Align the parties' rows (PSI), set up keys and channels, grow the trees, evaluate.

    A party failing or missing its deadline during a tree fails that tree: every party
    rolls back to the last complete round (the guest to the coordinator's count of them)
    and the tree is grown again; each failed tree and each failed roll-back attempt counts
    against ``cfg.max_retries`` (a party that is gone for good stops the job with its
    name). ``on_tree(done, total)`` is called after each complete tree.
    """
    guest, hosts = _parties(fed)
    clock = _Clock()
    run = secrets.token_hex(8)  # names this run's checkpoints at the parties
    size = align(fed, min_overlap=cfg.min_overlap)
    clock.lap("align")
    _setup(fed, cfg, guest, hosts, run, 0)
    clock.lap("setup")
    params = cfg.params
    total, done, retries = params.n_trees * params.outputs, 0, 0
    resumed_from: list[int] = []
    lost: list[str] = []
    while done < total:
        try:
            if lost:  # a party lost its process: all set up again from their checkpoints
                size = align(fed, min_overlap=cfg.min_overlap)
                _setup(fed, cfg, guest, hosts, run, done // params.outputs)
                fed.audit("secureboost.resumed", complete=done // params.outputs, parties=lost)
                resumed_from.append(done // params.outputs)
                lost = []
            _tree(fed, params.max_depth)
        except (ShoalError, OSError) as exc:
            log.warning("tree %d failed (%s); rolling back", done // params.outputs, exc)
            done -= done % params.outputs  # a multi-class round is grown again whole
            complete = done // params.outputs
            retries, gone = _roll_back(fed, [guest, *hosts], run, complete, retries, cfg, exc)
            lost = sorted({*lost, *gone})
            fed.audit("secureboost.tree_failed", tree=complete, reason=str(exc))
            continue
        done += 1
        if on_tree is not None:
            on_tree(done, total)
    clock.lap("trees")
    result = SecureBoostResult(
        intersection_size=size, trees=params.n_trees, retries=retries, resumed_from=resumed_from
    )
    if cfg.test_fraction > 0:
        result.test = evaluate(fed)
        clock.lap("evaluate")
    result.saved = _save(fed, [guest, *hosts])
    result.routed_bytes = fed.routed_bytes
    result.cpu_s, result.wall_s = clock.cpu, clock.wall
    return result


def _save(fed: Federation, parties: list[str]) -> list[str]:
    """Every party writes its part of the model where its node was told to (if anywhere);
    the parties that did. A party that fails to write is named in a warning: the trees are
    trained, and its part stays in its node's memory."""
    replies, failures = fed.request(parties, "secureboost.save")
    for node, failure in sorted(failures.items()):
        log.warning("party %s did not save its part of the model: %s", node, failure.detail)
    saved = sorted(n for n, r in replies.items() if int(r.get("saved", 0)))
    fed.audit("secureboost.saved", parties=saved)
    return saved


def _roll_back(
    fed: Federation,
    parties: list[str],
    run: str,
    complete: int,
    retries: int,
    cfg: SecureBoostConfig,
    cause: BaseException,
) -> tuple[int, list[str]]:
    """Every party forgets the failed tree; retried (each attempt a retry) until all
    answer, so a party that missed a deadline and comes back is waited for (and one that
    disconnected, up to ``cfg.resume_wait_s``). Returns the retries so far and the parties
    that answered without their session of the run (their process was restarted)."""
    while True:
        retries += 1
        if retries > cfg.max_retries:
            raise NotEnoughNodes(
                f"a tree failed ({cause}) and {cfg.max_retries} retries are used up; the job "
                f"stops after {complete} complete round(s) of trees"
            ) from cause
        try:
            wait_online(fed, parties, cfg.resume_wait_s)
        except NotEnoughNodes as exc:
            raise NotEnoughNodes(
                f"a tree failed ({cause}) and {exc}; the job stops after {complete} complete "
                "round(s) of trees"
            ) from cause
        replies, failures = fed.request(
            parties, "secureboost.rollback", common={"run": run, "complete": complete}
        )
        if not failures:
            return retries, sorted(n for n in parties if not int(replies[n].get("session", 0)))
        log.warning("roll-back failed at %s; trying again", sorted(failures))
        # a stalled party may yet come back: give it time before asking again
        time.sleep(min(cfg.retry_wait_s * 2.0 ** (retries - 1), 30.0))


class _Clock:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._at = (time.process_time(), time.perf_counter())

    def lap(self, name: str) -> None:
        now = (time.process_time(), time.perf_counter())
        self.cpu[name] = now[0] - self._at[0]
        self.wall[name] = now[1] - self._at[1]
        self._at = now


# -- vertical job files (``[model] name = "secureboost"`` in a ``[vertical]`` job) ------------


def config_from_job(job: VerticalJob) -> SecureBoostConfig:
    """The job's tree parameters ([model], XGBoost's or LightGBM's names) and crypto."""
    from shoal.trees.params import gbdt_params

    model = dict(job.raw.get("model", {}))
    declared_categories(model)  # checked here; each party codes its own columns on load
    skip = ("name", "categorical", "categories")
    values = {k: v for k, v in model.items() if k not in skip}
    values.setdefault("seed", job.config.seed)
    min_overlap = int(dict(job.raw.get("vertical", {})).get("min_overlap", 10))
    return SecureBoostConfig(
        params=gbdt_params(values),
        key_bits=job.config.key_bits,
        insecure_test_keys=job.config.insecure_test_keys,
        min_overlap=min_overlap,
        test_fraction=job.config.test_fraction,
        seed=job.config.seed,
    )


def load_party(job: VerticalJob, party: Party, path: Path | None = None) -> PartyData:
    """A party's table for a vertical.toml secureboost job: missing values allowed (trees
    learn where they go) and the job's categorical columns that are in its file coded."""
    return party.load(
        job.id_column, path, missing_ok=True,
        categorical=declared_categories(dict(job.raw.get("model", {}))),
    )  # fmt: skip


def summarize(job: VerticalJob, result: SecureBoostResult, wall_s: float) -> dict[str, Any]:
    test = dict(result.test)
    return {
        "job": job.name,
        "model": job.model,
        "intersection_size": result.intersection_size,
        "trees": result.trees,
        "retries": result.retries,
        "resumed_from": result.resumed_from,
        **{k: v for k, v in test.items() if k not in ("n", "digest")},
        "test_rows": int(test.get("n", 0)),
        "digest": test.get("digest"),
        "wall_s": wall_s,
        "bytes_sent": result.routed_bytes,
        "saved_by": result.saved,
    }


def centralized(
    cfg: SecureBoostConfig,
    tables: Mapping[str, PartyData],
    rows: Mapping[str, np.ndarray],
    order: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels on the held-out rows of the same trees trained in one place on
    the joined aligned columns (``order``: the guest first, then the hosts), with each
    party's own cuts: a simulation's reference, which needs every table in one place."""
    from shoal.trees import Bins, fit_bins, train
    from shoal.trees.horizontal import DEFAULT_FIXED_POINT

    n = len(rows[order[0]])
    held = held_out_rows(n, seed=cfg.seed, test_fraction=cfg.test_fraction)
    blocks = [tables[p].x[rows[p]] for p in order]
    labels = tables[order[0]].y
    if labels is None:
        raise DataError("the guest holds no label column")
    y = labels[rows[order[0]]]
    params = cfg.params
    if params.fixed_point_bits is None:
        params = GBDTParams(**{**params.to_dict(), "fixed_point_bits": DEFAULT_FIXED_POINT})
    parts = [
        fit_bins(block[~held], max_bins=params.max_bins, categorical=tables[p].categorical)
        for block, p in zip(blocks, order)
    ]
    bins = Bins(
        cuts=sum((b.cuts for b in parts), ()),
        categorical=sum((tuple(b.is_categorical) for b in parts), ()),
    )
    x = np.hstack(blocks)
    model = train(x[~held], y[~held], params, bins=bins)
    return model.predict(x[held]), y[held]


def simulate(job: VerticalJob) -> dict[str, Any]:
    """Run a vertical SecureBoost job with every party a virtual node, beside the
    centralized trees on the joined columns."""
    from shoal.runtime import LocalEngine, NodeApp
    from shoal.runtime.roles import NodeApps

    cfg = config_from_job(job)
    data = {p.name: load_party(job, p) for p in job.parties}
    apps = {}
    for p in job.parties:
        app = NodeApp(max_kept=8)
        app.install(secureboost_tasks(p.role))
        apps[p.name] = app
    names = list(apps)
    engine = LocalEngine(NodeApps(apps), nodes=names, data=[data[n] for n in names])
    fed = Federation(engine, roles=job.roles, seed=cfg.seed)
    started = time.perf_counter()
    result = train_routed(fed, cfg)
    summary = summarize(job, result, time.perf_counter() - started)
    order = [p.name for p in job.parties if p.role == "guest"]
    order += [p.name for p in job.parties if p.role == "host"]
    rows = {n: engine.node_state(n)["shoal.vertical"]["rows"] for n in order}
    predicted, y = centralized(cfg, data, rows, order)
    if len(y):
        metrics = _metrics(predicted, y, cfg.params)
        summary.update({f"centralized_{k}": v for k, v in metrics.items() if k != "logloss"})
    summary["identical_predictions"] = summary["digest"] == bytes(digest(predicted)).hex()
    return summary
