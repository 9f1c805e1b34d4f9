"""Real peers in separate processes on 127.0.0.1: they claim heads, train, and merge into the same W.

The protocol's scenarios (late join, stragglers, lease races, resync, stranger records, crashes,
owners that die or lie) run in-process in tests/test_protocol.py, tests/test_reduce.py and
tests/adversarial/; these keep the real thing honest: hivemind DHTs, p2pd, P2P downloads, signals
and process groups. Each run asserts all it can show, as processes are what takes the time."""

from __future__ import annotations

import math
import signal
import time

import pytest

from peers.checkpoint import load_checkpoint
from peers.local_swarm import LocalSwarm, peer_threads
from peers.models import create_lte_model
from peers.simulate import simulate
from peers.training import torch_threads
from swarm import dht_io
from swarm.config import load_config
from swarm.identity import Identity
from swarm.keys import RUNS_KEY, RunKeys, make_run_id
from swarm.schemas import DonorRecord, HashRecord, LeaseRecord, ReadyRecord, RunAnnouncement, RunProgress, RunRecord
from tests.harness import last, rogue_node, wait_role_gone, warnings_of, write_config

pytestmark = [pytest.mark.timeout(420), pytest.mark.xdist_group("processes")]
BOGUS = "ab" * 32


@pytest.fixture
def swarm_factory(tmp_path):
    made = []

    def make(**cfg) -> LocalSwarm:
        swarm = LocalSwarm(tmp_path, write_config(tmp_path / "run.yaml", **cfg))
        made.append(swarm)
        return swarm

    yield make
    for swarm in made:
        swarm.close()


def _rounds_done(n):
    return lambda events: any(e["event"] == "round" and e["new_round"] >= n for e in events)


def _attack_once(dht, identity: Identity, keys: RunKeys, round_: int, victim_p2p: str) -> None:
    """One volley of every attack a node with a key of its own and no lease can make; failures to
    store are expected (that is the defence)."""
    now = time.time()
    for k in range(round_, round_ + 4):
        dht.store(keys.hashes(k), "blocks every vote", now + 1e6)                    # ordinary value
        dht.store(keys.ready(k), {"round": k}, now + 1e6, subkey="rogue")            # unsigned
        dht_io.store(dht, keys.hashes(k), identity, HashRecord(round=k, digest=BOGUS, members=[identity.fingerprint]),
                      now + 300)                                                     # sybil vote, future rounds
        dht_io.store(dht, keys.ready(k), identity, ReadyRecord(round=k, heads=[0, 1], head_steps=99, nbytes=2**40,
                                                                ready_at=0.0, train_seconds=1e9, p2p=victim_p2p),
                      now + 300)                                                     # stale, huge, not its heads
    for head in range(3):
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


