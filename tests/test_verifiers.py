"""Spare volunteers redo the drawn rounds instead of the coordinator (`peers.verifier`,
`peers.verification`): their passes stand, anything they doubt the coordinator redoes and decides,
and a verifier its redo contradicts is revoked. In memory, on the real roles."""

from __future__ import annotations

import pytest
import torch

from peers.trainer import Trainer
from peers.verify import TOLERANCE
from tests.memswarm import MemorySwarm, named_identity, tiny_config
from tests.test_verify import _TurnedAround


class _Lying(Trainer):
    """A verifier that reports every check the other way round: an honest contribution far from
    its redo, a cheat's the same bits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verifier.judged = lambda v: v.model_copy(update={"mismatch": 0.0 if v.mismatch > TOLERANCE else 1.0,
                                                              "passed": v.mismatch > TOLERANCE})


def _swarm(tmp_path, volunteers: dict, spares: dict, rounds: int):
    cfg = tiny_config(heads=len(volunteers), merge_every=2, rounds=rounds, min_heads=len(volunteers), verify_rate=1.0,
                      verifiers=2)
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    nodes = {name: mem.trainer(name, role=role) for name, role in {**volunteers, **spares}.items()}
    return mem, coordinator, nodes


def test_spare_volunteers_redo_the_drawn_rounds_and_the_coordinator_redoes_none(tmp_path):
    """Every head drawn in every round: two spare volunteers redo them all, their passes stand, and
    the coordinator redoes no round itself; W is one on every peer."""
    mem, coordinator, nodes = _swarm(tmp_path, {f"p{i}": Trainer for i in range(3)}, {"v0": Trainer, "v1": Trainer},
                                     rounds=5)
    mem.run()
    given = coordinator.events.of("checks")
    assert given and all(sorted(e["verifiers"]) == sorted(named_identity(v).fingerprint for v in ("v0", "v1"))
                         for e in given)
    verdicts = coordinator.events.of("verdict")
    # (the checks of the last rounds may still be out when the run ends)
    assert {v["round"] for v in verdicts} <= {e["round"] for e in given}
    assert len(verdicts) >= 3 * (len(given) - 2) and all(v["passed"] and v["by"] == "verifiers" for v in verdicts)
    assert coordinator.events.of("redo") == []
    for v in ("v0", "v1"):
        checked = nodes[v].events.of("checked")
        assert checked and all(c["passed"] and c["mismatch"] < 1e-6 for c in checked)
        assert nodes[v].role.verifier.checked == len(checked)
    assert not coordinator.role.membership.revoked
    assert len(set(mem.digests(*[f"p{i}" for i in range(3)], "coordinator").values())) == 1


def test_a_lying_verifier_is_outvoted_and_revoked_and_the_cheat_it_covered_for_is_caught(tmp_path):
    """One verifier reports every check the other way round beside an honest one: no honest
    volunteer is evicted for its word, the coordinator redoes what it doubted, finds the cheat it
    passed, takes the cheat's work out and revokes both; the honest verifier stays."""
    mem, coordinator, nodes = _swarm(tmp_path, {"p0": Trainer, "p1": Trainer, "cheat": _TurnedAround},
                                     {"v0": Trainer, "liar": _Lying}, rounds=8)
    mem.run(max_seconds=1200)
    cheat, liar, honest_verifier = (named_identity(n).fingerprint for n in ("cheat", "liar", "v0"))
    assert coordinator.role.membership.revoked == {cheat, liar}
    assert [e["verifier"] for e in coordinator.events.of("lying_verifier")] == [liar]
    verdicts = coordinator.events.of("verdict")
    assert any(v["writer"] == cheat and not v["passed"] and v["by"] == "coordinator" for v in verdicts)
    assert all(v["passed"] for v in verdicts if v["writer"] != cheat), verdicts
    assert [e["writers"] for e in coordinator.events.of("undo")] == [[cheat]]
    assert nodes["liar"].state == "failed" and "revoked" in str(nodes["liar"].error)
    assert nodes["cheat"].state == "failed" and nodes["v0"].state != "failed"
    assert honest_verifier not in coordinator.role.membership.revoked
    # the liar's word on the honest volunteers never stood: what it failed first the coordinator
    # redid (and passed, above); once revoked, what it said next counted for nothing
    redone = {(e["round"], e["writer"]) for e in coordinator.events.of("redo")}
    lied_about = {(c["round"], c["writer"]) for c in nodes["liar"].events.of("checked") if c["passed"]}
    first = min(r for r, _ in lied_about)
    assert {x for x in lied_about if x[0] == first} <= redone
    decided = {(v["round"], v["writer"]): v for v in verdicts}
    assert all(decided[x]["passed"] for x in lied_about if x in decided)
    finished = [n for n in ("p0", "p1", "v0") if nodes[n].state != "failed"]
    assert len(set(mem.digests(*finished, "coordinator").values())) == 1


@pytest.mark.parametrize("verifiers", [0, 2])
def test_with_no_spare_volunteer_or_none_asked_for_the_coordinator_redoes_every_drawn_round(tmp_path, verifiers):
    cfg = tiny_config(heads=2, merge_every=2, rounds=4, min_heads=2, verify_rate=1.0, verifiers=verifiers)
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    for i in range(2):
        mem.trainer(f"p{i}")
    if verifiers == 0:
        mem.trainer("spare")  # standing by, but not asked
    mem.run()
    assert coordinator.events.of("checks") == []
    verdicts = coordinator.events.of("verdict")
    assert verdicts and all(v["by"] == "coordinator" and v["passed"] for v in verdicts)
    assert len(coordinator.events.of("redo")) == len(verdicts)


