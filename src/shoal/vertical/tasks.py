"""Node-side tasks of hetero linear models, per role, each with its release policy.

Guest: labels and its own columns (plus the intercept). Host: its own columns. Arbiter:
only the Paillier key. Every value that leaves a party is a Paillier ciphertext under a key
the coordinator does not hold or a vector masked uniformly mod n (``sealed`` to the role
that may receive it); only public keys, the intersection size and aggregate metrics are
``clear``. Party state (weights, masks, keys) lives in ``ctx.state`` and never leaves.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from shoal.core.routing import received
from shoal.crypto import paillier as P
from shoal.crypto.psi import PsiParty
from shoal.errors import ConfigError, DataError, ProtocolError
from shoal.runtime import TaskContext
from shoal.vertical.checkpoint import Checkpoints, MemoryCheckpoints, check_run
from shoal.vertical.model import MODELS, evaluate, held_out_rows, prepare
from shoal.vertical.party import PartyData

__all__ = [
    "F_ENC",
    "F_SLOPE",
    "F_X",
    "GRAD_SLOT_BITS",
    "aligned_rows",
    "psi_tasks",
    "vertical_tasks",
]

F_ENC = 32  # fractional bits of encrypted scores and residual parts
F_SLOPE = 8  # the residual's slope (1/4 or 1) is exact at 8 bits
# Fractional bits of the (standardized) features in X^T d; the mean over the batch is taken
# after decryption. 16 bits keep exponents near 20 bits (multi-exponentiation cost grows
# with them) and x within 2**-17, far inside the 1e-4 lossless bound.
F_X = 16
# Gradients are masked packed, 192-bit signed slots (10 per 2048-bit plaintext): at
# F_ENC + F_SLOPE + F_X = 56 fractional bits that holds |sum_i d_i x_i| < 2**135.
GRAD_SLOT_BITS = 192
# A host's prediction scores travel packed, 96-bit signed slots (21 per 2048-bit plaintext;
# |u| < 2**63 at F_ENC fractional bits, wider only for scores past that): one encryption at
# the host and one decryption at the guest per 21 rows instead of per row.
SCORE_VALUE_BITS = 96
PACKED_FIELDS = ("ct", "count", "weight", "value_bits", "additions", "frac_bits")

_STATE = "shoal.vertical"


def spec(fn: Any, release: dict[str, str]) -> Any:
    """A task with its release policy (a plain task where the runtime has no policies)."""
    task_spec = getattr(importlib.import_module("shoal.runtime"), "TaskSpec", None)
    return fn if task_spec is None else task_spec(fn, release)


def _st(ctx: TaskContext) -> dict[str, Any]:
    st: dict[str, Any] = ctx.state.setdefault(_STATE, {})
    return st


def _data(ctx: TaskContext) -> PartyData:
    data = ctx.data
    if not isinstance(data, PartyData):
        raise ConfigError(f"node {ctx.node_id!r} holds no vertical party table")
    return data


def _vec_out(prefix: str, vec: P.EncryptedVector) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in vec.to_payload().items()}


def _vec_in(pk: P.PublicKey, prefix: str, fields: dict[str, Any]) -> P.EncryptedVector:
    return P.EncryptedVector.from_payload(
        pk, {k: fields[f"{prefix}.{k}"] for k in ("ct", "shape", "frac_bits")}
    )


def _routed_vec(pk: P.PublicKey, payload: dict[str, Any], prefix: str) -> list[P.EncryptedVector]:
    parts = {k: received(payload, f"{prefix}.{k}") for k in ("ct", "shape", "frac_bits")}
    return [
        P.EncryptedVector.from_payload(pk, {k: parts[k][src] for k in parts}) for src in parts["ct"]
    ]


def _pool(st: dict[str, Any], pk: P.PublicKey, need: int) -> P.RandomnessPool:
    pools: dict[bytes, P.RandomnessPool] = st.setdefault("pools", {})
    key = pk.to_bytes()
    if key not in pools:
        own = st.get("sk")
        pools[key] = P.RandomnessPool(
            public_key=pk, private_key=own if own is not None and own.public_key == pk else None
        )
    pool = pools[key]
    if len(pool) < need:
        pool.refill(need - len(pool))
    return pool


# -- private set intersection ------------------------------------------------------------


def psi_start(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    salt = bytes(np.asarray(payload["salt"], dtype=np.uint8))
    st = _st(ctx)
    st["psi"] = PsiParty(ids=_data(ctx).ids, salt=salt)
    st["psi_full"] = {}
    return {"points": st["psi"].blind_own()}


def psi_blind(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Add our blinding to another party's points; keep a copy if the set is now complete."""
    st = _st(ctx)
    (points,) = received(payload, "points").values()
    out = st["psi"].blind(points)
    if payload.get("final"):
        st["psi_full"][str(payload["owner"])] = out
    return {"points": out}


