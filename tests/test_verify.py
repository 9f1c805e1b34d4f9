"""A head's round redone from what its holder would commit to (`peers/verify.py`): the same bits on
the same machine, within the tolerance across threads and precisions, and every cheat measured by
`scripts/bench_reproduce.py` outside it."""

from __future__ import annotations

import pytest
import torch

from peers import verify
from peers.data import DataSource, ImageShape
from peers.models import create_lte_model
from peers.shipped import shipped_config
from peers.trainer import Trainer
from peers.training import HeadTrainer, stack_batches
from swarm.config import load_config
from tests.conftest import load_script


def _cfg():
    return load_config(shipped_config())


def test_a_round_redone_from_its_start_is_the_holders_own_bit_for_bit():
    """Two rounds of one head (the second from a merged W, with optimizer moments and a stream part
    read): the start survives its encoding with its digest, and the redo is the holder's change."""
    cfg, head = _cfg(), 2
    source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    holder = create_lte_model(cfg, [head])
    trainer = HeadTrainer(holder, cfg.train, cfg.steps)
    stream = source.batches(head, cfg.lte.heads, cfg.head_batch)
    steps = cfg.lte.merge_every
    for r in range(2):
        start = verify.snapshot(holder, trainer.optimizer, head, r * steps, r * steps, steps)
        blob = start.encode()
        # what a fetch of a start allows, reckoned from a model holding no head (the coordinator's):
        # room for every value even where none repeats, not much more
        raw = sum(t.numel() * t.element_size() for t in start.tensors.values()) + sum(
            t.numel() * t.element_size() for m in start.moments.values() for t in m.values())
        bound = verify.start_bound(create_lte_model(cfg, []))
        assert len(blob) <= raw < bound < 2 * raw + (1 << 20)
        again = verify.RoundStart.decode(blob)
        assert again.digest() == start.digest() and bool(again.moments) == (r > 0)
        assert set(again.tensors) == set(start.tensors)
        values = sum(t.numel() * t.element_size() for t in start.tensors.values())
        if r > 0:  # after a merge each factor, its baseline and what was sent of it are one value, sent once
            assert len(blob) < 0.6 * values + sum(t.numel() * t.element_size() for m in start.moments.values()
                                                   for t in m.values())
        w = create_lte_model(cfg, [])
        w.load_shared_state(holder.shared_state())
        for t in range(steps):
            x, y = stack_batches([stream], "cpu")
            trainer.step(x, y, r * steps + t)
        own = verify.change(holder)
        assert verify.mismatch(verify.reproduce(cfg, w, again, source), own) == 0.0
        holder.merge([head])
    # what the digest covers: a moment, the cursor, a factor
    name = next(iter(start.moments))
    key = next(iter(start.moments[name]))
    for tampered in (verify.RoundStart(**{**start.__dict__, "cursor": start.cursor + 1}),
                     verify.RoundStart(**{**start.__dict__, "moments": {**start.moments, name: {
                         **start.moments[name], key: start.moments[name][key] * 1.0001}}}),
                     verify.RoundStart(**{**start.__dict__, "tensors": {k: v + 1e-6 if k.endswith("B") else v
                                                                        for k, v in start.tensors.items()}})):
        assert tampered.digest() != start.digest()
    with pytest.raises(ValueError, match="alone"):
        verify.restore(create_lte_model(cfg, [head, head + 1]), trainer, start)


def test_honest_redos_pass_the_tolerance_and_every_cheat_fails_it():
    bench = load_script("bench_reproduce")
    (row,) = bench.measure(_cfg(), rounds=1, head=1)
    for name in bench.HONEST:
        assert row[name] <= verify.TOLERANCE, (name, row[name])
    for name in bench.CHEATS:
        assert row[name] > 1.5 * verify.TOLERANCE, (name, row[name])


def test_mismatch_is_each_tensors_own_and_refuses_other_tensors():
    """A tensor forged alone is not hidden by a larger honest one beside it."""
    redo = {"a": torch.ones(3), "b": torch.full((2,), 100.0)}
    assert verify.mismatch(redo, {"a": -torch.ones(3), "b": torch.full((2,), 100.0)}) == pytest.approx(2.0)
    assert verify.mismatch(redo, {"a": torch.zeros(3), "b": torch.full((2,), 100.0)}) == pytest.approx(1.0)
    assert verify.mismatch(redo, {"a": torch.ones(3)}) == float("inf")


