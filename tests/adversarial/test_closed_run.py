"""A closed run is closed at every door: the nodes store no record a non-member wrote (under any
key: leases, rounds, members, progress, keys of no run), and serve no blob to a peer id no member
bound with its signature. A newcomer with an invite is stored from its first record on, a revoked
member no longer is. Every run, open ones included, bounds what one writer parks at a node: no
record may outlive the longest a run's record lives, and one writer keeps at most
MAX_SUBKEYS_PER_WRITER subkeys under a key.

In memory here; `test_a_real_node_of_a_closed_run_stores_and_serves_members_only` runs the same
rules in real hivemind nodes on loopback."""

from __future__ import annotations

import time

import pytest

from peers.coordinator import coordinator_identity
from swarm import dht_io
from swarm.admission import REFRESH_EVERY, REREAD_EVERY, install_storage_policy
from swarm.config import SwarmConfig
from swarm.identity import Identity, split_subkey
from swarm.keys import RunKeys, make_run_id
from swarm.membership import Membership, sign_invite
from swarm.memnet import MemoryBlobServer
from swarm.schemas import MAX_RECORD_TTL, HashRecord, InviteRecord, LeaseRecord, MemberRecord, RevocationRecord
from swarm.transport import TransferError
from tests.memswarm import MemorySwarm, named_identity, tiny_config

pytestmark = pytest.mark.timeout(120)


def _writers(mem: MemorySwarm) -> set[str]:
    """Every writer whose record the network's storage holds, under any key."""
    return {who[1] for entry in mem.net.storage.values() for subkey in (entry.subkeys or {})
            if (who := split_subkey(subkey)) is not None}


