"""Reading a round's records from the few DHT nodes nearest to their key (`swarm.read_replicas`) over
a real nine-node DHT on loopback: every record is still seen, and a read moves a fraction of the
bytes of hivemind's full search, in which every node holding the key sends all of it. The nodes
answer such reads through `dht_io.serve_reads` (without the neighbours hivemind appends to every
answer), except one, which is asked as hivemind asks."""

from __future__ import annotations

import functools
import time

import pytest
from hivemind.utils import get_dht_time

from peers.node import signing_validators
from swarm import dht_io, schemas
from swarm.identity import Identity
from swarm.schemas import PartRecord

pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("dht_reads")]  # one nine-node DHT
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
NODES = 9
LEGACY = NODES - 1  # the fixture's node without the read handler


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
    for node in nodes[:LEGACY]:
        node.run_coroutine(dht_io.serve_reads)
    yield nodes, identities
    for node in nodes:
        node.shutdown()


def test_a_read_from_two_replicas_sees_every_record_for_a_fraction_of_the_bytes(swarm_dht):
    """Two replicas and all five see every record; both move less than hivemind's search, in which
    every node it visits sends the whole key."""
    nodes, identities = swarm_dht
    key, now = "wire-test/parts/3", get_dht_time()
    members = sorted(identity.fingerprint for identity in identities[1:])
    written = set()
    for owner in range(1, NODES):  # 16 parts, two owners each: every owner announces 4, as with 8 peers
        reductions = [(part, tuple(members), "ab" * 32) for part in range(16) if owner - 1 in (part % 8, (part + 1) % 8)]
        record = PartRecord.of(3, reductions, "Qm" + "x" * 44)
        assert dht_io.store(nodes[owner], key, identities[owner], record, now + 60)
        written.add(("", identities[owner].fingerprint))
    time.sleep(1.0)

    def reads(read, times: int = 10) -> tuple[float, set]:
        before, seen = _loopback_bytes(), set()
        for _ in range(times):
            seen = read()
        time.sleep(0.5)  # stores hivemind makes after a search (caching at the nearest node) land too
        return (_loopback_bytes() - before) / times, seen

    searched, _ = reads(lambda: nodes[0].get(key, latest=True))
    every, seen_every = reads(lambda: set(dht_io.read(nodes[0], key, PartRecord, get_dht_time(), replicas=0)))
    near, seen_near = reads(lambda: set(dht_io.read(nodes[0], key, PartRecord, get_dht_time(), replicas=2)))
    assert seen_every == written and seen_near == written
    assert near < 0.7 * every < 0.7 * searched, (near, every, searched)


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
        assert dht_io.store(nodes[writer], key, identities[writer], record, now + 60)
        written.add(("", identities[writer].fingerprint))
    for reader in nodes:
        assert set(dht_io.read(reader, key, PartRecord, get_dht_time(), replicas=2)) == written
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

    ours = store_bytes(lambda record: dht_io.store(nodes[1], key, identities[1], record, get_dht_time() + 60))
    theirs = store_bytes(lambda record: nodes[1].store(key, schemas.dump(record), get_dht_time() + 60,
                                                       subkey=identities[1].subkey()))
    assert ours < 0.5 * theirs, (ours, theirs)
    assert set(dht_io.read(nodes[0], key, PartRecord, get_dht_time(), replicas=2)) == written


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
        assert dht_io.store(client, key, identity, PartRecord(round=5, members=[], reductions=[], p2p="Qm" + "z" * 44),
                             get_dht_time() + 60)
        assert client.run_coroutine(functools.partial(_holds, key=key))[1] == 0
        held = [node.run_coroutine(functools.partial(_holds, key=key))[1] for node in nodes]
        assert sorted(held) == [0] * (NODES - 5) + [1] * 5, held
        for reader in nodes:
            seen = set(dht_io.read(reader, key, PartRecord, get_dht_time(), replicas=2))
            assert seen == {("", identity.fingerprint)}
    finally:
        client.shutdown()


