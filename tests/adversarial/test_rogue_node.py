"""A rogue node against a real swarm on loopback: a real hivemind DHT node with a key of its own and
no lease writes every kind of hostile record, again and again, while a coordinator and two peers
(real processes) train. The honest peers must keep merging every round with each other, stay
alive, agree on W, and never count the rogue."""

from __future__ import annotations

import math
import time

import pytest

from peers.local_swarm import LocalSwarm
from swarm import dht_io
from swarm.identity import Identity
from swarm.keys import RUNS_KEY, RunKeys, make_run_id
from swarm.schemas import DonorRecord, HashRecord, LeaseRecord, ReadyRecord, RunAnnouncement, RunProgress, RunRecord
from tests.harness import last, rogue_node, write_config

pytestmark = pytest.mark.timeout(300)
BOGUS = "ab" * 32


def _attack_once(dht, identity: Identity, keys: RunKeys, round_: int, victim_p2p: str) -> None:
    """One volley of every attack; failures to store are expected (that is the defence)."""
    now = time.time()
    for k in range(round_, round_ + 4):
        dht.store(keys.hashes(k), "blocks every vote", now + 1e6)                    # ordinary value
        dht.store(keys.ready(k), {"round": k}, now + 1e6, subkey="rogue")            # unsigned
        dht_io.store(dht, keys.hashes(k), identity, HashRecord(round=k, digest=BOGUS, members=[identity.fingerprint]),
                      now + 300)                                                     # sybil vote, future rounds
        dht_io.store(dht, keys.ready(k), identity, ReadyRecord(round=k, heads=[0, 1], head_steps=99, nbytes=2**40,
                                                                ready_at=0.0, train_seconds=1e9, p2p=victim_p2p),
                      now + 300)                                                     # stale, huge, not its heads
    for head in range(2):
        dht_io.store(dht, keys.leases, identity, LeaseRecord(head=head, claimed_at=-1e308), now + 5, tag=str(head))
        dht.store(keys.leases, {"head": head, "claimed_at": -1e308}, math.inf, subkey=identity.subkey(str(head)))
    dht_io.store(dht, keys.donors, identity, DonorRecord(round=10**9, digest=BOGUS, p2p=str(dht.peer_id)), now + 300)
    dht_io.store(dht, keys.progress, identity, RunProgress(round=10**9, digest=BOGUS, rounds_total=10**9, samples=0,
                                                            history=[]), now + 300)
    dht_io.store(dht, keys.run, identity, RunRecord(run_id=keys.run_id, config={"model": {}}, coordinator=keys.coordinator,
                                                     created=now), now + 300)
    dht_io.store(dht, RUNS_KEY, identity, RunAnnouncement(created=1e18, model="evil"), now + 300, tag=keys.run_id)
    theirs = make_run_id("newest-run", identity.fingerprint)
    dht_io.store(dht, RUNS_KEY, identity, RunAnnouncement(created=1e18, model="evil"), now + 300, tag=theirs)


def test_a_rogue_node_hammering_a_live_swarm_changes_nothing(tmp_path):
    swarm = LocalSwarm(tmp_path, write_config(tmp_path / "run.yaml", heads=2, merge_every=2, rounds=10, min_heads=2))
    try:
        coordinator = swarm.start_coordinator()
        peers = [swarm.join(f"peer{i}", "--throttle", "0.1") for i in range(2)]
        coordinator.wait_for(lambda es: any(e["event"] == "round" and e["new_round"] >= 2 for e in es), 180, "round 2")
        keys = RunKeys(swarm.run_id)
        victim_p2p = last(peers[0], "joined")["p2p"]
        attack_from = max(e["new_round"] for e in coordinator.of("round"))

        def hammer(dht, identity):
            done = [e["new_round"] for e in coordinator.of("round")]
            _attack_once(dht, identity, keys, max(done, default=0), victim_p2p)

        with rogue_node(swarm, hammer) as (rogue, identity):
            for p in peers:
                assert p.wait(240) == 0, p.tail()
            assert coordinator.wait(60) == 0, coordinator.tail()
            # the attack was real: the rogue's signed records are in the DHT for everyone to read
            assert identity.fingerprint in dht_io.by_writer(dht_io.read(rogue, keys.donors, DonorRecord, time.time()))
    finally:
        swarm.close()

    rounds = coordinator.of("round")
    honest = {last(p, "joined")["peer"] for p in peers}
    assert [r["new_round"] for r in rounds] == list(range(1, 11))
    assert all(set(r["members"]) == honest for r in rounds), [r["members"] for r in rounds]
    assert all(identity.fingerprint not in r["members"] for r in rounds)
    final = {p.name: last(p, "left")["digest"] for p in (*peers, coordinator)}
    assert len(set(final.values())) == 1, final
    for p in peers:  # each peer's rounds under attack: merged, never missed, never re-synced
        during = [r for r in p.of("round") if r["round"] >= attack_from]
        assert during and all(r["merged"] and not r["missed"] and not r["resynced"] for r in during), during
    before = [r["time"] for r in rounds if r["new_round"] <= attack_from]
    during = [r["time"] for r in rounds if r["round"] >= attack_from]
    print(f"rogue node: {len(before) - 1} rounds in {before[-1] - before[0]:.1f}s before the attack, "
          f"{len(during)} rounds in {during[-1] - before[-1]:.1f}s under attack")
