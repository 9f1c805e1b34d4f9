"""The one-node LoRA layer (`LoRALinearFunction`) against the plain formula, in float64, and what it
keeps for backward; the ways a peer runs its heads (directly, looped, vmapped, checkpointed) agree."""

from __future__ import annotations

import pytest
import torch

from peers.training import HeadTrainer
from swarm.config import TrainConfig
from swarm.lora import fold_into_weight, lora_linear, lora_linear_reference
from swarm.lte_model import LTEModel, LTESpec
from swarm.quant import QuantizedWeight
from tests.conftest import randomize_heads, tiny_vit

M, N, R = 6, 10, 3


def _inputs(with_baseline: bool, with_bias: bool, dtype=torch.float64, seed: int = 0, tokens=(2, 5)):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    x = rand(*tokens, N)
    bias = rand(M) if with_bias else None
    a, b = rand(R, N), rand(M, R)
    a0, b0 = (rand(R, N, grad=False), rand(M, R, grad=False)) if with_baseline else (None, None)
    return x, bias, a, b, a0, b0


@pytest.mark.parametrize("tokens", [(2, 5), (1, 2)], ids=["folded-into-W", "low-rank-path"])
@pytest.mark.parametrize("storage", ["fp32", "nf4"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("variant", ["reset", "reset_less"])
def test_function_equals_plain_formula_with_all_gradients(variant, with_bias, storage, tokens):
    """Outputs and the gradients of x, A, B and a trainable bias (replicated non-linear parameters)
    equal those of W x + b + s (B A x - B0 A0 x), with W the layer's dequantized forward copy, in
    both of the layer's forms (the head folded into a dense W, or a low-rank path beside W x)."""
    assert fold_into_weight(tokens[0] * tokens[1], M, N) == (tokens == (2, 5))
    x, bias, a, b, a0, b0 = _inputs(variant == "reset_less", with_bias, tokens=tokens)
    store = QuantizedWeight(torch.randn(M, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64), storage)
    w = store.weight(torch.float64)
    if storage == "nf4":
        assert not torch.equal(w, store.master)  # the function must use the forward copy, not the master
    scale = 4.0
    inputs = [t for t in (x, bias, a, b) if t is not None]
    out = lora_linear(x, store, bias, a, b, a0, b0, scale)
    ref = lora_linear_reference(x, w, bias, a, b, a0, b0, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(t[0], store, *([t[1]] if with_bias else [None]),
                                                           *t[-2:], a0, b0, scale), tuple(inputs))


def _saved_during(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("tokens", [4, 200])
@pytest.mark.parametrize("autocast", [False, True])
def test_function_saves_its_input_once_and_no_dequantized_weight(autocast, tokens):
    """For backward the layer keeps x once (in the compute dtype: bf16 under autocast), A x and the
    factors it already holds; never a dequantized (or head-merged) copy of W, which it forms again
    in backward."""
    big_m, big_n = 128, 256
    store = QuantizedWeight(torch.randn(big_m, big_n), "nf4")
    x = torch.randn(tokens, 1, big_n, requires_grad=True)
    a, b = torch.randn(R, big_n, requires_grad=True), torch.randn(big_m, R, requires_grad=True)
    a0, b0 = torch.randn(R, big_n), torch.randn(big_m, R)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved = _saved_during(lambda: lora_linear(x, store, None, a, b, a0, b0, 2.0))
    assert not [t for t in saved if t.numel() == big_m * big_n]
    inputs = [t for t in saved if t.numel() == x.numel()]
    assert len(inputs) == 1 and inputs[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert sum(t.numel() for t in saved) <= x.numel() + tokens * R + 2 * R * (big_m + big_n)


def test_bf16_autocast_is_close_to_fp32_and_keeps_fp32_gradients():
    x, bias, a, b, a0, b0 = _inputs(True, True, dtype=torch.float32)
    store = QuantizedWeight(torch.randn(M, N, generator=torch.Generator().manual_seed(9)), "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, store, bias, a, b, a0, b0, 4.0)
    assert out.dtype == torch.bfloat16
    ref = lora_linear_reference(x, store.weight(), bias, a, b, a0, b0, 4.0)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.5)
    out.float().square().sum().backward()
    assert {t.grad.dtype for t in (x, bias, a, b)} == {torch.float32}


def _model(vectorised: bool, variant: str, heads=(0, 1, 2)) -> LTEModel:
    spec = LTESpec(n_heads=3, rank=2, alpha=16.0, variant=variant, nonlinear="replicate", vectorised=vectorised)
    model = LTEModel(tiny_vit().double(), spec, list(heads))
    randomize_heads(model, seed=3)
    model.merge()  # a non-zero baseline B0 A0 for the reset-less variant
    randomize_heads(model, seed=4)
    return model


@pytest.mark.parametrize("variant", ["reset", "reset_less"])
def test_stacked_heads_under_vmap_equal_the_loop_and_a_peer_holding_one_head(variant):
    """vmap over stacked heads (plain formula, unfused attention) = a loop of plugged heads (one
    autograd node per layer, fused attention) = a model holding just that head, in float64."""
    x = torch.randn(3, 4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vmapped, looped, alone = _model(True, variant), _model(False, variant), _model(True, variant, heads=(0, 1, 2))
    alone.set_heads([1])  # head 1 alone, with its tensors: the path of a one-head peer
    assert vmapped.vectorised and not looped.vectorised and not alone.vectorised
    outs = []
    for m, xi in ((vmapped, x), (looped, x), (alone, x[1:2])):
        out = m(xi)
        (out ** 2).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs[2][0], outs[0][1], rtol=0, atol=1e-12)
    for (name, p), q, r in zip(vmapped.named_parameters(), looped.parameters(), alone.parameters()):
        if p.requires_grad:
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
            torch.testing.assert_close(r.grad[0], p.grad[1], rtol=0, atol=1e-12, msg=name)


def _train(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=12, samples=120, lr=0.01, full_lr=0.01, grad_clip=1.0,
                                 weight_decay=0.01), **overrides})


@pytest.mark.parametrize("vectorised", [True, False])
def test_checkpointing_gives_the_same_step(vectorised):
    """Activation checkpointing recomputes each block in backward under the head that ran it."""
    x = torch.randn(3, 4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(1))
    plain, checkpointed = _model(vectorised, "reset_less"), _model(vectorised, "reset_less")
    losses = [HeadTrainer(m, _train(checkpointing=c), 10).step(x, y, 0)
              for m, c in ((plain, False), (checkpointed, True))]
    assert checkpointed.model.grad_checkpointing and not plain.model.grad_checkpointing
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    # The (clipped) gradients the step used; parameters after an Adam step would not do, since
    # Adam turns the rounding noise of gradients that are zero in exact arithmetic (the key bias's,
    # as softmax ignores a shift of all keys) into full-size steps.
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if p.requires_grad:
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
    with pytest.raises(RuntimeError, match="plugged"):  # a joint forward would recompute with no head
        checkpointed(x)


def test_bf16_training_step_on_cpu_keeps_fp32_state():
    model = LTEModel(tiny_vit(), LTESpec(n_heads=2, rank=2, alpha=16.0, nonlinear="replicate"), [0, 1])
    trainer = HeadTrainer(model, _train(precision="bf16"), 10)
    x, y = torch.randn(2, 4, 1, 8, 8), torch.randint(0, 3, (2, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = trainer.step(x, y, 0)
    assert loss == loss and loss > 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p, before[name]), name
    assert {s["exp_avg"].dtype for s in trainer.optimizer.state.values()} == {torch.float32}
