"""The LTE knobs beyond the paper's N, r, T: q, k and v adapted apart (`lte.split_qkv`), the scale of
A (`lte.init_scale`), and optimizer settings per parameter group (`train.factors`, `train.replicas`,
`train.full`). Float64 where it is math."""

from __future__ import annotations

import pytest
import torch

from peers.training import HeadTrainer
from swarm.config import TrainConfig
from swarm.lora import head_seed, semi_orthogonal
from swarm.lte_model import LTEModel, LTESpec
from swarm.wire import decode_contribution, encode_contribution
from tests.conftest import randomize_heads, tiny_mlp, tiny_vit

QKV = "blocks.0.attn.qkv"


def _split_model(heads=(0, 1), variant="reset_less") -> LTEModel:
    spec = LTESpec(n_heads=2, rank=2, alpha=8.0, variant=variant, split_qkv=True)
    return LTEModel(tiny_vit().double(), spec, list(heads))


def _off_blocks(b: torch.Tensor, blocks: int = 3) -> torch.Tensor:
    """The entries of B (H, m, blocks * r) outside its diagonal blocks."""
    m, r = b.shape[1] // blocks, b.shape[2] // blocks
    keep = torch.block_diag(*[torch.ones(m, r, dtype=b.dtype)] * blocks)
    return b * (1 - keep)


def test_split_qkv_is_three_separately_adapted_projections():
    """Head i's qkv output is [W_q x + s B_q A_q x, W_k x + s B_k A_k x, W_v x + s B_v A_v x] (+ b),
    each of q, k, v with its own rank-r head; B stays block-diagonal through training; other
    layers keep one rank-r head."""
    model = _split_model()
    r, dim = 2, 16
    assert model.layer_rank(QKV) == 3 * r and model.layer_rank("blocks.0.attn.proj") == r
    f = model.factors[QKV.replace(".", ":")]
    assert f.A.shape == (2, 3 * r, dim) and f.B.shape == (2, 3 * dim, 3 * r)
    for j in range(3):  # each block its own semi-orthogonal A
        a = f.A[1, j * r:(j + 1) * r].detach()
        torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=a.dtype) * r / dim, rtol=0, atol=1e-12)
    assert not torch.allclose(f.A[1, :r], f.A[1, r:2 * r])
    # train a few steps: gradients reach the diagonal blocks only
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(2, 4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        (model(x) ** 2).sum().backward()
        opt.step()
    assert f.B.abs().max() > 0 and _off_blocks(f.B.detach()).abs().max() == 0
    # the layer's forward, written out per projection
    layer = model.layer(QKV)
    w, bias = layer.weight_store.master, layer.bias
    h = torch.randn(5, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(2):
            layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0 = f.A[i], f.B[i], f.A0[i], f.B0[i]
            got = layer(h)
            parts = []
            for j in range(3):
                rows, cols = slice(j * dim, (j + 1) * dim), slice(j * r, (j + 1) * r)
                parts.append(h @ w[rows].T + bias[rows] + model.spec.scale * (h @ f.A[i, cols].T @ f.B[i, rows, cols].T))
            torch.testing.assert_close(got, torch.cat(parts, -1), rtol=0, atol=1e-12)
    layer.lora_A = layer.lora_B = layer.lora_A0 = layer.lora_B0 = None


@pytest.mark.parametrize("form", ["factors", "dense"])
def test_split_qkv_contributions_round_trip_and_merge_like_the_local_merge(form):
    peer = _split_model(heads=(1,))
    randomize_heads(peer, seed=3, scale=0.05)
    receiver = _split_model(heads=())
    c = decode_contribution(encode_contribution(peer, [1], form=form)[0], "peer", receiver, 10.0)
    for name, delta in peer.weight_deltas().items():
        torch.testing.assert_close(c.weights[name].double(), delta, rtol=1e-6, atol=1e-7)
    local = _split_model(heads=(1,))
    randomize_heads(local, seed=3, scale=0.05)
    local.merge()
    receiver.apply_merge({k: v.double() for k, v in c.weights.items()}, {})
    for (name, a), (_, b) in zip(local.layers(), receiver.layers()):
        torch.testing.assert_close(a.weight_store.master, b.weight_store.master, rtol=1e-6, atol=1e-7, msg=name)


def test_split_qkv_merged_model_is_plain_timm():
    model = _split_model()
    randomize_heads(model, seed=0)
    model.merge()
    plain = tiny_vit(seed=99).double()
    plain.load_state_dict(model.merged_state_dict())
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain.eval()(x), model.eval().forward_merged(x), rtol=0, atol=1e-10)


def test_init_scale_reference_is_sqrt_fan_in_over_rank():
    a = semi_orthogonal(4, 16, seed=head_seed(0, 1, 0), dtype=torch.float64, scale="reference")
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64) * 4.0, rtol=0, atol=1e-12)
    spectral = LTEModel(tiny_mlp(), LTESpec(n_heads=2, rank=2, alpha=4.0), [0, 1])
    reference = LTEModel(tiny_mlp(), LTESpec(n_heads=2, rank=2, alpha=4.0, init_scale="reference"), [0, 1])
    for key, f in spectral.factors.items():  # same directions, scaled by fan_in / rank
        torch.testing.assert_close(reference.factors[key].A, f.A * (f.A.shape[2] / 2), rtol=1e-12, atol=0)


