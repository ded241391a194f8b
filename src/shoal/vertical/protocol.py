"""The coordinator's side of vertical learning: align records by PSI, then train and
evaluate a hetero linear model as a short program of ``map``, ``to`` and requests.

The coordinator never holds a key; it sees the intersection size, public keys, batch
positions, ciphertexts (with the slot layout of packed ones), uniformly masked plaintexts
and the guest's aggregate metrics.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.core import Federation
from shoal.crypto.psi import new_salt
from shoal.errors import ConfigError, DataError, NotEnoughNodes, ProtocolError
from shoal.vertical.model import MODELS, batches
from shoal.vertical.tasks import PACKED_FIELDS

__all__ = ["HeteroConfig", "HeteroResult", "align", "evaluate", "train", "wait_online"]

log = logging.getLogger("shoal.vertical")


def _vec(prefix: str) -> tuple[str, str, str]:
    return (f"{prefix}.ct", f"{prefix}.shape", f"{prefix}.frac_bits")


@dataclass(frozen=True, kw_only=True)
class HeteroConfig:
    """A hetero linear model's training settings (the job file's [algorithm] and [crypto])."""

    model: str = "hetero_logistic_regression"
    mode: str = "arbiter"  # or "two_party": no arbiter, each party holds a key
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 0.15
    l2: float = 0.0
    seed: int = 0
    test_fraction: float = 0.2
    key_bits: int = 2048
    insecure_test_keys: bool = False
    min_overlap: int = 10
    patience: int | None = None  # early stopping: epochs without train-loss improvement
    tol: float = 1e-6
    max_retries: int = 3
    # how long a failed epoch waits for every party to be connected again (a restarted node)
    resume_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.mode not in ("arbiter", "two_party"):
            raise ConfigError(f"mode is 'arbiter' or 'two_party', got {self.mode!r}")
        if self.max_retries < 0 or not self.resume_wait_s >= 0:
            raise ConfigError("max_retries and resume_wait_s must be >= 0")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.l2 < 0:
            raise ConfigError("epochs, batch_size >= 1, lr > 0 and l2 >= 0 are required")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.key_bits < 2048 and not self.insecure_test_keys:
            raise ConfigError(
                f"key_bits={self.key_bits} is too short; use >= 2048 "
                "(or insecure_test_keys / --insecure-test-keys for tests)"
            )


@dataclass(kw_only=True)
class HeteroResult:
    intersection_size: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    # the epoch training went on from at each (re)start: -1 from scratch, else the last
    # epoch every party had completed
    resumed_from: list[int] = field(default_factory=list)
    routed_bytes: int = 0


def _parties(fed: Federation, mode: str) -> tuple[str, list[str], str | None]:
    if fed.roles is None:
        raise ConfigError("a vertical job needs roles: Federation(roles={'guest': ..., ...})")
    guests = fed.roles.nodes("guest")
    hosts = list(fed.roles.nodes("host"))
    if len(guests) != 1:
        raise ConfigError(f"a vertical job has exactly one guest (label holder), got {guests}")
    arbiter = None
    if mode == "arbiter":
        arbiters = fed.roles.nodes("arbiter")
        if len(arbiters) != 1:
            raise ConfigError("mode 'arbiter' needs exactly one arbiter node")
        arbiter = arbiters[0]
    elif len(hosts) != 1:
        raise ConfigError("the two-party mode has exactly one host")
    return guests[0], hosts, arbiter


def align(fed: Federation, *, min_overlap: int = 1) -> int:
    """ECDH-PSI between the guest and the hosts; every party keeps its aligned row order."""
    if fed.roles is None:
        raise ConfigError("align needs roles")
    parties = list(fed.roles.nodes("guest")) + list(fed.roles.nodes("host"))
    salt = np.frombuffer(new_salt(), dtype=np.uint8)
    # every party blinds its own ids first: each must hold its key before it blinds others'
    started = {p: fed.group([p]).map("vertical.psi.start", salt=salt)["points"] for p in parties}
    for owner in parties:
        held = started[owner]
        others = [q for q in parties if q != owner]
        for k, q in enumerate(others):
            final = k == len(others) - 1
            held = held.to(fed.group([q]), task="vertical.psi.blind", owner=owner, final=final)[
                "points"
            ]
        for q in parties:
            if q != others[-1]:
                held.to(fed.group([q]), task="vertical.psi.collect", owner=owner)
    replies, failures = fed.request(parties, "vertical.psi.finish", common={"parties": parties})
    if failures:
        raise NotEnoughNodes(f"record alignment failed at {sorted(failures)}")
    sizes = {int(r["size"]) for r in replies.values()}
    if len(sizes) != 1:
        raise ProtocolError(f"the parties disagree on the intersection size: {sorted(sizes)}")
    size = sizes.pop()
    if size < max(min_overlap, 1):
        raise DataError(
            f"the parties share only {size} ids, fewer than the minimum of {min_overlap}; "
            "check the id columns (same format at every party?) before training"
        )
    return size


def _setup(fed: Federation, cfg: HeteroConfig, size: int, run: str) -> int:
    guest, hosts, arbiter = _parties(fed, cfg.mode)
    common = {
        "run": run,
        "model": cfg.model,
        "lr": cfg.lr,
        "l2": cfg.l2,
        "mode": cfg.mode,
        "seed": cfg.seed,
        "test_fraction": cfg.test_fraction,
        "key_bits": cfg.key_bits,
        "insecure": cfg.insecure_test_keys,
    }
    roles = {guest: "guest", **{h: "host" for h in hosts}}
    replies, failures = fed.request(
        [guest, *hosts],
        "vertical.setup",
        common=common,
        per_node={n: {"role": r} for n, r in roles.items()},
    )
    if failures:
        first = next(iter(failures.values()))
        raise ProtocolError(f"setup failed at {first.node_id}: {first.detail}")
    keys: dict[str, Any] = {"k_predict": replies[guest]["pk"], "insecure": cfg.insecure_test_keys}
    if arbiter is not None:
        arb, fail = fed.request([arbiter], "vertical.arbiter.setup", common=common)
        if fail:
            raise ProtocolError(f"arbiter setup failed: {next(iter(fail.values())).detail}")
        keys["kG"] = keys["kH"] = arb[arbiter]["pk"]
    else:
        keys["kG"] = replies[hosts[0]]["pk"]  # the host decrypts the guest's masked gradient
        keys["kH"] = replies[guest]["pk"]  # and the guest the host's
    _, failures = fed.request([guest, *hosts], "vertical.keys", common=keys)
    if failures:
        raise NotEnoughNodes(f"the public keys did not reach {sorted(failures)}")
    n_test = round(cfg.test_fraction * size)
    return size - n_test


def _batch(fed: Federation, cfg: HeteroConfig, idx: np.ndarray) -> None:
    keyholder_g = "arbiter" if cfg.mode == "arbiter" else "host"
    keyholder_h = "arbiter" if cfg.mode == "arbiter" else "guest"
    hosts, guest = fed.role("host"), fed.role("guest")
    h = hosts.map("vertical.host.scores", batch=idx)
    g = h.select(*_vec("enc_u")).to(guest, task="vertical.guest.residual", batch=idx)
    hg = g.select(*_vec("to_host")).to(hosts, task="vertical.host.gradient", batch=idx)
    dg = g.select(*_vec("mg")).to(fed.role(keyholder_g), task="vertical.decrypt")
    dg.to(guest, task="vertical.update")
    dh = hg.select(*_vec("mg")).to(fed.role(keyholder_h), task="vertical.decrypt")
    dh.to(hosts, task="vertical.update")


def evaluate(fed: Federation, *, model: str, split: str = "test") -> dict[str, float]:
    """Scores of the guest's rows, known only to the guest; returns its aggregate metrics."""
    h = fed.role("host").map("vertical.host.predict", split=split)
    if MODELS[model].classification:
        fields: tuple[str, ...] = ("auc", "accuracy", "loss", "n")
    else:
        fields = ("rmse", "loss", "n")
    packed = tuple(f"enc_u.{k}" for k in PACKED_FIELDS)
    out = h.select(*packed).to(
        fed.role("guest"), task="vertical.guest.evaluate", split=split, send=fields
    )
    # The guest's metrics are clear by its policy; a mean over the one guest brings them.
    got = out.select(*fields).mean()
    return {k: float(v) for k, v in got.items()}


