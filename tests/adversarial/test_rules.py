"""Every trust rule of the protocol against the attack it stops, in one process on the in-memory DHT
(hivemind's storage rules and validators) and a fake clock. Each swarm test runs the same honest
peers twice, with and without the attack, and asserts that the honest peers kept merging every
round, agree on W, and (where the attacker holds no head) end with exactly the W of the run
without the attack."""

from __future__ import annotations

import math

import pytest
import torch
from hivemind.utils.serializer import MSGPackSerializer

from peers.trainer import Trainer
from swarm import dht_io, schemas
from swarm.identity import Identity
from swarm.memnet import MemoryDHT
from swarm.schemas import (DonorRecord, HashRecord, LeaseRecord, PartRecord, ReadyRecord, Reduction, RoundSummary,
                           RunAnnouncement, RunProgress, RunRecord)
from tests.memswarm import MemorySwarm, tiny_config

pytestmark = pytest.mark.timeout(120)

ROUNDS = 8
BOGUS = "ab" * 32  # a well-formed digest of nothing


def _config(**swarm):
    return tiny_config(heads=3, merge_every=2, rounds=ROUNDS, min_heads=3, **swarm)


def _honest_run(tmp_path, name: str, attack=None, at_round: int = 2, **swarm) -> MemorySwarm:
    """Coordinator and three one-head peers; `attack(swarm)` runs once the coordinator reached
    `at_round` (and may return a callable to run after every later step)."""
    mem = MemorySwarm(_config(**swarm), tmp_path / name)
    mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}")
    if attack is not None:
        mem.run(until=lambda s: any(e["new_round"] >= at_round for e in s["coordinator"].events.of("round")))
        attack(mem)
    mem.run()
    return mem


