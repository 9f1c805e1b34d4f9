"""The outer step of a merge (lte.outer): written out in float64 against the model's own merge, its
momentum carried with W wherever W goes (state blobs, checkpoints, a newcomer's download), and a
swarm with it still the simulation, bit for bit."""

from __future__ import annotations

import pytest
import torch

from peers.checkpoint import load_checkpoint, save_checkpoint
from peers.models import create_lte_model, lte_spec
from peers.simulate import simulate
from swarm.config import ConfigError, parse_config
from swarm.lora import merge_scale
from swarm.lte_model import MOMENTUM, LTEModel, LTESpec
from swarm.wire import decode_state, encode_state
from tests.conftest import randomize_heads, tiny_vit
from tests.memswarm import MemorySwarm, tiny_config

NESTEROV = {"lte.outer.optimizer": "nesterov", "lte.outer.lr": 0.7, "lte.outer.momentum": 0.9}


def _mean_changes(model: LTEModel) -> dict[str, torch.Tensor]:
    """What plain averaging adds to each shared tensor in this merge."""
    coef = merge_scale(model.spec.scale, model.spec.n_heads)
    out = {f"{n}.weight": coef * d for n, d in model.weight_deltas().items()}
    out.update({n: d / model.spec.n_heads for n, d in model.replica_deltas().items()})
    return out


@pytest.mark.parametrize("outer", ["average", "nesterov"])
def test_two_merges_take_the_outer_step_written_out(outer):
    """average: W += lr d. nesterov: m = mu m + d, W += lr (d + mu m), from m = 0: after two
    merges W = W0 + lr (d1 + mu d1) + lr (d2 + mu (mu d1 + d2)). Replicated parameters alike."""
    lr, mu = 0.7, (0.9 if outer == "nesterov" else 0.0)
    spec = LTESpec(n_heads=3, rank=2, alpha=16.0, nonlinear="replicate", outer=outer, outer_lr=lr, outer_momentum=mu)
    model = LTEModel(tiny_vit().double(), spec, [0, 1, 2])
    start = {k: v.clone() for k, v in model.shared_state().items()}
    expected = {k: v.clone() for k, v in start.items() if not k.startswith(MOMENTUM)}
    momentum = {k: torch.zeros_like(v) for k, v in expected.items()}
    for seed in (1, 2):
        randomize_heads(model, seed=seed, scale=0.05)
        for key, d in _mean_changes(model).items():
            assert d.abs().max() > 1e-3, key  # the heads moved: the identity is not 0 = 0
            momentum[key] = mu * momentum[key] + d
            expected[key] += lr * (d + mu * momentum[key])
        model.merge()
    state = model.shared_state()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12, msg=key)
    if outer == "nesterov":
        assert set(state) == set(expected) | {MOMENTUM + k for k in model.momentum}
        for key, m in momentum.items():
            if key in model.momentum:
                torch.testing.assert_close(state[MOMENTUM + key], m, rtol=0, atol=1e-12, msg=key)
    else:
        assert set(state) == set(expected)  # plain averaging keeps no state


def test_the_momentum_travels_with_w_in_state_blobs_and_checkpoints(tmp_path):
    """A peer that downloads W, or a coordinator that resumes, has the momentum too: the state's
    digest covers it, a blob or checkpoint carries it, and a blob whose momentum was tampered with
    is refused and leaves the model as it was."""
    cfg = tiny_config(heads=2).with_overrides(NESTEROV)
    trained = create_lte_model(cfg, [0, 1])
    randomize_heads(trained, seed=3, scale=0.05)
    trained.merge()
    assert any(m.abs().max() > 0 for m in trained.momentum.values())
    fresh = create_lte_model(cfg, [])
    before = fresh.state_digest()
    decode_state(encode_state(trained, 1), fresh, trained.state_digest(), 1)
    assert fresh.state_digest() == trained.state_digest()
    for key, m in trained.momentum.items():
        assert torch.equal(fresh.momentum[key], m), key

    other = create_lte_model(cfg, [])
    tampered = create_lte_model(cfg, [])
    tampered.load_shared_state(trained.shared_state())
    next(iter(tampered.momentum.values())).add_(1.0)  # same W, other momentum: another state
    assert tampered.state_digest() != trained.state_digest()
    blob = encode_state(tampered, 1)
    with pytest.raises(Exception, match="expected"):
        decode_state(blob, other, trained.state_digest(), 1)
    assert other.state_digest() == before

    save_checkpoint(tmp_path, "run", 1, cfg, trained, [])
    loaded = load_checkpoint(tmp_path).model
    assert loaded.state_digest() == trained.state_digest()
    for key, m in trained.momentum.items():
        assert torch.equal(loaded.momentum[key], m), key


def test_a_swarm_with_outer_nesterov_is_the_simulation_and_a_newcomer_downloads_the_momentum(tmp_path):
    """Three peers from round 0 give the simulation's W (and momentum) at every round, bit for
    bit; one joining at round 3 downloads W with its momentum and then merges the same W as every
    other peer (with momentum left at zero, its very next merge would differ)."""
    cfg = tiny_config(heads=3, merge_every=2, rounds=6, min_heads=3).with_overrides(NESTEROV)
    swarm = MemorySwarm(cfg, tmp_path)
    swarm.coordinator()
    for i in range(3):
        swarm.trainer(f"p{i}")
    swarm.run()
    sim = simulate(cfg)
    assert [r["digest"] for r in swarm["coordinator"].events.of("round")] == [p.digest for p in sim.history]
    assert len(set(swarm.digests().values())) == 1
    plain = simulate(cfg.with_overrides({"lte.outer.optimizer": "average"}))
    assert plain.history[-1].digest != sim.history[-1].digest  # the outer step changed W

    late_cfg = tiny_config(heads=3, merge_every=2, rounds=8).with_overrides(NESTEROV)
    late_swarm = MemorySwarm(late_cfg, tmp_path / "late")
    late_swarm.coordinator()
    late_swarm.trainer("early0"), late_swarm.trainer("early1")
    late_swarm.run(until=lambda s: any(e["new_round"] >= 3 for e in s["coordinator"].events.of("round")))
    late = late_swarm.trainer("late")
    late_swarm.run()
    joined = late.events.of("joined")[0]
    assert joined["round"] >= 3 and joined["downloaded"] > 0
    assert any(r["merged"] for r in late.events.of("round"))
    digests = late_swarm.digests()
    assert len(set(digests.values())) == 1, digests


def test_the_outer_step_is_strict_config():
    base = tiny_config()
    assert lte_spec(base.with_overrides(NESTEROV)).outer_momentum == 0.9
    assert lte_spec(base).outer_momentum == 0.0 and lte_spec(base).outer_lr == 1.0
    raw = base.model_dump(mode="json")
    for bad in ({"optimizer": "adam"}, {"momentum": 1.0}, {"lr": 0}, {"nesterov": True}):
        broken = dict(raw, lte={**raw["lte"], "outer": {**raw["lte"]["outer"], **bad}})
        with pytest.raises(ConfigError, match="outer"):
            parse_config(broken, origin="test")