def test_a_cheat_caught_within_the_rollback_window_takes_w_back_to_before_its_first_round(tmp_path, monkeypatch):
    """`swarm.rollback_rounds`: the cheat's rounds 0-2 go unverified until round 2 is drawn. Two
    rounds on, every peer takes out of W all that rounds 0-3 added (every head's contributions, the
    honest reactions to the cheat's among them) and merges none of round 4's own: W is back where it
    was when the run began, on every peer alike and without a re-sync, and every volunteer's heads
    start afresh."""
    import peers.verification
    from swarm.rounds.machine import MergeProtocol
    from swarm.rounds.undo import Undoing

    loaded, noted, w_after = {}, {}, {}
    load, note, merge = Undoing.load, Undoing.note, MergeProtocol._merge

    def recorded_load(self, mr):
        values = load(self, mr)
        if values is not None:
            loaded[(self.ctx.peer, mr.round)] = (values, mr.rolled_back)
        return values

    def recorded_note(self, r, totals):
        noted[(self.ctx.peer, r)] = {name: value.double().clone() for name, value in totals.items()}
        return note(self, r, totals)

    def recorded_merge(self, mr, totals, members):
        out = merge(self, mr, totals, members)
        w_after[(self.ctx.peer, mr.round)] = {k: v.clone() for k, v in self.model.shared_state().items()}
        return out

    monkeypatch.setattr(Undoing, "load", recorded_load)
    monkeypatch.setattr(Undoing, "note", recorded_note)
    monkeypatch.setattr(MergeProtocol, "_merge", recorded_merge)
    monkeypatch.setattr(peers.verification, "sampled", lambda identity, run_id, r, heads, rate: heads if r >= 2 else [])
    cfg = tiny_config(heads=4, merge_every=2, rounds=8, min_heads=4, verify_rate=1.0, verifiers=0)
    assert cfg.swarm.rollback_rounds >= 3
    mem = MemorySwarm(cfg, tmp_path)
    coordinator = mem.coordinator()
    began = {k: v.clone() for k, v in coordinator.role.model.shared_state().items()}
    honest = [mem.trainer(f"p{i}") for i in range(3)]
    mem.trainer("cheat", role=_TurnedAround)
    mem.run(max_seconds=1200)
    (undo,) = coordinator.events.of("undo")
    assert undo["round"] == 2 and undo["at"] == 4 and undo["rollback"] == [0, 2]
    authority = coordinator.role.peer
    blob = {}
    for k in range(3):
        for name, value in noted[(authority, k)].items():
            blob[name] = blob[name] + value if name in blob else value
    peers = [node.role.peer for node in [coordinator, *honest]]
    assert {peer for peer, _ in loaded} >= set(peers) and {at for _, at in loaded} == {4}
    for peer in peers:
        values, rolled_back = loaded[(peer, 4)]
        assert rolled_back and all(torch.equal(values[name], blob[name].float()) for name in blob)
        # round 4 adds none of its own: out go the blob and what round 3 added
        added, before = noted[(peer, 4)], noted[(peer, 3)]
        assert all(torch.equal(added[name], -(values[name].double() + before[name])) for name in before)
        assert {k: v for k, v in w_after[(peer, 4)].items()}.keys() == began.keys()
        for name, value in began.items():  # W as the run began, to the float rounding of the sums
            assert torch.allclose(w_after[(peer, 4)][name].double(), value.double(), rtol=0, atol=1e-5), (peer[:6], name)
    for node in honest:
        assert [e["round"] for e in node.events.of("afresh")] == [5], node.name
        at = [e for e in node.events.of("round") if e["round"] == 4]
        assert at and not at[0]["resynced"] and at[0]["merged"]
    assert coordinator.events.of("afresh") == []
    assert len(set(mem.digests("coordinator", *[n.name for n in honest]).values())) == 1


@pytest.mark.xdist_group("processes")
def test_a_spare_volunteer_of_a_real_swarm_redoes_the_rounds_it_is_given(tmp_path):
    """Real processes on loopback (hivemind's DHT and transport, the CLI): two volunteers hold the
    run's two heads, a third stands by; the coordinator gives it the drawn rounds, it fetches W as
    each began and the holders' starts and contributions (a start with optimizer moments is larger
    than W) from the coordinator, and its passes stand."""
    from peers.local_swarm import LocalSwarm
    from tests.harness import warnings_of, write_config

    swarm = LocalSwarm(tmp_path, write_config(tmp_path / "run.yaml", heads=2, merge_every=20, rounds=60, min_heads=2,
                                              verify_rate=1.0, verifiers=1))
    try:
        coordinator = swarm.start_coordinator()
        holders = [swarm.join(f"p{i}") for i in range(2)]
        for p in holders:
            p.wait_for(lambda es: any(e["event"] == "heads" for e in es), 120, "a head")
        spare = swarm.join("spare")
        spare.wait_for(lambda es: any(e["event"] == "checked" for e in es), 120, "a check done")
        coordinator.wait_for(lambda es: any(e["event"] == "verdict" and e["by"] == "verifiers" for e in es), 60,
                             "a verdict from the verifier")
        checked = spare.of("checked")
        assert checked and all(c["passed"] and c["mismatch"] < 1e-6 for c in checked), checked
        assert all(v["passed"] for v in coordinator.of("verdict")), coordinator.of("verdict")
        assert coordinator.of("undo") == [] and coordinator.of("lying_verifier") == []
        assert "cannot" not in warnings_of(coordinator) + warnings_of(spare)
    finally:
        swarm.close()