async def _ask_straight(_dht, node, peer_id, key: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(found a value, neighbours listed, bytes) of `peer_id`'s answer to `dht_io.serve_reads`'s
    handler and of its answer to hivemind's rpc_find, for `key` (run in the asking node's process)."""
    from hivemind.dht.routing import DHTID
    from hivemind.proto import dht_pb2

    request = dht_pb2.FindRequest(keys=[DHTID.generate(source=key).to_bytes()], peer=node.protocol.node_info)
    ours = await node.protocol.p2p.call_protobuf_handler(peer_id, dht_io.READ_HANDLER, request, dht_pb2.FindResponse)
    theirs = await node.protocol.get_stub(peer_id).rpc_find(request)
    return tuple((int(r.results[0].type == dht_pb2.FOUND_DICTIONARY), len(r.results[0].nearest_node_ids),
                  r.ByteSize()) for r in (ours, theirs))


async def _forget(_dht, node, key: str) -> None:
    """Drop what this node holds at `key` (run in its process)."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    for storage in (node.protocol.storage, node.protocol.cache):
        if key_id in storage:
            del storage[key_id]


async def _plant(_dht, node, key: str, subkey: bytes, value: bytes, expiration: float) -> bool:
    """Put a value straight into this node's storage, past its validators (run in its process)."""
    from hivemind.dht.routing import DHTID

    return node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, value, expiration)


def _node_id(node) -> bytes:
    return node.run_coroutine(functools.partial(_holds, key="-"))[0]


def test_a_poll_is_answered_straight_without_the_neighbours_hivemind_lists(swarm_dht):
    """hivemind's rpc_find lists up to a k-bucket of nearest nodes in every answer, for a search to
    go on; a poll that knows the nearest nodes needs none of them, and its answers carry none."""
    from hivemind.dht.routing import DHTID

    nodes, identities = swarm_dht
    key, now = "wire-test/votes/7", get_dht_time()
    written = set()
    for writer in range(1, 5):
        assert dht_io.store(nodes[writer], key, identities[writer], PartRecord(round=7, members=[], reductions=[],
                                                                                 p2p="Qm" + "v" * 44), now + 60)
        written.add(("", identities[writer].fingerprint))
    key_id = DHTID.generate(source=key)
    holder = min((n for n in range(LEGACY) if n != 0), key=lambda n: key_id.xor_distance(DHTID.from_bytes(_node_id(nodes[n]))))
    ours, theirs = nodes[0].run_coroutine(functools.partial(_ask_straight, peer_id=nodes[holder].peer_id, key=key))
    assert ours[:2] == (1, 0) and theirs[0] == 1 and theirs[1] >= NODES - 2, (ours, theirs)
    # the same records, without a node id and a peer id (some 60 bytes) for each other node
    assert ours[2] < theirs[2] - (NODES - 2) * 50, (ours, theirs)
    assert set(dht_io.read(nodes[0], key, PartRecord, get_dht_time(), replicas=2)) == written


def test_a_node_without_the_read_handler_is_asked_as_hivemind_asks(swarm_dht):
    """A node of a release without `serve_reads` answers through rpc_find: when only it holds a
    key, a poll finds the records there."""
    nodes, identities = swarm_dht
    key, now = "wire-test/ready/legacy", get_dht_time()
    assert dht_io.store(nodes[1], key, identities[1], PartRecord(round=1, members=[], reductions=[],
                                                                  p2p="Qm" + "l" * 44), now + 60)
    held = [entry for node in nodes for entry in node.run_coroutine(functools.partial(_entries, key=key))]
    assert held
    for node in nodes:
        node.run_coroutine(functools.partial(_forget, key=key))
    assert dht_io.read(nodes[0], key, PartRecord, get_dht_time(), replicas=NODES) == {}
    subkey, value, expiration = held[0]
    assert nodes[LEGACY].run_coroutine(functools.partial(_plant, key=key, subkey=subkey, value=value,
                                                         expiration=expiration))
    assert set(dht_io.read(nodes[0], key, PartRecord, get_dht_time(), replicas=NODES)) == {("", identities[1].fingerprint)}


async def _entries(_dht, node, key: str) -> list[tuple[bytes, bytes, float]]:
    """(subkey, signed value, expiration) of what this node holds at `key` (run in its process)."""
    from hivemind.dht.routing import DHTID

    entry = node.protocol.storage.get(DHTID.generate(source=key))
    return [] if entry is None else [(subkey, item.value, item.expiration_time) for subkey, item in entry.value.items()]


