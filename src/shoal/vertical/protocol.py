"""The coordinator's side of vertical learning: align records by PSI, then train and
evaluate a hetero linear model as a short program of ``map``, ``to`` and requests.

The coordinator never holds a key; it sees the intersection size, public keys, batch
positions, ciphertexts, uniformly masked plaintexts and the guest's aggregate metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.core import Federation
from shoal.crypto.psi import new_salt
from shoal.errors import ConfigError, DataError, NotEnoughNodes, ProtocolError
from shoal.vertical.model import MODELS, batches

__all__ = ["HeteroConfig", "HeteroResult", "align", "evaluate", "train"]

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

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.mode not in ("arbiter", "two_party"):
            raise ConfigError(f"mode is 'arbiter' or 'two_party', got {self.mode!r}")
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


def _setup(fed: Federation, cfg: HeteroConfig, size: int) -> int:
    guest, hosts, arbiter = _parties(fed, cfg.mode)
    common = {
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
    fed.request([guest, *hosts], "vertical.keys", common=keys)
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
    out = h.select(*_vec("enc_u")).to(
        fed.role("guest"), task="vertical.guest.evaluate", split=split, send=fields
    )
    # The guest's metrics are clear by its policy; a mean over the one guest brings them.
    got = out.select(*fields).mean()
    return {k: float(v) for k, v in got.items()}


def train(fed: Federation, cfg: HeteroConfig) -> HeteroResult:
    """Align, set up keys and train for ``cfg.epochs`` (or until early stopping).

    A party that fails mid-epoch fails that epoch: every party rolls back to the last
    completed epoch and the epoch is run again, up to ``cfg.max_retries`` times.
    """
    guest, hosts, _ = _parties(fed, cfg.mode)
    size = align(fed, min_overlap=cfg.min_overlap)
    n_train = _setup(fed, cfg, size)
    result = HeteroResult(intersection_size=size, epochs_run=0)
    parties = [guest, *hosts]
    best, stale, epoch = float("inf"), 0, 0
    while epoch < cfg.epochs:
        try:
            for idx in batches(n_train, cfg.batch_size, epoch=epoch, seed=cfg.seed):
                _batch(fed, cfg, idx)
            _, failures = fed.request(parties, "vertical.commit", common={"epoch": epoch})
            if failures:
                raise NotEnoughNodes(f"commit failed at {sorted(failures)}")
        except (NotEnoughNodes, ProtocolError) as exc:
            result.retries += 1
            log.warning(
                "epoch %d failed (%s); rolling back to the last completed epoch", epoch, exc
            )
            if result.retries > cfg.max_retries:
                raise
            _, failures = fed.request(parties, "vertical.rollback")
            if failures:
                raise NotEnoughNodes(
                    f"could not roll back after a failed epoch: {sorted(failures)} unreachable"
                ) from exc
            continue
        epoch += 1
        metrics = evaluate(fed, model=cfg.model, split="train")
        result.history.append(metrics)
        result.epochs_run = epoch
        if cfg.patience is not None:
            if metrics["loss"] < best - cfg.tol:
                best, stale = metrics["loss"], 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    if cfg.test_fraction > 0:
        result.test = evaluate(fed, model=cfg.model, split="test")
    result.routed_bytes = fed.routed_bytes
    return result
