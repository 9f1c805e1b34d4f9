"""Real peers in separate processes on 127.0.0.1: they claim heads, train, and merge into the same W.

The protocol's scenarios (late join, stragglers, lease races, resync, stranger records) run
in-process in tests/test_protocol.py; these keep the real thing honest: hivemind DHTs, p2pd, P2P
downloads, signals and process groups."""

from __future__ import annotations

import signal

import pytest
import torch
from peers.checkpoint import load_checkpoint
from peers.models import create_lte_model
from peers.simulate import simulate
from swarm.config import load_config
from peers.local_swarm import LocalSwarm
from tests.harness import last, wait_role_gone, write_config

pytestmark = pytest.mark.timeout(420)


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


def test_three_peers_agree_bit_for_bit_and_match_the_simulation(swarm_factory):
    """One of them behind NAT (`--client-mode`): it pushes its contribution to the others. They
    train on while each round's bytes move (swarm.overlap), as the simulation models it."""
    swarm = swarm_factory(heads=3, merge_every=2, rounds=4, min_heads=3, merge_grace=15.0, overlap=True)
    coordinator = swarm.start_coordinator()
    peers = [swarm.join("peer0"), swarm.join("peer1"), swarm.join("peer2", "--client-mode")]
    for p in peers:
        assert p.wait(240) == 0, p.tail()
    assert coordinator.wait(60) == 0, coordinator.tail()

    digests = {p.name: last(p, "left")["digest"] for p in peers}
    digests["coordinator"] = last(coordinator, "left")["digest"]
    assert len(set(digests.values())) == 1, digests
    assert sorted(h for p in peers for h in last(p, "heads")["heads"]) == [0, 1, 2]
    for p in peers:
        rounds = p.of("round")
        assert [r["new_round"] for r in rounds] == [1, 2, 3, 4]
        # forward/backward alone, not the polls of the round in flight between the steps
        assert 0.0 < last(p, "left")["compute_seconds"] < last(p, "left")["time"] - last(p, "joined")["time"]
        assert all(r["merged"] and len(r["members"]) == 3 for r in rounds), rounds

    # The same heads, seeds and data in one process give the same W (up to float rounding).
    cfg = load_config(swarm.config)
    sim_state = simulate(cfg).model.shared_state()
    swarm_state = load_checkpoint(swarm.workdir / "run").model.shared_state()
    initial = create_lte_model(cfg, []).shared_state()
    assert set(swarm_state) == set(sim_state)
    for key, tensor in sim_state.items():
        torch.testing.assert_close(swarm_state[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    moved = max((swarm_state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # training really moved W: the agreement is not the trivial one


def test_an_owner_sigkilled_mid_round_loses_and_doubles_nothing(swarm_factory):
    """Three contributors reduce W between them, two owners per part: one is killed (with its DHT
    and p2pd) once the others started reducing a round it owns parts of. Its parts come from
    their other owner, or raw from the contributions; every survivor ends each round with the
    coordinator's W, its change merged exactly when the agreed record says so, and the dead
    owner counts in no later round."""
    swarm = swarm_factory(heads=3, merge_every=2, rounds=6, min_heads=3, merge="reduce", merge_grace=6.0)
    coordinator = swarm.start_coordinator()
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
    assert wait_role_gone(victim.read()) == []
    for p in survivors:
        assert p.wait(240) == 0, p.tail()
    assert coordinator.wait(60) == 0, coordinator.tail()

    agreed = {r["new_round"]: r for r in coordinator.of("round")}
    assert sorted(agreed) == list(range(1, 7))
    for p in survivors:
        me = last(p, "joined")["peer"]
        for r in p.of("round"):
            assert r["digest"] == agreed[r["new_round"]]["digest"], (p.name, r)
            assert r["merged"] == (me in agreed[r["new_round"]]["members"]), r
            assert r["merged"] or r["missed"], r  # an offered change is merged once or carried on, never lost
    assert all(victim_peer not in r["members"] for r in agreed.values() if r["round"] > killed_round)
    # the owner-reduced merge was really in use (the killed round itself may end in a catch-up)
    assert all(any(r["reduced"] for r in p.of("round") if r["round"] < killed_round) for p in survivors)


def test_a_peer_killed_mid_round_is_survived_then_sigterm_ends_every_role_and_the_coordinator_resumes(swarm_factory):
    swarm = swarm_factory(heads=2, merge_every=2, rounds=200)
    identity = str(swarm.workdir / "coordinator.p2p-key")
    coordinator = swarm.start_coordinator("--identity", identity)
    victim, survivor = swarm.join("victim", "--throttle", "0.2"), swarm.join("survivor", "--throttle", "0.2")
    for p in (victim, survivor):
        p.wait_for(lambda es: any(e["event"] == "heads" and e["heads"] for e in es), 120, "a head")
    standby = swarm.join("standby", "--throttle", "0.2")
    standby.wait_for(lambda es: any(e["event"] == "standby" for e in es), 120, "standby")
    victim_head = last(victim, "heads")["heads"][0]
    # Kill it (and its DHT and p2pd) right after it offered a contribution: mid merge round.
    victim.wait_for(lambda es: any(e["event"] == "ready" and e["round"] >= 1 for e in es), 120, "a ready contribution")
    victim.signal_group(signal.SIGKILL)
    killed_round = last(victim, "ready")["round"]
    assert wait_role_gone(victim.read()) == []  # its DHT process and p2pd do not outlive it
    standby.wait_for(lambda es: any(e["event"] == "round" and e["merged"] and e["heads"] == [victim_head] for e in es),
                     120, "the standby merging the victim's head")
    # The swarm goes on; then SIGTERM to everyone, whatever phase each is in: all leave in seconds,
    # releasing their heads, and no DHT process or p2pd stays behind.
    survivor.wait_for(_rounds_done(killed_round + 3), 120, "three more rounds")
    for p in (survivor, standby, coordinator):
        p.signal_group(signal.SIGTERM)
    for p in (survivor, standby, coordinator):
        assert p.wait(20) == 0, p.tail()
        assert wait_role_gone(p.read()) == [], f"{p.name}'s DHT or p2pd still runs"
    assert last(survivor, "left")["heads"] and last(standby, "left")["heads"] == [victim_head]
    later = [r for r in coordinator.of("round") if r["round"] > killed_round]
    assert later and all(victim.of("joined")[0]["peer"] not in r["members"] for r in later)
    # Every round each of them merged, they merged to the same W.
    by_round = {}
    for p in (survivor, standby, coordinator):
        for r in p.of("round"):
            by_round.setdefault(r["new_round"], set()).add(r["digest"])
    assert by_round and all(len(d) == 1 for d in by_round.values()), by_round

    # The coordinator resumes from its run dir: same run id (its key is in the run dir), same
    # P2P address (--identity), the round and W of its last checkpoint, written as it left.
    saved = last(coordinator, "checkpoint")
    assert saved["round"] == last(coordinator, "left")["round"]
    first_run_id, first_maddrs = swarm.run_id, swarm.maddrs
    coordinator.events.rename(swarm.workdir / "first-coordinator.jsonl")
    resumed = swarm.start_coordinator("--identity", identity)
    started = last(resumed, "started")
    assert started["run_id"] == swarm.run_id == first_run_id
    assert [m.split("/p2p/")[1] for m in swarm.maddrs] == [m.split("/p2p/")[1] for m in first_maddrs]
    assert started["round"] == saved["round"] and started["digest"] == saved["digest"]
