"""A federated request across four real datasite processes, each acting as a shoal node.

Each owner approves on their own; the scientist's client is a shoal coordinator (a
Federation over ``SiteEngine``) and gets only the SecAgg+ sum. The sites' nodes refuse to
let a held result out any other way, refuse less noise than they charged, refuse keys not
signed by a federation member, and the sum survives a site dying mid-protocol.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sites import RunningSite, start_site

from shoal.aggregate import Clip
from shoal.core import Federation
from shoal.crypto.secagg import (
    ADVERTISE_TASK,
    MASKED_INPUT_TASK,
    SHARE_TASK,
    AdvertiseReply,
    SecAggNode,
    SecAggParams,
    SecAggServer,
    SecureSum,
)
from shoal.datasite import FederatedRequest, submit_federated
from shoal.datasite.client import DatasiteError
from shoal.datasite.federated import HOLD_TASK, SiteEngine
from shoal.datasite.state import DatasiteState
from shoal.errors import ProtocolError, ReleaseRefused
from shoal.runtime import FETCH_TASK, FailureKind, Task
from shoal.wire import decode, encode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningSite]]:
    base = tmp_path_factory.mktemp("federation")
    with ThreadPoolExecutor(4) as pool:
        running = list(
            pool.map(
                lambda i: start_site(base / f"hospital-{i}", tls=True, rows=60 + 20 * i), range(4)
            )
        )
    try:
        yield running
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda site: site.stop(), running))


def local_truth(site: RunningSite) -> np.ndarray:
    with open(site.data, newline="") as f:
        ages = np.array([float(r["age"]) for r in csv.DictReader(f)])
    return np.array([len(ages), ages.sum()])


def count_and_age(assets):  # type: ignore[no-untyped-def]
    import numpy as np

    ages = assets["patients"]["age"]
    return {"result": np.array([len(ages), float(ages.sum())])}


def decide(sites: list[RunningSite], request: FederatedRequest, deny: tuple[str, ...] = ()) -> None:
    for site in sites:
        owner = site.as_("olivia")
        rid = request.requests[site.directory.name].id
        owner.request(rid).wait(("mock-run",), timeout=60)
        if site.directory.name in deny:
            owner.deny(rid, "not this one")
        else:
            owner.approve(rid, request.code_hash, "counts and a sum, inside a secure sum")


def audit(site: RunningSite) -> list[dict[str, Any]]:
    return list(site.as_("olivia").call("GET", "/api/audit?limit=10000"))


def test_the_scientist_gets_only_the_secure_sum(sites: list[RunningSite]) -> None:
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(scientists, count_and_age, assets=["patients"], shape=[2], clip=1e5)
    assert set(request.requests) == {s.directory.name for s in sites}
    decide(sites, request)
    combined = request.result(timeout=120)
    truth = sum(local_truth(s) for s in sites)
    np.testing.assert_allclose(combined, truth, atol=1e-2)
    assert request.included == tuple(sorted(request.requests)) and not request.excluded
    # no site's own array ever reaches the scientist
    for site, scientist in zip(sites, scientists):
        rid = request.requests[site.directory.name].id
        with pytest.raises(ReleaseRefused, match="never released alone"):
            scientist.call("GET", f"/api/requests/{rid}/result", raw=True)
        assert scientist.request(rid).info["state"] == "released"
        assert any(e["action"] == "result.secure-sum" for e in audit(site))
    # and a second hold (to difference two sums) is refused by every node, and audited
    engine = request.engine()
    again = Federation(engine, min_nodes=1).all().map(HOLD_TASK, min_nodes=0)
    assert len(again) == 0
    assert {f.kind for f in again.failures.values()} == {FailureKind.REJECTED}
    assert all("joined a secure sum already" in f.detail for f in again.failures.values())
    assert any(e["action"] == "node.refused" for e in audit(sites[0]))


def test_a_hostile_scientist_gets_no_held_value_and_no_thinner_noise(
    sites: list[RunningSite],
) -> None:
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(
        scientists,
        count_and_age,
        assets=["patients"],
        shape=[2],
        clip=1e4,
        noise_multiplier=4.0,
        min_sites=3,
        name="hostile",
    )
    approved = sites[:3]
    decide(approved, request)
    names = [s.directory.name for s in approved]
    for name in names:
        request.requests[name].wait(("succeeded",), timeout=60)
    engine = request.engine(names)
    federation = Federation(engine, min_nodes=3)
    # the hold task never answers with the value itself
    direct = engine.dispatch(
        [Task(node_id=names[0], name=HOLD_TASK, payload=encode({}), task_id="direct/1")],
        deadline_s=30,
    )
    assert direct.failures[names[0]].kind is FailureKind.REJECTED
    assert "keep_as" in direct.failures[names[0]].detail
    held = federation.group(names).map(HOLD_TASK)
    assert held.node_ids == tuple(names)
    # fetching a held value is refused by each site's node: REJECTED, in its audit trail
    fetch = encode({"handle": held.handle, "fields": ["result"]})
    tasks = [Task(node_id=n, name=FETCH_TASK, payload=fetch, task_id=f"steal/{n}") for n in names]
    stolen = engine.dispatch(tasks, deadline_s=30)
    assert not stolen.replies
    for name, site in zip(names, approved):
        failure = stolen.failures[name]
        assert failure.kind is FailureKind.REJECTED and "secure" in failure.detail
        refusals = [
            e
            for e in audit(site)
            if e["action"] == "node.refused" and e["detail"]["task"] == FETCH_TASK
        ]
        assert refusals and refusals[-1]["detail"]["task_id"] == f"steal/{name}"
        assert refusals[-1]["detail"]["request"] == request.requests[name].id
    # a secure sum without the noise the ledgers were charged for is refused by every node
    with pytest.raises(ProtocolError):
        held["result"].aggregate(Clip(1e4) | SecureSum(value_range=1e4, dropout_fraction=0.0))
    for site in approved:
        entries = audit(site)
        reasons = [e["detail"].get("reason", "") for e in entries if e["action"] == "node.refused"]
        assert any("less noise than it charged" in r for r in reasons)


def test_distributed_noise_is_charged_at_every_site(sites: list[RunningSite]) -> None:
    scientists = [s.as_("tess") for s in sites]
    request = submit_federated(
        scientists,
        count_and_age,
        assets=["patients"],
        shape=[2],
        clip=1e4,
        noise_multiplier=4.0,
        name="noisy",
    )
    decide(sites, request)
    combined = request.result(timeout=120)
    truth = sum(local_truth(s) for s in sites)
    assert not np.allclose(combined, truth, atol=1e-2)  # noised (std 4e4 on the sum)
    for site in sites:
        budget = {b["scientist"]: b for b in site.as_("olivia").call("GET", "/api/budget")}
        assert budget["tess"]["spent_epsilon"] > 0


def test_a_site_that_did_not_approve_contributes_nothing(sites: list[RunningSite]) -> None:
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(
        scientists,
        count_and_age,
        assets=["patients"],
        shape=[2],
        clip=1e5,
        min_sites=3,
        name="three-of-four",
    )
    refuser = sites[1].directory.name
    decide(sites, request, deny=(refuser,))
    combined = request.result(timeout=120)
    truth = sum(local_truth(s) for s in sites if s.directory.name != refuser)
    np.testing.assert_allclose(combined, truth, atol=1e-2)
    assert refuser not in request.included and request.excluded[refuser].startswith("denied")
    rid = request.requests[refuser].id
    assert not any(
        e["action"].startswith(("result.secure-sum", "node.")) and e["detail"].get("request") == rid
        for e in audit(sites[1])
    )


def test_a_site_refuses_keys_not_signed_by_a_federation_member(
    sites: list[RunningSite],
) -> None:
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(
        scientists, count_and_age, assets=["patients"], shape=[2], clip=1e5, name="forged"
    )
    names = sorted(request.requests)
    target = names[0]
    engine = SiteEngine({target: request.requests[target]})
    server = SecAggServer(params=SecAggParams.create(names, vector_length=2, max_dropouts=0))
    advertise = encode(server.advertise_request().to_dict())
    got = engine.dispatch(
        [Task(node_id=target, name=ADVERTISE_TASK, payload=advertise, task_id="forge/0")],
        deadline_s=30,
    )
    reply = AdvertiseReply.from_dict(decode(got.replies[target].payload))
    assert len(reply.signature) == 64
    # the scientist answers for the other sites itself and relays the target's real keys
    replies = {target: reply}
    for n in names[1:]:
        replies[n] = SecAggNode(node_id=n).advertise(server.advertise_request())
    share = server.collect_keys(replies)[target]
    refused = engine.dispatch(
        [Task(node_id=target, name=SHARE_TASK, payload=encode(share.to_dict()), task_id="forge/1")],
        deadline_s=30,
    )
    assert "not signed by its identity key" in refused.failures[target].detail
    # and a round that is not the approved federation is refused at advertise
    small = SecAggServer(params=SecAggParams.create(names[:3], vector_length=2, max_dropouts=0))
    payload = encode(small.advertise_request().to_dict())
    wrong = engine.dispatch(
        [Task(node_id=target, name=ADVERTISE_TASK, payload=payload, task_id="forge/2")],
        deadline_s=30,
    )
    assert "min_sites" in wrong.failures[target].detail


def test_the_node_endpoint_refuses_bad_input_with_a_4xx(sites: list[RunningSite]) -> None:
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(
        scientists, count_and_age, assets=["patients"], shape=[2], clip=1.0, name="bad-input"
    )
    name = sites[0].directory.name
    rid = request.requests[name].id
    sam = scientists[0]
    engine = request.engine([name])

    def send(task: str, payload: bytes) -> Any:
        out = engine.dispatch(
            [Task(node_id=name, name=task, payload=payload, task_id="bad/1")], deadline_s=30
        )
        return out.failures[name]

    garbage = send(ADVERTISE_TASK, b"\x00not wire")
    assert garbage.kind is FailureKind.REJECTED
    unknown = send("os.system", encode({}))
    assert unknown.kind is FailureKind.REJECTED and "no task named" in unknown.detail
    malformed = send(ADVERTISE_TASK, encode({"secagg": "advertise_request"}))
    assert malformed.kind is FailureKind.ERROR
    for path, status in (
        (f"/api/requests/{rid}/node", 400),  # no task named
        (f"/api/requests/{rid}/node?task=x&task_id=" + "y" * 300, 400),
        (f"/api/requests/{rid + 10_000}/node?task=x&task_id=y", 404),
    ):
        with pytest.raises(DatasiteError) as refused:
            sam.call_bytes("POST", path, bytes(encode({})))
        assert refused.value.status == status
    # another scientist's request is not theirs to drive
    with pytest.raises(DatasiteError) as other:
        sites[0].as_("tess").call_bytes(
            "POST", f"/api/requests/{rid}/node?task=x&task_id=y", bytes(encode({}))
        )
    assert other.value.status in (403, 404)
    # a review request has no node at all
    review = sam.submit(count_and_age, assets=["patients"], name="plain")
    with pytest.raises(DatasiteError) as plain:
        sam.call_bytes(
            "POST", f"/api/requests/{review.id}/node?task=x&task_id=y", bytes(encode({}))
        )
    assert plain.value.status == 409
    assert sites[0].alive()


def test_a_federation_that_misnames_this_site_is_refused(sites: list[RunningSite]) -> None:
    sam = sites[0].as_("sam")
    with DatasiteState(sites[0].directory) as state:
        name = state.name
    policy = {
        "kind": "secure-sum",
        "federation": {
            "sites": {name: "00" * 32, "b": "11" * 32, "c": "22" * 32},
            "shape": [2],
            "clip": 1.0,
        },
    }
    with pytest.raises(DatasiteError, match=r"not among federation\.sites") as refused:
        sam.submit(count_and_age, assets=["patients"], policy=policy)
    assert refused.value.status == 400


def test_a_site_that_dies_mid_protocol_is_dropped_per_secagg(
    sites: list[RunningSite], monkeypatch: pytest.MonkeyPatch
) -> None:
    # last in this module: it kills one of the sites
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(
        scientists,
        count_and_age,
        assets=["patients"],
        shape=[2],
        clip=1e5,
        min_sites=3,
        name="dropout",
    )
    decide(sites, request)
    victim = sites[2]
    dispatch = SiteEngine.dispatch

    def dying(self: SiteEngine, tasks: Any, *, deadline_s: float) -> Any:
        if victim.alive() and any(t.name == MASKED_INPUT_TASK for t in tasks):
            victim.proc.kill()  # after it shared its keys, before its masked input
            victim.proc.wait(10)
        return dispatch(self, tasks, deadline_s=deadline_s)

    monkeypatch.setattr(SiteEngine, "dispatch", dying)
    combined = request.result(timeout=120)
    assert not victim.alive()
    name = victim.directory.name
    truth = sum(local_truth(s) for s in sites if s is not victim)
    np.testing.assert_allclose(combined, truth, atol=1e-2)
    assert name not in request.included and len(request.included) == 3
    assert "dropped" in request.excluded[name]