def _assert_unharmed(attacked: MemorySwarm, baseline: MemorySwarm | None = None) -> None:
    peers = ("coordinator", "p0", "p1", "p2")
    assert all(attacked[n].state == "finished" for n in peers), {n: attacked[n].state for n in peers}
    rounds = attacked["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    honest = {attacked[f"p{i}"].rt.peer for i in range(3)}
    assert all(set(r["members"]) == honest for r in rounds), [r["members"] for r in rounds]
    digests = attacked.digests(*peers)
    assert len(set(digests.values())) == 1, digests
    if baseline is not None:
        assert digests["coordinator"] == baseline.digests("coordinator")["coordinator"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return _honest_run(tmp_path_factory.mktemp("baseline"), "baseline")


def test_unsigned_values_and_endless_records_are_refused_by_storage(tmp_path):
    mem = MemorySwarm(_config(), tmp_path)
    mem.coordinator()
    keys = mem.coordinator_role().keys
    now = mem.clock.now()
    bare = MemoryDHT(mem.net, "Qmbare")  # a plain node: no key, no validators
    # an ordinary value would block every vote of the round; unsigned subkeys could claim anything
    assert not bare.store(keys.hashes(0), "not a dictionary", now + 60)
    assert not bare.store(keys.leases, {"head": 0, "claimed_at": now}, now + 60, subkey="0:someone")
    rogue, identity = mem.signing_dht("rogue")
    record = LeaseRecord(head=0, claimed_at=now)
    assert not dht_io.store(rogue, keys.leases, identity, record, math.inf, tag="0")  # would freeze a key
    # one that outlives any record is refused where it would be stored (`swarm.admission`; the
    # validators, which also judge reads, do not look at the clock) ...
    assert not dht_io.store(rogue, keys.leases, identity, record, now + 10 * schemas.MAX_RECORD_TTL, tag="1")
    # ... and one a node without that rule stored is never read
    policy, mem.net.policy = mem.net.policy, None
    assert dht_io.store(rogue, keys.leases, identity, record, now + 10 * schemas.MAX_RECORD_TTL, tag="1")
    assert dht_io.read(rogue, keys.leases, LeaseRecord, now) == {}
    mem.net.policy = policy
    assert dht_io.store(rogue, keys.leases, identity, record, now + 30, tag="0")  # its own, bounded: fine
    assert len(dht_io.read(rogue, keys.leases, LeaseRecord, now)) == 1
    # a value far larger than any record of a run would bloat every answer for the key
    from swarm.identity import MAX_RECORD_BYTES
    huge = {"head": 1, "claimed_at": now, "pad": "x" * MAX_RECORD_BYTES}
    assert not rogue.store(keys.leases, huge, now + 30, subkey=identity.subkey("1"))
    assert len(dht_io.read(rogue, keys.leases, LeaseRecord, now)) == 1
    # nobody writes under another's key
    victim = mem["coordinator"].rt.identity
    assert not rogue.store(keys.progress, {"round": 9}, now + 30, subkey=victim.subkey())
    assert dht_io.read(rogue, keys.hashes(0), HashRecord, now) == {}


def test_values_a_reader_cannot_decode_are_refused_and_never_hang_a_read(tmp_path):
    """A value that is not plain msgpack would stop hivemind's search for its key for good."""
    import dataclasses

    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    from swarm.identity import SignedOnlyValidator

    identity = Identity()
    validator = SignedOnlyValidator()
    subkey = MSGPackSerializer.dumps(identity.subkey("0"))
    good = DHTRecord(b"k", subkey, MSGPackSerializer.dumps({"head": 0, "claimed_at": 1.0}), 100.0)
    assert validator.validate(good)
    nested: list = [0]
    for _ in range(40):
        nested = [nested]
    for value in (b"\xc1", MSGPackSerializer.dumps(nested)):
        assert not validator.validate(dataclasses.replace(good, value=value))
    assert not validator.validate(dataclasses.replace(good, expiration_time=math.inf))
    assert not validator.validate(dataclasses.replace(good, subkey=MSGPackSerializer.dumps(b"0")))
    # and if a node serves one anyway, a read gives nothing instead of hanging or raising
    mem = MemorySwarm(_config(), tmp_path)
    mem.coordinator()
    keys = mem.coordinator_role().keys
    mem.net.put(keys.leases, identity.subkey("0"), b"\xc1", mem.clock.now() + 30)
    assert dht_io.read(mem["coordinator"].rt.dht, keys.leases, LeaseRecord, mem.clock.now()) == {}


def test_infinite_and_malformed_fields_never_parse():
    base = dict(round=1, heads=[0], head_steps=2, nbytes=10, ready_at=1.0, train_seconds=1.0, p2p="Qm")
    assert schemas.parse(ReadyRecord, base) is not None
    for change in ({"train_seconds": math.inf}, {"ready_at": math.nan}, {"heads": [0, 0]}, {"heads": []},
                   {"round": -1}, {"p2p": ""}, {"extra": 1}):
        assert schemas.parse(ReadyRecord, {**base, **change}) is None, change
    assert schemas.parse(HashRecord, {"round": 1, "digest": "x", "members": []}) is None
    assert schemas.parse(LeaseRecord, {"head": 0, "claimed_at": -math.inf}) is None


def test_records_are_stored_under_short_names_without_their_defaults_and_read_back_whole():
    ready = ReadyRecord(round=1, heads=[0], head_steps=2, nbytes=10, ready_at=1.0, p2p="Qm")
    wire = schemas.dump(ready)
    assert set(wire) == {"r", "h", "s", "n", "t", "p"} and schemas.parse(ReadyRecord, wire) == ready
    assert schemas.parse(ReadyRecord, ready.model_dump(mode="json")) == ready  # spelled out, it parses too
    assert schemas.parse(ReadyRecord, {**wire, "round": 1}) is None  # a field given twice is refused
    flagged = ready.model_copy(update={"zero_baseline": True})
    assert schemas.parse(ReadyRecord, schemas.dump(flagged)) == flagged != ready
    # What a round reads again and again, every member's record at each read: a ready record as a
    # peer writes it, and a lease, take under three quarters of the bytes with names spelled out.
    full = ReadyRecord(round=1234, heads=[7], head_steps=4560, nbytes=345678, ready_at=1764860000.125,
                       train_seconds=3.25, p2p="12D3KooW" + "x" * 44)
    lease = LeaseRecord(head=7, claimed_at=1764860000.125)
    for record in (full, lease):
        short = len(MSGPackSerializer.dumps(schemas.dump(record)))
        assert short < 0.75 * len(MSGPackSerializer.dumps(record.model_dump(mode="json"))), record


def test_every_record_names_its_fields_by_distinct_short_names():
    for model in (LeaseRecord, DonorRecord, ReadyRecord, HashRecord, Reduction, PartRecord, RoundSummary, RunProgress):
        aliases = [f.alias for f in model.model_fields.values()]
        assert None not in aliases and len(set(aliases)) == len(aliases), model
        assert all(len(a) <= 2 for a in aliases), model


def test_a_part_record_names_each_reductions_members_by_index_and_refuses_indices_out_of_range():
    members = [f"{k:020x}" for k in range(8)]
    reductions = [(part, tuple(members[part % 2:]), "ab" * 32) for part in range(16)]
    record = PartRecord.of(4, reductions, "Qm")
    assert record.members == members and record.reduced() == reductions
    assert schemas.parse(PartRecord, schemas.dump(record)) == record
    # Each reduction costs a byte per member, not a fingerprint: under half the bytes of a record
    # that spells every member out in every reduction.
    wire = schemas.dump(record)
    spelled = {**wire, "x": [{"i": p, "m": list(m), "d": d} for p, m, d in reductions]}
    assert 2 * len(MSGPackSerializer.dumps(wire)) < len(MSGPackSerializer.dumps(spelled))
    for change in ({"m": members[::-1]}, {"m": members + members[:1]}, {"m": members[:7]},
                   {"x": [{"i": 0, "m": [1, 0], "d": "ab" * 32}]},
                   {"x": [{"i": 0, "m": [0, 0], "d": "ab" * 32}]},
                   {"x": [{"i": 0, "m": [-1], "d": "ab" * 32}]}):
        assert schemas.parse(PartRecord, {**wire, **change}) is None, change
    assert schemas.parse(PartRecord, {**wire, "x": [{"i": 0, "m": [0, 1], "d": "ab" * 32}]}) is not None


def test_strangers_votes_ready_records_donors_and_progress_change_nothing(tmp_path, baseline):
    """A node with a key of its own but no lease: it votes for this and future rounds, offers
    contributions for heads it does not hold, dated at 0 or far ahead, advertises W at round
    10^9, and publishes a progress record of its own."""
    seen = {}

    def attack(mem: MemorySwarm):
        rogue, identity = mem.signing_dht("rogue")
        keys, now = mem.coordinator_role().keys, mem.clock.now()
        r = mem.coordinator_role().protocol.round
        for k in range(r, ROUNDS + 2):
            dht_io.store(rogue, keys.hashes(k), identity, HashRecord(round=k, digest=BOGUS, members=[identity.fingerprint]),
                          now + 300)
            for ready_at, heads in ((0.0, [0]), (now, [1, 2]), (now + 1e6, [0])):
                dht_io.store(rogue, keys.ready(k), identity,
                              ReadyRecord(round=k, heads=heads, head_steps=10, nbytes=100, ready_at=ready_at,
                                          train_seconds=1e6, p2p=mem["p0"].rt.p2p), now + 300)
        dht_io.store(rogue, keys.donors, identity, DonorRecord(round=10**9, digest=BOGUS, p2p=rogue.peer_id), now + 300)
        dht_io.store(rogue, keys.progress, identity, RunProgress(round=10**9, digest=BOGUS, rounds_total=10**9,
                                                                  samples=0, history=[]), now + 300)
        seen["rogue"] = identity.fingerprint

    attacked = _honest_run(tmp_path, "attacked", attack)
    _assert_unharmed(attacked, baseline)
    assert all(seen["rogue"] not in r["members"] for r in attacked["coordinator"].events.of("round"))


def test_claims_dated_far_in_the_past_take_no_head_that_is_being_trained(tmp_path, baseline):
    def attack(mem: MemorySwarm):
        rogue, identity = mem.signing_dht("rogue")
        keys, now = mem.coordinator_role().keys, mem.clock.now()

        def claim_everything():
            for head in range(3):
                dht_io.store(rogue, keys.leases, identity, LeaseRecord(head=head, claimed_at=-1e308),
                              mem.clock.now() + 5, tag=str(head))
        claim_everything()
        # keep renewing them for the rest of the run
        original = mem._step

        def step(node):
            if mem.clock.now() - step.last > 2:
                claim_everything()
                step.last = mem.clock.now()
            original(node)
        step.last = now
        mem._step = step

    attacked = _honest_run(tmp_path, "attacked", attack)
    _assert_unharmed(attacked, baseline)  # the three trained heads stayed with their peers throughout


def test_a_forged_run_record_and_a_stranger_run_announced_as_newest_redirect_nobody(tmp_path):
    from peers.node import SwarmError, announce_run, find_run
    from swarm.keys import RunKeys, make_run_id

    mem = MemorySwarm(_config(), tmp_path)
    coordinator = mem.coordinator().role
    keys, now = coordinator.keys, mem.clock.now()
    rogue, identity = mem.signing_dht("rogue")
    evil = coordinator.cfg.with_overrides({"swarm.max_update": 1e6, "data.source": "hf:evil/data"})
    forged = RunRecord(run_id=keys.run_id, config=evil.model_dump(mode="json"), coordinator=keys.coordinator, created=now)
    dht_io.store(rogue, keys.run, identity, forged, now + 60)
    reader, _ = mem.signing_dht("reader")
    got_keys, record, cfg = find_run(reader, keys.run_id, timeout=1, clock=mem.clock)
    assert cfg == coordinator.cfg and record.coordinator == keys.coordinator
    # announcing the victim's run id under another key counts for nothing ...
    dht_io.store(rogue, "lteswarm_runs", identity, RunAnnouncement(created=1e18, model="x"), now + 60, tag=keys.run_id)
    assert find_run(reader, None, timeout=1, clock=mem.clock)[0].run_id == keys.run_id
    # ... and a stranger's own run makes a plain join ask which run, instead of silently picking it
    theirs = RunKeys(make_run_id("newest", identity.fingerprint))
    announce_run(rogue, theirs, identity, forged.model_copy(update={"run_id": theirs.run_id, "created": 1e18,
                                                                    "coordinator": identity.fingerprint}), now + 60)
    with pytest.raises(SwarmError, match="choose one with --run-id"):
        find_run(reader, None, timeout=1, clock=mem.clock)


class _Rogue(Trainer):
    """A peer that holds a head by the rules and then sends poison as its contribution."""

    poison = "spike"

    def encode(self, heads):
        from safetensors.torch import load, save

        from swarm.wire import encode_contribution

        # dense: every layer a plain delta, so only the norm bound stands between the spike and W
        blob = encode_contribution(self.model, heads, form="dense")[0] if self.poison == "spike" else super().encode(heads)
        tensors = load(blob)
        import json

        meta = {"format": "lte-swarm/contribution/1", "heads": json.dumps(sorted(heads))}
        for name, t in tensors.items():
            if not name.startswith("w/"):
                continue
            if self.poison == "spike":  # one entry per 64-entry block near the per-entry limit
                limit = 0.99 * self.cfg.swarm.max_update / (self.model.spec.scale / self.model.spec.n_heads)
                flat = t.reshape(-1).clone()
                flat[::64] = limit
                tensors[name] = flat.reshape(t.shape)
            elif self.poison == "nan":
                tensors[name] = torch.full_like(t, float("nan"))
        return save(tensors, metadata=meta)


@pytest.mark.parametrize("poison", ["spike", "nan"])
def test_a_lease_holder_sending_poison_is_rejected_and_the_others_merge(tmp_path, poison):
    cfg = tiny_config(heads=4, merge_every=2, rounds=ROUNDS, min_heads=4)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}")
    _Rogue.poison = poison
    rogue = mem.trainer("rogue", role=_Rogue)
    mem.run()
    fingerprint = rogue.rt.peer
    rounds = mem["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(fingerprint not in r["members"] and fingerprint in r["rejected"] for r in rounds), rounds
    assert all(len(r["members"]) == 3 for r in rounds)
    digests = mem.digests("coordinator", "p0", "p1", "p2")
    assert len(set(digests.values())) == 1
    state = mem["coordinator"].role.model.shared_state()
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("merge", ["gather", "reduce"])
def test_an_outsized_contribution_is_not_downloaded(tmp_path, monkeypatch, merge):
    from swarm.memnet import MemoryBlobServer

    cfg = tiny_config(heads=3, merge_every=2, rounds=4, min_heads=3, merge=merge)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    fetched = []
    original = MemoryBlobServer.fetch

    def fetch(self, peer, name, timeout, max_bytes):
        fetched.append((str(peer), name))
        return original(self, peer, name, timeout, max_bytes)

    monkeypatch.setattr(MemoryBlobServer, "fetch", fetch)

    class Bloated(Trainer):
        def encode(self, heads):
            return super().encode(heads) + b"\0" * (self.protocol.max_contribution_bytes + 1)

    for i in range(2):
        mem.trainer(f"p{i}")
    bloated = mem.trainer("bloated", role=Bloated)
    mem.run()
    rounds = mem["coordinator"].events.of("round")
    assert all(bloated.rt.peer in r["rejected"] and len(r["members"]) == 2 for r in rounds)
    # refused before a byte of it moved (as an owner it may still serve reduced parts)
    assert not [name for peer, name in fetched if peer == bloated.rt.p2p and "/contribution/" in name]
    assert fetched  # the others did download from each other


def test_a_peer_whose_records_expired_syncs_instead_of_merging_alone(tmp_path):
    cfg = tiny_config(heads=3, merge_every=2, rounds=60, min_heads=3, round_timeout=8.0)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    peers = [mem.trainer(f"p{i}") for i in range(3)]
    mem.run(until=lambda s: any(e["new_round"] >= 2 for e in s["coordinator"].events.of("round")))
    sleeper = peers[0]
    sleeper.state = "asleep"  # a laptop lid closed: it does nothing while the others go on
    # long enough for every record of its round to expire (3 round timeouts)
    wake_at = mem.clock.now() + 4 * cfg.swarm.round_timeout
    mem.run(until=lambda s: s.clock.now() > wake_at)
    sleeper.state = "running"
    sleeper.next_at = mem.clock.now()
    mem.run()
    alone = [r for r in sleeper.events.of("round") if r["members"] == [sleeper.rt.peer]]
    assert not alone, alone
    assert any(r["missed"] and r["resynced"] for r in sleeper.events.of("round"))
    digests = mem.digests()
    assert len(set(digests.values())) == 1, digests


def _coordinator_down_for(mem: MemorySwarm, rounds: int) -> int:
    """Stop the coordinator once it checkpointed round 2 or later and let the holders merge
    `rounds` rounds without it; the round of its checkpoint."""
    mem.run(until=lambda s: any(e["round"] >= 2 for e in s["coordinator"].events.of("checkpoint")))
    mem.stop("coordinator")
    mem.run(until=lambda s: s["coordinator"].state != "running")
    saved_round = mem["coordinator"].events.last("checkpoint")["round"]
    mem.run(until=lambda s: s["p0"].role.protocol.round >= saved_round + rounds)
    return saved_round


def test_a_resumed_coordinator_recomputes_the_rounds_it_missed_and_downloads_no_w(tmp_path):
    cfg = tiny_config(heads=3, merge_every=2, rounds=8, min_heads=3)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}")
    saved_round = _coordinator_down_for(mem, 2)
    resumed = mem.coordinator(name="coordinator-again", run_dir=tmp_path / "run")
    assert resumed.role.protocol.round == saved_round
    mem.run()
    state = resumed.role.protocol.state
    assert resumed.state == "finished" and resumed.role.protocol.round == cfg.rounds
    assert state.rounds_verified >= 1 and state.downloads == 0
    digests = mem.digests("p0", "p1", "p2", "coordinator-again")
    assert len(set(digests.values())) == 1, digests


def test_a_resumed_coordinator_never_adopts_a_w_it_cannot_recompute(tmp_path):
    """Two colluding owners double the parts they own together while the coordinator is down: the
    third holder applies them too (nobody recomputes), so every holder holds the forged W. The
    coordinator, resumed, recomputes the round from its contributions, finds another W, and
    stops with one line instead of taking the majority's."""
    from tests.memswarm import with_protocol
    from tests.test_reduce import _LyingOwner

    cfg = tiny_config(heads=3, merge_every=2, rounds=12, min_heads=3)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}", role=with_protocol(_LyingOwner, "reduction") if i < 2 else Trainer)
    saved_round = _coordinator_down_for(mem, 2)
    saved = mem["coordinator"].events.last("checkpoint")["digest"]
    holders = mem.digests("p0", "p1", "p2")
    resumed = mem.coordinator(name="coordinator-again", run_dir=tmp_path / "run")
    mem.run(until=lambda s: resumed.state != "running")
    assert resumed.state == "failed" and "cannot be recomputed" in str(resumed.error), resumed.error
    assert resumed.role.protocol.round == saved_round and resumed.role.model.state_digest() == saved
    assert resumed.role.protocol.state.downloads == 0
    assert resumed.role.model.state_digest() not in holders.values()


