"""What the server sees: uniformly random vectors, and never enough shares for both secrets."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from scipy.stats import chisquare

from shoal.crypto.secagg import UnmaskRequest
from shoal.errors import ProtocolError


def share_counts(replies: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    b: dict[str, int] = {}
    s: dict[str, int] = {}
    for reply in replies.values():
        for u in reply.b_peers:
            b[u] = b.get(u, 0) + 1
        for u in reply.s_peers:
            s[u] = s.get(u, 0) + 1
    return b, s


@pytest.mark.parametrize("bits", [32, 20])
def test_masked_vectors_are_indistinguishable_from_uniform(make_round: Any, bits: int) -> None:
    r = make_round(6, vector_length=40_000, max_dropouts=1, bits=bits)
    # the most structured inputs possible: constants
    r.inputs = {v: np.full(40_000, 7 * i, dtype=r.params.dtype) for i, v in enumerate(r.inputs)}
    r.advertise()
    r.share()
    r.mask()
    for reply in r.masked_replies.values():
        top_byte = reply.masked >> (bits - 8)
        low_byte = reply.masked & 0xFF
        assert chisquare(np.bincount(top_byte, minlength=256)).pvalue > 1e-6
        assert chisquare(np.bincount(low_byte, minlength=256)).pvalue > 1e-6
    # the same statistic has power on the unmasked inputs
    raw = r.inputs["node-03"] & 0xFF
    assert chisquare(np.bincount(raw, minlength=256)).pvalue < 1e-6
    assert np.array_equal(r.unmask(), r.expected())


def test_server_never_gets_enough_shares_for_both_secrets(make_round: Any) -> None:
    r = make_round(12, vector_length=10, max_dropouts=4)
    t = r.params.threshold
    r.advertise()
    r.share(drop={"node-01"})
    r.mask(drop={"node-02", "node-07"})
    r.unmask(drop={"node-09"})
    b, s = share_counts(r.unmask_replies)
    survivors = set(r.server.survivors)
    assert survivors == set(r.params.nodes) - {"node-01", "node-02", "node-07"}
    for v in survivors:
        assert s.get(v, 0) == 0 and b[v] >= t  # only the self-mask of a survivor
    for u in ("node-02", "node-07"):
        assert b.get(u, 0) == 0 and s[u] >= t  # only the masking key of a dropped node
    assert "node-01" not in b and "node-01" not in s  # shared nothing, asked nothing


def test_a_lying_server_cannot_collect_both_kinds(make_round: Any) -> None:
    r = make_round(9, vector_length=10, max_dropouts=2)
    t, k = r.params.threshold, r.params.degree
    r.advertise()
    r.share()
    r.mask()
    victim = "node-04"
    neighbours = list(r.params.neighbours(victim))
    honest = r.unmask_requests[neighbours[0]]
    lie = replace(
        honest,
        survivors=tuple(v for v in honest.survivors if v != victim),
        dropped=(*honest.dropped, victim),
    )
    replies = {}
    for i, v in enumerate(neighbours):
        request = honest if i % 2 else lie  # half hear "survived", half "dropped"
        replies[v] = r.nodes[v].unmask(request)
    b, s = share_counts(replies)
    assert b.get(victim, 0) + s.get(victim, 0) == k
    assert min(b.get(victim, 0), s.get(victim, 0)) < t  # because 2t > k
    # and asking again with the other story is refused by every neighbour
    for i, v in enumerate(neighbours):
        with pytest.raises(ProtocolError, match="both"):
            r.nodes[v].unmask(lie if i % 2 else honest)


def test_node_refuses_to_reveal_both_kinds_in_one_request(make_round: Any) -> None:
    r = make_round(6, vector_length=4)
    r.advertise()
    r.share()
    r.mask()
    node = r.params.neighbours("node-00")[0]
    req = r.unmask_requests[node]
    both = replace(req, dropped=(*req.dropped, "node-00"))
    with pytest.raises(ProtocolError, match="both"):
        r.nodes[node].unmask(both)


def test_node_refuses_to_unmask_too_few_survivors(make_round: Any) -> None:
    r = make_round(8, vector_length=4, max_dropouts=2)
    r.advertise()
    r.share()
    r.mask()
    v = "node-05"
    req = r.unmask_requests[v]
    nb = set(r.params.neighbours(v))
    # claim everyone but v and one neighbour dropped, to isolate v's input
    keep = {v, sorted(nb)[0]}
    isolating = UnmaskRequest(
        round_id=req.round_id,
        survivors=tuple(u for u in req.survivors if u in keep),
        dropped=tuple(u for u in req.survivors if u not in keep),
    )
    with pytest.raises(ProtocolError, match="minimum"):
        r.nodes[v].unmask(isolating)


def test_node_refuses_inconsistent_membership(make_round: Any) -> None:
    r = make_round(8, vector_length=4, max_dropouts=2)
    r.advertise()
    r.share(drop={"node-03"})
    r.mask()
    v = next(u for u in r.params.neighbours("node-03") if u in r.unmask_requests)
    req = r.unmask_requests[v]
    # node-03 never shared keys with v, so v holds nothing to reveal for it
    claim = replace(req, dropped=(*req.dropped, "node-03"))
    with pytest.raises(ProtocolError, match="disagrees"):
        r.nodes[v].unmask(claim)
    told_dropped = replace(
        req, survivors=tuple(u for u in req.survivors if u != v), dropped=(*req.dropped, v)
    )
    with pytest.raises(ProtocolError, match="dropped"):
        r.nodes[v].unmask(told_dropped)
