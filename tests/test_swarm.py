"""Real peers in separate processes on 127.0.0.1: they claim heads, train, and merge into the same W."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from peers.models import create_lte_model
from peers.simulate import simulate
from swarm.config import load_config
from peers.local_swarm import LocalSwarm
from tests.harness import last, wait_group_gone, write_config

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
    swarm = swarm_factory(heads=3, merge_every=2, rounds=4, min_heads=3, merge_grace=15.0)
    coordinator = swarm.start_coordinator()
    peers = [swarm.join(f"peer{i}") for i in range(3)]
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
        assert all(r["merged"] and len(r["members"]) == 3 for r in rounds), rounds

    # The same heads, seeds and data in one process give the same W (up to float rounding).
    cfg = load_config(swarm.config)
    sim_state = simulate(cfg).model.shared_state()
    swarm_state = load_file(str(swarm.workdir / "run" / "state.safetensors"))
    initial = create_lte_model(cfg, []).shared_state()
    assert set(swarm_state) == set(sim_state)
    for key, tensor in sim_state.items():
        torch.testing.assert_close(swarm_state[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    moved = max((swarm_state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # training really moved W: the agreement is not the trivial one


def test_a_peer_killed_mid_round_is_survived_and_its_head_reclaimed(swarm_factory):
    swarm = swarm_factory(heads=2, merge_every=2, rounds=14)
    coordinator = swarm.start_coordinator()
    victim, survivor = swarm.join("victim", "--throttle", "0.3"), swarm.join("survivor", "--throttle", "0.3")
    for p in (victim, survivor):
        p.wait_for(lambda es: any(e["event"] == "heads" and e["heads"] for e in es), 120, "a head")
    standby = swarm.join("standby", "--throttle", "0.3")
    standby.wait_for(lambda es: any(e["event"] == "standby" for e in es), 120, "standby")
    victim_head = last(victim, "heads")["heads"][0]
    # Kill it (and its DHT and p2pd) right after it offered a contribution: mid merge round.
    victim.wait_for(lambda es: any(e["event"] == "ready" and e["round"] >= 1 for e in es), 120, "a ready contribution")
    victim.signal_group(signal.SIGKILL)
    killed_round = last(victim, "ready")["round"]

    assert survivor.wait(300) == 0, survivor.tail()
    assert standby.wait(120) == 0, standby.tail()
    assert coordinator.wait(60) == 0, coordinator.tail()
    final = {p.name: last(p, "left")["digest"] for p in (survivor, standby, coordinator)}
    assert len(set(final.values())) == 1, final
    assert last(standby, "heads")["heads"] == [victim_head]
    assert any(r["merged"] for r in standby.of("round") if r["heads"] == [victim_head])
    assert last(survivor, "round")["new_round"] == 14
    # The rounds after the kill went on without the victim.
    later = [r for r in coordinator.of("round") if r["round"] > killed_round]
    assert later and all(victim.of("joined")[0]["peer"] not in r["members"] for r in later)


def test_a_peer_joining_at_round_3_catches_up_and_contributes(swarm_factory):
    # ~2 s per round, so the run is still going when the late peer is up (~10 s to start)
    swarm = swarm_factory(heads=3, merge_every=2, rounds=30)
    coordinator = swarm.start_coordinator()
    early = [swarm.join(f"early{i}", "--throttle", "0.5") for i in range(2)]
    coordinator.wait_for(_rounds_done(3), 180, "round 3")
    late = swarm.join("late", "--throttle", "0.5")
    for p in (*early, late):
        assert p.wait(300) == 0, p.tail()
    assert coordinator.wait(60) == 0
    joined = late.of("joined")[0]
    assert joined["round"] >= 3
    rounds = late.of("round")
    first_full = next(r for r in rounds if not r["missed"])
    assert first_full["merged"], rounds
    assert first_full["round"] <= joined["round"] + 2
    final = {p.name: last(p, "left")["digest"] for p in (*early, late, coordinator)}
    assert len(set(final.values())) == 1, final


def test_a_slow_peer_misses_rounds_but_no_head_step_is_lost(swarm_factory):
    swarm = swarm_factory(heads=2, merge_every=3, rounds=8)
    coordinator = swarm.start_coordinator()
    fast = swarm.join("fast")
    slow = swarm.join("slow", "--throttle", "1.3")  # ~4 s per round; others wait only merge_grace = 3 s
    for p in (fast, slow):
        assert p.wait(300) == 0, p.tail()
    assert coordinator.wait(60) == 0
    slow_rounds = slow.of("round")
    assert any(r["missed"] for r in slow_rounds), slow_rounds
    missed_at = next(i for i, r in enumerate(slow_rounds) if r["missed"])
    assert any(r["merged"] for r in slow_rounds[missed_at + 1:]), slow_rounds  # its change made it later

    # Every head-step trained is merged exactly once, or still unmerged when the run ended.
    merged_per_round = {}
    for proc in (coordinator, fast, slow):
        for r in proc.of("round"):
            if not r["missed"]:
                merged_per_round.setdefault(r["round"], set()).add(r["merged_head_steps"])
    assert all(len(v) == 1 for v in merged_per_round.values()), merged_per_round  # everyone agrees per round
    merged = sum(v.pop() for v in merged_per_round.values())
    trained = sum(last(p, "left")["trained_head_steps"] for p in (fast, slow))
    unmerged = sum(last(p, "left")["unmerged_steps"] * len(last(p, "left")["heads"]) for p in (fast, slow))
    assert trained == merged + unmerged, (trained, merged, unmerged)
    assert trained > 0 and merged > 0
    assert len({last(p, "left")["digest"] for p in (fast, slow, coordinator)}) == 1


def test_sigterm_leaves_cleanly_and_the_coordinator_resumes_from_its_run_dir(swarm_factory):
    swarm = swarm_factory(heads=2, merge_every=2, rounds=40)
    identity = str(swarm.workdir / "coordinator.key")
    coordinator = swarm.start_coordinator("--identity", identity)
    peer = swarm.join("peer", "--throttle", "0.2")
    peer.wait_for(_rounds_done(2), 120, "two merge rounds")
    peer.signal_group(signal.SIGTERM)
    assert peer.wait(30) == 0, peer.tail()
    assert last(peer, "left")["heads"]
    assert wait_group_gone(peer.handle.pid) == []  # its DHT process and p2pd too

    coordinator.wait_for(lambda es: any(e["event"] == "checkpoint" and e["round"] >= 2 for e in es), 60, "a checkpoint")
    coordinator.signal_group(signal.SIGTERM)
    assert coordinator.wait(30) == 0, coordinator.tail()
    saved = last(coordinator, "checkpoint")
    first_run_id, first_maddrs = swarm.run_id, swarm.maddrs
    coordinator.events.rename(swarm.workdir / "first-coordinator.jsonl")
    resumed = swarm.start_coordinator("--identity", identity)
    started = last(resumed, "started")
    assert started["run_id"] == swarm.run_id == first_run_id
    assert [m.split("/p2p/")[1] for m in swarm.maddrs] == [m.split("/p2p/")[1] for m in first_maddrs]  # same peer id
    assert started["round"] == saved["round"] and started["digest"] == saved["digest"]


def test_joining_an_unreachable_swarm_is_one_line_and_nonzero(tmp_path):
    import subprocess

    from tests.conftest import CLI, ROOT

    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRzhwoMVtyVwTj6gRYNKTqUryrE8Ru1rgsyZNUZfzi78w"
    proc = subprocess.run([*CLI, "join", "--initial-peers", dead], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "initial peers" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