def test_a_resumed_coordinator_far_behind_adopts_the_holders_w_only_when_told(tmp_path):
    """The rounds' contributions are gone after a few rounds: a coordinator down longer cannot
    recompute them, stops, and takes the holders' W only when its operator says so
    (`--adopt-swarm-state`)."""
    cfg = tiny_config(heads=2, merge_every=2, rounds=16, min_heads=2)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    mem.trainer("p0"), mem.trainer("p1")
    # long enough for every record and contribution of that round to be gone
    saved_round = _coordinator_down_for(mem, 8)
    refused = mem.coordinator(name="coordinator-again", run_dir=tmp_path / "run")
    mem.run(until=lambda s: refused.state != "running")
    assert refused.state == "failed" and "--adopt-swarm-state" in str(refused.error)
    assert refused.role.protocol.round == saved_round
    resumed = mem.coordinator(name="coordinator-trusting", run_dir=tmp_path / "run", adopt_swarm_state=True)
    assert resumed.role.protocol.round == saved_round
    mem.run()
    assert resumed.role.protocol.round == cfg.rounds
    assert any(r["missed"] and r["resynced"] for r in resumed.events.of("round"))
    digests = mem.digests("p0", "p1", "coordinator-trusting")
    assert len(set(digests.values())) == 1, digests