def _closed_run(tmp_path) -> tuple[MemorySwarm, dict[str, InviteRecord]]:
    """Coordinator, p0 invited, p1 listed in the config; invites for p0 and p2 (not started)."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=6, min_heads=2, closed=True,
                      members=[named_identity("p1").fingerprint])
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    authority = coordinator_identity(coordinator.role.run_dir)
    expires = int(mem.clock.now() + 3600)
    invites = {n: sign_invite(authority, mem.run_id, named_identity(n).fingerprint, expires) for n in ("p0", "p2")}
    mem.trainer("p0", invite=invites["p0"])
    mem.trainer("p1")
    return mem, invites


def test_a_closed_run_stores_no_record_a_stranger_writes_and_serves_it_no_blob(tmp_path):
    mem, invites = _closed_run(tmp_path)
    keys = RunKeys(mem.run_id)
    mem.run(until=lambda s: any(e["new_round"] >= 2 for e in s["coordinator"].events.of("round")))
    stranger, identity = mem.signing_dht("stranger")
    copier, copier_identity = mem.signing_dht("copier")
    now = mem.clock.now()
    refused = mem.net.policy.refused
    written = [
        (keys.leases, LeaseRecord(head=0, claimed_at=now - 5), "0"),
        (keys.hashes(2), HashRecord(round=2, digest="0" * 64, members=[identity.fingerprint]), ""),
        (keys.members, MemberRecord(p2p="Qmstranger"), ""),  # no invite
        (keys.members, MemberRecord(p2p="Qmstranger", invite=invites["p2"]), ""),  # someone else's invite
        (keys.revocations, RevocationRecord(revoked=[named_identity("p0").fingerprint]), ""),
        ("some-other-key", LeaseRecord(head=0, claimed_at=now), ""),  # keys of no run: a closed run's nodes are its own
    ]
    for key, record, tag in written:
        assert not dht_io.store(stranger, key, identity, record, now + 30, tag=tag), key
    # a member's invite copied by another key does not admit the copier either
    assert not dht_io.store(copier, keys.members, copier_identity, MemberRecord(p2p="Qmcopier", invite=invites["p0"]),
                            now + 30)
    assert not dht_io.store(copier, keys.leases, copier_identity, LeaseRecord(head=1, claimed_at=now), now + 30, tag="1")
    assert identity.fingerprint not in _writers(mem) and copier_identity.fingerprint not in _writers(mem)
    assert mem.net.policy.refused >= refused + len(written) + 2

    # ... and no blob is served to a peer id no member bound
    outsider = MemoryBlobServer(mem.net, "Qmstranger")
    for donor in ("coordinator", "p0"):
        with pytest.raises(TransferError, match="does not have"):
            outsider.fetch(f"Qm{donor}", keys.state_blob, timeout=10, max_bytes=1 << 30)
    # a member that said where it is reached is served, by member and coordinator alike
    dht, newcomer = mem.signing_dht("p2", named_identity("p2"))
    Membership(dht, keys, mem.cfg.swarm, mem.clock, invites["p2"], p2p="Qmp2").publish(newcomer)
    mem.clock.advance(5)  # past the donors' rate limit on reads of the members
    member = MemoryBlobServer(mem.net, "Qmp2")
    for donor in ("coordinator", "p0"):
        assert member.fetch(f"Qm{donor}", keys.state_blob, timeout=10, max_bytes=1 << 30)
    # a key that is no member binding the outsider's peer id binds nothing
    impostor_dht, impostor = mem.signing_dht("impostor")
    assert not dht_io.store(impostor_dht, keys.members, impostor, MemberRecord(p2p="Qmstranger"), mem.clock.now() + 30)
    mem.clock.advance(5)
    with pytest.raises(TransferError, match="does not have"):
        outsider.fetch("Qmcoordinator", keys.state_blob, timeout=10, max_bytes=1 << 30)
    mem.run()
    assert mem.digests("coordinator", "p0", "p1")  # the run went on to its end, members and all
    assert {named_identity("p0").fingerprint, named_identity("p1").fingerprint} <= _writers(mem)


def test_an_invited_newcomer_is_stored_from_its_first_record_and_a_revoked_member_no_longer(tmp_path):
    mem, invites = _closed_run(tmp_path)
    keys = RunKeys(mem.run_id)
    mem.run(until=lambda s: any(e["new_round"] >= 1 for e in s["coordinator"].events.of("round")))
    dht, newcomer = mem.signing_dht("p2", named_identity("p2"))
    now = mem.clock.now()
    claim = LeaseRecord(head=1, claimed_at=now)
    assert not dht_io.store(dht, keys.leases, newcomer, claim, now + 30, tag="1")  # no invite published yet
    assert dht_io.store(dht, keys.members, newcomer, MemberRecord(p2p="Qmp2", invite=invites["p2"]), now + 30)
    assert dht_io.store(dht, keys.leases, newcomer, claim, now + 30, tag="1")  # its next write is taken
    # ... and so is a record of a newcomer whose member record the storing side has not seen yet:
    # the refusal makes it read the members, and the write is taken
    other, member = mem.signing_dht("p3", named_identity("p3"))
    invite = sign_invite(coordinator_identity(mem["coordinator"].role.run_dir), mem.run_id, member.fingerprint,
                         int(now + 3600))
    policy, mem.net.policy = mem.net.policy, None
    assert dht_io.store(other, keys.members, member, MemberRecord(p2p="Qmp3", invite=invite), now + 30)
    mem.net.policy = policy
    mem.clock.advance(REFRESH_EVERY)
    now = mem.clock.now()
    assert dht_io.store(other, keys.leases, member, LeaseRecord(head=0, claimed_at=now), now + 30, tag="0")

    # revoked: from the moment the nodes read the coordinator's list, nothing new of it is stored
    coordinator = mem["coordinator"].rt
    assert dht_io.store(coordinator.dht, keys.revocations, coordinator.identity,
                        RevocationRecord(revoked=[newcomer.fingerprint]), now + 60)
    mem.clock.advance(REREAD_EVERY)  # the nodes read the members and the revocations again by then
    now = mem.clock.now()
    assert not dht_io.store(dht, keys.leases, newcomer, LeaseRecord(head=1, claimed_at=now), now + 30, tag="1")


def test_every_run_bounds_how_long_and_how_many_records_one_writer_parks_at_a_node(tmp_path):
    mem = MemorySwarm(tiny_config(), tmp_path)  # an open run
    mem.coordinator()
    keys = RunKeys(mem.run_id)
    flooder, identity = mem.signing_dht("flooder")
    other_dht, other = mem.signing_dht("other")
    now = mem.clock.now()
    record = LeaseRecord(head=0, claimed_at=now)
    assert not dht_io.store(flooder, keys.leases, identity, record, now + MAX_RECORD_TTL + 3600, tag="0")
    assert dht_io.store(flooder, keys.leases, identity, record, now + MAX_RECORD_TTL, tag="0")
    stored = sum(dht_io.store(flooder, keys.leases, identity, record, now + 30, tag=f"j{i}") for i in range(80))
    assert stored == dht_io.MAX_SUBKEYS_PER_WRITER - 1  # with the first one: the cap, and no more
    assert dht_io.store(flooder, keys.leases, identity, record, now + 60, tag="j0")  # renewing its own: fine
    assert dht_io.store(other_dht, keys.leases, other, record, now + 30, tag="0")  # other writers: fine


def test_a_node_of_an_open_run_serves_everyone_and_a_failing_rule_nobody(tmp_path):
    mem = MemorySwarm(tiny_config(), tmp_path)
    mem.coordinator()
    mem.run(until=lambda s: s["coordinator"].role.started)
    keys = RunKeys(mem.run_id)
    anyone = MemoryBlobServer(mem.net, "Qmanyone")
    assert anyone.fetch("Qmcoordinator", keys.state_blob, timeout=10, max_bytes=1 << 30)

    def broken(peer: str) -> bool:
        raise RuntimeError("the rule failed")

    mem.net.servers["Qmcoordinator"].serves = broken  # the real transport judges through the same `judged`
    with pytest.raises(TransferError, match="does not have"):
        anyone.fetch("Qmcoordinator", keys.state_blob, timeout=10, max_bytes=1 << 30)


def test_one_policy_per_network_and_member_records_checked_where_they_are_stored():
    """`install_storage_policy` keeps the first policy; a member record is judged on its invite."""
    from swarm.clock import FakeClock
    from swarm.memnet import MemoryDHT, MemoryNetwork

    authority = Identity()
    run_id = make_run_id("closed", authority.fingerprint)
    net = MemoryNetwork(FakeClock())
    dht = MemoryDHT(net, "Qma")
    install_storage_policy(dht, run_id, SwarmConfig(closed=True))
    first = net.policy
    install_storage_policy(dht, run_id, SwarmConfig(closed=False))
    assert net.policy is first and first.closed
    member, stranger = Identity(), Identity()
    expired = sign_invite(authority, run_id, member.fingerprint, int(net.clock.now()) - 10)
    assert first.learn({member.fingerprint: MemberRecord(p2p="Qm", invite=expired)}, net.clock.now()) is False
    good = sign_invite(authority, run_id, member.fingerprint, int(net.clock.now() + 60))
    assert first.learn({stranger.fingerprint: MemberRecord(p2p="Qm", invite=good)}, net.clock.now()) is False
    assert first.learn({member.fingerprint: MemberRecord(p2p="Qm", invite=good)}, net.clock.now()) is True
    assert first.admits(member.fingerprint, net.clock.now())
    assert not first.admits(member.fingerprint, net.clock.now() + 120)  # not past its invite


async def _writers_at(_dht, node, key: str) -> list[str]:
    """Runs in a DHT's process: the writers whose records this node stores under `key`."""
    from hivemind.dht.routing import DHTID

    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None or not hasattr(found.value, "items"):
        return []
    return sorted({who[1] for subkey, _ in found.value.items() if (who := split_subkey(subkey)) is not None})


