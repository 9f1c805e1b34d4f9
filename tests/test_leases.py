"""Head leases: races and forged claims over a real two-node DHT on loopback; expiry, renewal and\nrelease on the in-memory DHT and a fake clock (the same storage rules, no waiting)."""

from __future__ import annotations

import threading

import pytest
from hivemind.utils import get_dht_time

from swarm import schemas
from swarm.keys import RunKeys
from swarm.leases import HeadLeases, winners
from swarm.schemas import LeaseRecord

pytestmark = pytest.mark.timeout(120)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture(scope="module")
def dhts():
    import hivemind

    a = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    b = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=a.get_visible_maddrs())
    yield a, b
    b.shutdown()
    a.shutdown()


def _pair(dhts, run_id, lease=4.0):
    keys = RunKeys(run_id)
    return [HeadLeases(d, keys, str(d.peer_id), 4, lease_seconds=lease, settle_seconds=1.0) for d in dhts]


def test_two_peers_racing_for_one_head_end_with_exactly_one_holder(dhts):
    la, lb = _pair(dhts, "race")
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


def _memory_pair(lease=4.0):
    from swarm.clock import FakeClock
    from swarm.memnet import MemoryDHT, MemoryNetwork

    clock = FakeClock()
    net = MemoryNetwork(clock)
    keys = RunKeys("mem")
    pair = [HeadLeases(MemoryDHT(net, name), keys, name, 4, lease_seconds=lease, settle_seconds=1.0, clock=clock)
            for name in ("a", "b")]
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


def test_forged_and_malformed_claims_are_ignored(dhts):
    a, b = dhts
    keys = RunKeys("forged")
    now = get_dht_time()
    victim = str(b.peer_id)
    # a claims head 0 in b's name (subkey says a, record says b) and writes garbage for head 1
    schemas.store(a, keys.leases, RunKeys.lease_subkey(0, str(a.peer_id)),
                  LeaseRecord(head=0, peer=victim, claimed_at=now), now + 10)
    a.store(keys.leases, {"head": "one"}, expiration_time=now + 10, subkey="1:x")
    lb = HeadLeases(b, keys, victim, 4, lease_seconds=5.0, settle_seconds=0.5)
    assert lb.holders() == {}
    assert lb.free_heads() == [0, 1, 2, 3]


def test_winner_rule_is_earliest_claim_then_smaller_peer():
    claims = [LeaseRecord(head=0, peer="b", claimed_at=1.0), LeaseRecord(head=0, peer="a", claimed_at=1.0),
              LeaseRecord(head=0, peer="c", claimed_at=0.5, released=True), LeaseRecord(head=1, peer="z", claimed_at=2.0),
              LeaseRecord(head=1, peer="y", claimed_at=3.0)]
    assert winners(claims) == {0: "a", 1: "z"}