def test_with_the_coordinator_down_sybil_votes_decide_nothing(tmp_path):
    """Many identities without a lease vote for a W nobody holds while the coordinator is away:
    only the lease holders' votes count, one each."""
    mem = MemorySwarm(tiny_config(heads=3, merge_every=2, rounds=12, min_heads=3), tmp_path)
    mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}")
    mem.run(until=lambda s: any(e["new_round"] >= 2 for e in s["coordinator"].events.of("round")))
    keys = mem.coordinator_role().keys
    mem.crash("coordinator")
    sybils = [mem.signing_dht(f"sybil{i}") for i in range(7)]
    start = mem["p0"].role.protocol.round
    for k in range(start, 14):
        for dht, identity in sybils:
            dht_io.store(dht, keys.hashes(k), identity, HashRecord(round=k, digest=BOGUS, members=[]), mem.clock.now() + 600)
    mem.run()
    for i in range(3):
        rounds = mem[f"p{i}"].events.of("round")
        assert rounds[-1]["new_round"] == 12 and not any(r["resynced"] for r in rounds), rounds
    digests = mem.digests("p0", "p1", "p2")
    assert len(set(digests.values())) == 1 and BOGUS not in digests.values()


def test_a_peer_cannot_hold_more_heads_than_the_run_allows(tmp_path):
    from swarm.errors import ConfigError

    mem = MemorySwarm(_config(max_heads_per_peer=2), tmp_path)
    mem.coordinator()
    with pytest.raises(ConfigError, match="max_heads_per_peer"):
        mem.trainer("greedy", heads=3)


