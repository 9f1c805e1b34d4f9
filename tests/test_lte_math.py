"""LTE's defining identities, in float64 against hand-written references."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn import functional as F

from swarm.lora import head_seed, semi_orthogonal
from swarm.lte_model import LTEModel, LTESpec, clip_head_grads_
from tests.conftest import randomize_heads, tiny_mlp, tiny_vit


def _masters(model: LTEModel) -> dict[str, torch.Tensor]:
    return {n: l.weight_store.master.clone() for n, l in model.layers()}


def test_reset_less_with_T1_is_multi_head_lora():
    """Same batch to every head, merge after every step: outputs and every head's gradients equal
    those of multi-head LoRA, y = W x + b + (s/N) sum_i B_i A_i x, trained by the same SGD."""
    n, lr = 3, 0.05
    spec = LTESpec(n_heads=n, rank=2, alpha=8.0, variant="reset_less", nonlinear="freeze")
    lte = LTEModel(tiny_mlp(), spec, list(range(n)))
    base = tiny_mlp()  # same seed: same W and biases
    layers = [base[0], base[2]]
    ref_a = [lte.factors[k].A.detach().clone().requires_grad_() for k in ("0", "2")]
    ref_b = [lte.factors[k].B.detach().clone().requires_grad_() for k in ("0", "2")]

    def reference(x):
        h = x
        for li, layer in enumerate(layers):
            lora = sum(F.linear(F.linear(h, ref_a[li][i]), ref_b[li][i]) for i in range(n))
            h = F.linear(h, layer.weight, layer.bias) + spec.scale / n * lora
            if li == 0:
                h = F.gelu(h)
        return h

    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(7, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (7,), generator=g)
        out = lte(x.expand(n, -1, -1))
        ref_out = reference(x)
        for i in range(n):
            torch.testing.assert_close(out[i], ref_out, rtol=0, atol=1e-12)
        # LTE's objective is the mean of the heads' losses.
        torch.stack([F.cross_entropy(out[i], y) for i in range(n)]).mean().backward()
        F.cross_entropy(ref_out, y).backward()
        for li, key in enumerate(("0", "2")):
            torch.testing.assert_close(lte.factors[key].A.grad, ref_a[li].grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(lte.factors[key].B.grad, ref_b[li].grad, rtol=0, atol=1e-12)
        with torch.no_grad():
            for p in lte.trainable_parameters() + ref_a + ref_b:
                p -= lr * p.grad
                p.grad = None
        lte.merge()
        if step > 0:  # the heads really moved: the identity is not the trivial B = 0 one
            assert any(f.B.abs().max() > 0 for f in lte.factors.values())
            assert all(r.grad is None for r in ref_a)


def test_vectorised_heads_equal_a_loop_of_single_heads():
    models = []
    for vectorised in (True, False):
        spec = LTESpec(n_heads=3, rank=2, alpha=16.0, nonlinear="replicate", vectorised=vectorised)
        m = LTEModel(tiny_vit().double(), spec, [0, 1, 2])
        randomize_heads(m, seed=3)
        models.append(m)
    x = torch.randn(3, 4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = []
    for m in models:
        out = m(x)
        (out ** 2).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    assert not torch.allclose(outs[0][0], outs[0][1])  # heads differ: each saw its own factors and input
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", ["reset", "reset_less"])
@pytest.mark.parametrize("storage", ["fp32", "nf4"])
def test_merge_with_all_B_zero_leaves_W_unchanged(variant, storage):
    spec = LTESpec(n_heads=4, rank=2, alpha=64.0, variant=variant, storage=storage)
    model = LTEModel(tiny_mlp().float(), spec, [0, 1, 2, 3])
    with torch.no_grad():  # A moves, B stays zero
        for f in model.factors.values():
            f.A.mul_(3.0)
    before, digest = _masters(model), model.weight_digest()
    model.merge()
    for name, w in _masters(model).items():
        assert torch.equal(w, before[name])
    assert model.weight_digest() == digest


@pytest.mark.parametrize("variant", ["reset", "reset_less"])
def test_absent_head_contributes_exactly_its_accumulated_change(variant):
    """Head 1 misses k merges; when it finally takes part, W gets exactly (s/N) times everything it
    learned since its last merge, and nothing is merged twice."""
    n, k = 3, 3
    spec = LTESpec(n_heads=n, rank=2, alpha=8.0, variant=variant)
    model = LTEModel(tiny_mlp(), spec, list(range(n)))
    expected = _masters(model)
    merged_product = {name: torch.zeros(n, *w.shape, dtype=w.dtype) for name, w in expected.items()}

    def products():
        return {name: model.factors[name].B.detach() @ model.factors[name].A.detach() for name in expected}

    for round_ in range(k + 1):
        randomize_heads(model, seed=10 + round_)
        present = [0, 2] if round_ < k else [0, 1, 2]
        now = products()
        for name in expected:
            for i in present:
                expected[name] += spec.scale / n * (now[name][i] - merged_product[name][i])
        if round_ == k:
            accumulated = {name: now[name][1] - merged_product[name][1] for name in expected}
            for name, delta in model.weight_deltas([1]).items():
                torch.testing.assert_close(delta, accumulated[name], rtol=0, atol=1e-12)
                assert delta.abs().max() > 1e-3
        model.merge(present)
        after = products()
        for name in expected:
            for i in present:
                merged_product[name][i] = after[name][i]
    for name, w in _masters(model).items():
        torch.testing.assert_close(w, expected[name], rtol=0, atol=1e-12)
    assert all(d.abs().max() == 0 for d in model.weight_deltas().values())  # nothing left to merge twice


def test_reset_variant_zeroes_B_and_keeps_A():
    model = LTEModel(tiny_mlp(), LTESpec(n_heads=2, rank=2, alpha=4.0, variant="reset"), [0, 1])
    randomize_heads(model, seed=0)
    a_before = {k: f.A.detach().clone() for k, f in model.factors.items()}
    model.merge([1])
    for k, f in model.factors.items():
        assert torch.equal(f.A, a_before[k])
        assert f.B[1].abs().max() == 0 and f.B[0].abs().max() > 0


def test_replicas_are_averaged_with_fixed_divisor():
    spec = LTESpec(n_heads=4, rank=2, alpha=4.0, nonlinear="replicate")
    model = LTEModel(tiny_mlp(), spec, [0, 1, 2, 3])
    shared0 = dict(model.model.named_parameters())["0.bias"].detach().clone()
    randomize_heads(model, seed=5)
    replicas = model.replicas["0:bias"].detach().clone()
    model.merge([0, 1])
    shared = dict(model.model.named_parameters())["0.bias"]
    torch.testing.assert_close(shared, shared0 + (replicas[0] + replicas[1] - 2 * shared0) / 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.replicas["0:bias"][0], shared, rtol=0, atol=0)  # merged heads restart from it
    torch.testing.assert_close(model.replicas["0:bias"][3], replicas[3], rtol=0, atol=0)  # absent heads keep theirs


def test_the_shared_state_read_from_another_thread_never_holds_a_plugged_in_head():
    """While a head is plugged in (a training step), the module's non-linear parameters are that
    head's replicas; a merge round running beside the step (swarm.overlap) or a peer handing out W
    must read the shared ones, so it waits for the step."""
    spec = LTESpec(n_heads=2, rank=2, alpha=4.0, nonlinear="replicate")
    model = LTEModel(tiny_mlp(), spec, [0, 1])
    shared = {name: p.data_ptr() for name, p in model.model.named_parameters()}
    plugged, read = threading.Event(), threading.Event()

    def step() -> None:
        with model.plugged(0):
            plugged.set()
            read.wait(1.0)  # without the lock the read is done at once; with it, it waits for this
    worker = threading.Thread(target=step)
    worker.start()
    plugged.wait(10.0)
    state = model.shared_state()
    read.set()
    worker.join()
    assert {name: state[name].data_ptr() for name in shared} == shared


def test_A_is_semi_orthogonal_per_head_and_reproducible_anywhere():
    a = semi_orthogonal(4, 10, seed=head_seed(0, 2, 0), dtype=torch.float64)
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64) * 0.4, rtol=0, atol=1e-12)
    full = LTEModel(tiny_mlp(), LTESpec(n_heads=4, rank=2, alpha=4.0), [0, 1, 2, 3])
    alone = LTEModel(tiny_mlp(), LTESpec(n_heads=4, rank=2, alpha=4.0), [2])  # a peer holding head 2 only
    for key in full.factors:
        assert torch.equal(full.factors[key].A[2], alone.factors[key].A[0])
        assert not torch.allclose(full.factors[key].A[0], full.factors[key].A[1])
        assert torch.equal(full.factors[key].B, torch.zeros_like(full.factors[key].B))


def test_per_head_clipping_leaves_other_heads_alone():
    p = torch.zeros(2, 3, requires_grad=True)
    p.grad = torch.tensor([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0]])
    norms = clip_head_grads_([p], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.1]))
    torch.testing.assert_close(p.grad[0].norm(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.grad[1], torch.tensor([0.1, 0.0, 0.0]))


@pytest.mark.parametrize("vectorised", [True, False])
def test_reset_variant_forward_is_W_x_plus_b_plus_s_B_A_x(vectorised):
    """Each head of the reset variant computes y = W x + b + s B_i A_i x, written out by hand here,
    on its own input."""
    n = 3
    spec = LTESpec(n_heads=n, rank=2, alpha=8.0, variant="reset", vectorised=vectorised)
    model = LTEModel(tiny_mlp(), spec, list(range(n)))
    randomize_heads(model, seed=7)
    assert all(f.A0 is None and f.B[i].abs().max() > 0 for f in model.factors.values() for i in range(n))
    plain = tiny_mlp()  # same seed: the W and b the heads sit on
    x = torch.randn(n, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = model(x)
    for i in range(n):
        h = x[i]
        for key, layer in (("0", plain[0]), ("2", plain[2])):
            a, b = model.factors[key].A[i].detach(), model.factors[key].B[i].detach()
            h = h @ layer.weight.T + layer.bias + spec.scale * (h @ a.T @ b.T)
            if key == "0":
                h = F.gelu(h)
        torch.testing.assert_close(out[i], h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vectorised", [False, True])
def test_an_eager_head_runs_on_its_sent_change_at_the_weight_its_merge_gives_it(vectorised):
    """Merges a round late, eager: while its contribution is in flight, head i runs on
    W + s (B A - Bs As) + w s (Bs As - B0 A0) with its replicas at base + w (sent - base) +
    (rep - sent), w being the share of the head's change that the merge adds to W (with Nesterov,
    outer_lr (1 + mu) / N); once the merge lands it runs on the plain view again."""
    n = 3
    spec = LTESpec(n_heads=n, rank=2, alpha=8.0, nonlinear="replicate", outer="nesterov", outer_lr=0.7,
                   outer_momentum=0.9, vectorised=vectorised)
    model = LTEModel(tiny_mlp(), spec, list(range(n)))
    model.delayed = model.eager = True
    w = spec.own_weight

    # w is what a merge gives one head's change (momentum still zero)
    fresh = LTEModel(tiny_mlp(), spec, list(range(n)))
    randomize_heads(fresh, seed=9)
    before = dict(fresh.shared_state())
    before = {k: v.clone() for k, v in before.items()}
    deltas, replicas = fresh.weight_deltas([1]), fresh.replica_deltas([1])
    fresh.apply_merge(deltas, replicas)
    for name, delta in deltas.items():
        torch.testing.assert_close(fresh.shared_state()[f"{name}.weight"] - before[f"{name}.weight"],
                                   spec.scale * w * delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(fresh.shared_state()["0.bias"] - before["0.bias"], w * replicas["0.bias"],
                               rtol=0, atol=1e-12)

    # a round trained, sent, merged a round late; the next one sent and in flight, training on
    randomize_heads(model, seed=1)
    first = model.weight_deltas(), model.replica_deltas()
    model.mark_sent()
    randomize_heads(model, seed=2)
    model.apply_merge(*first)
    model.settle_delayed(merged=True)
    second = model.weight_deltas(), model.replica_deltas()
    model.mark_sent()
    randomize_heads(model, seed=3)

    x = torch.randn(n, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = model.shared_state()
    out = model(x)
    for i in range(n):
        h = x[i]
        for key in ("0", "2"):
            f = {k: getattr(model.factors[key], k)[i].detach() for k in ("A", "B", "A0", "B0", "As", "Bs")}
            weight = (state[f"{key}.weight"] + spec.scale * (f["B"] @ f["A"] - f["Bs"] @ f["As"])
                      + w * spec.scale * (f["Bs"] @ f["As"] - f["B0"] @ f["A0"]))
            base, sent = model.replica_base[f"{key}:bias"][i], model.replica_sent[f"{key}:bias"][i]
            bias = base + w * (sent - base) + (model.replicas[f"{key}:bias"][i] - sent)
            assert (sent - base).abs().max() > 1e-3 and (f["Bs"] - f["B0"]).abs().max() > 1e-3
            h = h @ weight.T + bias.detach()
            if key == "0":
                h = F.gelu(h)
        torch.testing.assert_close(out[i], h, rtol=0, atol=1e-12)
    model.eager = False
    assert (model(x) - out).abs().max() > 1e-3  # the plain delayed view differs while a merge is in flight

    model.apply_merge(*second)
    model.settle_delayed(merged=True)
    plain = model(x)
    model.eager = True
    torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-12)
