"""Categorical columns in vertical SecureBoost: a host splits one category against the rest
on encrypted histograms, losslessly, and the guest cannot tell such a split from a threshold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import DataError
from shoal.trees import Bins, GBDTParams, train

pytest.importorskip("shoal.crypto.paillier")

from wire_link import Wire

from shoal.trees.vertical import (
    GuestParty,
    HostParty,
    VerticalModel,
    load_guest,
    predict_vertical,
    save_guest,
    train_secureboost,
)

KEY_BITS = 512  # test keys: the protocol is the same at 2048


def task(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Guest: 2 numeric + 1 categorical (4 categories); host: 1 numeric + 2 categorical
    (7 categories with missing values, 5 categories). The signal is in categories that no
    threshold on the codes separates."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(size=(n, 2)),
            rng.integers(0, 4, size=n),
            rng.normal(size=n),
            rng.integers(0, 7, size=n),
            rng.integers(0, 5, size=n),
        ]
    ).astype(np.float64)
    x[rng.random(n) < 0.1, 4] = np.nan
    x[rng.random(n) < 0.03, 0] = np.nan
    effect = np.array([1.5, -1.0, 0.3, 2.0, -2.0, 0.0, 0.7])
    z = 0.5 * x[:, 3] + np.where(np.isnan(x[:, 4]), 2.0, effect[np.nan_to_num(x[:, 4]).astype(int)])
    z += 0.8 * (x[:, 5] == 3) - 0.6 * (x[:, 2] == 1) + 0.3 * np.nan_to_num(x[:, 0])
    y = (z + rng.normal(size=n) > 0.5).astype(np.float64)
    return x, y


GUEST_COLS, GUEST_CAT, HOST_CAT = 3, [2], [1, 2]


def parties(
    x: np.ndarray, y: np.ndarray, params: GBDTParams, *, host_cat: list[int] = HOST_CAT
) -> tuple[GuestParty, HostParty, Wire]:
    guest = GuestParty(x=x[:, :GUEST_COLS], y=y, params=params, key_bits=KEY_BITS,
                       insecure_keys=True, categorical=GUEST_CAT)  # fmt: skip
    host = HostParty(x=x[:, GUEST_COLS:], max_bins=params.max_bins, insecure_keys=True,
                     categorical=host_cat)  # fmt: skip
    return guest, host, Wire(host)


def joined(guest: GuestParty, host: HostParty) -> Bins:
    return Bins(
        cuts=guest.bins.cuts + host.bins.cuts,
        categorical=tuple(guest.bins.is_categorical) + tuple(host.bins.is_categorical),
    )


def assert_lossless(
    model: VerticalModel, guest: GuestParty, host: HostParty, x: np.ndarray, y: np.ndarray
) -> tuple[set[tuple[int, bool]], Any]:
    """Tree by tree, node by node, against centralized shoal on the joined columns with the
    parties' cuts; returns the (owner, categorical) kinds of split seen."""
    central = train(x, y, model.params, bins=joined(guest, host))
    kinds = set()
    for vround, cround in zip(model.trees, central.trees, strict=True):
        for vt, ct in zip(vround, cround, strict=True):
            np.testing.assert_array_equal(vt.left, ct.left)
            np.testing.assert_array_equal(vt.right, ct.right)
            np.testing.assert_array_equal(vt.value, ct.value)
            for v in np.flatnonzero(vt.left >= 0):
                if vt.owner[v] == 0:
                    got = (int(vt.split[v]), int(vt.left_bins[v]), bool(vt.default_left[v]),
                           bool(vt.categorical[v]))  # fmt: skip
                else:  # the test reads the host's private table; the guest cannot
                    assert not vt.categorical[v]  # the guest does not know the kind
                    f, t, d = host.records[vt.split[v]]
                    got = (GUEST_COLS + f, t, d, bool(host.bins.is_categorical[f]))
                want = (int(ct.feature[v]), int(ct.left_bins[v]), bool(ct.default_left[v]),
                        bool(ct.categorical[v]))  # fmt: skip
                assert got == want, (v, got, want)
                kinds.add((int(vt.owner[v]), got[3]))
    return kinds, central


