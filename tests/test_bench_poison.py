"""`scripts/bench_poison.py`: every forged contribution is as large as the bounds let through (it
passes the swarm's checks, and 3 % more would not), points where its attack says, and the
benchmark runs the swarm's merge with it. The runs themselves take minutes: docs/benchmarks.md."""

from __future__ import annotations

import torch

from swarm.lte_model import LTEModel, LTESpec
from swarm.wire import decode_contribution, encode_contribution
from tests.conftest import ROOT, load_script, randomize_heads, tiny_vit

SPEC = LTESpec(n_heads=4, rank=2, alpha=8.0, nonlinear="replicate")


def test_a_forgery_sits_at_the_bounds_and_points_where_its_attack_says():
    bench = load_script("bench_poison")
    model = LTEModel(tiny_vit(), SPEC, [0])
    randomize_heads(model, seed=0, scale=0.05)
    blob, _ = encode_contribution(model, [0])
    honest = decode_contribution(blob, "p", model, max_update=10.0)
    for attack in ("shrink", "flip", "noise"):
        forged = bench.forge(attack, honest, model, 10.0, 0.5, {}, torch.Generator().manual_seed(0))
        assert bench._passes(forged, model, 10.0, 0.5, {}), attack
        assert not bench._passes(forged, model, 10.0, 0.5 * bench.MARGIN / 1.03, {}), attack  # at the bound
        for name, delta in forged.weights.items():
            reference = {"shrink": -model.layer(name).weight_store.master, "flip": -honest.weights[name]}.get(attack)
            if reference is not None:
                cosine = torch.nn.functional.cosine_similarity(delta.flatten(), reference.float().flatten(), dim=0)
                assert cosine > 0.999, (attack, name)
    zeros = bench.forge("zeros", honest, model, 10.0, 0.5, {}, torch.Generator())
    assert all(not t.any() for t in [*zeros.weights.values(), *zeros.replicas.values()])


def test_a_caught_head_is_taken_out_as_the_swarm_takes_it_out_and_w_stays_near_the_attack_free_run(monkeypatch):
    """`--verify-rate 1`: the head pulling W toward zero is caught in round 0, left out of round 1,
    its round-0 change taken out in round 2 (`swarm.rounds.undo`) and honest after. W's layers end
    up nearer the attack-free run's than with nothing taken out, and nearer still than when nobody
    verifies (a tiny model, 3 rounds)."""
    import swarm.rounds.undo as undo

    bench = load_script("bench_poison")
    tiny = {"model.args.embed_dim": 16, "model.args.depth": 1, "model.args.num_heads": 2, "lte.rank": 4,
            "train.samples": 3 * 10 * 64, "train.eval_every": 1000}  # 3 rounds of T = 10 steps of 64
    config = str(ROOT / "configs" / "digits-vit-tiny.yaml")
    free = bench.run_one((config, tiny, None, 0, 0.0, False))
    verified, unverified = (bench.run_one((config, tiny, "shrink", 1, v, False)) for v in (1.0, 0.0))
    monkeypatch.setattr(undo, "subtract", lambda totals, _: totals)
    kept = bench.run_one((config, tiny, "shrink", 1, 1.0, False))  # caught, but its change left in W
    assert verified["caught"] == kept["caught"] == [0] and unverified["caught"] == [] and free["rounds"] == 3

    def distance(run):
        return sum(abs(run["norms"][n] - free["norms"][n]) for n in free["norms"])

    assert distance(verified) < 0.7 * distance(kept) and distance(kept) < distance(unverified)


def test_a_rolled_back_round_takes_out_every_heads_contribution_of_the_rounds_since_the_caught_heads_first(
        monkeypatch):
    """`--rollback` (the swarm's `swarm.rollback_rounds`, as the simulation models it): the head
    caught in round 0 takes rounds 0 and 1 with it two rounds on: every head's contributions, as
    the rounds applied them; without it, only the caught head's share goes."""
    import swarm.rounds.undo as undo
    import swarm.wire as wire

    bench = load_script("bench_poison")
    tiny = {"model.args.embed_dim": 16, "model.args.depth": 1, "model.args.num_heads": 2, "lte.rank": 4,
            "train.samples": 3 * 10 * 64, "train.eval_every": 1000}
    config = str(ROOT / "configs" / "digits-vit-tiny.yaml")
    merged, taken = [], []
    totals_of, subtract = wire.merged_totals, undo.subtract
    monkeypatch.setattr(wire, "merged_totals", lambda *a, **k: merged.append(totals_of(*a, **k)) or merged[-1])
    monkeypatch.setattr(undo, "subtract", lambda totals, values: taken.append(values) or subtract(totals, values))

    def same(a, b) -> bool:
        scale = max(float(b[name].abs().max()) for name in b)
        return max(float((a[name].double() - b[name].double()).abs().max()) for name in b) < 1e-6 * scale

    for rollback in (False, True):
        merged.clear(), taken.clear()
        run = bench.run_one((config, tiny, "shrink", 1, 1.0, rollback))
        assert run["caught"] == [0] and len(merged) == 3
        if rollback:  # round 0's whole merge in the undo, then round 1's, which round 2 takes out itself
            assert len(taken) == 2 and same(taken[0], merged[0]) and same(taken[1], merged[1])
        else:
            assert len(taken) == 1 and not same(taken[0], merged[0])
