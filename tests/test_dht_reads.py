"""Reading a round's records from the few DHT nodes nearest to their key (`swarm.read_replicas`) over
a real nine-node DHT on loopback: every record is still seen, and a read moves a fraction of the
bytes of hivemind's full search, in which every node holding the key sends all of it."""

from __future__ import annotations

import functools
import time

import pytest
from hivemind.utils import get_dht_time

from peers.node import signing_validators
from swarm import schemas
from swarm.identity import Identity
from swarm.schemas import PartRecord

pytestmark = pytest.mark.timeout(120)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
NODES = 9


def _loopback_bytes() -> int:
    for line in open("/proc/net/dev"):
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[0])
    raise RuntimeError("no loopback interface")


@pytest.fixture(scope="module")
def swarm_dht():
    import hivemind

    identities = [Identity() for _ in range(NODES)]
    nodes = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, record_validators=signing_validators(identities[0]))]
    initial = nodes[0].get_visible_maddrs()
    nodes += [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=initial,
                           record_validators=signing_validators(identity)) for identity in identities[1:]]
    yield nodes, identities
    for node in nodes:
        node.shutdown()


def test_a_read_from_two_replicas_sees_every_record_for_a_fraction_of_the_bytes(swarm_dht):
    nodes, identities = swarm_dht
    key, now = "wire-test/parts/3", get_dht_time()
    members = sorted(identity.fingerprint for identity in identities[1:])
    written = set()
    for owner in range(1, NODES):  # 16 parts, two owners each: every owner announces 4, as with 8 peers
        reductions = [(part, tuple(members), "ab" * 32) for part in range(16) if owner - 1 in (part % 8, (part + 1) % 8)]
        record = PartRecord.of(3, reductions, "Qm" + "x" * 44)
        assert schemas.store(nodes[owner], key, identities[owner], record, now + 60)
        written.add(("", identities[owner].fingerprint))
    time.sleep(1.0)

    def reads(replicas: int, times: int = 10) -> tuple[float, set]:
        before, seen = _loopback_bytes(), set()
        for _ in range(times):
            seen = set(schemas.read(nodes[0], key, PartRecord, get_dht_time(), replicas=replicas))
        time.sleep(0.5)  # stores hivemind makes after a search (caching at the nearest node) land too
        return (_loopback_bytes() - before) / times, seen

    full, seen_full = reads(0)
    near, seen_near = reads(2)
    assert seen_full == written and seen_near == written
    assert near < 0.7 * full, (near, full)


async def _holds(_dht, node, key: str) -> tuple[bytes, int]:
    """This node's id and how many records its own storage holds under `key` (run in its process)."""
    from hivemind.dht.routing import DHTID

    entry = node.protocol.storage.get(DHTID.generate(source=key))
    return node.node_id.to_bytes(), 0 if entry is None else len(entry[0])


def test_a_store_goes_straight_to_the_nearest_nodes_and_every_reader_finds_it(swarm_dht):
    """In a swarm smaller than a k-bucket a node knows every node: it stores at the key's nearest
    nodes without hivemind's search, which pulls the key's whole dictionary from every node it
    asks. Every node then reads every record from the two nodes nearest the key, the records sit
    on the nearest nodes only, and a store moves a fraction of the bytes of hivemind's."""
    from hivemind.dht.routing import DHTID

    nodes, identities = swarm_dht
    key, now = "wire-test/ready/5", get_dht_time()
    written = set()
    for writer in range(1, NODES):
        record = PartRecord(round=5, members=[], reductions=[], p2p="Qm" + "x" * 44)
        assert schemas.store(nodes[writer], key, identities[writer], record, now + 60)
        written.add(("", identities[writer].fingerprint))
    for reader in nodes:
        assert set(schemas.read(reader, key, PartRecord, get_dht_time(), replicas=2)) == written
    key_id = DHTID.generate(source=key)
    held = {DHTID.from_bytes(node_id): count
            for node_id, count in (node.run_coroutine(functools.partial(_holds, key=key)) for node in nodes)}
    nearest = sorted(held, key=key_id.xor_distance)[:5]
    assert all(held[n] == NODES - 1 for n in nearest), (held, nearest)
    assert not any(held[n] for n in held if n not in nearest), held

    def store_bytes(store, times: int = 10) -> float:
        before = _loopback_bytes()
        for i in range(times):
            store(PartRecord(round=5, members=[], reductions=[], p2p="Qm" + "y" * (44 + i)))
        time.sleep(0.5)
        return (_loopback_bytes() - before) / times

    ours = store_bytes(lambda record: schemas.store(nodes[1], key, identities[1], record, get_dht_time() + 60))
    theirs = store_bytes(lambda record: nodes[1].store(key, schemas.dump(record), get_dht_time() + 60,
                                                       subkey=identities[1].subkey()))
    assert ours < 0.5 * theirs, (ours, theirs)
    assert set(schemas.read(nodes[0], key, PartRecord, get_dht_time(), replicas=2)) == written