def test_categorical_columns_at_both_parties_grow_the_centralized_trees() -> None:
    x, y = task()
    params = GBDTParams(n_trees=4, max_depth=4, max_bins=32, min_child_weight=2.0,
                        colsample=0.9, subsample=0.9)  # fmt: skip
    guest, host, link = parties(x, y, params)
    model = train_secureboost(guest, [link])
    kinds, central = assert_lossless(model, guest, host, x, y)
    # host categorical, host numeric and guest categorical splits all occur
    assert {(1, True), (1, False), (0, True)} <= kinds
    cat_defaults = {
        host.records[t.split[v]][2]
        for r in model.trees for t in r for v in np.flatnonzero((t.owner == 1) & (t.left >= 0))
        if host.bins.is_categorical[host.records[t.split[v]][0]]
    }  # fmt: skip
    assert cat_defaults == {True, False}  # missing values learned to go either way
    # federated prediction on new rows equals the centralized model's
    new, _ = task(n=300, seed=5)
    got = predict_vertical(model, new[:, :GUEST_COLS], [link], x_hosts=[new[:, GUEST_COLS:]])
    np.testing.assert_allclose(got, central.predict(new), rtol=0, atol=1e-7)


def test_the_centralized_reference_equals_xgboost_on_the_same_cuts(xgbc: Any) -> None:
    """What the vertical trees equal is XGBoost's model (enable_categorical, one-hot)."""
    x, y = task()
    params = GBDTParams(n_trees=3, max_depth=4, max_bins=32, min_child_weight=2.0)
    guest, host, link = parties(x, y, params)
    model = train_secureboost(guest, [link])
    _, central = assert_lossless(model, guest, host, x, y)
    xgbc.assert_same_model(central, xgbc.xgboost_on_codes(x, y, central.params, central.bins))


def test_softmax_with_host_categories_is_lossless() -> None:
    x, y = task(n=900, seed=2)
    y = np.where(np.nan_to_num(x[:, 4]) > 3, 2.0, y)
    params = GBDTParams(objective="multi:softprob", num_class=3, n_trees=2, max_depth=3,
                        max_bins=16)  # fmt: skip
    guest, host, link = parties(x, y, params)
    model = train_secureboost(guest, [link])
    kinds, _ = assert_lossless(model, guest, host, x, y)
    assert (1, True) in kinds


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(2, 6),
    missing=st.floats(0.0, 0.4),
    absent=st.booleans(),
    mcw=st.sampled_from([0.0, 1.0, 5.0]),
    seed=st.integers(0, 10_000),
)
def test_one_category_host_splits_equal_centralized_on_random_data(
    k: int, missing: float, absent: bool, mcw: float, seed: int
) -> None:
    """Property: one host categorical column (some categories possibly absent from some
    nodes, missing values or none, any min_child_weight) splits as centralized training."""
    rng = np.random.default_rng(seed)
    n = 120
    codes = rng.integers(0, k, size=n).astype(np.float64)
    if absent:
        codes[codes == k - 2] = k - 1  # a category no training row holds
    codes[rng.random(n) < missing] = np.nan
    if len(np.unique(codes[~np.isnan(codes)])) < 2:
        codes[:2] = [0, k - 1]
    guest_x = rng.normal(size=(n, 1))
    y = (rng.random(n) < 0.3 + 0.1 * np.nan_to_num(codes, nan=2.5)).astype(np.float64)
    x = np.column_stack([guest_x, np.zeros(n), codes])
    x[:, 1] = rng.integers(0, 3, size=n)  # the guest's categorical column (GUEST_CAT)
    x[:2, 1] = [0, 2]
    x = np.column_stack([x, rng.normal(size=n)])
    params = GBDTParams(n_trees=2, max_depth=3, max_bins=16, min_child_weight=mcw)
    guest = GuestParty(x=x[:, :2], y=y, params=params, key_bits=KEY_BITS, insecure_keys=True,
                       categorical=[1])  # fmt: skip
    host = HostParty(x=x[:, 2:], max_bins=16, insecure_keys=True, categorical=[0])
    model = train_secureboost(guest, [Wire(host)])
    central = train(
        x, y, model.params,
        bins=Bins(cuts=guest.bins.cuts + host.bins.cuts,
                  categorical=(False, True, True, False)),
    )  # fmt: skip
    for vround, cround in zip(model.trees, central.trees, strict=True):
        for vt, ct in zip(vround, cround, strict=True):
            np.testing.assert_array_equal(vt.left, ct.left)
            np.testing.assert_array_equal(vt.value, ct.value)
            for v in np.flatnonzero(vt.owner == 1):
                if vt.left[v] >= 0:
                    f, t, d = host.records[vt.split[v]]
                    assert (2 + f, t, d) == (ct.feature[v], ct.left_bins[v], ct.default_left[v])