def test_a_holder_commits_to_its_rounds_start_and_its_contribution_can_be_redone(tmp_path):
    """In a run that redoes rounds: a volunteer's ready record names the digest of what each head's
    round began from, it serves that start, and the round redone from it and the round's W is its
    contribution as it went on the wire."""
    from swarm import dht_io
    from swarm.schemas import ReadyRecord
    from swarm.wire import decode_contribution
    from tests.memswarm import MemorySwarm, tiny_config

    def offered_round_one(verify_rate: float, workdir):
        mem = MemorySwarm(tiny_config(heads=2, merge_every=3, rounds=3, min_heads=2, verify_rate=verify_rate), workdir)
        coordinator = mem.coordinator()
        p0, _ = mem.trainer("p0"), mem.trainer("p1")
        mem.run(until=lambda s: any(e["round"] == 1 for e in s["p0"].events.of("ready")))
        record = dht_io.by_writer(dht_io.read(p0.rt.dht, p0.role.keys.ready(1), ReadyRecord, mem.clock.now()))
        return mem, coordinator, p0, record[p0.role.peer]

    # a run that redoes no rounds: nobody copies, encodes and hashes its heads' state for nothing
    assert offered_round_one(0.0, tmp_path / "off")[3].starts is None
    mem, coordinator, p0, record = offered_round_one(0.5, tmp_path / "on")
    cfg = mem.cfg
    w = coordinator.role.model  # the coordinator is at round 1: its W is what round 1 trained on
    assert coordinator.role.protocol.round == 1
    keys, peer = p0.role.keys, p0.role.peer
    assert record.starts is not None and len(record.starts) == len(record.heads)
    server = coordinator.role.server
    blob = server.fetch(p0.rt.p2p, keys.contribution_blob(1, peer), 10.0, 1 << 26)
    submitted = decode_contribution(blob, peer, w, max_update=float("inf"))
    (head,) = record.heads
    start = verify.RoundStart.decode(server.fetch(p0.rt.p2p, keys.round_start_blob(1, peer, head), 10.0, 1 << 26))
    assert start.digest() == record.starts[0] and start.head == head and start.steps == cfg.lte.merge_every
    assert start.cursor == cfg.lte.merge_every and start.moments  # its second round: a stream part read, moments
    redo = verify.reproduce(cfg, w, start, p0.role.source)
    # the same machine and fp32 on the wire: the redo is the contribution but for its rounding to fp32
    assert cfg.swarm.contribution_dtype == "fp32"
    assert verify.mismatch(redo, {**submitted.weights, **submitted.replicas}) < 1e-6


class _TurnedAround(Trainer):
    """Sends its heads' change turned around (its B negated for the encoding), within every bound."""

    def encode(self, heads):
        with torch.no_grad():
            for _, f in self.model.factors.items():
                f.B.neg_()
            try:
                return super().encode(heads)
            finally:
                for _, f in self.model.factors.items():
                    f.B.neg_()


def test_the_coordinator_redoes_sampled_rounds_and_finds_the_contribution_that_does_not_reproduce(tmp_path):
    """`swarm.verify_rate: 1`: the coordinator redoes every head's round once it merged it; the
    honest volunteers' contributions pass every time, the one sending its factors' change turned
    around (its replicas' honest) fails every time, and the verdicts are published signed."""
    from swarm import dht_io
    from swarm.schemas import VerdictRecord
    from tests.memswarm import MemorySwarm, named_identity, tiny_config

    cfg = tiny_config(heads=3, merge_every=2, rounds=4, min_heads=3, verify_rate=1.0)
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    for i in range(3):
        mem.trainer(f"p{i}", role=_TurnedAround if i == 2 else Trainer)
    mem.run()
    cheat = named_identity("p2").fingerprint
    verdicts = coordinator.events.of("verdict")
    last = cfg.rounds - 1  # the run is over when the coordinator asks: the volunteers have left
    rounds = {e["round"] for e in coordinator.events.of("round") if cheat in e["members"]} - {last}
    assert rounds and {v["round"] for v in verdicts if v["writer"] == cheat} == rounds
    assert {e["round"] for e in coordinator.events.of("unverifiable")} <= {last}
    assert all(not v["passed"] and v["mismatch"] > 1.5 for v in verdicts if v["writer"] == cheat), verdicts
    honest = [v for v in verdicts if v["writer"] != cheat]
    assert len(honest) >= 2 * len(rounds) - 2 and all(v["passed"] and v["mismatch"] < 1e-6 for v in honest), honest
    published = dht_io.by_writer(dht_io.read(coordinator.rt.dht, coordinator.role.keys.verdicts(max(rounds)),
                                             VerdictRecord, mem.clock.now()))[coordinator.role.peer]
    assert {v.writer: v.passed for v in published.verdicts}[cheat] is False