def test_a_node_in_client_mode_stores_only_at_nodes_that_others_can_reach(swarm_dht):
    """Nobody can connect to a node in client mode: a copy it kept would be one of the 5 replicas
    in name only. Its records go to the 5 nearest reachable nodes, where every reader finds them."""
    import hivemind

    nodes, _ = swarm_dht
    identity = Identity()
    client = hivemind.DHT(start=True, client_mode=True, initial_peers=nodes[0].get_visible_maddrs(),
                          record_validators=signing_validators(identity))
    try:
        key = "wire-test/ready/client"
        assert schemas.store(client, key, identity, PartRecord(round=5, members=[], reductions=[], p2p="Qm" + "z" * 44),
                             get_dht_time() + 60)
        assert client.run_coroutine(functools.partial(_holds, key=key))[1] == 0
        held = [node.run_coroutine(functools.partial(_holds, key=key))[1] for node in nodes]
        assert sorted(held) == [0] * (NODES - 5) + [1] * 5, held
        for reader in nodes:
            seen = set(schemas.read(reader, key, PartRecord, get_dht_time(), replicas=2))
            assert seen == {("", identity.fingerprint)}
    finally:
        client.shutdown()


def test_a_round_polls_its_records_from_two_replicas_and_reads_its_members_from_every_node(tmp_path, monkeypatch):
    """The in-memory swarm, every DHT read recorded with the nodes it asks: the ready records and
    the holders that decide a round's members are read thoroughly once per round, every other poll
    narrowly."""
    from swarm.memnet import MemoryDHT
    from tests.memswarm import MemorySwarm, tiny_config

    asked: list[tuple[str, int]] = []
    get = MemoryDHT.get

    def recording_get(self, key, latest=True, return_future=False, **kwargs):
        if return_future:  # as `schemas.read` asks; the in-memory DHT then calls get again, synchronously
            asked.append((key, kwargs.get("beam_size", 0)))
        return get(self, key, latest, return_future, **kwargs)

    monkeypatch.setattr(MemoryDHT, "get", recording_get)
    rounds = 3
    mem = MemorySwarm(tiny_config(heads=2, merge_every=2, rounds=rounds, min_heads=2), tmp_path)
    mem.coordinator()
    mem.trainer("p0"), mem.trainer("p1")
    mem.run()
    assert len(set(mem.digests().values())) == 1
    keys = mem["p0"].role.keys
    for r in range(rounds):
        ready = [beam for key, beam in asked if key == keys.ready(r)]
        assert ready.count(0) >= 3 and ready.count(2) > ready.count(0), ready  # each member settles once
        assert {beam for key, beam in asked if key in (keys.parts(r), keys.hashes(r))} == {2}
    # the holders are read thoroughly where they decide (a round closing early, its members), twice
    # a round at most for each of the 3 nodes; every other lease read is narrow
    leases = [beam for key, beam in asked if key == keys.leases]
    assert set(leases) == {0, 2} and leases.count(0) <= 2 * 3 * rounds, leases
