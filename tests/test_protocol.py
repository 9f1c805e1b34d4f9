"""The protocol in one process: real trainers and coordinator on the in-memory DHT and a fake
clock (tests/memswarm.py). Each scenario replays exactly and runs in well under a second of real
time; each ends by checking that every live peer holds the same W."""

from __future__ import annotations

import threading

import pytest

from peers.simulate import simulate
from peers.trainer import Trainer
from swarm.clock import Clock, FakeClock
from swarm.rounds import MergeProtocol
from swarm.schemas import DonorRecord, PeerPhase
from tests.memswarm import MemorySwarm, run_swarm, tiny_config, with_protocol

pytestmark = pytest.mark.timeout(120)


def _round_done(name: str, n: int):
    return lambda s: any(e["new_round"] >= n for e in s[name].events.of("round"))


def _agree(swarm: MemorySwarm, *names: str) -> str:
    digests = swarm.digests(*names)
    assert len(set(digests.values())) == 1, digests
    return next(iter(digests.values()))


def test_peers_merge_every_round_and_match_the_simulation(tmp_path):
    cfg = tiny_config(heads=3, merge_every=2, rounds=4, min_heads=3)
    swarm = run_swarm(cfg, tmp_path, 3)
    assert all(n.state == "finished" for n in swarm.nodes.values())
    _agree(swarm)
    for i in range(3):
        rounds = swarm[f"p{i}"].events.of("round")
        assert [r["new_round"] for r in rounds] == [1, 2, 3, 4]
        assert all(r["merged"] and len(r["members"]) == 3 for r in rounds), rounds
    assert sorted(h for i in range(3) for h in swarm[f"p{i}"].events.last("heads")["heads"]) == [0, 1, 2]
    # The same heads, seeds and data in one process give the same W and replicas, bit for bit, at
    # every round (three heads: the merge scales by 1/3, which rounds)
    sim = simulate(cfg)
    assert [r["digest"] for r in swarm["coordinator"].events.of("round")] == [p.digest for p in sim.history]
    assert swarm["coordinator"].role.protocol.round == cfg.rounds


def test_a_peer_crashing_mid_round_is_survived_and_its_head_taken_by_a_standby(tmp_path):
    cfg = tiny_config(heads=2, merge_every=2, rounds=12)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    victim, survivor = swarm.trainer("victim"), swarm.trainer("survivor")
    swarm.run(until=lambda s: all(s[n].role.model.head_ids for n in ("victim", "survivor")))
    standby = swarm.trainer("standby")
    swarm.run(until=lambda s: s["standby"].events.of("standby") and s["victim"].events.of("ready")
              and s["victim"].events.last("ready")["round"] >= 1 and s["victim"].role.mr is not None)
    victim_head = victim.role.model.head_ids[0]
    killed_round = victim.events.last("ready")["round"]
    swarm.crash("victim")
    swarm.run()
    assert survivor.state == standby.state == "finished"
    _agree(swarm, "survivor", "standby", "coordinator")
    assert standby.events.last("heads")["heads"] == [victim_head]
    assert any(r["merged"] for r in standby.events.of("round") if r["heads"] == [victim_head])
    assert survivor.events.last("round")["new_round"] == cfg.rounds
    later = [r for r in swarm["coordinator"].events.of("round") if r["round"] > killed_round]
    assert later and all(victim.rt.peer not in r["members"] for r in later)


def test_a_peer_joining_at_round_3_catches_up_and_contributes(tmp_path):
    cfg = tiny_config(heads=3, merge_every=2, rounds=10)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    swarm.trainer("early0"), swarm.trainer("early1")
    swarm.run(until=_round_done("coordinator", 3))
    late = swarm.trainer("late")
    swarm.run()
    joined = late.events.of("joined")[0]
    assert joined["round"] >= 3 and joined["downloaded"] > 0
    first_full = next(r for r in late.events.of("round") if not r["missed"])
    assert first_full["merged"] and first_full["round"] <= joined["round"] + 2
    _agree(swarm)


def test_a_slow_peer_misses_rounds_but_no_head_step_is_lost_or_merged_twice(tmp_path):
    cfg = tiny_config(heads=2, merge_every=3, rounds=8)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    fast, slow = swarm.trainer("fast", throttle=0.05), swarm.trainer("slow", throttle=1.5)  # 4.5 s per round > 3 s grace
    swarm.run()
    slow_rounds = slow.events.of("round")
    assert any(r["missed"] for r in slow_rounds), slow_rounds
    missed_at = next(i for i, r in enumerate(slow_rounds) if r["missed"])
    assert any(r["merged"] for r in slow_rounds[missed_at + 1:]), slow_rounds
    # each missed round (one member: all-gathered) was fetched and reduced again, not downloaded as W
    assert slow.role.protocol.state.rounds_replayed >= 1 and slow.role.protocol.state.downloads == 0
    per_round: dict[int, set[int]] = {}
    for node in (swarm["coordinator"], fast, slow):
        for r in node.events.of("round"):
            if not r["missed"]:
                per_round.setdefault(r["round"], set()).add(r["merged_head_steps"])
    assert all(len(v) == 1 for v in per_round.values()), per_round
    merged = sum(v.pop() for v in per_round.values())
    trained = sum(n.events.last("left")["trained_head_steps"] for n in (fast, slow))
    unmerged = sum(n.events.last("left")["unmerged_steps"] * len(n.events.last("left")["heads"]) for n in (fast, slow))
    assert trained == merged + unmerged > 0 and merged > 0, (trained, merged, unmerged)
    _agree(swarm)