def test_a_share_of_the_heads_is_drawn_from_the_coordinators_signature():
    from swarm.identity import Identity

    coordinator, other = Identity(), Identity()
    heads = list(range(400))
    drawn = verify.sampled(coordinator, "run", 3, heads, 0.25)
    assert 60 < len(drawn) < 140 and drawn == verify.sampled(coordinator, "run", 3, heads, 0.25)
    assert drawn != verify.sampled(coordinator, "run", 4, heads, 0.25)
    assert drawn != verify.sampled(other, "run", 3, heads, 0.25)  # nobody else can compute it
    assert verify.sampled(coordinator, "run", 3, heads, 0.0) == [] and verify.sampled(coordinator, "run", 3, heads, 1.0) == heads


class _Recorded(_TurnedAround):
    """`_TurnedAround`, keeping each contribution it sent, by round."""

    sent: dict[int, bytes] = {}

    def encode(self, heads):
        blob = super().encode(heads)
        _Recorded.sent[self.protocol.round] = blob
        return blob


@pytest.mark.parametrize("first_drawn", [0, 2])
def test_a_contribution_that_does_not_reproduce_is_taken_out_by_every_peer_alike_and_its_writer_evicted(
        tmp_path, monkeypatch, first_drawn):
    """Four heads, one of them turned around; the coordinator redoes every head's round from round
    `first_drawn` on (none before). The round it catches the cheat in, it revokes the cheat's key
    (the cheat stops, a spare volunteer takes its head, no later round merges the cheat) and two
    rounds on every peer takes out of W exactly what the cheat's contributions added in every round
    no verdict passed, the undrawn ones included, without a re-sync: they all hold the same W."""
    import peers.verification
    from swarm.rounds.machine import MergeProtocol
    from swarm.rounds.undo import UNDO_DELAY, Undoing, subtract
    from swarm.wire import decode_contribution, split_totals
    from tests.memswarm import MemorySwarm, named_identity, tiny_config

    loaded: dict[tuple[str, int], dict] = {}  # (peer, round) -> what it took out
    load = Undoing.load

    def recorded(self, mr):
        values = load(self, mr)
        if values is not None:
            loaded[(self.ctx.peer, mr.round)] = values
        return values

    monkeypatch.setattr(Undoing, "load", recorded)
    merges: dict[tuple[str, int], tuple[str, str]] = {}  # (peer, round) -> W after its merge without / with the undo
    merge = MergeProtocol._merge

    def merged(self, mr, totals, members):
        if mr.undo is not None:
            merges[(self.peer, mr.round)] = tuple(self.model.digest_after(*split_totals(self.model, t))
                                                  for t in (totals, subtract(totals, mr.undo)))
        return merge(self, mr, totals, members)

    monkeypatch.setattr(MergeProtocol, "_merge", merged)
    # the draw's own properties are tested below; here the rounds it draws are the test's
    monkeypatch.setattr(peers.verification, "sampled", lambda identity, run_id, r, heads, rate: heads if r >= first_drawn else [])
    # the coordinator redoes every round itself (the spare volunteer is no verifier: see below), and takes
    # out the cheat's contributions alone (a rollback: test_verifiers.py)
    cfg = tiny_config(heads=4, merge_every=2, rounds=14, min_heads=4, verify_rate=1.0, verifiers=0, rollback_rounds=0)
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    _Recorded.sent = {}
    honest = [mem.trainer(f"p{i}") for i in range(3)]
    cheat = mem.trainer("cheat", role=_Recorded)
    spare = mem.trainer("spare")  # no head free for it until the cheat is gone
    undone_at = {}

    def undone(_) -> bool:
        undone_at.update({e["at"]: e for e in coordinator.events.of("undo")})
        return bool(undone_at) and all(any(e["round"] >= max(undone_at) and e["merged"] for e in node.events.of("round"))
                                       for node in [*honest, spare])

    mem.run(until=undone, max_seconds=1200)
    cheater = named_identity("cheat").fingerprint
    (caught,) = [v for v in coordinator.events.of("verdict") if not v["passed"]]
    r = caught["round"]
    assert r == first_drawn and caught["writer"] == cheater
    assert undone_at[r + UNDO_DELAY]["writers"] == [cheater] and undone_at[r + UNDO_DELAY]["rounds"] == [r + 1]
    assert cheat.state == "failed" and "revoked" in str(cheat.error)
    assert all(v["passed"] for v in coordinator.events.of("verdict") if v["writer"] != cheater)

    # what the round two on takes out is what the cheat's contributions to rounds 0 to r added
    # (unclipped here, summed in round order): the coordinator's values and those every other peer
    # fetched and checked alike, at that round only
    added: dict = {}
    for k in range(r + 1):
        sent = decode_contribution(_Recorded.sent[k], cheater, coordinator.role.model, max_update=float("inf"))
        for name, value in {**sent.weights, **sent.replicas}.items():
            added[name] = added[name] + value.double() if name in added else value.double()
    peers = [node.role.peer for node in [coordinator, *honest, spare]]
    # (the spare had no W yet; the cheat, not yet aware it was revoked, took it out too)
    assert {who for who, at in loaded if at == r + UNDO_DELAY} - {cheater} == set(peers[:-1])
    assert {at for _, at in loaded} == {r + UNDO_DELAY}
    for taken in loaded.values():
        assert set(taken) >= set(added) and not any(bool(taken[name].any()) for name in set(taken) - set(added))
        assert all(torch.equal(taken[name], added[name].float()) for name in added)

    # no later round merges the cheat; every peer took the undo itself, and all hold the same W
    for node in [coordinator, *honest, spare]:
        rounds = [e for e in node.events.of("round") if e["round"] > r and e.get("merged", not e["missed"])]
        assert rounds and all(cheater not in e["members"] for e in rounds), node.name
    for node in [coordinator, *honest]:
        at = [e for e in node.events.of("round") if e["round"] == r + UNDO_DELAY]
        without, with_undo = merges[(node.role.peer, r + UNDO_DELAY)]
        assert at and at[0]["digest"] == with_undo != without and not at[0]["resynced"], (node.name, at)
    assert len({d for name, d in mem.digests().items() if name != "cheat"}) == 1