def test_a_forged_record_in_a_nodes_answer_is_dropped(swarm_dht):
    """The two nodes nearest to a key hand out a record its writer never signed (planted in their
    storage past their validators) beside a genuine one: the reader's own validators check every
    entry, the forgery never surfaces and the genuine record is not lost with it."""
    from hivemind.dht.routing import DHTID

    nodes, identities = swarm_dht
    ids = [DHTID.from_bytes(_node_id(node)) for node in nodes]

    def nearest(key: str) -> list[int]:
        return sorted(range(NODES), key=lambda n: DHTID.generate(source=key).xor_distance(ids[n]))[:2]

    # a key whose two nearest nodes both answer through the read handler (one node is excluded:
    # such a key always exists), read by a node that is neither of them
    key = next(k for k in (f"wire-test/ready/forged{i}" for i in range(1000)) if LEGACY not in nearest(k))
    reader = next(n for n in range(NODES) if n not in nearest(key))
    writer, forger = [n for n in range(NODES) if n != reader][:2]
    now = get_dht_time()
    assert dht_io.store(nodes[writer], key, identities[writer], PartRecord(round=2, members=[], reductions=[],
                                                                            p2p="Qm" + "f" * 44), now + 60)
    forged = PartRecord(round=2, members=[], reductions=[], p2p="Qm" + "g" * 44)
    value = nodes[reader].run_coroutine(functools.partial(_serialize, value=schemas.dump(forged))) + b"[sig]" + bytes(64)
    for n in nearest(key):
        assert nodes[n].run_coroutine(functools.partial(_plant, key=key, subkey=identities[forger].subkey(),
                                                        value=value, expiration=now + 60))
    for replicas in (2, NODES):
        seen = dht_io.read(nodes[reader], key, PartRecord, get_dht_time(), replicas=replicas)
        assert ("", identities[forger].fingerprint) not in seen and ("", identities[writer].fingerprint) in seen, seen


async def _serialize(_dht, node, value) -> bytes:
    return node.protocol.serializer.dumps(value)


def test_a_round_polls_its_records_from_two_replicas_and_reads_its_members_from_the_store_replicas(tmp_path, monkeypatch):
    """The in-memory swarm, every DHT read recorded with the nodes it asks: the ready records and
    the holders that decide a round's members are read thoroughly (a search of the 5 nodes that
    every record is stored at) once per round, every other poll narrowly."""
    from swarm.memnet import MemoryDHT
    from tests.memswarm import MemorySwarm, tiny_config

    asked: list[tuple[str, int]] = []
    get = MemoryDHT.get

    def recording_get(self, key, latest=True, return_future=False, **kwargs):
        if return_future:  # as `dht_io.read` asks; the in-memory DHT then calls get again, synchronously
            asked.append((key, kwargs["beam_size"]))
        return get(self, key, latest, return_future, **kwargs)

    monkeypatch.setattr(MemoryDHT, "get", recording_get)
    rounds = 3
    mem = MemorySwarm(tiny_config(heads=2, merge_every=2, rounds=rounds, min_heads=2), tmp_path)
    mem.coordinator()
    mem.trainer("p0"), mem.trainer("p1")
    mem.run()
    assert len(set(mem.digests().values())) == 1
    keys, thorough = mem["p0"].role.keys, dht_io.STORE_REPLICAS
    for r in range(rounds):
        ready = [beam for key, beam in asked if key == keys.ready(r)]
        assert ready.count(thorough) >= 3 and ready.count(2) > ready.count(thorough), ready  # each member settles once
        assert {beam for key, beam in asked if key in (keys.parts(r), keys.hashes(r))} == {2}
    # the holders are read thoroughly where they decide (a round closing early, its members), twice
    # a round at most for each of the 3 nodes; every other lease read is narrow
    leases = [beam for key, beam in asked if key == keys.leases]
    assert set(leases) == {thorough, 2} and leases.count(thorough) <= 2 * 3 * rounds, leases