@pytest.mark.parametrize("subsample", [1.0, 0.5])
def test_ties_and_a_category_no_row_holds_break_as_centralized(subsample: float) -> None:
    """Edge cases a random task rarely meets: a two-category column whose two one-hot
    splits mirror each other (equal gains: the lower category wins), missing values that
    carry the signal next to a category no training row holds (centralized training meets
    "that category and the missing values right", i.e. missing against the rest, at the
    lowest such category), and, subsampled, nodes whose missing rows all have zero
    hessian (both directions tie: missing values left wins)."""
    rng = np.random.default_rng(7)
    n = 600
    binary = rng.integers(0, 2, size=n).astype(np.float64)
    gappy = rng.choice([0.0, 2.0, 3.0], size=n)  # no row holds category 1
    gappy[rng.random(n) < 0.25] = np.nan
    y = ((binary == 1) ^ (rng.random(n) < 0.15)).astype(np.float64)
    y = np.where(np.isnan(gappy), (rng.random(n) < 0.95).astype(np.float64), y)
    x = np.column_stack([rng.normal(size=n), binary, gappy])
    params = GBDTParams(n_trees=3, max_depth=3, max_bins=16, subsample=subsample)
    guest = GuestParty(x=x[:, :1], y=y, params=params, key_bits=KEY_BITS, insecure_keys=True)
    host = HostParty(x=x[:, 1:], max_bins=16, insecure_keys=True, categorical=[0, 1])
    model = train_secureboost(guest, [Wire(host)])
    bins = Bins(cuts=guest.bins.cuts + host.bins.cuts, categorical=(False, True, True))
    central = train(x, y, model.params, bins=bins)
    won = []
    for vround, cround in zip(model.trees, central.trees, strict=True):
        for vt, ct in zip(vround, cround, strict=True):
            np.testing.assert_array_equal(vt.left, ct.left)
            np.testing.assert_array_equal(vt.value, ct.value)
            for v in np.flatnonzero((vt.owner == 1) & (vt.left >= 0)):
                f, t, d = host.records[vt.split[v]]
                assert (1 + f, t, d) == (ct.feature[v], ct.left_bins[v], ct.default_left[v])
                won.append((f, t, d))
    assert (1, 1, False) in won  # missing against the rest, at the category nobody holds
    assert (0, 0, True) in won  # the mirrored binary split, at the lower category


def _guest_view(link: Wire) -> list[tuple[str, str, str, int]]:
    """What the host sent: method, field, dtype kind and number of dimensions (the values
    themselves are ciphertexts, record ids, candidate counts and row directions)."""
    return sorted(
        {
            (m, name, np.asarray(v).dtype.kind, np.asarray(v).ndim)
            for m, r in link.sent
            for name, v in r.items()
        }
    )


