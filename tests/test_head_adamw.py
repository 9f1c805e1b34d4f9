"""Every head keeps its own AdamW state: equal to torch's AdamW while heads move together, and kept
heads keep their moments and step counts when a peer's head set changes."""

from __future__ import annotations

import torch

from peers.training import HeadTrainer
from swarm.config import TrainConfig
from swarm.head_adamw import HeadAdamW
from swarm.lte_model import LTEModel, LTESpec
from tests.conftest import tiny_vit


def test_equals_torch_adamw_bit_for_bit_when_heads_step_together():
    g = torch.Generator().manual_seed(0)
    mine = torch.nn.Parameter(torch.randn(3, 4, 5, generator=g))
    ref = torch.nn.Parameter(mine.detach().clone())
    opts = [HeadAdamW([mine], lr=0.01, weight_decay=0.1), torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1, foreach=False)]
    for step in range(4):
        grad = torch.randn(3, 4, 5, generator=g)
        for p, opt in ((mine, opts[0]), (ref, opts[1])):
            p.grad = grad.clone()
            opt.param_groups[0]["lr"] = 0.01 / (step + 1)
            opt.step()
        assert torch.equal(mine, ref)
    assert not torch.equal(mine, torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)))


def test_a_head_that_starts_later_gets_its_own_bias_correction():
    """Head 1 first steps when head 0 is at step 3: its update equals a fresh AdamW's first step."""
    p = torch.nn.Parameter(torch.zeros(2, 4))
    opt = HeadAdamW([p], lr=0.1, weight_decay=0.0)
    opt.state[p] = {"step": torch.tensor([3.0, 0.0]), "exp_avg": torch.zeros(2, 4), "exp_avg_sq": torch.zeros(2, 4)}
    p.grad = torch.ones(2, 4) * 0.5
    opt.step()
    fresh = torch.nn.Parameter(torch.zeros(4))
    ref = torch.optim.AdamW([fresh], lr=0.1, weight_decay=0.0, foreach=False)
    fresh.grad = torch.ones(4) * 0.5
    ref.step()
    assert torch.equal(p[1], fresh)
    assert not torch.equal(p[0], p[1])  # head 0 at step 4 corrects its moments differently
    assert opt.state[p]["step"].tolist() == [4.0, 1.0]


def test_kept_heads_keep_their_optimizer_state_across_a_change_of_heads():
    """Train heads 0 and 2, then hold 2 and 1: head 2's moments and step count are carried over
    unchanged to its new position; head 1 starts with no moments at step 0."""
    cfg = TrainConfig(batch_size=8, samples=80, lr=0.01, full_lr=0.01, grad_clip=1.0)
    model = LTEModel(tiny_vit(), LTESpec(n_heads=3, rank=2, alpha=16.0, nonlinear="replicate"), [0, 2])
    trainer = HeadTrainer(model, cfg, 10)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        trainer.step(torch.randn(2, 4, 1, 8, 8, generator=g), torch.randint(0, 3, (2, 4), generator=g), step)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: {k: v[1].clone() for k, v in trainer.optimizer.state[p].items()}
              for n, p in model.named_parameters() if p.requires_grad}
    assert all(s["step"].item() == 2 and s["exp_avg"].abs().max() > 0 for s in before.values())

    trainer.set_heads([2, 1])
    assert model.head_ids == [2, 1]
    params = dict(model.named_parameters())
    for name in names:
        state = trainer.optimizer.state[params[name]]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][0], before[name][key]), (name, key)
            assert not state[key][1].any(), (name, key)
    optimized = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(optimized) == sorted(id(p) for p in model.trainable_parameters()) == sorted(map(id, trainer.params))
    trainer.step(torch.randn(2, 4, 1, 8, 8, generator=g), torch.randint(0, 3, (2, 4), generator=g), 2)
    assert {tuple(trainer.optimizer.state[params[n]]["step"].tolist()) for n in names} == {(3.0, 1.0)}

    trainer.set_heads([1])  # drop the kept one: head 1 keeps its single step
    params = dict(model.named_parameters())
    assert {tuple(trainer.optimizer.state[params[n]]["step"].tolist()) for n in names} == {(1.0,)}