def test_a_peer_that_re_syncs_counts_the_steps_of_members_whose_records_came_after_it_settled(tmp_path, monkeypatch):
    """Views of the holders two seconds old shift who sees the slow peer's ready record before its
    window closes: a peer that settled without it re-syncs to the agreed W, and still counts
    the steps that W merged from the agreed members' signed records."""
    from swarm.leases import HeadLeases

    holders = HeadLeases.holders
    monkeypatch.setattr(HeadLeases, "holders", lambda self, max_age=2.0, thorough=False: holders(self, max_age, thorough))
    swarm = MemorySwarm(tiny_config(heads=2, merge_every=3, rounds=4), tmp_path)
    swarm.coordinator()
    fast = swarm.trainer("fast", throttle=0.05)
    swarm.trainer("slow", throttle=1.5)
    swarm.run()
    resynced = [r for r in fast.events.of("round") if r["resynced"] and len(r["members"]) > 1]
    assert resynced, fast.events.of("round")
    by_round = {r["round"]: r["merged_head_steps"] for r in swarm["coordinator"].events.of("round")}
    assert all(r["merged_head_steps"] == by_round[r["round"]] > 0 for r in resynced), (resynced, by_round)
    _agree(swarm)


def test_two_peers_claiming_one_head_at_once_end_with_one_holder(tmp_path):
    cfg = tiny_config(heads=1, merge_every=2, rounds=6)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    a, b = swarm.trainer("a"), swarm.trainer("b")
    swarm.run()
    holders = [n for n in (a, b) if n.events.of("heads") and any(e["heads"] for e in n.events.of("heads"))]
    assert len(holders) == 1, [n.events.of("heads") for n in (a, b)]
    other = b if holders[0] is a else a
    assert other.events.of("standby") and not any(r["merged"] for r in other.events.of("round"))
    assert all(len(r["members"]) == 1 for r in swarm["coordinator"].events.of("round"))
    _agree(swarm, holders[0].name, "coordinator")  # a standby does not follow the rounds
    assert other.state == "finished" and other.role.protocol.state.downloads == 0


def test_a_lapsed_lease_is_reclaimed_as_a_new_claim_and_loses_to_the_peer_that_took_it(tmp_path):
    from swarm.keys import RunKeys, make_run_id
    from swarm.leases import HeadLeases

    swarm = MemorySwarm(tiny_config(heads=1), tmp_path)
    keys = RunKeys(make_run_id("leases", "0" * 20))
    (dht_a, id_a), (dht_b, id_b) = swarm.signing_dht("a"), swarm.signing_dht("b")
    la = HeadLeases(dht_a, keys, id_a, 1, lease_seconds=6.0, settle_seconds=0.5, clock=swarm.clock)
    lb = HeadLeases(dht_b, keys, id_b, 1, lease_seconds=6.0, settle_seconds=0.5, clock=swarm.clock)
    assert la.claim(1) == [0]
    swarm.clock.advance(7.0)  # a stalls past its lease (a long merge, a sleeping laptop)
    assert lb.claim(1) == [0]
    assert la.renew() == [0]  # a's renewal is a new claim: it does not take the head back
    assert lb.holders() == {0: id_b.fingerprint} and not la.held


