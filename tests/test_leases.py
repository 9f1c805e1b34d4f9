"""Head leases: races and forged claims over a real two-node DHT on loopback; expiry, renewal,
release and the winner rule on the in-memory DHT and a fake clock (the same storage rules)."""

from __future__ import annotations

import threading

import pytest
from hivemind.utils import get_dht_time

from peers.node import install_signing
from swarm import dht_io, schemas
from swarm.identity import Identity
from swarm.keys import RunKeys, make_run_id
from swarm.leases import HeadLeases, winners
from swarm.schemas import LeaseRecord

pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("leases")]  # one two-node DHT
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def _keys(name: str) -> RunKeys:
    return RunKeys(make_run_id(name, "0" * 20))


@pytest.fixture(scope="module")
def nodes():
    import hivemind

    a = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    b = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=a.get_visible_maddrs())
    identities = [Identity(), Identity()]
    for dht, identity in zip((a, b), identities):
        install_signing(dht, identity)
    yield (a, b), identities
    b.shutdown()
    a.shutdown()


def test_two_peers_racing_for_one_head_end_with_exactly_one_holder(nodes):
    (a, b), (ia, ib) = nodes
    keys = _keys("race")
    la, lb = (HeadLeases(d, keys, i, 4, lease_seconds=4.0, settle_seconds=1.0) for d, i in ((a, ia), (b, ib)))
    barrier, results = threading.Barrier(2), {}

    def go(leases):
        barrier.wait()
        results[leases.peer] = leases.claim(1, prefer=[0])

    threads = [threading.Thread(target=go, args=(l,)) for l in (la, lb)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(map(len, results.values())) == [0, 1], results
    winner, loser = (la, lb) if results[la.peer] else (lb, la)
    assert la.holders() == lb.holders() == {0: winner.peer}
    assert winner.held.keys() == {0} and not loser.held
    # the loser takes another head
    got = loser.claim(1)
    assert len(got) == 1 and got[0] != 0
    assert la.holders() == lb.holders() == {0: winner.peer, got[0]: loser.peer}


def test_forged_unsigned_and_malformed_claims_are_ignored(nodes):
    (a, b), (ia, ib) = nodes
    keys = _keys("forged")
    now = get_dht_time()
    # a claims head 0 in b's name (b's owner subkey): the DHT refuses to store it
    assert not a.store(keys.leases, schemas.dump(LeaseRecord(head=0, claimed_at=now)), now + 10, subkey=ib.subkey("0"))
    # unsigned claims and garbage under a's own key: refused or dropped when read
    assert not a.store(keys.leases, {"head": 1, "claimed_at": now}, expiration_time=now + 10, subkey="1")
    dht_io.store(a, keys.leases, ia, LeaseRecord(head=2, claimed_at=now), now + 10, tag="3")  # tag names another head
    a.store(keys.leases, {"head": "one"}, expiration_time=now + 10, subkey=ia.subkey("1"))
    lb = HeadLeases(b, keys, ib, 4, lease_seconds=5.0, settle_seconds=0.5)
    assert lb.holders() == {}
    assert lb.free_heads() == [0, 1, 2, 3]


def _memory_pair(lease=4.0):
    from swarm.clock import FakeClock
    from swarm.memnet import MemoryDHT, MemoryNetwork

    clock = FakeClock()
    net = MemoryNetwork(clock)
    keys = _keys("mem")
    pair = []
    for name in ("a", "b"):
        dht, identity = MemoryDHT(net, name), Identity()
        install_signing(dht, identity)
        pair.append(HeadLeases(dht, keys, identity, 4, lease_seconds=lease, settle_seconds=1.0, clock=clock))
    return clock, pair


def test_a_crashed_holders_head_frees_up_when_its_lease_expires():
    clock, (la, lb) = _memory_pair(lease=3.0)
    assert la.claim(1, prefer=[2]) == [2]
    assert lb.claim(1, prefer=[2]) == []  # taken
    clock.advance(0.5)  # 2.5 s after the claim
    assert 2 not in lb.free_heads()  # not yet expired
    clock.advance(1.0)  # la "crashed": it never renews
    assert 2 in lb.free_heads()
    assert lb.claim(1, prefer=[2]) == [2]


def test_renewal_keeps_the_lease_and_release_frees_it_at_once():
    clock, (la, lb) = _memory_pair(lease=3.0)
    assert la.claim(1, prefer=[1]) == [1]
    for _ in range(3):
        clock.advance(1.2)
        assert la.due()
        assert la.renew() == []
    assert lb.holders() == {1: la.peer}  # alive well past one lease
    la.release()
    assert 1 in lb.free_heads()


def test_claims_dated_in_the_future_or_outliving_a_lease_are_ignored():
    clock, (la, lb) = _memory_pair(lease=3.0)
    now = clock.now()
    dht_io.store(la.dht, la.keys.leases, la.identity, LeaseRecord(head=0, claimed_at=now + 60), now + 3, tag="0")
    dht_io.store(la.dht, la.keys.leases, la.identity, LeaseRecord(head=1, claimed_at=now), now + 600, tag="1")
    assert lb.holders() == {}


def test_winner_rule_is_incumbent_then_earliest_claim_then_smaller_fingerprint():
    claims = [("b", LeaseRecord(head=0, claimed_at=1.0)), ("a", LeaseRecord(head=0, claimed_at=1.0)),
              ("c", LeaseRecord(head=0, claimed_at=0.5, released=True)), ("z", LeaseRecord(head=1, claimed_at=2.0)),
              ("y", LeaseRecord(head=1, claimed_at=3.0)), ("x", LeaseRecord(head=2, claimed_at=-1e308)),
              ("w", LeaseRecord(head=2, claimed_at=5.0))]
    assert winners(claims) == {0: "a", 1: "z", 2: "x"}
    assert winners(claims, incumbents={2: "w", 1: "gone"}) == {0: "a", 1: "z", 2: "w"}


def test_a_view_of_the_holders_is_reused_within_its_age_and_a_thorough_one_serves_any_ask():
    """Each fresh view is a read of every holder's claim: a plain view serves plain asks up to
    `max_age` old, a thorough one serves any ask; a plain view never stands in for a thorough one."""
    clock, (la, lb) = _memory_pair(lease=6.0)
    assert la.claim(1, prefer=[0]) == [0]
    reads = []
    claims = lb.claims
    lb.claims = lambda thorough=False: reads.append(thorough) or claims(thorough)
    assert lb.holders(max_age=2.0) == {0: la.peer} and reads == [False]
    assert lb.claim(1, prefer=[1]) == [1] and reads[-1] is True  # settled on a fresh thorough view
    reads.clear()
    clock.advance(1.0)
    lb.holders(max_age=2.0)
    lb.holders(max_age=2.0, thorough=True)
    assert reads == []                      # a second old, thorough: it serves both asks
    clock.advance(1.5)                      # 2.5 s old
    assert lb.holders(max_age=2.0) == {0: la.peer, 1: lb.peer} and reads == [False]
    lb.holders(max_age=2.0, thorough=True)
    assert reads == [False, True]           # a plain view does not serve a thorough ask
    lb.holders(max_age=2.0)
    assert reads == [False, True]           # the thorough one serves a plain ask
    lb.holders(max_age=0.0, thorough=True)  # 0: afresh, whatever is held
    assert reads == [False, True, True]
