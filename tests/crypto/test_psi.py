from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import psi
from shoal.errors import ConfigError, DataError, ProtocolError


@settings(max_examples=15, deadline=None)
@given(
    a=st.sets(st.integers(0, 60), max_size=25),
    b=st.sets(st.integers(0, 60), max_size=25),
    c=st.sets(st.integers(0, 60), max_size=25),
)
def test_intersection_and_shared_order(a: set[int], b: set[int], c: set[int]) -> None:
    sets = [sorted(a), sorted(b), sorted(c)]
    salt = psi.new_salt()
    parties = [psi.PsiParty(ids=[f"id{x}" for x in s], salt=salt) for s in sets]
    results = psi.run_psi(parties)
    want = a & b & c
    aligned = [[s[i] for i in r.rows.tolist()] for s, r in zip(sets, results)]
    assert all(r.size == len(want) for r in results)
    assert set(aligned[0]) == want
    # every party holds the same ids in the same row order
    assert aligned[0] == aligned[1] == aligned[2]


def test_two_party_with_mixed_id_types() -> None:
    salt = psi.new_salt()
    a = psi.PsiParty(ids=[1, 2, 3, "x"], salt=salt)
    b = psi.PsiParty(ids=["3", "x", "y", "1"], salt=salt)
    ra, rb = psi.run_psi([a, b])
    got_a = [str([1, 2, 3, "x"][i]) for i in ra.rows]
    got_b = [["3", "x", "y", "1"][i] for i in rb.rows]
    assert got_a == got_b and sorted(got_a) == ["1", "3", "x"]
    assert ra.size == rb.size == 3


def test_duplicates_refused() -> None:
    with pytest.raises(DataError, match="duplicate id 'a'"):
        psi.PsiParty(ids=["a", "b", "a"], salt=psi.new_salt())


def test_invalid_points_refused() -> None:
    salt = psi.new_salt()
    a = psi.PsiParty(ids=["1", "2"], salt=salt)
    bad = np.full((2, 32), 0xFF, dtype=np.uint8)  # not an encoding of a Ristretto point
    with pytest.raises(ProtocolError, match="not a valid Ristretto255 point"):
        a.blind(bad)
    with pytest.raises(ProtocolError):
        a.blind(np.zeros((2, 31), dtype=np.uint8))
    with pytest.raises(ProtocolError, match="2 ids"):
        a.intersect(a.blind_own()[:1], [])


def test_curious_peer_and_coordinator_see_only_blinded_points() -> None:
    """What travels (once- and fully-blinded points) cannot be linked to ids by anyone
    without the parties' keys: an id's salted hash never appears, the same ids in another
    session give unrelated points, and a peer's own keyed guesses match only the shared ids."""
    ids_a = [f"p{i}" for i in range(30)]
    ids_b = [f"p{i}" for i in range(20, 50)]
    salt = psi.new_salt()
    a, b = psi.PsiParty(ids=ids_a, salt=salt), psi.PsiParty(ids=ids_b, salt=salt)
    once_a = a.blind_own()
    full_a = b.blind(once_a)
    once_b = b.blind_own()
    full_b = a.blind(once_b)
    relayed = {bytes(p) for arr in (once_a, full_a, once_b, full_b) for p in arr}
    hashes = {psi._hash_to_group(salt, x) for x in ids_a + ids_b}
    assert not relayed & hashes  # the coordinator sees no plain salted hash of any id
    # B, curious, blinds every id it can think of with its own key: only ids it holds and A
    # also holds can be recognized in A's fully blinded set, i.e. exactly the intersection.
    guesses = [f"p{i}" for i in range(100)]
    mine = {b.blind([psi._hash_to_group(salt, g)])[0].tobytes(): g for g in guesses}
    # B's own once-blinded values are k_B*H; A's full set is k_A*k_B*H: no guess matches
    assert not set(mine) & {p.tobytes() for p in full_a}
    res = b.intersect(full_b, [full_a])
    assert sorted(ids_b[i] for i in res.rows) == [f"p{i}" for i in range(20, 30)]
    # a second session (new salt, new keys) over the same ids shares no point with the first
    salt2 = psi.new_salt()
    a2 = psi.PsiParty(ids=ids_a, salt=salt2)
    assert not {p.tobytes() for p in a2.blind_own()} & {p.tobytes() for p in once_a}
    # the once-blinded order is a secret shuffle, not the id order
    b_again = psi.PsiParty(ids=ids_a, salt=salt)
    assert b_again._order.tolist() != list(range(30))


def test_disjoint_sets_intersect_empty() -> None:
    salt = psi.new_salt()
    ra, rb = psi.run_psi(
        [psi.PsiParty(ids=["a", "b"], salt=salt), psi.PsiParty(ids=["c"], salt=salt)]
    )
    assert ra.size == rb.size == 0 and ra.rows.size == 0


def test_threaded_batches_match_one_thread() -> None:
    """Above the parallel threshold the points are split over threads; the result (and the
    check of every peer point, wherever it sits in the batch) is the same as one thread's."""
    n = psi._MIN_PARALLEL + 500
    salt = psi.new_salt()
    ids_a = [f"u{i}" for i in range(n)]
    ids_b = [f"u{i}" for i in range(n // 2, n // 2 + n)]
    one = psi.PsiParty(ids=ids_a, salt=salt, workers=1)
    two = psi.PsiParty(ids=ids_b, salt=salt, workers=2)
    # hashing in threads keeps each point at its row: compare with the one-id reference
    assert two._hashed[0].tobytes() == psi._hash_to_group(salt, ids_b[int(two._order[0])])
    assert two._hashed[-1].tobytes() == psi._hash_to_group(salt, ids_b[int(two._order[-1])])
    ra, rb = psi.run_psi([one, two])
    assert ra.size == rb.size == n - n // 2
    assert [ids_a[i] for i in ra.rows] == [ids_b[i] for i in rb.rows]
    bad = np.array(two.blind_own())
    bad[-1] = 0xFF  # the last point, in the last thread's chunk
    with pytest.raises(ProtocolError, match="not a valid Ristretto255 point"):
        one.blind(bad)
    with pytest.raises(ConfigError, match="workers"):
        psi.PsiParty(ids=["a"], salt=salt, workers=0)