def _train(**groups) -> TrainConfig:
    return TrainConfig(batch_size=4, samples=8, lr=0.01, full_lr=0.03, weight_decay=0.05, grad_clip=1.0, **groups)


def test_param_groups_carry_their_own_decay_rate_and_clip():
    model = LTEModel(tiny_mlp(), LTESpec(n_heads=2, rank=2, alpha=4.0, nonlinear="replicate"), [0, 1])
    trainer = HeadTrainer(model, _train(replica_lr=0.1, factors={"weight_decay": 0.0}, replicas={"grad_clip": 0.0}), 10)
    factors, replicas = trainer.optimizer.param_groups
    assert {id(p) for p in replicas["params"]} == {id(p) for p in model.replicas.parameters()}
    assert (factors["weight_decay"], factors["peak_lr"]) == (0.0, 0.01)
    assert (replicas["weight_decay"], replicas["peak_lr"]) == (0.05, 0.1)
    assert [clip for _, clip in trainer.clips] == [1.0, None]  # factors inherit train.grad_clip; 0 is off
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    trainer.step(x, torch.zeros(2, 3, dtype=torch.long), step_index=5)
    assert replicas["lr"] == pytest.approx(10 * factors["lr"]) and 0 < factors["lr"] < 0.01  # on the schedule
    # unset, the replicas train at full-rank's rate; unset clips: each head's factors and replicas
    # are clipped together, as one vector
    joint = HeadTrainer(model, _train(), 10)
    assert [g["peak_lr"] for g in joint.optimizer.param_groups] == [0.01, 0.03]
    assert len(joint.clips) == 1 and joint.clips[0][1] == 1.0
    full = HeadTrainer(torch.nn.Linear(3, 3), _train(full={"grad_clip": 2.0, "weight_decay": 0.1}), 10)
    assert full.clips[0][1] == 2.0 and full.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert full.optimizer.param_groups[0]["peak_lr"] == 0.03


def test_separate_clips_clip_each_group_per_head():
    """Clips far below the gradients' norms: after a step, each head's factors and each head's
    replicas have exactly their own group's norm."""
    from swarm.lte_model import clip_head_grads_

    model = LTEModel(tiny_mlp(), LTESpec(n_heads=2, rank=2, alpha=4.0, nonlinear="replicate"), [0, 1])
    randomize_heads(model, seed=1)
    trainer = HeadTrainer(model, _train(factors={"grad_clip": 1e-3}, replicas={"grad_clip": 1e-4}), 10)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trainer.step(x, torch.tensor([[0, 1, 2], [2, 1, 0]]), step_index=5)
    for (params, clip), group in zip(trainer.clips, trainer.optimizer.param_groups):
        assert params is group["params"] or params == group["params"]
        norms = clip_head_grads_(params, 1e9)  # measures without clipping
        torch.testing.assert_close(norms, torch.full((2,), clip, dtype=norms.dtype), rtol=1e-3, atol=0)