async def _candidates(_dht, node, key: str) -> list[str]:
    """Runs in a DHT's process: the peer ids of the nodes it would store `key` at or read it from."""
    from hivemind.dht.routing import DHTID

    known = node.protocol.routing_table.uid_to_peer_id
    ids = dht_io._known_nearest(node, DHTID.generate(source=key)) or []
    return [str(node.peer_id) if uid == node.node_id else known[uid].to_base58() for uid in ids]


async def _table(_dht, node) -> list[str]:
    """Runs in a DHT's process: the peer ids in its routing table."""
    return sorted(peer.to_base58() for peer in node.protocol.routing_table.uid_to_peer_id.values())


async def _ping(_dht, node, peer: str) -> None:
    """Runs in a DHT's process: ask `peer` to add this node to its routing table (hivemind's ping)."""
    from hivemind.p2p import PeerID

    await node.protocol.call_ping(PeerID.from_base58(peer))


def test_a_real_node_of_a_closed_run_stores_and_serves_members_only(tmp_path):
    """Real hivemind nodes on loopback: the coordinator's node stores no stranger's record and
    serves it no blob; a member that published its record before the node knew the run is learnt
    by the read its first refused write starts; one that publishes later is stored at once. Its
    routing table (what hivemind's searches pass through) drops the stranger and never takes it
    back, however often it calls."""
    import functools

    from peers.node import start_dht
    from swarm.transport import BlobServer

    authority, first, second, stranger_id = Identity(), Identity(), Identity(), Identity()
    keys = RunKeys(make_run_id("closed", authority.fingerprint))
    cfg = SwarmConfig(closed=True)
    expires = int(time.time() + 3600)
    honest = start_dht([], signer=authority)
    nodes = [honest]
    try:
        nodes += [start_dht(honest.get_visible_maddrs(), signer=who) for who in (first, second, stranger_id)]
        _, early, late, stranger = nodes

        def writers(key: str) -> list[str]:
            return honest.run_coroutine(functools.partial(_writers_at, key=key))

        def member_record(node, who: Identity) -> None:
            invite = sign_invite(authority, keys.run_id, who.fingerprint, expires)
            assert dht_io.store(node, keys.members, who, MemberRecord(p2p=str(node.peer_id), invite=invite),
                                time.time() + 60)

        member_record(early, first)  # before the honest node knows the run
        install_storage_policy(honest, keys.run_id, cfg)
        claim = LeaseRecord(head=0, claimed_at=time.time())
        dht_io.store(stranger, keys.leases, stranger_id, claim, time.time() + 30, tag="0")
        deadline = time.monotonic() + 15
        while first.fingerprint not in writers(keys.leases) and time.monotonic() < deadline:
            dht_io.store(early, keys.leases, first, claim, time.time() + 30, tag="0")  # a claim is written again
            time.sleep(0.5)
        assert first.fingerprint in writers(keys.leases)
        member_record(late, second)
        dht_io.store(late, keys.leases, second, claim, time.time() + 30, tag="1")
        assert second.fingerprint in writers(keys.leases)  # at its first write
        dht_io.store(stranger, keys.leases, stranger_id, claim, time.time() + 40, tag="0")
        assert stranger_id.fingerprint not in writers(keys.leases) + writers(keys.members)
        # the members' nodes are what it stores at and reads from now: never the stranger's
        asked = honest.run_coroutine(functools.partial(_candidates, key=keys.leases))
        assert str(stranger.peer_id) not in asked and {str(early.peer_id), str(late.peer_id)} <= set(asked)
        stranger.run_coroutine(functools.partial(_ping, peer=str(honest.peer_id)))
        deadline = time.monotonic() + 10
        while str(stranger.peer_id) in (table := honest.run_coroutine(_table)) and time.monotonic() < deadline:
            stranger.run_coroutine(functools.partial(_ping, peer=str(honest.peer_id)))
            time.sleep(0.5)
        assert str(stranger.peer_id) not in table and {str(early.peer_id), str(late.peer_id)} <= set(table), table
        for _ in range(3):
            stranger.run_coroutine(functools.partial(_ping, peer=str(honest.peer_id)))
        time.sleep(0.5)
        assert str(stranger.peer_id) not in honest.run_coroutine(_table)

        server = BlobServer(honest, namespace="t")
        servers = [server] + [BlobServer(node, namespace="t") for node in (early, stranger)]
        try:
            server.serves = Membership(honest, keys, cfg).admits_peer
            server.publish("w", b"x" * 1000)
            assert servers[1].fetch(str(honest.peer_id), "w", timeout=20, max_bytes=1 << 20) == b"x" * 1000
            with pytest.raises(TransferError, match="does not have"):
                servers[2].fetch(str(honest.peer_id), "w", timeout=20, max_bytes=1 << 20)
        finally:
            for s in servers:
                s.shutdown()
    finally:
        for node in nodes:
            node.shutdown()