def test_newcomers_at_round_0_build_w_from_the_seed_and_download_it_only_when_theirs_differs(tmp_path):
    cfg = tiny_config(heads=3, merge_every=2, rounds=3, min_heads=3)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    nodes = [swarm.trainer(f"p{i}") for i in range(3)]
    odd = nodes[2].role.model  # its W0 came out different (another device's kernels, say)
    state = odd.shared_state()
    key = next(k for k in state if k.endswith(".weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.25
    odd.load_shared_state(state)
    swarm.run()
    joined = [n.events.of("joined")[0] for n in nodes]
    assert [j["round"] for j in joined] == [0, 0, 0]
    assert joined[0]["downloaded"] == joined[1]["downloaded"] == 0, joined
    assert joined[2]["downloaded"] > 0, joined
    _agree(swarm)


def test_a_newcomer_that_loses_its_claim_before_round_0_claims_a_free_head_without_waiting_out_a_round(tmp_path):
    """Round 0 cannot start before `min_heads` are held: a peer that lost its first claim and went
    standby must not sit in a round nobody can open while a head is free."""
    cfg = tiny_config(heads=3, merge_every=2, rounds=2, min_heads=3)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    a = swarm.trainer("a")
    swarm.trainer("b")
    swarm.run(until=lambda s: s["a"].role.model.head_ids and s["b"].role.model.head_ids)
    late = swarm.trainer("late")
    taken, claims = a.role.model.head_ids[0], []
    propose = late.role.leases.propose

    def first_on_a_taken_head(count, prefer=None):
        claims.append(count)
        return propose(count, prefer=[taken] if len(claims) == 1 else prefer)

    late.role.leases.propose = first_on_a_taken_head
    start = swarm.clock.now()
    swarm.run(until=lambda s: s["late"].role.model.head_ids)
    assert late.events.of("standby") and len(claims) >= 2  # it lost, followed, then claimed again
    assert swarm.clock.now() - start < cfg.swarm.round_timeout / 4
    swarm.run()
    assert [r["new_round"] for r in swarm["coordinator"].events.of("round")] == [1, 2]
    assert all(len(r["members"]) == 3 for r in swarm["coordinator"].events.of("round"))
    _agree(swarm)


def test_a_peer_with_a_diverged_w_resyncs_to_the_agreed_one(tmp_path):
    cfg = tiny_config(heads=3, merge_every=2, rounds=6, min_heads=3)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    nodes = [swarm.trainer(f"p{i}") for i in range(3)]
    swarm.run(until=_round_done("coordinator", 2))
    broken = nodes[0].role.model
    before = broken.state_digest()
    state = broken.shared_state()
    key = next(k for k in state if k.endswith(".weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.5  # a flipped value in its W (bad RAM, a bug): it no longer matches
    broken.load_shared_state(state)
    assert broken.state_digest() != before
    swarm.run()
    assert any(r["resynced"] for r in nodes[0].events.of("round")), nodes[0].events.of("round")
    _agree(swarm)


def test_sigterm_mid_merge_leaves_within_one_step_and_frees_the_heads(tmp_path):
    cfg = tiny_config(heads=2, merge_every=2, rounds=20)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    a, b = swarm.trainer("a"), swarm.trainer("b", throttle=1.0)  # a waits for b in every merge
    swarm.run(until=lambda s: s["a"].role.phase is PeerPhase.MERGING and s["a"].role.mr is not None)
    swarm.stop("a")
    steps = swarm.steps
    swarm.run(until=lambda s: s["a"].state != "running")
    assert a.state == "stopped" and swarm.steps - steps <= 3
    assert a.events.last("left")["heads"] and swarm["b"].role.leases.holders(max_age=0.0).get(a.events.last("left")["heads"][0]) is None
    swarm.run()
    assert b.state == "finished"
    _agree(swarm, "b", "coordinator")


def test_a_member_that_leaves_before_its_vote_is_read_does_not_hold_the_round_to_its_deadline(tmp_path):
    """Its vote never shows (as when the last volunteers leave a run and take the DHT nodes that
    held their votes with them); once its heads are released, nobody waits for it."""
    from swarm.rounds import MergeProtocol, RoundStep

    class Unvoting(MergeProtocol):
        def _vote(self, mr, members):  # as MergeProtocol's, without publishing the digest
            mr.members = members
            mr.step, mr.deadline = RoundStep.VOTING, self.clock.monotonic() + self.cfg.merge_grace

    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=2)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    swarm.trainer("a", role=with_protocol(Unvoting)), swarm.trainer("b")
    swarm.run(until=lambda s: s["a"].role.mr is not None and s["a"].role.mr.step is RoundStep.VOTING)
    swarm.stop("a")
    swarm.run()
    first = swarm["coordinator"].events.of("round")[0]
    assert sorted(first["members"]) == sorted([swarm["a"].rt.peer, swarm["b"].rt.peer])
    assert first["phases"]["done"] - first["phases"]["merged"] < cfg.swarm.merge_grace, first["phases"]
    assert swarm["b"].state == "finished"
    _agree(swarm, "b", "coordinator")


def test_a_coordinator_resumes_from_its_checkpoint(tmp_path):
    cfg = tiny_config(heads=1, merge_every=2, rounds=8)
    swarm = MemorySwarm(cfg, tmp_path)
    coordinator = swarm.coordinator()
    swarm.trainer("p")
    swarm.run(until=lambda s: any(e["round"] >= 2 for e in s["coordinator"].events.of("checkpoint")))
    swarm.stop("coordinator")
    swarm.run(until=lambda s: s["coordinator"].state != "running")
    saved = coordinator.events.last("checkpoint")
    again = MemorySwarm(cfg, tmp_path)
    resumed = again.coordinator(name="again")
    assert resumed.role.resumed and resumed.role.keys.run_id == coordinator.role.keys.run_id
    assert resumed.role.protocol.round == saved["round"]
    assert resumed.role.model.state_digest() == saved["digest"]
    assert [h.round for h in resumed.role.history] == [h.round for h in coordinator.role.history]


def test_the_status_snapshot_shows_every_peer_its_phase_and_the_head_map(tmp_path):
    from peers.monitor import snapshot

    cfg = tiny_config(heads=3, merge_every=2, rounds=8)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    swarm.trainer("a"), swarm.trainer("b", heads=2)
    swarm.run(until=lambda s: _round_done("coordinator", 2)(s) and s["a"].role.phase is PeerPhase.TRAINING)
    coordinator = swarm["coordinator"].role
    snap = snapshot(coordinator.dht, coordinator.keys, cfg, swarm.clock)
    by_peer = {p["peer"]: p for p in snap["peers"]}
    assert set(by_peer) == {swarm["a"].rt.peer, swarm["b"].rt.peer}
    assert by_peer[swarm["a"].rt.peer]["state"] == "training" and len(by_peer[swarm["b"].rt.peer]["heads"]) == 2
    assert sorted(h["peer"] for h in snap["heads"]) == sorted([swarm["a"].rt.peer] + [swarm["b"].rt.peer] * 2)
    assert snap["round"] >= 2 and snap["history"] and snap["agree"] is True


def _record_stores(swarm, node) -> dict[str, list[tuple[float, dict]]]:
    """key -> (monotonic time, value) of every record `node` stores from now on."""
    stores: dict[str, list[tuple[float, dict]]] = {}
    store = node.rt.dht.store

    def recorded(key, value, *args, **kw):
        if kw.get("return_future"):  # as the swarm asks (the in-memory node answers by calling itself)
            stores.setdefault(key, []).append((swarm.clock.monotonic(), value))
        return store(key, value, *args, **kw)
    node.rt.dht.store = recorded
    return stores


def test_the_list_of_peers_is_rewritten_seldom_and_the_view_shows_the_live_record(tmp_path):
    """Every store into the run's shared list of peers moves the whole list (a DHT store first
    looks its key up): a peer copies its status there every ROSTER_EVERY seconds, and writes it
    more often under its own key, which is what the status view shows."""
    from peers.monitor import snapshot
    from peers.trainer import ROSTER_EVERY, STATUS_EVERY
    from swarm.keys import RunKeys

    cfg = tiny_config(heads=2, merge_every=4, rounds=60, min_heads=2)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    peers = [swarm.trainer(f"p{i}", throttle=0.5) for i in range(2)]
    keys = RunKeys(swarm.run_id)
    stores = _record_stores(swarm, peers[0])
    began = swarm.clock.monotonic()
    swarm.run(until=lambda s: s.clock.monotonic() - began > 4 * ROSTER_EVERY)
    listed, live = stores.get(keys.peers, []), stores.get(keys.status(peers[0].rt.peer), [])
    assert 1 <= len(listed) <= 5 and all(b[0] - a[0] >= ROSTER_EVERY for a, b in zip(listed, listed[1:])), listed
    assert len(live) >= 4 * ROSTER_EVERY / STATUS_EVERY, len(live)
    view = snapshot(swarm["coordinator"].role.dht, keys, cfg, swarm.clock)
    shown = {p["peer"]: p for p in view["peers"]}[peers[0].rt.peer]
    assert shown["time"] == live[-1][1]["time"] > listed[-1][1]["time"]  # the live record, newer than the copy


def test_a_donor_record_is_rewritten_when_w_changes_or_once_a_lease_old(tmp_path):
    """Lease renewals come every third of a lease; the donor record goes out again only when W
    changed since, or when it is a lease old: every store into the shared list moves all of it."""
    from swarm.keys import RunKeys

    cfg = tiny_config(heads=2, merge_every=4, rounds=6, min_heads=2)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    peers = [swarm.trainer(f"p{i}", throttle=2.0) for i in range(2)]
    keys = RunKeys(swarm.run_id)
    stores = _record_stores(swarm, peers[0])
    began = swarm.clock.monotonic()
    swarm.run()
    donors = [(at, DonorRecord.model_validate(value)) for at, value in stores.get(keys.donors, [])]
    written = [(at, r.round, r.digest) for at, r in donors]
    span, lease = swarm.clock.monotonic() - began, cfg.swarm.lease_seconds
    assert span > 6 * lease  # renewals alone would have written about 18 records
    assert {w[1] for w in written} == set(range(7)), written  # every new W is said at once
    repeats = [(a, b) for a, b in zip(written, written[1:]) if a[1:] == b[1:]]
    assert all(b[0] - a[0] >= lease for a, b in repeats), written
    assert len(written) <= 7 + span / lease + 1, (len(written), span)


def test_a_donor_record_is_not_written_for_a_w_that_changed_while_it_was_hashed(tmp_path):
    """A renewal (beside the steps) may announce while a merge lands: a record pairing the old
    round with the new W's digest would stand for a lease, so it is dropped, and the merge's own
    announcement says what W now is."""
    from swarm.keys import RunKeys

    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=1)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    peer = swarm.trainer("p0")
    swarm.run(until=lambda s: s["p0"].role.phase is PeerPhase.TRAINING)
    protocol, keys = peer.role.protocol, RunKeys(swarm.run_id)
    stores = _record_stores(swarm, peer)
    digest = protocol.model.state_digest

    def written():
        donors = [DonorRecord.model_validate(value) for _, value in stores.get(keys.donors, [])]
        return [(r.round, r.digest) for r in donors]

    def merge_lands_meanwhile():
        protocol.state.round += 1  # as `apply_pending` does between its two version bumps
        protocol.state.version += 1
        return digest()
    protocol.state._announced, protocol.state._digest = ((-1, -1), float("-inf")), (-1, "")  # nothing said or hashed yet
    protocol.model.state_digest = merge_lands_meanwhile
    protocol.announce()
    assert written() == []
    protocol.model.state_digest = digest
    protocol.announce()
    assert written() == [(protocol.round, digest())]


def test_w_is_hashed_once_per_version_and_again_after_a_change_during_its_hash(tmp_path):
    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=1)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    peer = swarm.trainer("p0")
    swarm.run(until=lambda s: s["p0"].role.phase is PeerPhase.TRAINING)
    protocol, digest = peer.role.protocol, peer.role.protocol.model.state_digest
    hashed = []

    def counted(changes: bool):
        def hash_w():
            hashed.append(protocol.state.version)
            if changes:
                protocol.state.version += 1  # W changes while it is hashed
            return digest()
        return hash_w
    protocol.state._digest = (-1, "")
    protocol.model.state_digest = counted(changes=True)
    protocol.w_digest()
    protocol.model.state_digest = counted(changes=False)
    assert protocol.w_digest() == protocol.w_digest() == protocol.w_digest() == digest()
    assert hashed == [hashed[0], hashed[0] + 1]  # hashed again after the change, then kept


class _CountsClosedAsks(MergeProtocol):
    """Records when each round was asked whether it closed (each ask reads the round's votes)."""

    def closed(self, r):
        self.asks.setdefault(r, []).append(self.clock.monotonic())
        return super().closed(r)


def test_an_open_round_asks_whether_it_closed_at_most_every_second(tmp_path):
    """A peer waiting in an open round reads the ready records at every poll, and the votes (which
    exist only once someone merged) at most every CLOSED_EVERY seconds; the rounds still close
    when every holder is ready, and a straggler still finds a round closed."""
    from swarm.rounds import CLOSED_EVERY

    class Peer(with_protocol(_CountsClosedAsks)):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.protocol.asks = {}

    cfg = tiny_config(heads=3, merge_every=4, rounds=4, min_heads=3, merge_grace=8.0)  # the slow peer is in time
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    fast = [swarm.trainer(f"p{i}", role=Peer, throttle=0.05) for i in range(2)]
    slow = swarm.trainer("slow", role=Peer, throttle=1.0)
    swarm.run()
    assert all(n.state == "finished" for n in swarm.nodes.values())
    _agree(swarm)
    for node in fast + [slow]:
        asks = node.role.protocol.asks
        assert asks and all(b - a >= CLOSED_EVERY - 1e-9 for times in asks.values() for a, b in zip(times, times[1:])), asks
    # the fast peers waited seconds for the slow one in every round, asking now and then
    waits = [len(node.role.protocol.asks.get(r, [])) for node in fast for r in range(4)]
    assert max(waits) >= 3, waits
    for node in fast + [slow]:
        assert [r["new_round"] for r in node.events.of("round")] == [1, 2, 3, 4]


@pytest.mark.parametrize("eager", [False, True])
def test_with_overlap_peers_train_through_rounds_and_still_match_the_simulation(tmp_path, eager):
    """swarm.overlap: each round's merge lands while the peers train the next T steps and applies
    at their end, as the simulation models it (with its eager correction too); the delay really
    changes the result."""
    cfg = tiny_config(heads=3, merge_every=2, rounds=5, min_heads=3, overlap=True, eager=eager)
    swarm = run_swarm(cfg, tmp_path, 3)
    assert all(n.state == "finished" for n in swarm.nodes.values())
    _agree(swarm)
    for i in range(3):
        rounds = swarm[f"p{i}"].events.of("round")
        assert [r["new_round"] for r in rounds] == [1, 2, 3, 4, 5]
        assert all(r["merged"] and len(r["members"]) == 3 and not r["resynced"] for r in rounds), rounds
        # each round reports the steps its contribution carried, not those trained while it was in flight
        assert [r["steps"] for r in rounds] == [2] * 5 and all(r["loss"] == r["loss"] for r in rounds), rounds
    # the merges applied a round late are the simulation's, bit for bit, and not the prompt ones
    got = swarm["coordinator"].role.model.state_digest()
    assert got == simulate(cfg).model.state_digest()
    assert got != simulate(cfg.with_overrides({"swarm.overlap": False, "swarm.eager": False})).model.state_digest()
    assert got != simulate(cfg.with_overrides({"swarm.eager": not eager})).model.state_digest()


@pytest.mark.parametrize("peers,part_owners,overlap", [(3, 2, False), (3, 1, True), (2, 2, False)])
def test_fragments_are_merged_in_turn_and_the_swarm_still_matches_the_simulation(tmp_path, peers, part_owners,
                                                                                 overlap):
    """lte.fragments: each round merges one fragment of W's parts (each part every k rounds, the
    last round all of them), its contributions carry that fragment alone, and the swarm (owner-
    reduced with two owners per part, or one checked by the coordinator, with overlap and its eager
    correction; all-gathered with two peers) still trains the simulation's model bit for bit."""
    cfg = tiny_config(heads=peers, merge_every=2, rounds=5, min_heads=peers, part_owners=part_owners,
                      overlap=overlap, eager=overlap).with_overrides({"lte.fragments": 3})
    swarm = run_swarm(cfg, tmp_path, peers)
    assert all(n.state == "finished" for n in swarm.nodes.values())
    _agree(swarm)
    for i in range(peers):
        rounds = swarm[f"p{i}"].events.of("round")
        assert [r["new_round"] for r in rounds] == [1, 2, 3, 4, 5]
        assert all(r["merged"] and len(r["members"]) == peers and not r["resynced"] for r in rounds), rounds
        sent = [e["nbytes"] for e in swarm[f"p{i}"].events.of("ready")]
        assert len(sent) == 5 and max(sent[:4]) < 0.6 * sent[4], sent  # a fragment's bytes, then all of W's
    got = swarm["coordinator"].role.model.state_digest()
    assert got == simulate(cfg).model.state_digest()
    assert got != simulate(cfg.with_overrides({"lte.fragments": 1})).model.state_digest()


def test_a_peer_never_waits_for_the_dhts_answer_to_its_status_record(tmp_path):
    """Status records are written for the status view alone: a step does not stall on the DHT's
    answer (on a saturated home link a store's round trip takes a good part of a second)."""
    from concurrent.futures import Future

    from swarm.keys import RunKeys

    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=2)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    peers = [swarm.trainer(f"p{i}") for i in range(2)]
    unanswered = []
    for node in peers:
        dht, store = node.rt.dht, node.rt.dht.store

        def never_answered(key, *args, return_future=False, _store=store, **kw):
            keys = RunKeys(swarm.run_id)
            if key == keys.peers or key.startswith(keys.status("")):
                unanswered.append(Future())  # the nodes never answer
                return unanswered[-1] if return_future else unanswered[-1].result()
            return _store(key, *args, return_future=return_future, **kw)
        dht.store = never_answered
    swarm.run()
    assert all(n.state == "finished" for n in swarm.nodes.values())
    assert len(unanswered) >= 2 * 3 and not any(f.done() for f in unanswered)
    for node in peers:
        assert [r["new_round"] for r in node.events.of("round")] == [1, 2, 3]
    _agree(swarm)