def test_the_guest_learns_nothing_more_than_for_a_numeric_split(tmp_path: Path) -> None:
    """A curious guest: the host's messages have the same fields, types and shapes with its
    columns categorical or numeric; each candidate it decrypts is a left sum of rows like a
    threshold's; its model holds only (host, record id) for host splits, with no kind; and
    the only per-node number that differs, the candidate count, is a sum over the host's
    columns of counts that depend on bins the guest does not know."""
    x, y = task(n=800)
    params = GBDTParams(n_trees=2, max_depth=3, max_bins=16)
    guest, host, link = parties(x, y, params)
    model = train_secureboost(guest, [link])
    guest_n, _, link_n = parties(x, y, params, host_cat=[])  # same columns, numeric
    train_secureboost(guest_n, [link_n])
    assert _guest_view(link) == _guest_view(link_n)
    for method, reply in link.sent:  # no floats, no category codes in the clear
        for name, value in reply.items():
            assert np.asarray(value).dtype.kind != "f", (method, name)
    # (test_decrypted_candidates_are_left_sums_of_rows checks the decrypted values)
    path = tmp_path / "guest.json"
    save_guest(model, path)
    doc = json.loads(path.read_text())
    flags = [f for r in doc["trees"] for t in r for f, o in zip(t["categorical"], t["owner"])
             if o == 1]  # fmt: skip
    assert flags and not any(flags)  # host splits carry no kind in the guest's file
    assert doc["categorical"] == [False, False, True]  # the guest's own columns only
    host_records = {int(t.split[v]) for r in model.trees for t in r
                    for v in np.flatnonzero((t.owner == 1) & (t.left >= 0))}  # fmt: skip
    assert any(host.bins.is_categorical[host.records[i][0]] for i in host_records)
    # the model file round-trips and predicts the same
    again = load_guest(path)
    np.testing.assert_array_equal(
        predict_vertical(again, x[:, :GUEST_COLS], [link]),
        predict_vertical(model, x[:, :GUEST_COLS], [link]),
    )


def test_decrypted_candidates_are_left_sums_of_rows() -> None:
    """At the root, every candidate the guest decrypts for a categorical column equals the
    fixed-point (g, h) sum of the rows of all categories but one (with or without the
    missing rows): the same kind of number as a threshold's left sum."""
    x, y = task(n=400)
    params = GBDTParams(n_trees=1, max_depth=1, max_bins=16)
    guest = GuestParty(x=x[:, :GUEST_COLS], y=y, params=params, key_bits=KEY_BITS,
                       insecure_keys=True, categorical=GUEST_CAT)  # fmt: skip
    host = HostParty(x=x[:, [4]], max_bins=16, insecure_keys=True, categorical=[0])
    seen: list[list[tuple[int, int]]] = []
    from shoal.trees import vertical

    original = vertical._decrypt

    def spy(*args: Any) -> list[list[tuple[int, int]]]:
        out = original(*args)
        seen.extend(out)
        return out

    vertical._decrypt = spy  # type: ignore[assignment]
    try:
        train_secureboost(guest, [Wire(host)])
    finally:
        vertical._decrypt = original  # type: ignore[assignment]
    from shoal.trees.booster import tree_gradients
    from shoal.trees.objective import base_margin, gradients

    margin = np.full((len(y), 1), base_margin(guest.params), dtype=np.float32)
    g, h = gradients(margin, guest.labels, guest.params)
    g, h = tree_gradients(g[:, 0], h[:, 0], guest.params, np.random.default_rng(0))
    scale = 2**24
    gi, hi = np.round(g * scale).astype(np.int64), np.round(h * scale).astype(np.int64)
    codes = host.codes[:, 0]
    expected = set()
    for c in np.unique(codes[codes < 256]):
        rest = (codes != c) & (codes < 256)
        expected.add((int(gi[rest].sum()), int(hi[rest].sum())))
        expected.add((int(gi[codes != c].sum()), int(hi[codes != c].sum())))
    got = {tuple(map(int, pair)) for pair in seen[0]}
    assert got == expected


