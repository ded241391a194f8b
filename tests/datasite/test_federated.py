"""A federated request across three real datasite processes: each owner approves, the
scientist gets only the SecAgg+ sum, and cannot stand in for a site or rerun the sum."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sites import RunningSite, start_site

from shoal.datasite import submit_federated
from shoal.datasite.client import DatasiteError
from shoal.datasite.state import DatasiteState
from shoal.errors import ReleaseRefused
from shoal.wire import encode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningSite]]:
    base = tmp_path_factory.mktemp("federation")
    with ThreadPoolExecutor(3) as pool:
        running = list(
            pool.map(
                lambda i: start_site(base / f"hospital-{i}", tls=True, rows=60 + 20 * i), range(3)
            )
        )
    try:
        yield running
    finally:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda site: site.stop(), running))


def local_truth(site: RunningSite) -> np.ndarray:
    with open(site.data, newline="") as f:
        ages = np.array([float(r["age"]) for r in csv.DictReader(f)])
    return np.array([len(ages), ages.sum()])


def count_and_age(assets):  # type: ignore[no-untyped-def]
    import numpy as np

    ages = assets["patients"]["age"]
    return {"result": np.array([len(ages), float(ages.sum())])}


def approve_all(sites: list[RunningSite], request) -> None:  # type: ignore[no-untyped-def]
    for site in sites:
        owner = site.as_("olivia")
        rid = request.requests[site.directory.name].id
        mine = owner.request(rid)
        mine.wait(("mock-run",), timeout=60)
        owner.approve(rid, request.code_hash, "counts and a sum, inside a secure sum")


def test_the_scientist_gets_only_the_secure_sum(sites: list[RunningSite]) -> None:
    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(scientists, count_and_age, assets=["patients"], shape=[2], clip=1e5)
    assert set(request.requests) == {s.directory.name for s in sites}
    approve_all(sites, request)
    combined = request.result(timeout=120)
    truth = sum(local_truth(s) for s in sites)
    np.testing.assert_allclose(combined, truth, atol=1e-2)
    # no site's own array ever reaches the scientist
    for site, scientist in zip(sites, scientists):
        rid = request.requests[site.directory.name].id
        with pytest.raises(ReleaseRefused, match="never released alone"):
            scientist.call("GET", f"/api/requests/{rid}/result", raw=True)
        assert scientist.request(rid).info["state"] == "released"
    # and a second round on the same requests (to difference two sums) is refused
    rid = request.requests[sites[0].directory.name].id
    with pytest.raises(DatasiteError) as refused:
        scientists[0].call_bytes(
            "POST", f"/api/requests/{rid}/secagg/advertise", bytes(encode({"x": 1}))
        )
    assert refused.value.status == 409


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
    approve_all(sites, request)
    combined = request.result(timeout=120)
    truth = sum(local_truth(s) for s in sites)
    assert not np.allclose(combined, truth, atol=1e-2)  # noised (std 4e4 on the sum)
    for site in sites:
        budget = {b["scientist"]: b for b in site.as_("olivia").call("GET", "/api/budget")}
        assert budget["tess"]["releases"] == 1 and budget["tess"]["spent_epsilon"] > 0


def test_a_site_refuses_keys_not_signed_by_a_federation_member(
    sites: list[RunningSite],
) -> None:
    from shoal.crypto.secagg import SecAggParams, SecAggServer

    scientists = [s.as_("sam") for s in sites]
    request = submit_federated(
        scientists, count_and_age, assets=["patients"], shape=[2], clip=1e5, name="forged"
    )
    approve_all(sites, request)
    names = sorted(request.requests)
    for name in names:
        request.requests[name].wait(("succeeded",), timeout=60)
    params = SecAggParams.create(names, vector_length=2, max_dropouts=0)
    server = SecAggServer(params=params)
    from shoal.crypto.secagg import AdvertiseReply, SecAggNode
    from shoal.wire import decode

    # the scientist answers for two of the sites itself and relays the third's real keys
    target = names[0]
    rid = request.requests[target].id
    site = scientists[0]
    reply = decode(
        site.call_bytes(
            "POST",
            f"/api/requests/{rid}/secagg/advertise",
            bytes(encode(server.advertise_request().to_dict())),
        )
    )
    reply.pop("identity_signature")
    fakes = {n: SecAggNode(node_id=n) for n in names[1:]}
    replies = {target: AdvertiseReply.from_dict(reply)}
    for n, node in fakes.items():
        replies[n] = node.advertise(server.advertise_request())
    share_request = server.collect_keys(replies)[target].to_dict()
    share_request["peer_signatures"] = np.zeros((len(names) - 1, 64), np.uint8)
    with pytest.raises(DatasiteError, match="not signed by its identity key") as refused:
        site.call_bytes(
            "POST", f"/api/requests/{rid}/secagg/share_keys", bytes(encode(share_request))
        )
    assert refused.value.status == 409


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