def test_a_poll_takes_the_next_nearest_node_for_each_that_left():
    """The two nodes nearest to a key leave without a word (still in every routing table): a poll
    from two replicas asks the next nearest instead, and finds the records there."""
    import hivemind
    from hivemind.dht.routing import DHTID

    identities = [Identity() for _ in range(6)]
    nodes = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, record_validators=signing_validators(identities[0]))]
    nodes += [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=nodes[0].get_visible_maddrs(),
                           record_validators=signing_validators(identity)) for identity in identities[1:]]
    try:
        for node in nodes:
            node.run_coroutine(dht_io.serve_reads)
        ids = [DHTID.from_bytes(_node_id(node)) for node in nodes]
        key = "wire-test/leases/left"
        nearest = sorted(range(6), key=lambda n: DHTID.generate(source=key).xor_distance(ids[n]))
        # the farthest node reads (it holds no copy: records go to the 5 nearest), the third writes
        reader, writer = nearest[5], nearest[2]
        assert dht_io.store(nodes[writer], key, identities[writer], PartRecord(round=4, members=[], reductions=[],
                                                                                p2p="Qm" + "n" * 44), get_dht_time() + 60)
        for n in nearest[:2]:
            nodes[n].shutdown()
        for _ in range(2):  # and again, once the reader knows they are gone
            seen = dht_io.read(nodes[reader], key, PartRecord, get_dht_time(), replicas=2)
            assert set(seen) == {("", identities[writer].fingerprint)}, seen
    finally:
        for node in nodes:
            if node.is_alive():
                node.shutdown()



def test_a_reader_looks_at_a_bounded_number_of_one_writers_records_under_a_key(swarm_dht):
    """A stranger writing hundreds of subkeys under a key the swarm polls: each read checks and
    parses at most MAX_SUBKEYS_PER_WRITER of them, and still finds every other writer's record."""
    nodes, identities = swarm_dht
    key, now = "wire-test/leases/junk", get_dht_time()
    import hivemind

    junk = Identity()  # a node of its own, signing with a key of its own
    flooder = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=nodes[0].get_visible_maddrs(),
                           record_validators=signing_validators(junk))
    try:
        for i in range(dht_io.MAX_SUBKEYS_PER_WRITER + 16):
            dht_io.store(flooder, key, junk, PartRecord(round=1, members=[], reductions=[], p2p="Qm" + "j" * 44),
                         now + 60, tag=f"junk{i:04d}", wait=False)
        assert dht_io.store(nodes[1], key, identities[1], PartRecord(round=1, members=[], reductions=[],
                                                                      p2p="Qm" + "h" * 44), now + 60)
        time.sleep(0.5)
        seen = dht_io.read(nodes[2], key, PartRecord, get_dht_time())
        writers = [who for _, who in seen]
        assert identities[1].fingerprint in writers
        assert 0 < writers.count(junk.fingerprint) <= dht_io.MAX_SUBKEYS_PER_WRITER
    finally:
        flooder.shutdown()


def test_two_nodes_that_chose_ids_nearest_to_a_key_and_answer_empty_do_not_eclipse_polls():
    """Strangers can choose node ids next to a key and answer every read of it with nothing. A
    poll asks 2 of the 5 nearest nodes at random, not the 2 nearest: most polls see the records,
    and a thorough read (all 5) always does."""
    import hivemind
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import RecordValidatorBase

    class RefuseAll(RecordValidatorBase):
        def validate(self, record) -> bool:
            return False

        def sign_value(self, record) -> bytes:
            return record.value

        def strip_value(self, record) -> bytes:
            return record.value

    key = "wire-test/leases/eclipse"
    key_id = DHTID.generate(source=key)
    identities = [Identity() for _ in range(4)]
    nodes = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, record_validators=signing_validators(identities[0]))]
    initial = nodes[0].get_visible_maddrs()
    nodes += [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=initial,
                           record_validators=signing_validators(identity)) for identity in identities[1:]]
    # joining through every honest node, the strangers are in every honest node's routing table
    everyone = [maddr for node in nodes for maddr in node.get_visible_maddrs()]
    eclipse = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=everyone, node_id=DHTID(key_id ^ (i + 1)),
                            record_validators=[RefuseAll()]) for i in range(2)]
    try:
        for node in nodes:
            node.run_coroutine(dht_io.serve_reads)
        ids = [DHTID.from_bytes(_node_id(node)) for node in nodes]
        reader = max(range(4), key=lambda n: key_id.xor_distance(ids[n]))  # holds no copy of its own
        writer = (reader + 1) % 4
        assert dht_io.store(nodes[writer], key, identities[writer], PartRecord(round=4, members=[], reductions=[],
                                                                                p2p="Qm" + "e" * 44), get_dht_time() + 60)
        polls = [dht_io.read(nodes[reader], key, PartRecord, get_dht_time(), replicas=2) for _ in range(20)]
        assert sum(bool(seen) for seen in polls) >= 10  # 2 of 5 at random: both strangers 1 time in 10
        assert set(dht_io.read(nodes[reader], key, PartRecord, get_dht_time())) == {("", identities[writer].fingerprint)}
    finally:
        for node in nodes + eclipse:
            node.shutdown()