def test_bad_categorical_columns_at_a_party_are_clear_errors() -> None:
    x, y = task(n=200)
    bad = x[:, GUEST_COLS:].copy()
    bad[0, 1] = 2.5
    with pytest.raises(DataError, match="not category codes"):
        HostParty(x=bad, max_bins=16, insecure_keys=True, categorical=[1])
    with pytest.raises(DataError, match="out of range"):
        HostParty(x=x[:, GUEST_COLS:], max_bins=16, insecure_keys=True, categorical=[7])
    with pytest.raises(DataError, match="more than max_bins"):
        GuestParty(x=x[:, :GUEST_COLS], y=y, params=GBDTParams(max_bins=3), key_bits=KEY_BITS,
                   insecure_keys=True, categorical=[2])  # fmt: skip
    from shoal.vertical.party import PartyData

    with pytest.raises(DataError, match="distinct column indices"):
        PartyData.from_columns(["a", "b"], x[:2, :2], categorical=[1, 1])


def test_routed_secureboost_with_a_hosts_categorical_columns_equals_centralized() -> None:
    """Guest and host as federation nodes (PSI, sealed boxes through a coordinator): each
    party names its own categorical columns in its table, the coordinator is told nothing
    about them, and the guest's prediction digest equals centralized training's."""
    from shoal.core import Federation
    from shoal.runtime import LocalEngine, NodeApp
    from shoal.runtime.roles import NodeApps
    from shoal.trees.secureboost import SecureBoostConfig, centralized, digest, secureboost_tasks
    from shoal.trees.secureboost import train_routed as routed
    from shoal.vertical.party import PartyData

    x, y = task(n=700, seed=3)
    ids = [f"r{i:05d}" for i in range(len(y))]
    rng = np.random.default_rng(0)
    order = {"bank": rng.permutation(len(y))[20:], "shop": rng.permutation(len(y))[5:]}
    tables = {
        "bank": PartyData.from_columns([ids[i] for i in order["bank"]],
                                       x[order["bank"], :GUEST_COLS], y=y[order["bank"]],
                                       missing_ok=True, categorical=GUEST_CAT),
        "shop": PartyData.from_columns([ids[i] for i in order["shop"]],
                                       x[order["shop"], GUEST_COLS:], missing_ok=True,
                                       categorical=HOST_CAT),
    }  # fmt: skip
    apps = {}
    for name, role in (("bank", "guest"), ("shop", "host")):
        app = NodeApp(max_kept=8)
        app.install(secureboost_tasks(role))
        apps[name] = app
    engine = LocalEngine(NodeApps(apps), nodes=list(tables), data=list(tables.values()))
    fed = Federation(engine, roles={"guest": ["bank"], "host": ["shop"]})
    sent: list[Any] = []
    original = fed.request

    def spy(node_ids, task, **kw):  # type: ignore[no-untyped-def]
        sent.append(kw.get("common"))
        return original(node_ids, task, **kw)

    fed.request = spy  # type: ignore[method-assign]
    cfg = SecureBoostConfig(
        params=GBDTParams(n_trees=3, max_depth=3, max_bins=16), key_bits=KEY_BITS,
        insecure_test_keys=True, seed=1,
    )  # fmt: skip
    result = routed(fed, cfg)
    host = engine.node_state("shop")["shoal.trees.secureboost"]["host"]
    assert host.bins.categorical == (False, True, True)
    assert any(host.bins.is_categorical[f] for f, _, _ in host.records)  # it won such splits
    rows = {n: engine.node_state(n)["shoal.vertical"]["rows"] for n in tables}
    predicted, _ = centralized(cfg, tables, rows, ["bank", "shop"])
    assert result.test["digest"] == bytes(digest(predicted)).hex()
    # the coordinator's messages never name a categorical column
    assert not any("categor" in str(k) for c in sent if c for k in c)