def wait_online(fed: Federation, nodes: list[str], wait_s: float) -> None:
    """Until every party is connected again (a restarted node dials back in)."""
    end, pause = time.monotonic() + wait_s, 0.05
    while True:
        missing = sorted(set(nodes) - set(fed.node_ids))
        if not missing:
            return
        if time.monotonic() >= end:
            raise NotEnoughNodes(f"part(ies) {missing} did not come back within {wait_s:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


@dataclass
class _Session:
    """The coordinator's view of a run: its id, and the intersection and training rows
    once the parties hold a session (keys, aligned rows)."""

    run: str
    size: int = 0
    n_train: int = 0


def _resume(fed: Federation, cfg: HeteroConfig, session: _Session) -> int:
    """Bring every party back to the last epoch all of them completed; returns it (-1:
    none yet). A party that lost its session (a restarted process) makes every party
    align and set up again, with fresh keys; each keeps its own coefficients."""
    guest, hosts, arbiter = _parties(fed, cfg.mode)
    parties = [guest, *hosts]
    everyone = parties + ([arbiter] if arbiter is not None else [])
    wait_online(fed, everyone, cfg.resume_wait_s)
    replies, failures = fed.request(everyone, "vertical.status", common={"run": session.run})
    if failures:
        raise NotEnoughNodes(f"status failed at {sorted(failures)}")
    if not all(int(replies[n]["session"]) for n in everyone) or not session.size:
        session.size = align(fed, min_overlap=cfg.min_overlap)
        session.n_train = _setup(fed, cfg, session.size, session.run)
    # each party holds every epoch up to its "last": the latest all hold is the smallest
    epoch = min(min(int(replies[p]["last"]) for p in parties), cfg.epochs - 1)
    _, failures = fed.request(parties, "vertical.restore", common={"epoch": epoch})
    if failures:
        raise NotEnoughNodes(f"restore failed at {sorted(failures)}")
    return epoch


def _stop_early(history: list[dict[str, float]], cfg: HeteroConfig) -> bool:
    if cfg.patience is None:
        return False
    best, stale = float("inf"), 0
    for metrics in history:
        if metrics["loss"] < best - cfg.tol:
            best, stale = metrics["loss"], 0
        else:
            stale += 1
    return stale >= cfg.patience


def train(fed: Federation, cfg: HeteroConfig, *, run: str | None = None) -> HeteroResult:
    """Align, set up keys and train for ``cfg.epochs`` (or until early stopping).

    Each party keeps its coefficients of every completed epoch (``vertical.commit``). A
    party that fails (or drops out) mid-epoch fails that epoch: once every party is
    connected again (within ``cfg.resume_wait_s``), all go back to the last epoch every
    one of them completed, and training goes on from there, up to ``cfg.max_retries``
    failures. A restarted party with a state file keeps its coefficients across the
    restart; the others' keys and alignment are then set up again. ``run`` names the run
    at the parties (default: a fresh random id).
    """
    guest, hosts, _ = _parties(fed, cfg.mode)
    session = _Session(run=run if run is not None else secrets.token_hex(8))
    result = HeteroResult(intersection_size=0, epochs_run=0)
    parties = [guest, *hosts]
    epoch, resume = 0, True  # the first "resume" aligns and sets up from scratch
    while True:
        try:
            if resume:
                epoch = _resume(fed, cfg, session) + 1
                result.resumed_from.append(epoch - 1)
                del result.history[epoch:]
                resume = False
            if len(result.history) < epoch:  # metrics of the last completed epoch
                result.history.append(evaluate(fed, model=cfg.model, split="train"))
            result.epochs_run = epoch
            if epoch >= cfg.epochs or _stop_early(result.history, cfg):
                if cfg.test_fraction > 0:
                    result.test = evaluate(fed, model=cfg.model, split="test")
                break
            for idx in batches(session.n_train, cfg.batch_size, epoch=epoch, seed=cfg.seed):
                _batch(fed, cfg, idx)
            _, failures = fed.request(parties, "vertical.commit", common={"epoch": epoch})
            if failures:
                raise NotEnoughNodes(f"commit failed at {sorted(failures)}")
            epoch += 1
        except (NotEnoughNodes, ProtocolError) as exc:
            result.retries += 1
            if result.retries > cfg.max_retries:
                raise
            log.warning("epoch %d failed (%s); resuming from the last completed epoch", epoch, exc)
            resume = True
    result.intersection_size = session.size
    result.routed_bytes = fed.routed_bytes
    return result