# Not strict: how many of its records a reader misses depends on which nodes it happened to learn
# of before its reads went straight to the nearest ones, which varies from run to run.
@pytest.mark.xfail(strict=False, reason=(
    "a node in client mode stores at the nodes it knows, and learns of no others while its reads go "
    "straight to the nodes it knows (their answers carry no neighbours): one that joined before the "
    "other peers' nodes knows only the first node for good, and most reads miss its records (in a "
    "loopback swarm: the others never see its head claimed and wait for min_heads while it merges alone)"))
def test_a_node_in_client_mode_that_joined_before_the_others_still_stores_where_readers_look():
    """A peer behind NAT may start before the other peers' nodes join the run's first node: its
    records must still reach the nodes nearest to their key, where every reader looks."""
    import hivemind

    identities = [Identity() for _ in range(6)]
    first = hivemind.DHT(start=True, host_maddrs=LOOPBACK, record_validators=signing_validators(identities[0]))
    client = hivemind.DHT(start=True, client_mode=True, initial_peers=first.get_visible_maddrs(),
                          record_validators=signing_validators(identities[1]))
    others = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=first.get_visible_maddrs(),
                           record_validators=signing_validators(identity)) for identity in identities[2:]]
    try:
        for node in (first, *others):
            node.run_coroutine(dht_io.serve_reads)
        unseen = []
        for k in range(2):
            key = f"wire-test/leases/client-{k}"
            for _ in range(2):  # a claim, then its renewal
                assert dht_io.store(client, key, identities[1], PartRecord(round=1, members=[], reductions=[],
                                                                            p2p="Qm" + "c" * 44), get_dht_time() + 60)
                time.sleep(0.2)
            unseen += [(k, n) for n, reader in enumerate((first, *others))
                       if not dht_io.read(reader, key, PartRecord, get_dht_time(), replicas=2)]
        assert not unseen, unseen
    finally:
        for node in (client, *others, first):
            node.shutdown()


async def _forget_everyone(_dht, node) -> int:
    """Runs in a DHT's process: drop every node from the routing table, as failed calls do."""
    table = node.protocol.routing_table
    for uid in list(table.uid_to_peer_id):
        del table[uid]
    return len(table.uid_to_peer_id)


async def _known(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def test_a_node_that_lost_every_neighbour_bootstraps_again_from_its_initial_peers(monkeypatch):
    """hivemind never bootstraps again: a reader whose neighbours all failed it once would read
    every key as empty until it restarted. It dials its initial peers again and reads as before."""
    from peers.node import start_dht

    monkeypatch.setattr(dht_io, "REBOOTSTRAP_EVERY", 1.0)  # before the nodes start: their processes fork with it
    writer_identity = Identity()
    writer = start_dht([], signer=writer_identity)
    reader = start_dht(writer.get_visible_maddrs(), client_mode=True, signer=Identity())
    try:
        key, record = "rebootstrap-test", schemas.DonorRecord(round=0, digest="0" * 64, p2p="Qmwriter")
        assert dht_io.store(writer, key, writer_identity, record, get_dht_time() + 60)
        assert dht_io.read(reader, key, schemas.DonorRecord, get_dht_time())
        assert reader.run_coroutine(_forget_everyone) == 0
        assert dht_io.read(reader, key, schemas.DonorRecord, get_dht_time()) == {}  # what a lost node sees
        deadline = time.monotonic() + 4 * dht_io.REBOOTSTRAP_EVERY + 10
        while reader.run_coroutine(_known) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dht_io.read(reader, key, schemas.DonorRecord, get_dht_time())
    finally:
        reader.shutdown()
        writer.shutdown()
