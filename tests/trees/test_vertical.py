"""Vertical SecureBoost: the trees of centralized training on the joined columns, while
the guest learns only (host, record id) for host splits and hosts never see a gradient."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine

from shoal.errors import DataError, ProtocolError
from shoal.trees import Bins, GBDTParams, train

pytest.importorskip("shoal.crypto.paillier")

from wire_link import Wire

from shoal.trees.vertical import (
    GuestParty,
    HostParty,
    Link,
    VerticalModel,
    predict_vertical,
    train_secureboost,
)

KEY_BITS = 512  # test keys; the protocol is the same at 2048


def _cancer() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    x = x.copy()
    x[np.random.default_rng(0).random(x.shape) < 0.05] = np.nan
    return x, y


def _parties(
    x: np.ndarray, y: np.ndarray, params: GBDTParams, cuts: list[int]
) -> tuple[GuestParty, list[HostParty], list[Wire]]:
    blocks = np.split(x, cuts, axis=1)
    guest = GuestParty(x=blocks[0], y=y, params=params, key_bits=KEY_BITS, insecure_keys=True)
    hosts = [HostParty(x=b, max_bins=params.max_bins, insecure_keys=True) for b in blocks[1:]]
    return guest, hosts, [Wire(h) for h in hosts]


def assert_same_as_centralized(
    model: VerticalModel, guest: GuestParty, hosts: list[HostParty], x: np.ndarray, y: np.ndarray
) -> None:
    joined = Bins(cuts=guest.bins.cuts + sum((h.bins.cuts for h in hosts), ()))
    central = train(x, y, model.params, bins=joined)
    offsets = np.cumsum([0, guest.codes.shape[1], *[h.codes.shape[1] for h in hosts]])
    assert len(model.trees) == len(central.trees)
    for vround, cround in zip(model.trees, central.trees):
        for vt, ct in zip(vround, cround, strict=True):
            np.testing.assert_array_equal(vt.left, ct.left)
            np.testing.assert_array_equal(vt.right, ct.right)
            np.testing.assert_array_equal(vt.value, ct.value)
            for v in np.flatnonzero(vt.left >= 0):
                if vt.owner[v] == 0:
                    got = (int(vt.split[v]), int(vt.left_bins[v]), bool(vt.default_left[v]))
                else:  # the test may look up the host's private table; the guest cannot
                    f, t, d = hosts[vt.owner[v] - 1].records[vt.split[v]]
                    got = (int(offsets[vt.owner[v]] + f), t, d)
                assert got == (int(ct.feature[v]), int(ct.left_bins[v]), bool(ct.default_left[v]))


def test_secureboost_grows_the_centralized_trees_on_the_joined_columns() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=2, max_depth=4, max_bins=32, colsample=0.9)
    guest, hosts, links = _parties(x, y, params, [10, 22])
    model = train_secureboost(guest, links)
    assert_same_as_centralized(model, guest, hosts, x, y)
    owners = {int(o) for r in model.trees for t in r for o in t.owner[t.left >= 0]}
    assert owners >= {1, 2}  # both hosts won splits, so the test covers host splits


def test_secureboost_softmax_is_lossless() -> None:
    x, y = load_wine(return_X_y=True)
    params = GBDTParams(objective="multi:softprob", num_class=3, n_trees=1, max_depth=3,
                        max_bins=16)  # fmt: skip
    guest, hosts, links = _parties(x, y, params, [4])
    model = train_secureboost(guest, links)
    assert_same_as_centralized(model, guest, hosts, x, y)


def test_federated_prediction_matches_centralized() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=2, max_depth=3, max_bins=16)
    guest, hosts, links = _parties(x, y, params, [15])
    model = train_secureboost(guest, links)
    joined = Bins(cuts=guest.bins.cuts + hosts[0].bins.cuts)
    central = train(x, y, model.params, bins=joined)
    new = x[::3]
    got = predict_vertical(model, new[:, :15], links, x_hosts=[new[:, 15:]])
    np.testing.assert_allclose(got, central.predict(new), rtol=0, atol=1e-7)


def test_the_guest_never_receives_a_host_threshold_or_a_plain_histogram() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=1, max_depth=3, max_bins=16)
    guest, hosts, links = _parties(x, y, params, [15])
    train_secureboost(guest, links)
    cuts = np.concatenate(hosts[0].bins.cuts)
    # a cut as the 8 bytes of a float64: what a leaked threshold looks like inside a byte
    # buffer (a cut such as 27.0 equals single ciphertext bytes by chance, its 8 bytes do not)
    patterns = [c.tobytes() for c in cuts.astype("<f8")]
    records = 0
    for (method, reply), asked in zip(links[0].sent, links[0].asked, strict=True):
        if method == "commit":
            # a commit's integers are positions, not values: each winner is one of the ids the
            # guest offered for its node (shuffled, so any index, even one equal to a cut such
            # as 27.0) and each record is the host's next row
            offered = np.split(asked["ids"], np.cumsum(asked["counts"])[:-1])
            assert all(c in ids for c, ids in zip(reply["chosen"], offered, strict=True))
            assert reply["records"].tolist() == list(range(records, records + len(offered)))
            records += len(offered)
            reply = {k: v for k, v in reply.items() if k not in ("chosen", "records")}
        for name, value in reply.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                raise AssertionError(f"{method} sent floats in {name!r}")
            if isinstance(value, np.ndarray) and value.dtype == np.uint8:
                raw = value.tobytes()
                leaked = any(pattern in raw for pattern in patterns)
            else:
                leaked = isinstance(value, float) or (
                    isinstance(value, np.ndarray) and np.isin(cuts, value).any()
                )
            if leaked:
                raise AssertionError(f"{method} sent a threshold-like value in {name!r}")
    assert {m for m, _ in links[0].sent} <= {"describe", "start_tree", "histograms", "commit"}


def test_the_host_sees_only_ciphertexts_of_the_gradients() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=1, max_depth=2, max_bins=16)
    guest, hosts, _ = _parties(x, y, params, [15])
    seen: list[dict[str, Any]] = []

    def spy(method: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(dict(payload))
        return hosts[0].handle(method, payload)

    train_secureboost(guest, [spy])
    start = next(p for p in seen if "ct" in p)
    assert start["ct"].dtype == np.uint8 and start["ct"].shape[0] == len(y)
    # ciphertexts of equal plaintexts differ (fresh randomness for each row)
    assert len({bytes(row) for row in start["ct"]}) == len(y)


def test_a_hostile_guest_cannot_read_a_hosts_table() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=1, max_depth=2, max_bins=16)
    guest, hosts, links = _parties(x, y, params, [15])
    train_secureboost(guest, links)
    host = hosts[0]
    with pytest.raises(ProtocolError, match="unknown candidate"):
        host.handle(
            "commit",
            {"nodes": np.array([99]), "ids": np.array([0]), "counts": np.array([1]),
             "pos": np.zeros(len(y), np.int64)},
        )  # fmt: skip
    with pytest.raises(ProtocolError, match="malformed"):
        host.handle("commit", {"node": 0})
    with pytest.raises(ProtocolError, match="unknown record"):
        host.handle("decide", {"records": np.array([10_000])})
    with pytest.raises(ProtocolError, match="no method"):
        host.handle("threshold_table", {})
    with pytest.raises(ProtocolError, match="malformed"):
        bad = {"pos": np.zeros(3, np.int64), "level": np.array([0])}
        host.handle("histograms", {**bad, "parent": np.array([-1]), "sibling": np.array([-1])})


def test_bad_inputs_are_clear_errors() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=1, max_depth=2, max_bins=16)
    with pytest.raises(DataError, match="no rows after the intersection"):
        HostParty(x=np.zeros((0, 3)))
    guest, _, _ = _parties(x, y, params, [15])
    short = HostParty(x=x[:-5, 15:], insecure_keys=True)
    with pytest.raises(DataError, match="align the parties' rows"):
        train_secureboost(guest, [Wire(short)])
    labels = y.astype(float)
    labels[3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        GuestParty(x=x[:, :15], y=labels, params=params, key_bits=KEY_BITS, insecure_keys=True)


def test_a_host_refuses_a_short_key_unless_told_it_is_a_test() -> None:
    x, y = _cancer()
    params = GBDTParams(n_trees=1, max_depth=2, max_bins=16)
    guest = GuestParty(x=x[:, :15], y=y, params=params, key_bits=KEY_BITS, insecure_keys=True)
    strict: Link = Wire(HostParty(x=x[:, 15:]))
    with pytest.raises(Exception, match="too short"):
        train_secureboost(guest, [strict])


def test_a_party_failing_mid_tree_drops_that_tree_and_training_resumes() -> None:
    from shoal.trees.vertical import VerticalTreeFailed

    x, y = _cancer()
    params = GBDTParams(n_trees=3, max_depth=3, max_bins=16, subsample=0.8, colsample=0.8)
    guest, _hosts, links = _parties(x, y, params, [15])
    calls = {"histograms": 0}

    def flaky(method: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        if method == "histograms":
            calls["histograms"] += 1
            if calls["histograms"] == 5:  # inside the second tree
                raise ProtocolError("host h1 dropped out")
        return links[0](method, payload)

    with pytest.raises(VerticalTreeFailed, match="1 complete tree") as failed:
        train_secureboost(guest, [flaky])
    assert len(failed.value.model.trees) == 1
    resumed = train_secureboost(guest, links, start=failed.value.model)
    fresh_guest, _fresh_hosts, fresh_links = _parties(x, y, params, [15])
    uninterrupted = train_secureboost(fresh_guest, fresh_links)
    for (a,), (b,) in zip(resumed.trees, uninterrupted.trees, strict=True):
        np.testing.assert_array_equal(a.left, b.left)
        np.testing.assert_array_equal(a.value, b.value)
        np.testing.assert_array_equal(a.owner, b.owner)


def test_each_party_exports_its_own_part(tmp_path: Any) -> None:
    from shoal.trees.vertical import load_guest, save_guest

    x, y = _cancer()
    params = GBDTParams(n_trees=2, max_depth=3, max_bins=16)
    guest, hosts, links = _parties(x, y, params, [15])
    model = train_secureboost(guest, links)
    save_guest(model, tmp_path / "guest.json")
    hosts[0].save(tmp_path / "host.json")
    guest_text = (tmp_path / "guest.json").read_text()
    host_text = (tmp_path / "host.json").read_text()
    # the guest's trees hold no host threshold; the host's file holds no leaf value
    tree_numbers = np.asarray(
        [v for r in json.loads(guest_text)["trees"] for t in r for a in t.values() for v in a],
        dtype=np.float64,
    )
    assert not np.isin(np.concatenate(hosts[0].bins.cuts), tree_numbers).any()
    leaves = [float(v) for r in model.trees for t in r for v in t.value[t.left < 0]]
    host_numbers = json.loads(host_text)["records"]
    assert all(len(r) == 3 for r in host_numbers)
    assert not any(repr(v) in host_text for v in leaves if v != 0.0)
    reloaded = HostParty.load(tmp_path / "host.json")
    new = x[::4]
    got = predict_vertical(
        load_guest(tmp_path / "guest.json"), new[:, :15], [Wire(reloaded)], x_hosts=[new[:, 15:]]
    )
    expected = predict_vertical(model, new[:, :15], links, x_hosts=[new[:, 15:]])
    np.testing.assert_array_equal(got, expected)
    (tmp_path / "bad.json").write_text(guest_text.replace('"owner": [1', '"owner": [7'))
    if '"owner": [1' in guest_text:
        with pytest.raises(DataError, match="unknown party"):
            load_guest(tmp_path / "bad.json")


class Tamper:
    """A host that runs the protocol but alters one kind of reply before sending it."""

    def __init__(self, link: Link, method: str, change: Any) -> None:
        self.link, self.method, self.change = link, method, change

    def __call__(self, method: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        reply = dict(self.link(method, payload))
        return self.change(reply) if method == self.method else reply


def _flip_left(reply: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "left": 1 - np.asarray(reply["left"])}


def _reuse_record(reply: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "records": np.zeros_like(np.asarray(reply["records"]))}


def _negative_record(reply: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "records": np.asarray(reply["records"]) - 1000}


def _negative_count(reply: dict[str, Any]) -> dict[str, Any]:
    counts = np.asarray(reply["counts"]).copy()
    if len(counts) > 1:  # keep the number of ciphertexts: move candidates between nodes
        counts[0], counts[1] = -counts[1], counts[0] + 2 * counts[1]
    return {**reply, "counts": counts}


def _huge_count(reply: dict[str, Any]) -> dict[str, Any]:
    return {**reply, "counts": np.asarray(reply["counts"]) * 0 + 10**9}


def _zero_ciphertext(reply: dict[str, Any]) -> dict[str, Any]:
    ct = np.asarray(reply["ct"]).copy()
    if len(ct):
        ct[0] = 0
    return {**reply, "ct": ct}


@pytest.mark.parametrize(
    ("method", "change", "words"),
    [
        ("commit", _flip_left, "rows it sends left"),
        ("commit", _reuse_record, "record"),
        ("commit", _negative_record, "record"),
        ("histograms", _negative_count, "wrong number of ciphertexts|packed sums"),
        ("histograms", _huge_count, "wrong number of ciphertexts"),
        ("histograms", _zero_ciphertext, "Z_"),
    ],
)
def test_a_host_sending_malformed_or_inconsistent_replies_fails_the_tree(
    method: str, change: Any, words: str
) -> None:
    """A host whose rows going left do not carry the sums it offered for that split, that
    names a record it used before (or none), or sends impossible candidate counts or
    ciphertexts, fails the tree with a ProtocolError, never a tree built on it."""
    from shoal.trees.vertical import VerticalTreeFailed

    x, y = _cancer()
    params = GBDTParams(n_trees=2, max_depth=3, max_bins=16)
    guest, _hosts, links = _parties(x, y, params, [15])
    hostile = Tamper(links[0], method, change)
    # the reused record needs one earlier record: tamper from the second tree on
    if change is _reuse_record:
        model = train_secureboost(guest, links)
        guest, _hosts, links = _parties(x, y, params, [15])
        first = {"n": 0}

        def later(reply: dict[str, Any]) -> dict[str, Any]:
            first["n"] += 1
            return reply if first["n"] == 1 else _reuse_record(reply)

        hostile = Tamper(links[0], method, later)
        assert any(o == 1 for r in model.trees for t in r for o in t.owner[t.left >= 0])
    with pytest.raises(VerticalTreeFailed, match=words):
        train_secureboost(guest, [hostile])