def test_secureboost_refuses_category_set_splits() -> None:
    from shoal.errors import ConfigError
    from shoal.trees.secureboost import SecureBoostConfig

    x, y = task(n=100)
    params = GBDTParams(n_trees=1, max_cat_to_onehot=4)
    with pytest.raises(ConfigError, match="category-set splits"):
        GuestParty(x=x[:, :GUEST_COLS], y=y, params=params, key_bits=KEY_BITS,
                   insecure_keys=True)  # fmt: skip
    with pytest.raises(ConfigError, match="category-set splits"):
        SecureBoostConfig(params=params, key_bits=KEY_BITS, insecure_test_keys=True)


VERTICAL_TOML = """
[job]
name = "categories"
seed = 0

[vertical]
id_column = "id"
parties = [
  { name = "bank", role = "guest", path = "bank.csv", label = "y" },
  { name = "shop", role = "host", path = "shop.csv" },
]

[model]
name = "secureboost"
n_trees = 3
max_depth = 3
max_bins = 16
categorical = ["region", "product"]
categories = { product = ["tea", "coffee", "cocoa", "mate", "juice"] }

[crypto]
key_bits = 512
"""


def _csvs(tmp_path: Path, n: int = 400) -> None:
    rng = np.random.default_rng(11)
    regions = np.array(["north", "south", "east", "west"])
    products = np.array(["tea", "coffee", "cocoa", "mate", "juice"])
    r, p = rng.integers(0, 4, n), rng.integers(0, 5, n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    z = a + np.array([1.0, -1.0, 0.5, -0.5])[r] + np.array([0.0, 2.0, -2.0, 1.0, -1.0])[p]
    y = (z + rng.normal(size=n) > 0).astype(int)
    missing = rng.random(n) < 0.1
    bank = ["id,a,region,y"] + [f"u{i},{a[i]:.4f},{regions[r[i]]},{y[i]}" for i in range(n)]
    shop = ["id,product,b"] + [
        f"u{i},{'' if missing[i] else products[p[i]]},{b[i]:.4f}" for i in range(n - 7)
    ]
    (tmp_path / "bank.csv").write_text("\n".join(bank) + "\n")
    (tmp_path / "shop.csv").write_text("\n".join(shop) + "\n")


def test_a_vertical_toml_names_categorical_columns_and_equals_centralized(tmp_path: Path) -> None:
    """`shoal run vertical.toml` with a categorical column at each party (labels in the
    CSVs; one declared in the job, one by the file's sorted labels; missing products): the
    guest's prediction digest equals centralized training's on the same coded columns."""
    from shoal.cli.main import main
    from shoal.trees.secureboost import load_party
    from shoal.vertical.job import load_vertical_job

    _csvs(tmp_path)
    (tmp_path / "vertical.toml").write_text(VERTICAL_TOML)
    job = load_vertical_job(tmp_path / "vertical.toml", insecure_test_keys=True)
    bank, shop = (load_party(job, p) for p in job.parties)
    assert bank.categorical == (1,) and shop.categorical == (0,)
    assert set(np.unique(bank.x[:, 1])) == {0.0, 1.0, 2.0, 3.0}  # east, north, south, west
    assert np.isnan(shop.x[:, 0]).any() and np.nanmax(shop.x[:, 0]) == 4.0
    code = main(["run", str(tmp_path / "vertical.toml"), "--insecure-test-keys",
                 "--json", str(tmp_path / "s.json"), "--quiet"])  # fmt: skip
    summary = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and summary["identical_predictions"] and summary["auc"] > 0.8
    # a product the job's list does not have is refused when the party loads its file
    text = (tmp_path / "shop.csv").read_text().replace(",tea,", ",rooibos,", 1)
    (tmp_path / "shop.csv").write_text(text)
    with pytest.raises(DataError, match=r"column 'product' holds a category not in the job's"):
        load_party(job, job.parties[1])