class _FirstInThread(FakeClock):
    """A fake clock that runs the first work handed to `background` in a real thread (and the rest
    in line, so that the run still replays alike)."""

    def __init__(self):
        super().__init__()
        self.threads = 0

    def background(self, work):
        if self.threads == 0:
            self.threads += 1
            return Clock.background(self, work)
        return super().background(work)


class _WaitsForAStep(MergeProtocol):
    """A round's poll that, off the training thread, waits (a bounded real time) until its peer
    has trained a step, and records how many it trained meanwhile; it advances nothing itself."""

    def poll(self, mr):
        if threading.current_thread() is threading.main_thread():
            return super().poll(mr)
        self.stepped.clear()
        before = self.trainer.trained_head_steps
        self.stepped.wait(30.0)
        self.steps_during_poll.append(self.trainer.trained_head_steps - before)
        return None


class _StepSignal(with_protocol(_WaitsForAStep)):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.protocol.trainer, self.protocol.stepped, self.protocol.steps_during_poll = self, threading.Event(), []

    def _train_step(self):
        wait = super()._train_step()
        self.protocol.stepped.set()
        return wait


def test_with_overlap_a_round_is_polled_beside_the_training_steps(tmp_path):
    """swarm.overlap: a round's poll (its downloads take seconds on a home link) runs beside the
    peer's steps, not between them: a poll that waits for a step gets one. (The one test here with
    a real thread: the clock runs that one poll in it.)"""
    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=2, overlap=True)
    swarm = MemorySwarm(cfg, tmp_path, clock=_FirstInThread())
    swarm.coordinator()
    peers = [swarm.trainer(f"p{i}", role=_StepSignal) for i in range(2)]
    swarm.run()
    assert all(n.state == "finished" for n in swarm.nodes.values())
    _agree(swarm)
    waited = [n.role.protocol.steps_during_poll for n in peers]
    assert sorted(len(w) for w in waited) == [0, 1], waited  # the one poll run in a thread
    assert sum(waited, [])[0] >= 1, waited
    for n in peers:
        assert [r["new_round"] for r in n.events.of("round")] == [1, 2, 3]


