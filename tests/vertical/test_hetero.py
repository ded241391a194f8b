"""Hetero logistic/linear regression: lossless against the same Taylor-loss model trained
centrally on the joined columns, in both modes, with failures, bad input and a curious
coordinator."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.core import Federation
from shoal.core.routing import received
from shoal.errors import ConfigError, DataError, ProtocolError
from shoal.runtime import Faults, LocalEngine, NodeApp
from shoal.runtime.roles import NodeApps
from shoal.vertical.checkpoint import FileCheckpoints, MemoryCheckpoints
from shoal.vertical.model import MODELS, evaluate, held_out_rows, prepare, train_centralized
from shoal.vertical.party import PartyData
from shoal.vertical.protocol import HeteroConfig, train
from shoal.vertical.tasks import vertical_tasks
from shoal.wire import decode

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


class _Restarts(NodeApps):
    """A party whose process dies at its ``at``-th call of ``task``: its whole task state is
    gone (keys, rows, coefficients in memory), and so is ``lose``, its checkpoints kept in
    memory; a checkpoint file remains."""

    def __init__(self, apps, *, node: str, task: str, at: int, lose=None) -> None:
        super().__init__(apps)
        self.node, self.task, self.at, self.calls, self.lose = node, task, at, 0, lose

    def handle(self, ctx, name, payload, **kw):
        if ctx.node_id == self.node and name == self.task:
            self.calls += 1
            if self.calls == self.at:
                ctx.state.clear()
                if self.lose is not None:
                    self.lose._saved.clear()
                raise ProtocolError("the party's process died")
        return super().handle(ctx, name, payload, **kw)


def _restart_federation(parties, roles, *, mode, stores, **restart):
    apps = {}
    for node, role in roles.items():
        app = NodeApp(max_kept=8)
        app.install(vertical_tasks(role, mode=mode, checkpoints=stores.get(node)))
        apps[node] = app
    nodes = list(roles)
    engine = LocalEngine(
        _Restarts(apps, **restart), nodes=nodes, data=[parties.get(n) for n in nodes]
    )
    by_role: dict[str, list[str]] = {}
    for node, role in roles.items():
        by_role.setdefault(role, []).append(node)
    return Federation(engine, roles=by_role), engine


@pytest.mark.parametrize("mode", ["arbiter", "two_party"])
def test_restarted_party_resumes_from_its_saved_epoch(mode: str, tmp_path) -> None:
    """The host's process dies in epoch 2's third batch; it keeps its coefficients of every
    completed epoch in a file, so the run goes on from epoch 1 (with fresh alignment and
    keys, since the host lost its session) and ends with exactly the uninterrupted model."""
    guest, host = split_breast_cancer()
    roles = ROLES_ARB if mode == "arbiter" else ROLES_TWO
    data = {"bank": guest, "insurer": host}
    cfg = _cfg(mode=mode, epochs=3)
    fed, engine = federation(data, roles, mode=mode)
    clean = train(fed, cfg)
    host_file = FileCheckpoints(tmp_path / "insurer.db")
    batches_per_epoch = -(-round(0.8 * clean.intersection_size) // cfg.batch_size)
    fed2, engine2 = _restart_federation(
        data,
        roles,
        mode=mode,
        stores={"insurer": host_file},
        node="insurer",
        task="vertical.host.scores",
        at=2 * batches_per_epoch + 3,
    )
    resumed = train(fed2, cfg)
    assert resumed.retries == 1 and resumed.resumed_from == [-1, 1]
    np.testing.assert_array_equal(_weights(engine2), _weights(engine))
    assert resumed.history == clean.history and resumed.test == clean.test
    assert host_file.epochs(next(iter({r for r, _ in _runs(host_file)}))) == [0, 1, 2]


def _runs(store: FileCheckpoints) -> list[tuple[str, int]]:
    return store._conn.execute("SELECT run, epoch FROM vertical_epochs").fetchall()


def test_a_party_without_saved_epochs_restarts_the_run_from_scratch() -> None:
    """Without a state file the restarted host holds no epoch: every party starts over
    (from zeros), and the model is still exactly the uninterrupted one."""
    guest, host = split_breast_cancer()
    data = {"bank": guest, "insurer": host}
    cfg = _cfg(mode="two_party", epochs=2)
    fed, engine = federation(data, ROLES_TWO, mode="two_party")
    clean = train(fed, cfg)
    memory = MemoryCheckpoints()
    fed2, engine2 = _restart_federation(
        data, ROLES_TWO, mode="two_party", stores={"insurer": memory}, node="insurer",
        task="vertical.host.gradient", at=5, lose=memory,
    )  # fmt: skip
    resumed = train(fed2, cfg)
    assert resumed.retries == 1 and resumed.resumed_from == [-1, -1]
    np.testing.assert_array_equal(_weights(engine2), _weights(engine))
    assert resumed.history == clean.history


def test_resume_refuses_what_is_not_this_party_s_checkpoint(tmp_path) -> None:
    store = FileCheckpoints(tmp_path / "p.db")
    store.save("run1", 0, np.arange(3.0))
    assert store.epochs("run1") == [0] and store.epochs("run2") == []
    np.testing.assert_array_equal(FileCheckpoints(tmp_path / "p.db").load("run1", 0), [0, 1, 2])
    with pytest.raises(ProtocolError, match="no coefficients"):
        store.load("run1", 1)
    with pytest.raises(ProtocolError, match="run id"):
        store.save("../x", 0, np.zeros(1))
    with pytest.raises(ConfigError, match="max_retries"):
        HeteroConfig(max_retries=-1)


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


def test_prediction_scores_travel_packed_and_decrypt_exactly() -> None:
    """A host's scores reach the guest packed (one ciphertext per slots rows, not per row),
    and the guest's metrics are those of the federated weights on the joined rows."""
    guest, host = split_breast_cancer()
    predicted: list[dict] = []

    class Recorded(NodeApps):
        def handle(self, ctx, name, payload, **kw):
            if name == "vertical.guest.evaluate":  # what the host routed to the guest
                got = decode(payload)
                fields = {k: received(got, f"enc_u.{k}")["insurer"] for k in ("ct", "count")}
                predicted.append(fields)
            return super().handle(ctx, name, payload, **kw)

    apps = {}
    for node, role in ROLES_ARB.items():
        apps[node] = NodeApp(max_kept=8)
        apps[node].install(vertical_tasks(role, mode="arbiter"))
    engine = LocalEngine(Recorded(apps), nodes=list(ROLES_ARB), data=[guest, host, None])
    fed = Federation(engine, roles={r: [n] for n, r in ROLES_ARB.items()})
    cfg = _cfg(epochs=1, mode="arbiter")
    result = train(fed, cfg)
    held = held_out_rows(512, seed=cfg.seed, test_fraction=cfg.test_fraction)
    slots = (cfg.key_bits - 1) // 96
    assert sorted(r["count"] for r in predicted) == sorted([held.sum(), (~held).sum()])
    for r in predicted:  # one ciphertext per `slots` rows
        assert r["ct"].shape[0] == -(-r["count"] // slots) and slots > 1
    g_rows = engine.node_state("bank")["shoal.vertical"]["rows"]
    h_rows = engine.node_state("insurer")["shoal.vertical"]["rows"]
    _, gx_test = prepare(guest.x[g_rows], held, intercept=True)
    _, hx_test = prepare(host.x[h_rows], held, intercept=False)
    scores = np.hstack([gx_test, hx_test]) @ _weights(engine)
    want = evaluate(MODELS[cfg.model], scores, guest.y[g_rows][held])
    for k in ("auc", "accuracy", "loss"):
        assert abs(result.test[k] - want[k]) <= 1e-9
