"""Reading a round's records from the few DHT nodes nearest to their key (`swarm.read_replicas`) over
a real nine-node DHT on loopback: every record is still seen, and a read moves a fraction of the
bytes of hivemind's full search, in which every node holding the key sends all of it."""

from __future__ import annotations

import time

import pytest
from hivemind.utils import get_dht_time

from peers.node import signing_validators
from swarm import schemas
from swarm.identity import Identity
from swarm.schemas import PartRecord, Reduction

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
        reductions = [Reduction(part=part, members=members, digest="ab" * 32)
                      for part in range(16) if owner - 1 in (part % 8, (part + 1) % 8)]
        record = PartRecord(round=3, reductions=reductions, p2p="Qm" + "x" * 44)
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