class _InThreads(FakeClock):
    """A fake clock that runs work handed to `background` in real threads."""

    def background(self, work):
        return Clock.background(self, work)


class _RenewsAfterAStep(Trainer):
    """A peer whose lease renewal, off the training thread, first waits (a bounded real time) until
    the peer has trained a step, and records how many it trained meanwhile."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.stepped, self.steps_during_renewal = threading.Event(), []

    def _keep_leases(self):
        if threading.current_thread() is not threading.main_thread():
            self.stepped.clear()
            before = self.trained_head_steps
            self.stepped.wait(30.0)
            self.steps_during_renewal.append(self.trained_head_steps - before)
        super()._keep_leases()

    def _train_step(self):
        wait = super()._train_step()
        self.stepped.set()
        return wait


def test_leases_are_renewed_beside_the_training_steps(tmp_path):
    """A renewal due in the middle of a peer's T steps runs beside them (on a busy home link its
    store and read take a good part of a second each), and the swarm still ends alike."""
    cfg = tiny_config(heads=2, merge_every=8, rounds=3, min_heads=2)
    swarm = MemorySwarm(cfg, tmp_path, clock=_InThreads())
    swarm.coordinator()
    peers = [swarm.trainer(f"p{i}", role=_RenewsAfterAStep, throttle=0.5) for i in range(2)]
    swarm.run()
    assert all(n.state == "finished" for n in swarm.nodes.values())
    _agree(swarm)
    for n in peers:
        assert n.role.steps_during_renewal and all(s >= 1 for s in n.role.steps_during_renewal), \
            n.role.steps_during_renewal
        assert [r["new_round"] for r in n.events.of("round")] == [1, 2, 3]


def test_a_rounds_decision_stays_readable_when_its_vote_is_hidden(tmp_path):
    """The coordinator's vote is written once, at the nodes then nearest to its key; newcomers
    nearer to the key hide it from every later read. Its progress record repeats the latest
    decisions, so a peer deciding late still takes the coordinator's word, not a majority of
    whichever holders' votes it happened to read."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=5)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    peer = swarm.trainer("p0")
    swarm.trainer("p1")
    swarm.run(until=_round_done("coordinator", 3))
    agreement = peer.role.protocol.agreement
    keys = peer.role.keys
    for r in (0, 1):
        with swarm.net.lock:  # every vote of the round gone, as if displaced
            swarm.net.storage.pop(keys.hashes(r), None)
        assert agreement.authority_vote(r, thorough=True) is None
        decided = agreement.decided(r)
        coordinator_round = next(e for e in swarm["coordinator"].events.of("round") if e["round"] == r)
        assert decided is not None and decided.round == r
        assert decided.digest == coordinator_round["digest"]
        assert decided.members == sorted(coordinator_round["members"]) and decided.members
    assert agreement.decided(cfg.rounds + 3) is None