@pytest.mark.parametrize("setting", [{"swarm.overlap": True}, {"lte.fragments": 2}])
def test_a_run_that_redoes_rounds_refuses_settings_whose_rounds_cannot_be_redone(setting):
    """A fragment's change spans several rounds and an overlapped round trains on a W that changes
    midway: redone from one round's start, an honest head's would not reproduce, and its holder
    would be evicted."""
    from swarm.errors import ConfigError

    cfg = _cfg()
    with pytest.raises(ConfigError, match="swarm.verify_rate"):
        cfg.with_overrides({"swarm.verify_rate": 0.25, **setting})
    cfg.with_overrides(setting)  # without verification: fine


def test_rewinding_a_head_puts_back_its_rounds_start_and_leaves_the_other_heads_alone():
    """What a holder does with a round nobody will merge in a run that merges only work it can
    redo: the head's factors, replicas and moments go back to the round's start, bit for bit, and
    a first round's moments (none at its start) go back to a fresh head's zeros."""
    cfg = _cfg()
    source = DataSource(cfg.data, ImageShape(cfg.model.image_size, cfg.model.channels), seed=cfg.train.seed)
    model = create_lte_model(cfg, [1, 3])
    trainer = HeadTrainer(model, cfg.train, cfg.steps)
    streams = [source.batches(h, cfg.lte.heads, cfg.head_batch) for h in (1, 3)]

    def train(steps, first):
        for t in range(steps):
            x, y = stack_batches(streams, "cpu")
            trainer.step(x, y, first + t)

    for first_round in (True, False):
        starts = {h: verify.snapshot(model, trainer.optimizer, h, 0, 0, 2) for h in (1, 3)}
        assert bool(starts[3].moments) != first_round
        train(2, 0)
        verify.rewind(model, trainer.optimizer, starts[3])
        back = verify.snapshot(model, trainer.optimizer, 3, 0, 0, 2)
        kept = verify.snapshot(model, trainer.optimizer, 1, 0, 0, 2)
        if first_round:  # zeros where there were no moments: the same steps as a fresh head's
            assert back.moments and all(not bool(t.any()) for m in back.moments.values() for t in m.values())
            back.moments = {}
        assert back.digest() == starts[3].digest()
        assert kept.digest() != starts[1].digest()  # head 1 keeps its round
        model.merge()
    with pytest.raises(ValueError, match="not held"):
        verify.rewind(model, trainer.optimizer, verify.RoundStart(head=0, step=0, cursor=0, steps=2))