def test_three_peers_agree_bit_for_bit_and_match_the_simulation_while_a_rogue_node_hammers_them(swarm_factory):
    """One of them behind NAT (`--client-mode`): it pushes its contribution to the others. They
    train on while each round's bytes move (swarm.overlap), as the simulation models it. Once the
    first round merged, a real hivemind node with a key of its own and no lease writes every kind
    of hostile record, again and again (claims dated far in the past take no head that is being
    trained, but they would take a free one, so it waits for the heads' first merge): every round
    still merges all three, never the rogue, and W is the simulation's, which no attack took part
    in."""
    # nobody is killed here: a fetch that runs into its timeout is a host too busy (2 cores, 9 processes)
    swarm = swarm_factory(heads=3, merge_every=2, rounds=3, min_heads=3, merge_grace=15.0, request_timeout=20.0,
                          overlap=True)
    coordinator = swarm.start_coordinator()
    peers = [swarm.join("peer0"), swarm.join("peer1")]
    # behind NAT, it joins a swarm whose nodes are up (see test_dht_reads.py: a node in client mode
    # that joins before them never learns of them, and most reads miss its records)
    for p in peers:
        p.wait_for(lambda es: any(e["event"] == "joined" for e in es), 120, "joining")
    peers.append(swarm.join("peer2", "--client-mode"))
    keys = RunKeys(swarm.run_id)
    coordinator.wait_for(_rounds_done(1), 180, "round 1")
    attack_from = max(e["new_round"] for e in coordinator.of("round"))
    victim_p2p = last(peers[0], "joined")["p2p"]

    def hammer(dht, identity):
        done = [e["new_round"] for e in coordinator.of("round")]
        _attack_once(dht, identity, keys, max(done, default=0), victim_p2p)

    with rogue_node(swarm, hammer, every=0.25) as (rogue, identity):
        for p in peers:
            assert p.wait(240) == 0, p.tail()
        assert coordinator.wait(60) == 0, coordinator.tail()
        # the attack was real: the rogue's signed records are in the DHT for everyone to read
        assert identity.fingerprint in dht_io.by_writer(dht_io.read(rogue, keys.donors, DonorRecord, time.time()))

    digests = {p.name: last(p, "left")["digest"] for p in peers}
    digests["coordinator"] = last(coordinator, "left")["digest"]
    assert len(set(digests.values())) == 1, digests
    assert sorted(h for p in peers for h in last(p, "heads")["heads"]) == [0, 1, 2]
    honest = {last(p, "joined")["peer"] for p in peers}
    assert all(set(r["members"]) == honest for r in coordinator.of("round")), coordinator.of("round")
    for p in peers:
        rounds = p.of("round")
        assert [r["new_round"] for r in rounds] == [1, 2, 3]
        # forward/backward alone, not the polls of the round in flight between the steps
        assert 0.0 < last(p, "left")["compute_seconds"] < last(p, "left")["time"] - last(p, "joined")["time"]
        assert all(r["merged"] and len(r["members"]) == 3 and not r["missed"] for r in rounds), rounds
        under_attack = [r for r in rounds if r["round"] >= attack_from]
        assert under_attack and not any(r["resynced"] for r in under_attack), (
            f"{p.name}: {[{k: r[k] for k in ('round', 'resynced', 'rejected', 'raw_parts')} for r in under_attack]}\n"
            f"{warnings_of(p)}")

    # The same heads, seeds and data in one process give the same W and replicas, bit for bit (one
    # torch thread in both: CPU kernels split their sums by thread)
    cfg = load_config(swarm.config)
    with torch_threads(peer_threads()):
        sim = simulate(cfg).model
    swarm_model = load_checkpoint(swarm.workdir / "run").model
    assert swarm_model.state_digest() == sim.state_digest() == digests["coordinator"]
    swarm_state, initial = swarm_model.shared_state(), create_lte_model(cfg, []).shared_state()
    moved = max((swarm_state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # training really moved W: the agreement is not the trivial one


def test_an_owner_sigkilled_mid_round_loses_nothing_then_sigterm_ends_every_role_and_the_coordinator_resumes(swarm_factory):
    """Three contributors reduce W between them, two owners per part. One is killed (with its DHT
    and p2pd) once the others started reducing a round it owns parts of. Its parts come from their
    other owner, or raw from the contributions; every survivor ends each round with the
    coordinator's W, its change merged exactly when the agreed record says so, and the dead owner
    counts in no later round. (A standby taking the dead peer's head is protocol logic:
    tests/test_protocol.py.) Then SIGTERM to everyone, whatever phase each is in: all leave in
    seconds, releasing their heads, and no DHT process or p2pd stays behind. The coordinator
    resumes from its run dir: same run id (its key is in the run dir), same P2P address
    (--identity), the round and W of its last checkpoint, written as it left."""
    swarm = swarm_factory(heads=3, merge_every=2, rounds=200, min_heads=3, merge="reduce", merge_grace=6.0)
    identity = str(swarm.workdir / "coordinator.p2p-key")
    coordinator = swarm.start_coordinator("--identity", identity)
    peers = [swarm.join(f"peer{i}", "--throttle", "0.1") for i in range(3)]
    victim, survivors = peers[0], peers[1:]
    victim.wait_for(lambda es: any(e["event"] == "joined" for e in es), 120, "joining")
    victim_peer = last(victim, "joined")["peer"]

    def reducing_with_the_victim(events):
        return any(e["event"] == "reducing" and e["round"] >= 2 and victim_peer in e["members"] for e in events)

    survivors[0].wait_for(reducing_with_the_victim, 180, "a reduced round with the victim as an owner")
    victim.signal_group(signal.SIGKILL)
    killed_round = next(e["round"] for e in survivors[0].of("reducing") if victim_peer in e["members"]
                        and e["round"] >= 2)
    assert wait_role_gone(victim.read()) == []  # its DHT process and p2pd do not outlive it
    survivors[0].wait_for(_rounds_done(killed_round + 3), 120, "three more rounds")
    for p in (*survivors, coordinator):
        p.signal_group(signal.SIGTERM)
    for p in (*survivors, coordinator):
        assert p.wait(20) == 0, p.tail()
        assert wait_role_gone(p.read()) == [], f"{p.name}'s DHT or p2pd still runs"
        assert p is coordinator or last(p, "left")["heads"]

    agreed = {r["new_round"]: r for r in coordinator.of("round")}
    assert sorted(agreed) == list(range(1, len(agreed) + 1)) and len(agreed) >= killed_round + 2, sorted(agreed)
    for p in survivors:
        me = last(p, "joined")["peer"]
        for r in p.of("round"):
            if r["new_round"] not in agreed:  # the round the coordinator was stopped in
                continue
            assert r["digest"] == agreed[r["new_round"]]["digest"], (p.name, r)
            assert r["merged"] == (me in agreed[r["new_round"]]["members"]), r
            assert r["merged"] or r["missed"], r  # an offered change is merged once or carried on, never lost
    assert all(victim_peer not in r["members"] for r in agreed.values() if r["round"] > killed_round)
    # the owner-reduced merge was really in use (the killed round itself may end in a catch-up)
    assert all(any(r["reduced"] for r in p.of("round") if r["round"] < killed_round) for p in survivors)

    saved = last(coordinator, "checkpoint")
    assert saved["round"] == last(coordinator, "left")["round"]
    first_run_id, first_maddrs = swarm.run_id, swarm.maddrs
    coordinator.events.rename(swarm.workdir / "first-coordinator.jsonl")
    resumed = swarm.start_coordinator("--identity", identity)
    started = last(resumed, "started")
    assert started["run_id"] == swarm.run_id == first_run_id
    assert [m.split("/p2p/")[1] for m in swarm.maddrs] == [m.split("/p2p/")[1] for m in first_maddrs]
    assert started["round"] == saved["round"] and started["digest"] == saved["digest"]