def test_a_holder_dating_its_ready_records_to_close_every_round_early_stalls_nothing(tmp_path):
    """It pre-publishes ready records for the coming rounds, dated so that their deadlines have
    passed: were ready times to decide that a round is over, the others would try to catch up
    with a round nobody merged, and wait out the round timeout every round."""

    class Backdater(Trainer):
        attack = True

        def encode(self, heads):
            now, keys = self.clock.now(), self.keys
            for k in range(self.protocol.round + 1, self.protocol.round + 4):
                record = ReadyRecord(round=k, heads=heads, head_steps=1, nbytes=10, train_seconds=0.0, p2p=self.rt.p2p,
                                     ready_at=now - 2.5 * self.cfg.swarm.round_timeout)
                if self.attack:
                    dht_io.store(self.dht, keys.ready(k), self.rt.identity, record, now + 60)
            return super().encode(heads)

    def run(name: str, attack: bool) -> tuple[MemorySwarm, float]:
        Backdater.attack = attack
        mem = MemorySwarm(tiny_config(heads=3, merge_every=2, rounds=ROUNDS, min_heads=3), tmp_path / name)
        start = mem.clock.now()
        mem.coordinator()
        mem.trainer("p0"), mem.trainer("p1")
        mem.trainer("backdater", role=Backdater, throttle=0.5)  # the others reach each round first
        mem.run()
        return mem, mem.clock.now() - start

    mem, attacked = run("attacked", True)
    _, honest = run("honest", False)
    rounds = mem["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for name in ("p0", "p1"):
        assert all(r["merged"] and not r["missed"] for r in mem[name].events.of("round")), mem[name].events.of("round")
    assert len(set(mem.digests("coordinator", "p0", "p1").values())) == 1
    assert attacked <= 1.2 * honest, (attacked, honest)  # seconds of fake time: deterministic


def test_asking_a_donor_for_w_again_and_again_encodes_it_once_per_version(tmp_path, monkeypatch):
    """Anyone may download W from a donor; a stranger asking in a loop gets copies of one encoding,
    and the next round's W is encoded afresh."""
    from peers.models import create_lte_model
    from swarm import wire
    from swarm.rounds import state_transfer
    from swarm.memnet import MemoryBlobServer

    encodings = []

    def counting(model, round_):
        encodings.append(round_)
        return wire.encode_state(model, round_)

    monkeypatch.setattr(state_transfer, "encode_state", counting)
    mem = MemorySwarm(tiny_config(heads=2, rounds=3), tmp_path)
    mem.coordinator()
    for i in range(2):
        mem.trainer(f"p{i}")
    mem.run(until=lambda s: s["p0"].role.protocol.round >= 1 and s["p0"].role.mr is None)
    donor = mem["p0"]
    asker, _ = mem.signing_dht("asker")
    server, name = MemoryBlobServer(mem.net, asker.peer_id), donor.role.keys.state_blob
    before = len(encodings)
    blobs = {server.fetch(donor.rt.p2p, name, 5.0, 2**30) for _ in range(20)}
    assert len(blobs) == 1 and len(encodings) - before <= 1
    model = create_lte_model(mem.cfg, [])

    def served_is_current(blob: bytes) -> bool:
        return wire.decode_state(blob, model, expect_digest=donor.role.model.state_digest()) == donor.role.protocol.round

    assert served_is_current(blobs.pop())
    mem.run(until=lambda s: s["p0"].role.protocol.round >= 2 and s["p0"].role.mr is None)
    before = len(encodings)
    assert served_is_current(server.fetch(donor.rt.p2p, name, 5.0, 2**30)) and len(encodings) == before + 1


def test_a_run_cannot_make_a_volunteer_train_on_a_local_path_it_names(tmp_path):
    """The run's config is the coordinator's word: a local `data.source` (say `~/Pictures`) would
    have every volunteer that joins without `--data` read its own files of that name. A peer
    refuses, saying what to pass; with `--data` it trains on what it was given."""
    from peers.data import digits_dataset
    from swarm.errors import ConfigError

    private = tmp_path / "private"
    digits_dataset().save_to_disk(str(private))  # the coordinator's own copy, which it evaluates on
    mem = MemorySwarm(_config().with_overrides({"data": {"source": str(private)}}), tmp_path / "swarm")
    mem.coordinator()
    with pytest.raises(ConfigError, match="pass --data"):
        mem.trainer("p0")
    assert mem.trainer("p1", data="digits").role.source is not None


def test_rounds_still_merge_when_every_poll_is_answered_empty(tmp_path, monkeypatch):
    """Nodes placed next to a round's keys can answer the few a poll asks with nothing, poll after
    poll. Before a round is given up, its ready records are read from every node that holds them:
    the round merges, late, instead of passing without a merge."""
    from swarm.rounds.agreement import Agreement

    ready = Agreement.ready
    monkeypatch.setattr(Agreement, "ready", lambda self, r, thorough=False: ready(self, r, True) if thorough else {})
    mem = MemorySwarm(tiny_config(heads=3, merge_every=2, rounds=3, min_heads=3), tmp_path)
    mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}")
    mem.run()
    rounds = mem["coordinator"].events.of("round")
    assert [r["new_round"] for r in rounds] == [1, 2, 3]
    assert all(len(r["members"]) == 3 for r in rounds), [r["members"] for r in rounds]