class _Uncommitted(Trainer):
    """Sends its work with no start to redo it from (as work on a volunteer's own data goes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commits = False


@pytest.mark.parametrize("accept", [True, False])
def test_a_run_that_merges_only_what_it_can_redo_leaves_unverifiable_work_out(tmp_path, accept):
    """`swarm.accept_unverifiable: false`: a contribution without a start to redo it from is left
    out of every round by every peer (with it true, the same contribution is merged), and a
    volunteer that would train on its own data is told so when it joins."""
    from swarm.errors import ConfigError
    from tests.memswarm import MemorySwarm, named_identity, tiny_config

    cfg = tiny_config(heads=3, merge_every=2, rounds=4, min_heads=3, verify_rate=0.01, accept_unverifiable=accept)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    for i in range(2):
        mem.trainer(f"p{i}")
    mem.trainer("own", role=_Uncommitted)
    if not accept:
        with pytest.raises(ConfigError, match="without --data"):
            mem.trainer("private", data="digits:/somewhere/else")
    mem.run()
    own = named_identity("own").fingerprint
    rounds = [e for node in mem.nodes.values() for e in node.events.of("round") if e.get("members")]
    assert rounds and all(len(e["members"]) == (3 if accept else 2) for e in rounds), rounds
    assert all((own in e["members"]) == accept for e in rounds)
    assert len(set(mem.digests().values())) == 1


@pytest.mark.parametrize("accept", [True, False])
def test_work_that_missed_its_round_is_offered_again_or_in_a_run_that_merges_only_what_it_can_redo_trained_again(
        tmp_path, accept):
    """Work carried into the next round began on a W the swarm left: nobody could redo it. A run
    that merges anything offers it again at once; one that merges only what it can redo takes the
    heads back to their round's start (bit for bit), to train it again from a start it commits to."""
    from tests.memswarm import MemorySwarm, tiny_config

    cfg = tiny_config(heads=2, merge_every=2, rounds=4, min_heads=2, verify_rate=0.5, accept_unverifiable=accept)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    node, _ = mem.trainer("p0"), mem.trainer("p1")
    peer = node.role
    # its second round (moments at its start) trained, not yet offered
    mem.run(until=lambda s: peer.starts_round >= 1 and peer.step_in_round == cfg.lte.merge_every and peer.mr is None)
    (head,) = peer.model.head_ids
    start = peer.starts[head]

    def at_start() -> bool:
        now = verify.snapshot(peer.model, peer.head_trainer.optimizer, head, start.step, start.cursor, start.steps)
        return now.digest() == start.digest()

    assert not at_start() and peer.unmerged_steps == cfg.lte.merge_every
    peer._missed()
    assert peer.carry_over is accept and (peer.unmerged_steps > 0) is accept
    assert at_start() is not accept and (peer.starts == {}) is not accept


def test_a_run_that_merges_only_what_it_can_redo_refuses_a_volunteer_nobody_can_fetch_from(tmp_path):
    from swarm.errors import ConfigError
    from tests.memswarm import MemorySwarm, tiny_config

    cfg = tiny_config(heads=2, verify_rate=0.25, accept_unverifiable=False)
    mem = MemorySwarm(cfg, tmp_path)
    mem.coordinator()
    with pytest.raises(ConfigError, match="--client-mode"):
        mem.trainer("behind-nat", reachable=False)
    mem.trainer("reachable")  # fine