def test_a_close_quorum_holds_a_round_open_for_a_slow_holder(tmp_path):
    """swarm.close_quorum: past its window, a round waits until that share of the holders are
    ready (bounded by the round's timeout); without it the slow peer misses round after round."""
    members = {}
    for quorum in (0.0, 1.0):
        cfg = tiny_config(heads=2, merge_every=3, rounds=4, close_quorum=quorum)
        swarm = MemorySwarm(cfg, tmp_path / str(quorum))
        swarm.coordinator()
        swarm.trainer("fast", throttle=0.05)
        swarm.trainer("slow", throttle=1.5)  # 4.5 s a round against a 3 s window
        swarm.run()
        members[quorum] = [len(r["members"]) for r in swarm["coordinator"].events.of("round")]
        _agree(swarm)
    assert min(members[0.0]) == 1, members  # the window closed without the slow peer
    assert members[1.0][1:] == [2] * (len(members[1.0]) - 1), members  # every round after the first has both


def test_peers_wait_for_a_slow_coordinator_while_its_progress_record_says_it_is_up(tmp_path):
    """Past the grace and a round's timeout, a round still waits for the coordinator's vote while
    the coordinator is up: a peer that merged on alone could keep, and spread, a W the coordinator
    then decides otherwise."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=4, min_heads=2)
    swarm = MemorySwarm(cfg, tmp_path)
    coordinator = swarm.coordinator()
    peers = [swarm.trainer("p0"), swarm.trainer("p1")]
    hold = 2.5 * cfg.swarm.round_timeout
    times: dict[str, float] = {}
    original = coordinator.role.protocol.poll

    def slow(mr):  # the coordinator takes long over round 1 (its links are busy), still publishing progress
        if mr.round == 1:
            times.setdefault("held", swarm.clock.now())
            if swarm.clock.now() - times["held"] < hold:
                mr.wait = cfg.swarm.poll_seconds
                return None
        result = original(mr)
        if result is not None and mr.round == 1:
            times.setdefault("coordinator", swarm.clock.now())
        return result
    coordinator.role.protocol.poll = slow
    for node in peers:
        emit = node.events.emit

        def stamped(event, _name=node.name, _emit=emit, **fields):
            if event == "round" and fields.get("round") == 1:
                times.setdefault(_name, swarm.clock.now())
            _emit(event, **fields)
        node.events.emit = stamped
    swarm.run()
    assert times["coordinator"] - times["held"] >= hold
    assert all(times[p.name] >= times["coordinator"] for p in peers), times  # nobody decided round 1 before it
    _agree(swarm)


def _progress_while_the_coordinator_blocks(tmp_path, cfg, block) -> None:
    """Run a swarm whose coordinator, entering round 1, first calls `block(swarm, coordinator)`
    (time passing in its transfers); the coordinator's progress record as a peer then reads it
    must still be there, at round 1, and the swarm must end agreed."""
    swarm = MemorySwarm(cfg, tmp_path)
    coordinator = swarm.coordinator()
    peer = swarm.trainer("p0")
    swarm.trainer("p1")
    original = coordinator.role.protocol.poll
    seen = []

    def blocking(mr):
        if mr.round == 1 and not seen:
            block(swarm, coordinator)
            seen.append(peer.role.protocol.agreement.progress())
        return original(mr)
    coordinator.role.protocol.poll = blocking
    swarm.run()
    assert seen and seen[0] is not None and seen[0].round == 1
    _agree(swarm)


def test_the_coordinators_progress_record_outlives_a_round_that_blocks_on_transfers(tmp_path):
    """A coordinator recomputing every part waits on every member's uplink, for minutes on home
    links; peers read a lapsed progress record as a coordinator gone and decide without it. The
    record is rewritten between transfers."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=4, min_heads=2)

    def twelve_leases(swarm, coordinator):  # the round's transfers, with its keep-alive between them
        for _ in range(12):
            swarm.clock.advance(cfg.swarm.lease_seconds)
            coordinator.role.protocol.keep_alive()
    _progress_while_the_coordinator_blocks(tmp_path, cfg, twelve_leases)


