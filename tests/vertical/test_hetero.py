"""Hetero logistic/linear regression: lossless against the same Taylor-loss model trained
centrally on the joined columns, in both modes, with failures, bad input and a curious
coordinator."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.errors import ConfigError, DataError, ProtocolError
from shoal.runtime import Faults
from shoal.vertical.model import MODELS, evaluate, held_out_rows, prepare, train_centralized
from shoal.vertical.party import PartyData
from shoal.vertical.protocol import HeteroConfig, train

from .conftest import federation, split_breast_cancer

ROLES_ARB = {"bank": "guest", "insurer": "host", "arb": "arbiter"}
ROLES_TWO = {"bank": "guest", "insurer": "host"}


def _cfg(**kw) -> HeteroConfig:
    base = dict(
        epochs=2, batch_size=128, lr=0.15, l2=0.01, key_bits=512, insecure_test_keys=True, seed=3
    )
    base.update(kw)
    return HeteroConfig(**base)


def _reference(engine, guest: PartyData, host: PartyData, cfg: HeteroConfig):
    """The centralized model on the joined aligned columns, with the same batches."""
    g_rows = engine.node_state("bank")["shoal.vertical"]["rows"]
    h_rows = engine.node_state("insurer")["shoal.vertical"]["rows"]
    # PSI gave both parties one row order: the ids line up position by position
    assert [guest.ids[i] for i in g_rows] == [host.ids[i] for i in h_rows]
    held = held_out_rows(len(g_rows), seed=cfg.seed, test_fraction=cfg.test_fraction)
    gx, gx_test = prepare(guest.x[g_rows], held, intercept=True)
    hx, hx_test = prepare(host.x[h_rows], held, intercept=False)
    y = guest.y[g_rows]
    spec = MODELS[cfg.model]
    w = train_centralized(
        spec,
        np.hstack([gx, hx]),
        y[~held],
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        l2=cfg.l2,
        seed=cfg.seed,
    )
    test = evaluate(spec, np.hstack([gx_test, hx_test]) @ w, y[held])
    return w, gx.shape[1], test


def _weights(engine) -> np.ndarray:
    return np.concatenate(
        [engine.node_state(n)["shoal.vertical"]["w"] for n in ("bank", "insurer")]
    )


@pytest.mark.parametrize("mode", ["arbiter", "two_party"])
def test_lossless_against_centralized(mode: str) -> None:
    guest, host = split_breast_cancer()
    roles = ROLES_ARB if mode == "arbiter" else ROLES_TWO
    fed, engine = federation({"bank": guest, "insurer": host}, roles, mode=mode)
    cfg = _cfg(mode=mode)
    result = train(fed, cfg)
    assert result.intersection_size == 512  # 90% of 569; the rest each party holds alone
    w_ref, _, test_ref = _reference(engine, guest, host, cfg)
    w = _weights(engine)
    assert np.max(np.abs(w - w_ref)) <= 1e-4 * np.max(np.abs(w_ref))
    assert abs(result.test["auc"] - test_ref["auc"]) <= 0.002
    assert result.test["auc"] > 0.95 and result.test["accuracy"] > 0.9
    assert len(result.history) == cfg.epochs
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_linear_regression_and_early_stopping() -> None:
    guest, host = split_breast_cancer()
    # a regression target the guest holds: a smooth function of both parties' columns
    xg_all = {i: r for i, r in zip(guest.ids, guest.x)}
    target = np.array([0.5 * xg_all[i][0] for i in guest.ids])
    guest = PartyData.from_columns(guest.ids, guest.x, y=target)
    fed, engine = federation({"bank": guest, "insurer": host}, ROLES_ARB, mode="arbiter")
    cfg = _cfg(model="hetero_linear_regression", lr=0.05, epochs=6, patience=1, tol=1e9)
    result = train(fed, cfg)
    # tol is huge, so no epoch improves "enough": training stops after patience epochs
    assert result.epochs_run == 1 + 1
    w_ref, _, test_ref = _reference(
        engine, guest, host, HeteroConfig(**{**cfg.__dict__, "epochs": result.epochs_run})
    )
    assert np.max(np.abs(_weights(engine) - w_ref)) <= 1e-4 * np.max(np.abs(w_ref))
    assert abs(result.test["rmse"] - test_ref["rmse"]) <= 1e-6 * max(1.0, test_ref["rmse"])


def test_party_dropping_mid_epoch_resumes_from_last_epoch() -> None:
    guest, host = split_breast_cancer()
    cfg = _cfg(mode="arbiter", epochs=2)
    fed, engine = federation({"bank": guest, "insurer": host}, ROLES_ARB, mode="arbiter")
    clean = train(fed, cfg)
    w_clean = _weights(engine)
    faults = Faults(drop=0.3, tasks=frozenset({"vertical.host.gradient"}), seed=5)
    fed2, engine2 = federation(
        {"bank": guest, "insurer": host}, ROLES_ARB, mode="arbiter", faults=faults
    )
    # PSI's order differs per session, so compare against this session's own reference
    faulty = train(fed2, HeteroConfig(**{**cfg.__dict__, "max_retries": 20}))
    assert faulty.retries >= 1 and clean.retries == 0
    # rolled back and rerun, the model is exactly the uninterrupted one
    np.testing.assert_array_equal(_weights(engine2), w_clean)
    assert faulty.test == clean.test


def test_bad_input_is_refused_before_training() -> None:
    guest, host = split_breast_cancer()
    far = PartyData.from_columns([f"zz{i}" for i in range(50)], np.ones((50, 3)))
    fed, _ = federation({"bank": guest, "insurer": far}, ROLES_ARB, mode="arbiter")
    with pytest.raises(DataError, match="share only 0 ids"):
        train(fed, _cfg())
    labelled_host = PartyData.from_columns(host.ids, host.x, y=np.zeros(len(host.ids)))
    fed, _ = federation({"bank": guest, "insurer": labelled_host}, ROLES_ARB, mode="arbiter")
    with pytest.raises(ProtocolError, match="a host holds a label column"):
        train(fed, _cfg())
    with pytest.raises(ConfigError, match="too short"):
        HeteroConfig(key_bits=1024)
    with pytest.raises(DataError, match="duplicate id"):
        PartyData.from_columns(["a", "a"], np.ones((2, 1)))
    fed, _ = federation({"bank": guest, "insurer": host}, ROLES_ARB, mode="arbiter")
    with pytest.raises(DataError, match="minimum of 1000"):
        train(fed, _cfg(min_overlap=1000))


def test_csv_loading_refuses_bad_tables(tmp_path) -> None:
    good = tmp_path / "g.csv"
    good.write_text("id,label,a,b\n1,0,0.5,2\n2,1,1.5,3\n")
    data = PartyData.from_csv(good, id_column="id", label="label")
    assert data.ids == ("1", "2") and data.columns == ("a", "b") and data.y.tolist() == [0, 1]
    bad = tmp_path / "b.csv"
    bad.write_text("id,a\n1,x\n")
    with pytest.raises(DataError, match="column 'a' is not numeric"):
        PartyData.from_csv(bad, id_column="id")
    with pytest.raises(DataError, match="no id column"):
        PartyData.from_csv(good, id_column="key")
    dup = tmp_path / "d.csv"
    dup.write_text("id,a\n1,1\n1,2\n")
    with pytest.raises(DataError, match="duplicate id '1'"):
        PartyData.from_csv(dup, id_column="id")


def test_curious_coordinator_sees_only_sealed_bytes() -> None:
    """Everything a party sends through the coordinator is a uint8 array (ciphertexts, PSI
    points, uniformly masked plaintexts, public keys) or a clear aggregate metric/size:
    no float array of scores, residuals, gradients or weights ever reaches it."""
    guest, host = split_breast_cancer()
    fed, _ = federation({"bank": guest, "insurer": host}, ROLES_ARB, mode="arbiter")
    seen: list[dict] = []
    original = fed.request

    def spy(node_ids, task, **kw):
        replies, failures = original(node_ids, task, **kw)
        seen.extend(replies.values())
        return replies, failures

    fed.request = spy  # type: ignore[method-assign]
    train(fed, _cfg(epochs=1))
    arrays = [v for r in seen for v in r.values() if isinstance(v, np.ndarray)]
    assert arrays and all(a.dtype == np.uint8 for a in arrays)
    routes = [e for e in fed.audit_log if e.action == "route"]
    assert {e.detail["role"] for e in routes} == {"guest", "host", "arbiter"}


def test_two_hosts_with_an_arbiter_are_lossless() -> None:
    guest, host = split_breast_cancer()
    h1 = PartyData.from_columns(host.ids, host.x[:, :12])
    h2 = PartyData.from_columns(host.ids[::-1], host.x[::-1, 12:])  # its own row order
    roles = {"bank": "guest", "ins1": "host", "ins2": "host", "arb": "arbiter"}
    fed, engine = federation({"bank": guest, "ins1": h1, "ins2": h2}, roles, mode="arbiter")
    cfg = _cfg()
    result = train(fed, cfg)
    rows = {n: engine.node_state(n)["shoal.vertical"]["rows"] for n in ("bank", "ins1", "ins2")}
    data = {"bank": guest, "ins1": h1, "ins2": h2}
    aligned = [[data[n].ids[i] for i in rows[n]] for n in rows]
    assert aligned[0] == aligned[1] == aligned[2] and result.intersection_size == 512
    held = held_out_rows(512, seed=cfg.seed, test_fraction=cfg.test_fraction)
    blocks = [prepare(data[n].x[rows[n]], held, intercept=n == "bank") for n in rows]
    y = guest.y[rows["bank"]]
    w_ref = train_centralized(MODELS[cfg.model], np.hstack([b[0] for b in blocks]), y[~held],
                              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              l2=cfg.l2, seed=cfg.seed)  # fmt: skip
    w = np.concatenate([engine.node_state(n)["shoal.vertical"]["w"] for n in rows])
    assert np.max(np.abs(w - w_ref)) <= 1e-4 * np.max(np.abs(w_ref))