def psi_collect(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    (points,) = received(payload, "points").values()
    _st(ctx)["psi_full"][str(payload["owner"])] = np.array(points)
    return {}


def psi_finish(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    st = _st(ctx)
    full = st["psi_full"]
    owners = payload["parties"]
    if sorted(full) != sorted(owners):
        raise ProtocolError(f"missing fully blinded sets: have {sorted(full)}, need {owners}")
    result = st["psi"].intersect(full[ctx.node_id], [full[o] for o in owners if o != ctx.node_id])
    # Every party holds the same intersection ids, so sorting them gives one order that
    # does not depend on the session's keys (runs are reproducible) and reveals nothing.
    ids = _data(ctx).ids
    st["rows"] = np.array(sorted(result.rows.tolist(), key=lambda i: ids[i]), dtype=np.int64)
    del st["psi"]
    return {"size": int(result.size)}


# -- setup ------------------------------------------------------------------------------


def setup(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Align, split, standardize, init weights, make this party's Paillier key."""
    st = _st(ctx)
    data = _data(ctx)
    rows = st.get("rows")
    if rows is None:
        raise ProtocolError("run the record alignment (PSI) before setup")
    role = str(payload["role"])
    if role == "host" and data.y is not None:
        raise DataError("a host holds a label column; only the guest may hold labels")
    if role == "guest" and data.y is None:
        raise DataError("the guest holds no label column")
    held_out = held_out_rows(
        len(rows), seed=int(payload["seed"]), test_fraction=float(payload["test_fraction"])
    )
    x_train, x_test = prepare(data.x[rows], held_out, intercept=role == "guest")
    if role == "guest":
        assert data.y is not None
        y = data.y[rows]
        st["y"], st["y_test"] = y[~held_out], y[held_out]
    for stale in ("pools", "masks", "kG", "kH", "k_predict"):  # the previous session's
        st.pop(stale, None)
    st.update(
        role=role,
        run=check_run(payload["run"]),
        x=x_train,
        x_test=x_test,
        w=np.zeros(x_train.shape[1]),
        model=MODELS[str(payload["model"])],
        lr=float(payload["lr"]),
        l2=float(payload["l2"]),
        mode=str(payload["mode"]),
    )
    bits = int(payload["key_bits"])
    pk, sk = P.generate_keypair(bits, insecure=bool(payload.get("insecure", False)))
    st["pk"], st["sk"] = pk, sk
    return {"pk": np.frombuffer(pk.to_bytes(), np.uint8), "features": int(x_train.shape[1])}


def arbiter_setup(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    pk, sk = P.generate_keypair(
        int(payload["key_bits"]), insecure=bool(payload.get("insecure", False))
    )
    _st(ctx).update(pk=pk, sk=sk, run=check_run(payload["run"]))
    return {"pk": np.frombuffer(pk.to_bytes(), np.uint8)}


def keys(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Learn the public keys: ``kG`` protects the guest's residual (its key holder decrypts
    the guest's masked gradient), ``kH`` the host's; ``k_predict`` is the guest's own."""
    st = _st(ctx)
    insecure = bool(payload.get("insecure", False))
    for name in ("kG", "kH", "k_predict"):
        if name in payload:
            st[name] = P.PublicKey.from_bytes(
                bytes(np.asarray(payload[name], np.uint8)), insecure=insecure
            )
    return {}


# -- one mini-batch -----------------------------------------------------------------------


def _batch(st: dict[str, Any], payload: dict[str, Any]) -> np.ndarray:
    idx = np.asarray(payload["batch"], dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= len(st["x"]):
        raise ProtocolError("a batch must be a non-empty list of training row positions")
    return idx


def _masked_gradient(
    st: dict[str, Any], pk: P.PublicKey, enc_d: P.EncryptedVector, xb: np.ndarray
) -> P.EncryptedVector:
    """[[X^T d]] packed and masked for the key holder; the masks stay here for :func:`update`."""
    grad = enc_d.matmul(xb, frac_bits=F_X)
    packing = P.Packing(key_bits=pk.bits, value_bits=GRAD_SLOT_BITS, frac_bits=grad.frac_bits)
    need = -(-len(grad) // packing.slots)
    masked, masks = P.mask_packed(grad, packing, pool=_pool(st, pk, need))
    st["masks"] = (masks, packing, len(grad), len(xb))
    return masked


def host_scores(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """[[X_H w_H]] under the key protecting the guest's residual."""
    st = _st(ctx)
    idx = _batch(st, payload)
    u = st["x"][idx] @ st["w"]
    st["u"] = u
    pk = st["kG"]
    enc = P.encrypt(pk, u, frac_bits=F_ENC, pool=_pool(st, pk, len(u)))
    return _vec_out("enc_u", enc)


def guest_residual(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """[[d]] = slope*(u_G + sum [[u_H]]) + offset(y); masked [[X_G^T d / b]]; the host's share."""
    st = _st(ctx)
    idx = _batch(st, payload)
    model = st["model"]
    pk = st["kG"]
    parts = _routed_vec(pk, payload, "enc_u")
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    xb = st["x"][idx]
    own = model.slope * (xb @ st["w"]) + model.offset(st["y"][idx])
    enc_d = total.mul(np.float64(model.slope), frac_bits=F_SLOPE).add_plain(own)
    out = _vec_out("mg", _masked_gradient(st, pk, enc_d, xb))
    if st["mode"] == "arbiter":
        out.update(_vec_out("to_host", enc_d.rerandomize(_pool(st, pk, len(enc_d)))))
    else:  # two-party: the host finishes the residual under our key
        peer = st["kH"]
        c = P.encrypt(peer, own, frac_bits=F_ENC + F_SLOPE, pool=_pool(st, peer, len(own)))
        out.update(_vec_out("to_host", c))
    return out


def host_gradient(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    st = _st(ctx)
    idx = _batch(st, payload)
    pk = st["kH"]
    (enc,) = _routed_vec(pk, payload, "to_host")
    if st["mode"] != "arbiter":
        enc = enc.add_plain(st["model"].slope * st["u"])
    return _vec_out("mg", _masked_gradient(st, pk, enc, st["x"][idx]))


def decrypt_masked(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """The key holder's part: raw plaintexts of masked vectors (uniform in Z_n: no info)."""
    st = _st(ctx)
    sk = st["sk"]
    parts = {k: received(payload, f"mg.{k}") for k in ("ct", "shape", "frac_bits")}
    out = {}
    for src in parts["ct"]:
        vec = P.EncryptedVector.from_payload(sk.public_key, {k: parts[k][src] for k in parts})
        # one field per sender, so each party unmasks only its own vector
        out[f"plain/{src}"] = P.ints_to_bytes(sk.public_key, P.decrypt_raw(sk, vec))
    return out


def update(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Unmask our gradient and take a step (with L2); the gradient never leaves."""
    st = _st(ctx)
    sources = received(payload, f"plain/{ctx.node_id}")
    if len(sources) != 1:
        raise ProtocolError("expected one key holder's answer")
    (plain,) = sources.values()
    pk = st["kG"] if st["role"] == "guest" else st["kH"]
    masks, packing, count, rows = st.pop("masks")
    total = P.unmask_packed(
        pk, P.ints_from_bytes(pk, plain), masks, packing=packing, count=count, shape=(count,)
    )
    grad = total / rows  # the batch mean, as the centralized model takes it
    st["w"] = st["w"] - st["lr"] * (grad + st["l2"] * st["w"])
    return {}


def _epoch(payload: dict[str, Any]) -> int:
    epoch = payload.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < -1:
        raise ProtocolError("an epoch is an integer >= -1 (-1: before the first epoch)")
    return int(epoch)


def _session(st: dict[str, Any]) -> str:
    if "w" not in st or "run" not in st:
        raise ProtocolError("this party has no training session: run setup first")
    run: str = st["run"]
    return run


def status(store: Checkpoints, role: str) -> Any:
    def task(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        """Whether this party still holds the run's session (keys, rows, coefficients), and
        the last epoch of the run it holds the coefficients of, with every epoch before it
        (-1: none). Numbers only: the coefficients stay here."""
        st = _st(ctx)
        run = check_run(payload["run"])
        if role == "arbiter":  # it holds a key and no coefficients
            return {"session": int("sk" in st and st.get("run") == run), "last": -1}
        live = "w" in st and st.get("run") == run and "kG" in st
        last = -1
        for epoch in store.epochs(run):
            if epoch != last + 1:
                break
            last = epoch
        return {"session": int(live), "last": last}

    return task


def commit(store: Checkpoints) -> Any:
    def task(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        """The epoch is complete here: keep its coefficients (durably, with a state file)
        before acknowledging it."""
        st = _st(ctx)
        store.save(_session(st), _epoch(payload), st["w"])
        return {}

    return task


def restore(store: Checkpoints) -> Any:
    def task(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        """Back to the coefficients of a completed epoch (-1: zeros, before the first)."""
        st = _st(ctx)
        run, epoch = _session(st), _epoch(payload)
        w = np.zeros(len(st["w"])) if epoch == -1 else store.load(run, epoch)
        if w.shape != st["w"].shape:
            raise ProtocolError(
                f"the saved coefficients of epoch {epoch} have {len(w)} values, this party's "
                f"model {len(st['w'])}: not this job's"
            )
        st["w"] = w
        st.pop("masks", None)
        return {}

    return task


# -- prediction: only the guest learns the scores ------------------------------------------


def host_predict(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """[[X_H w_H]] for the guest, packed: the guest learns these scores whole anyway."""
    st = _st(ctx)
    x = st["x_test"] if payload.get("split") == "test" else st["x"]
    pk = st["k_predict"]
    u = x @ st["w"]
    top = max((abs(v) for v in P.to_fixed(u, F_ENC)), default=0)
    packing = P.Packing(
        key_bits=pk.bits, value_bits=max(SCORE_VALUE_BITS, top.bit_length() + 1), frac_bits=F_ENC
    )
    need = -(-len(u) // packing.slots)
    enc = P.encrypt_packed(pk, u, packing, pool=_pool(st, pk, need))
    return {f"enc_u.{k}": v for k, v in enc.to_payload().items()}


def guest_evaluate(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    st = _st(ctx)
    test = payload.get("split") == "test"
    x = st["x_test"] if test else st["x"]
    y = st["y_test"] if test else st["y"]
    scores = x @ st["w"]
    if payload.get("routed.from"):
        parts = {k: received(payload, f"enc_u.{k}") for k in PACKED_FIELDS}
        for src in parts["ct"]:
            enc = P.PackedVector.from_payload(st["pk"], {k: parts[k][src] for k in parts})
            if enc.count != len(scores):
                raise ProtocolError(f"{src} sent {enc.count} scores for {len(scores)} rows")
            scores = scores + P.decrypt_packed(st["sk"], enc)
    out: dict[str, Any] = {k: float(v) for k, v in evaluate(st["model"], scores, y).items()}
    out["n"] = len(y)
    return out


def psi_tasks() -> dict[str, Any]:
    """The record-alignment tasks every guest and host installs (:func:`shoal.vertical.align`
    drives them); the aligned rows are then :func:`aligned_rows` at each party."""
    parties = "sealed:guest,host"
    return {
        "vertical.psi.start": spec(psi_start, {"points": parties}),
        "vertical.psi.blind": spec(psi_blind, {"points": parties}),
        "vertical.psi.collect": spec(psi_collect, {"*": "never"}),
        "vertical.psi.finish": spec(psi_finish, {"size": "clear"}),
    }


def aligned_rows(ctx: TaskContext) -> np.ndarray:
    """This party's rows of the intersection, in the order every party shares."""
    rows = _st(ctx).get("rows")
    if rows is None:
        raise ProtocolError("run the record alignment (PSI) first")
    out: np.ndarray = rows
    return out


def vertical_tasks(
    role: str, *, mode: str, checkpoints: Checkpoints | None = None
) -> dict[str, Any]:
    """The tasks a party of ``role`` installs, each with its release policy.

    ``checkpoints`` keeps the party's coefficients of each completed epoch (in memory unless
    given, e.g. :class:`~shoal.vertical.checkpoint.FileCheckpoints` at a deployed party).
    """
    if mode not in ("arbiter", "two_party"):
        raise ConfigError(f"mode is 'arbiter' or 'two_party', got {mode!r}")
    store = checkpoints if checkpoints is not None else MemoryCheckpoints()
    parties = "sealed:guest,host"
    state = {"session": "clear", "last": "clear"}
    common = {
        **psi_tasks(),
        "vertical.setup": spec(setup, {"pk": "clear", "features": "clear"}),
        "vertical.keys": spec(keys, {"*": "never"}),
        "vertical.update": spec(update, {"*": "never"}),
        "vertical.status": spec(status(store, role), state),
        "vertical.commit": spec(commit(store), {"*": "never"}),
        "vertical.restore": spec(restore(store), {"*": "never"}),
    }
    if role == "arbiter":
        return {
            "vertical.arbiter.setup": spec(arbiter_setup, {"pk": "clear"}),
            "vertical.status": spec(status(store, role), state),
            "vertical.decrypt": spec(decrypt_masked, {"plain/*": parties}),
        }
    keyholder_g = "arbiter" if mode == "arbiter" else "host"
    keyholder_h = "arbiter" if mode == "arbiter" else "guest"
    if role == "guest":
        tasks = {
            **common,
            "vertical.guest.residual": spec(
                guest_residual, {"mg.*": f"sealed:{keyholder_g}", "to_host.*": "sealed:host"}
            ),
            "vertical.guest.evaluate": spec(
                guest_evaluate,
                {
                    "auc": "clear",
                    "accuracy": "clear",
                    "loss": "clear",
                    "rmse": "clear",
                    "n": "clear",
                },
            ),
        }
    elif role == "host":
        tasks = {
            **common,
            "vertical.host.scores": spec(host_scores, {"enc_u.*": "sealed:guest"}),
            "vertical.host.gradient": spec(host_gradient, {"mg.*": f"sealed:{keyholder_h}"}),
            "vertical.host.predict": spec(host_predict, {"enc_u.*": "sealed:guest"}),
        }
    else:
        raise ConfigError(f"unknown vertical role {role!r}: guest, host or arbiter")
    if mode == "two_party":
        tasks["vertical.decrypt"] = spec(decrypt_masked, {"plain/*": parties})
    return tasks