def test_standbys_fetch_nothing_of_the_rounds_until_one_wins_a_head_and_catches_up(tmp_path):
    """Volunteers beyond the heads stand by without following the rounds (at scale most of them
    do: following would cost the members' uplinks a round's parts each); the one that takes a
    freed head brings its W up to date first, contributes, and ends on the swarm's W."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=10)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    swarm.trainer("p0"), swarm.trainer("p1")
    swarm.run(until=lambda s: all(s[n].role.model.head_ids for n in ("p0", "p1")))
    standbys = [swarm.trainer("s0"), swarm.trainer("s1")]
    swarm.run(until=_round_done("coordinator", 4))
    assert all(n.events.of("standby") and not n.events.of("round") for n in standbys)
    assert all(n.role.server.bytes_received == 0 for n in standbys)  # neither W nor any round's blobs
    swarm.stop("p0")
    swarm.run()
    taker = next(n for n in standbys if n.events.of("heads"))
    rest = next(n for n in standbys if n is not taker)
    assert any(r["merged"] for r in taker.events.of("round"))
    assert taker.role.protocol.state.downloads + taker.role.protocol.state.rounds_replayed >= 1
    _agree(swarm, "p1", taker.name, "coordinator")
    assert rest.state == "finished" and rest.role.server.bytes_received == 0


def test_the_coordinators_progress_record_outlives_one_download_tried_twice(tmp_path):
    """Between two of the coordinator's keep-alives lies at most one download and its retry: with a
    request timeout long against the lease (a run tuned for slow links), the record lives that long."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=3, min_heads=2, request_timeout=20.0, round_timeout=40.0)

    def one_download_tried_twice(swarm, coordinator):  # a lease passes, then a fetch and its retry time out
        coordinator.role.protocol.keep_alive()
        swarm.clock.advance(cfg.swarm.lease_seconds + 2 * cfg.swarm.request_timeout - 1)
    _progress_while_the_coordinator_blocks(tmp_path, cfg, one_download_tried_twice)
