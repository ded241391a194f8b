"""SecureBoost between federation nodes addressed by role: rows aligned by PSI, messages
routed sealed through a coordinator that holds no key; the trees are the centralized ones."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from shoal.core import Federation
from shoal.errors import ConfigError, DataError, NotEnoughNodes
from shoal.runtime import (
    FETCH_TASK,
    FORWARD_TASK,
    DispatchResult,
    Failure,
    FailureKind,
    Faults,
    LocalEngine,
    NodeApp,
    Task,
)
from shoal.runtime.roles import NodeApps
from shoal.trees import Bins, GBDTParams, train
from shoal.vertical.model import held_out_rows
from shoal.vertical.party import PartyData

pytest.importorskip("shoal.crypto.paillier")

from shoal.trees.secureboost import (
    SecureBoostConfig,
    digest,
    secureboost_tasks,
    train_routed,
)

STATE = "shoal.trees.secureboost"


def _tables(hosts: int = 1, seed: int = 0, missing: float = 0.0) -> dict[str, PartyData]:
    """breast_cancer by columns: the guest 10 + label, hosts the rest; each party misses a
    different few ids and keeps its own row order (and ``missing`` of its values)."""
    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(x.shape) < missing, np.nan, x)
    n = len(y)
    ids = np.array([f"p{i:04d}" for i in range(n)])
    blocks = np.array_split(np.arange(10, 30), hosts)
    out = {}
    for k, name in enumerate(["bank", *[f"ins{h}" for h in range(hosts)]]):
        rows = rng.permutation(np.setdiff1d(np.arange(n), rng.choice(n, 20, replace=False)))
        cols = np.arange(10) if k == 0 else blocks[k - 1]
        out[name] = PartyData.from_columns(
            ids[rows], x[np.ix_(rows, cols)], y=y[rows] if k == 0 else None, missing_ok=True
        )
    return out


def _federation(tables: dict[str, PartyData], **engine_kw: Any) -> tuple[Federation, LocalEngine]:
    roles = {name: "guest" if name == "bank" else "host" for name in tables}
    apps = {}
    for node, role in roles.items():
        app = NodeApp(max_kept=8)
        app.install(secureboost_tasks(role))
        apps[node] = app
    nodes = list(roles)
    engine = LocalEngine(NodeApps(apps), nodes=nodes, data=[tables[n] for n in nodes], **engine_kw)
    by_role: dict[str, list[str]] = {}
    for node, role in roles.items():
        by_role.setdefault(role, []).append(node)
    return Federation(engine, roles=by_role), engine


def _cfg(**params: Any) -> SecureBoostConfig:
    base = {"n_trees": 2, "max_depth": 3, "max_bins": 16}
    return SecureBoostConfig(
        params=GBDTParams(**{**base, **params}), key_bits=512, insecure_test_keys=True, seed=1
    )


def _centralized(engine: LocalEngine, tables: dict[str, PartyData], cfg: SecureBoostConfig):
    """The same trees trained in one place on the joined aligned training rows."""
    rows = {n: engine.node_state(n)["shoal.vertical"]["rows"] for n in tables}
    aligned = [[tables[n].ids[i] for i in rows[n]] for n in tables]
    assert all(a == aligned[0] for a in aligned)  # PSI gave every party one order
    held = held_out_rows(len(aligned[0]), seed=cfg.seed, test_fraction=cfg.test_fraction)
    x = np.hstack([tables[n].x[rows[n]] for n in tables])
    y = tables["bank"].y[rows["bank"]]
    guest = engine.node_state("bank")[STATE]["guest"]
    hosts = [engine.node_state(n)[STATE]["host"] for n in tables if n != "bank"]
    bins = Bins(cuts=guest.bins.cuts + sum((h.bins.cuts for h in hosts), ()))
    params = guest.params  # with the federated fixed point
    return train(x[~held], y[~held], params, bins=bins), x[held], y[held], hosts


def test_routed_secureboost_grows_the_centralized_trees_tree_by_tree() -> None:
    tables = _tables(hosts=2, missing=0.05)  # missing values: learned default directions
    fed, engine = _federation(tables)
    cfg = _cfg(colsample=0.9)
    result = train_routed(fed, cfg)
    assert result.intersection_size == len(set.intersection(*(set(t.ids) for t in tables.values())))
    central, x_test, y_test, hosts = _centralized(engine, tables, cfg)
    model = engine.node_state("bank")[STATE]["boosting"].model()
    offsets = np.cumsum([0, 10, *[h.codes.shape[1] for h in hosts]])
    owners, defaults = set(), set()
    for vround, cround in zip(model.trees, central.trees, strict=True):
        for vt, ct in zip(vround, cround, strict=True):
            np.testing.assert_array_equal(vt.left, ct.left)
            np.testing.assert_array_equal(vt.right, ct.right)
            np.testing.assert_array_equal(vt.value, ct.value)
            for v in np.flatnonzero(vt.left >= 0):
                owner = int(vt.owner[v])
                owners.add(owner)
                if owner == 0:
                    got = (int(vt.split[v]), int(vt.left_bins[v]), bool(vt.default_left[v]))
                else:  # the test reads the host's private table; the guest cannot
                    f, t, d = hosts[owner - 1].records[vt.split[v]]
                    got = (int(offsets[owner] + f), t, d)
                assert got == (int(ct.feature[v]), int(ct.left_bins[v]), bool(ct.default_left[v]))
                defaults.add(got[2])
    assert owners >= {1, 2}  # both hosts won splits
    assert True in defaults  # some split sends the missing values left (a backward scan)
    assert result.test["digest"] == bytes(digest(central.predict(x_test))).hex()
    assert result.test["n"] == len(y_test) and result.test["auc"] > 0.9
    routes = [e for e in fed.audit_log if e.action == "route"]
    assert {e.detail["role"] for e in routes} == {"guest", "host"}


def test_the_coordinator_sees_only_sealed_bytes_and_clear_metrics() -> None:
    tables = _tables()
    fed, _ = _federation(tables)
    seen: list[tuple[str, dict]] = []
    original = fed.request

    def spy(node_ids, task, **kw):  # type: ignore[no-untyped-def]
        replies, failures = original(node_ids, task, **kw)
        seen.extend((task, r) for r in replies.values())
        return replies, failures

    fed.request = spy  # type: ignore[method-assign]
    train_routed(fed, _cfg(n_trees=1))
    for task, reply in seen:
        for name, value in reply.items():
            if isinstance(value, np.ndarray):
                # PSI points, public keys and AES-GCM boxes: bytes, never a float or an index
                assert value.dtype == np.uint8, (task, name)
    boxes = [v for t, r in seen for k, v in r.items() if k.startswith(("box", "routed/"))]
    assert boxes


def test_nobody_but_the_guest_reads_its_gradients_or_labels() -> None:
    """A curious coordinator asks the guest's node for the encrypted gradients in the clear,
    routes them to the wrong role, and asks for fields that were never released: the node
    refuses each, and the refusals are in the audit trail. A host gets only its own box."""
    tables = _tables(hosts=2)
    fed, engine = _federation(tables)
    train_routed(fed, _cfg(n_trees=1))
    guest, hosts = fed.role("guest"), fed.role("host")
    out = guest.map("secureboost.guest.tree")  # a tree's start: encrypted (g, h) for each host
    with pytest.raises(NotEnoughNodes, match="refuses to send"):
        out.select("box/ins0").mean()  # shoal.fetch of a sealed field: refused
    replies, failures = fed.request(
        ["bank"], FETCH_TASK, common={"handle": out.handle, "fields": ["box/ins0"]}
    )
    assert not replies and failures["bank"].kind.value == "rejected"
    for field in ("y", "grad", "labels"):  # nothing releases labels or plain gradients
        replies, failures = fed.request(
            ["bank"], FORWARD_TASK, common={"handle": out.handle, "fields": [field],
                                            "role": "host"},
        )  # fmt: skip
        assert not replies
    with pytest.raises(NotEnoughNodes, match="refuses"):
        out.select("box/ins0").to(guest, task="secureboost.guest.choose")
    assert [e for e in fed.audit_log if e.action == "route.refused"]
    # routed to the hosts (as the protocol does), each host opens only its own box
    sums = out.to(hosts, task="secureboost.host.tree")
    with pytest.raises(NotEnoughNodes, match="refuses to send"):
        sums.select("box").mean()  # the hosts' histograms are sealed to the guest
    host_state = engine.node_state("ins1")[STATE]
    from shoal.trees.secureboost import _open

    raw = engine.node_state("bank")[STATE]
    assert host_state["channel"] == raw["channels"]["ins1"]
    assert host_state["channel"] != raw["channels"]["ins0"]
    with pytest.raises(Exception, match="authentication"):
        ins0_box = fed.request(
            ["bank"], FORWARD_TASK, common={"handle": out.handle, "fields": ["box/ins0"],
                                            "role": "host"},
        )[0]["bank"]["box/ins0"]  # fmt: skip
        _open(host_state["channel"], ins0_box, step="tree>ins0")


def test_a_host_failing_mid_tree_is_rolled_back_and_the_trees_are_the_same() -> None:
    tables = _tables()
    cfg = _cfg(n_trees=2, subsample=0.8, colsample=0.8)
    cfg = SecureBoostConfig(**{**cfg.__dict__, "max_retries": 50})
    faults = Faults(error=0.25, tasks=frozenset({"secureboost.host.commit"}),
                    nodes=frozenset({"ins0"}), seed=3)  # fmt: skip
    fed, engine = _federation(tables, faults=faults)
    result = train_routed(fed, cfg)
    assert result.retries >= 1
    clean, clean_engine = _federation(tables)
    train_routed(clean, cfg)
    a = engine.node_state("bank")[STATE]["boosting"].model()
    b = clean_engine.node_state("bank")[STATE]["boosting"].model()
    for (ta,), (tb,) in zip(a.trees, b.trees, strict=True):
        np.testing.assert_array_equal(ta.left, tb.left)
        np.testing.assert_array_equal(ta.owner, tb.owner)
        np.testing.assert_array_equal(ta.value, tb.value)


class LoseOneReply:
    """An engine that runs the ``nth`` dispatch of ``task`` but loses the replies: the
    party did the work, the coordinator never heard (a reply lost in transit)."""

    def __init__(self, inner: LocalEngine, task: str, nth: int) -> None:
        self.inner, self.task, self.nth, self.seen = inner, task, nth, 0

    def node_ids(self) -> Any:
        return self.inner.node_ids()

    def dispatch(self, tasks: list[Task], *, deadline_s: float) -> DispatchResult:
        result = self.inner.dispatch(tasks, deadline_s=deadline_s)
        if not any(t.name == self.task for t in tasks):
            return result
        self.seen += 1
        if self.seen != self.nth:
            return result
        lost = {
            n: Failure(node_id=n, task_id=r.task_id, kind=FailureKind.DROPPED, detail="lost")
            for n, r in result.replies.items()
        }
        return DispatchResult(replies={}, failures={**result.failures, **lost})


def test_a_lost_reply_ending_a_tree_is_undone_and_the_trees_are_the_same() -> None:
    """The guest ends tree 2 but the coordinator never hears: it rolls back to its own count
    of complete trees (the guest undoes the tree it ended) and grows it again."""
    tables = _tables()
    cfg = _cfg(n_trees=3, max_depth=2, subsample=0.8, colsample=0.8)
    _, engine = _federation(tables)
    # depth 2: two applies per tree; the 4th is the last level of tree 2
    lossy = LoseOneReply(engine, "secureboost.guest.apply", nth=4)
    routed = Federation(lossy, roles={"guest": ["bank"], "host": ["ins0"]})
    result = train_routed(routed, cfg)
    assert result.retries == 1 and lossy.seen == 3 * 2 + 2  # tree 2 grown again
    failed = [e.detail["tree"] for e in routed.audit_log if e.action == "secureboost.tree_failed"]
    assert failed == [1]
    clean, clean_engine = _federation(tables)
    train_routed(clean, cfg)
    a = engine.node_state("bank")[STATE]["boosting"].model()
    b = clean_engine.node_state("bank")[STATE]["boosting"].model()
    assert len(a.trees) == len(b.trees) == 3
    for (ta,), (tb,) in zip(a.trees, b.trees, strict=True):
        np.testing.assert_array_equal(ta.left, tb.left)
        np.testing.assert_array_equal(ta.owner, tb.owner)
        np.testing.assert_array_equal(ta.value, tb.value)
    assert result.test["digest"] == train_routed(_federation(tables)[0], cfg).test["digest"]


def test_a_party_that_never_comes_back_stops_the_job_with_its_name() -> None:
    tables = _tables()
    cfg = SecureBoostConfig(**{**_cfg(n_trees=2).__dict__, "max_retries": 2, "retry_wait_s": 0})
    faults = Faults(drop=1.0, tasks=frozenset({"secureboost.host.commit",
                                               "secureboost.rollback"}),
                    nodes=frozenset({"ins0"}))  # fmt: skip
    fed, _ = _federation(tables, faults=faults)
    with pytest.raises(NotEnoughNodes, match=r"ins0.*retries are used up.*0 complete round"):
        train_routed(fed, cfg)


def test_bad_parties_are_refused_before_training() -> None:
    tables = _tables()
    # a host whose ids share nothing with the guest's: no rows after the intersection
    lonely = PartyData.from_columns([f"z{i}" for i in range(50)], np.random.rand(50, 3))
    fed, _ = _federation({"bank": tables["bank"], "ins0": lonely})
    with pytest.raises(DataError, match="share only 0 ids"):
        train_routed(fed, _cfg())
    # a host holding labels
    labelled = PartyData.from_columns(
        tables["ins0"].ids, tables["ins0"].x, y=np.zeros(len(tables["ins0"].ids))
    )
    fed, _ = _federation({"bank": tables["bank"], "ins0": labelled})
    with pytest.raises(Exception, match="only the guest may hold labels"):
        train_routed(fed, _cfg())
    # NaN labels at the guest
    g = tables["bank"]
    y = g.y.copy()
    y[5] = np.nan
    fed, _ = _federation({"bank": PartyData.from_columns(g.ids, g.x, y=y), "ins0": tables["ins0"]})
    with pytest.raises(Exception, match="NaN"):
        train_routed(fed, _cfg())
    # a column constant over the aligned rows
    h = tables["ins0"]
    flat = h.x.copy()
    flat[:, 2] = 1.0
    fed, _ = _federation({"bank": g, "ins0": PartyData.from_columns(h.ids, flat)})
    with pytest.raises(Exception, match="constant everywhere"):
        train_routed(fed, _cfg())
    with pytest.raises(ConfigError, match="too short"):
        SecureBoostConfig(params=GBDTParams(), key_bits=512)


def test_a_party_csv_may_leave_features_empty_for_trees_only(tmp_path: Any) -> None:
    path = tmp_path / "party.csv"
    path.write_text("id,a,b\nx1,1.5,\nx2,,2\nx3,3,4\n")
    table = PartyData.from_csv(path, id_column="id", missing_ok=True)
    assert np.isnan(table.x[0, 1]) and np.isnan(table.x[1, 0]) and table.x[2, 1] == 4
    with pytest.raises(DataError, match="not numeric"):  # linear models: impute first
        PartyData.from_csv(path, id_column="id")
    path.write_text("id,a\nx1,inf\n")
    with pytest.raises(DataError):
        PartyData.from_csv(path, id_column="id", missing_ok=True)


def test_a_coordinator_replaying_or_reordering_boxes_is_refused() -> None:
    """The coordinator cannot open a box, but it holds every one it relayed. Delivered twice,
    or after a later one, a box is refused by the party it is for, and a host's old reply
    is refused by the guest: each box carries its number on the channel, authenticated."""
    tables = _tables()
    fed, engine = _federation(tables)
    train_routed(fed, _cfg(n_trees=1))
    guest, hosts = fed.role("guest"), fed.role("host")
    host = engine.node_state("ins0")[STATE]["host"]
    out = guest.map("secureboost.guest.tree")
    sums = out.to(hosts, task="secureboost.host.tree", min_nodes=1)
    with pytest.raises(NotEnoughNodes, match="replayed or reordered"):
        out.to(hosts, task="secureboost.host.tree", min_nodes=1)  # the same box again
    chosen = sums.to(guest, task="secureboost.guest.choose")
    with pytest.raises(NotEnoughNodes, match="replayed or reordered"):
        sums.to(guest, task="secureboost.guest.choose")  # a host's reply, delivered again
    committed = chosen.to(hosts, task="secureboost.host.commit", min_nodes=1)
    records = len(host.records)
    with pytest.raises(NotEnoughNodes, match="replayed or reordered"):
        chosen.to(hosts, task="secureboost.host.commit", min_nodes=1)
    assert len(host.records) == records  # the replayed commit recorded no split
    with pytest.raises(NotEnoughNodes, match="replayed or reordered"):
        out.to(hosts, task="secureboost.host.tree", min_nodes=1)  # an older box, after a newer
    following = committed.to(guest, task="secureboost.guest.apply", last=False)
    assert following.to(hosts, task="secureboost.host.histograms", min_nodes=1).node_ids


def test_a_coordinator_handing_one_hosts_box_to_another_host_is_refused() -> None:
    """The coordinator relays the guest's box for ins0 to ins1 as if it were ins1's (it
    holds the bytes): ins1 cannot open it (another channel key, another host in the
    authenticated step) and records nothing."""
    from shoal.core.routing import ROUTED_FROM, ROUTED_PREFIX

    tables = _tables(hosts=2)
    fed, engine = _federation(tables)
    train_routed(fed, _cfg(n_trees=1))
    out = fed.role("guest").map("secureboost.guest.tree")
    replies, _ = fed.request(
        ["bank"], FORWARD_TASK, common={"handle": out.handle, "fields": ["box/ins0"],
                                        "role": "host"},
    )  # fmt: skip
    stolen = replies["bank"]["box/ins0"]
    seen = engine.node_state("ins1")[STATE]["seen"]
    crafted = {ROUTED_FROM: ["bank"], f"{ROUTED_PREFIX}bank/box/ins1": stolen}
    replies, failures = fed.request(["ins1"], "secureboost.host.tree", common=crafted)
    assert not replies and "failed authentication" in failures["ins1"].detail
    assert engine.node_state("ins1")[STATE]["seen"] == seen  # nothing taken


def test_each_party_writes_its_part_of_the_model_where_its_node_says(tmp_path: Any) -> None:
    """At the end of a run every party writes its own part to its node's ``model_out``
    (the coordinator names no path; a party without one writes nothing). The guest's file
    and the hosts' files together predict what the run's guest scored on its held-out rows."""
    from wire_link import Wire

    from shoal.trees.vertical import HostParty, load_guest, predict_vertical

    tables = _tables(hosts=2, missing=0.05)
    roles = {"bank": "guest", "ins0": "host", "ins1": "host"}
    out = {"bank": tmp_path / "bank.json", "ins0": tmp_path / "ins0.json"}  # ins1: none
    apps = {}
    for node, role in roles.items():
        app = NodeApp(max_kept=8)
        app.install(secureboost_tasks(role, model_out=out.get(node)))
        apps[node] = app
    engine = LocalEngine(NodeApps(apps), nodes=list(roles), data=[tables[n] for n in roles])
    fed = Federation(engine, roles={"guest": ["bank"], "host": ["ins0", "ins1"]})
    result = train_routed(fed, _cfg(n_trees=2))
    assert result.saved == ["bank", "ins0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.json", "ins0.json"]
    # ins1's part from its node's memory, as a third file would hold it
    engine.node_state("ins1")[STATE]["host"].save(tmp_path / "ins1.json")
    guest = load_guest(out["bank"])
    hosts = [Wire(HostParty.load(tmp_path / f"{h}.json")) for h in ("ins0", "ins1")]
    x_tests = [engine.node_state(n)[STATE]["x_test"] for n in roles]
    scores = predict_vertical(guest, x_tests[0], hosts, x_hosts=x_tests[1:])
    assert bytes(digest(scores)).hex() == result.test["digest"]
    assert len(guest.trees) == 2 and any(
        (t.owner[t.left >= 0] > 0).any() for r in guest.trees for t in r
    )  # host splits: the host files are needed
