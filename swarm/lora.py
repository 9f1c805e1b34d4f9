"""LoRA-the-Explorer math for one linear layer: head products, merge deltas, semi-orthogonal init.

Tensors in, tensors out, so every identity here can be checked in float64. Per-head tensors are
stacked along a leading head dimension: A is (H, r, n), B is (H, m, r) for a weight of shape (m, n).
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from swarm.quant import QuantizedWeight


def head_seed(seed: int, head: int, layer: int) -> int:
    """A seed for head `head` of layer `layer`, the same on every peer that ever holds that head."""
    digest = hashlib.sha256(f"lte/{seed}/{head}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


InitScale = Literal["spectral", "reference"]


def semi_orthogonal(rank: int, fan_in: int, *, seed: int, dtype: torch.dtype = torch.float32,
                    scale: InitScale = "spectral") -> torch.Tensor:
    """A (rank, fan_in) matrix with orthonormal rows (or columns when rank > fan_in), scaled by
    sqrt(rank / fan_in) so its spectral norm matches its shape (`spectral`: Bernstein et al.'s
    spectral scaling, A maps fan_in to rank), or by sqrt(fan_in / rank) (`reference`: what the
    paper's public code does). Under Adam the scale of A sets how far B's steps move B A.

    Each head draws its own matrix: distinct random subspaces are what keep the heads exploring
    different directions.
    """
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, fan_in, dtype=torch.float64)
    nn.init.orthogonal_(a, generator=generator)
    ratio = rank / fan_in if scale == "spectral" else fan_in / rank
    return (a * ratio ** 0.5).to(dtype)


def products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B_i @ A_i for every head: (H, m, r) x (H, r, n) -> (H, m, n)."""
    return torch.bmm(b, a)


def delta_sum(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sum over `heads` of each head's unmerged change B_i A_i - B0_i A0_i, shape (m, n).

    B0 A0 is the product at the head's last merge (reset-less variant); with the reset variant B is
    zeroed at every merge, so there is no baseline and `a0`/`b0` are None. The heads are summed in
    the order given, which callers keep canonical so that every peer gets the same bits.
    """
    idx = list(range(a.shape[0])) if heads is None else list(heads)
    m, n = b.shape[1], a.shape[2]
    total = torch.zeros(m, n, dtype=a.dtype, device=a.device)
    for i in idx:
        total += b[i] @ a[i]
        if a0 is not None and b0 is not None:
            total -= b0[i] @ a0[i]
    return total


def merge_scale(scale: float, n_heads: int) -> float:
    """The LTE merge coefficient s / N, with N the run's fixed head count, not the heads present:
    an absent head then changes nothing, instead of inflating everyone else's step."""
    return scale / n_heads


def outer_step_(w: torch.Tensor, delta: torch.Tensor, weight: float, lr: float,
                momentum: torch.Tensor | None = None, mu: float = 0.0) -> None:
    """The outer step of a merge, in place on w, with the mean change d = weight * delta (the
    negative of DiLoCo's pseudo-gradient): plain, w += lr d (lr 1: averaging); or with a Nesterov
    `momentum` buffer m, m = mu m + d and w += lr (d + mu m), DiLoCo's outer step. `delta` must
    have w's dtype already: the same values then give the same bits on every peer."""
    if momentum is None:
        w.add_(delta, alpha=weight * lr)
        return
    mean = delta.mul(weight)
    momentum.mul_(mu).add_(mean)
    w.add_(mean, alpha=lr).add_(momentum, alpha=lr * mu)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's (bf16 on a mixed-precision run), else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def fold_into_weight(tokens: int, out_features: int, in_features: int) -> bool:
    """Whether a layer applies its head as W + s (B A - B0 A0), formed once per call (a cost of
    m n r, whatever the batch), rather than as low-rank products of the activations (a cost of
    r (m + n) per token): the first is cheaper once the tokens exceed m n / (m + n)."""
    return tokens * (out_features + in_features) > out_features * in_features


def _effective_weight(store: QuantizedWeight, a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None,
                      b0: torch.Tensor | None, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """W + s (B A - B0 A0) as a dense (m, n) temporary, summed in the factors' precision (fp32 on
    a mixed-precision run, like any master weight) and only then cast to the compute dtype."""
    exact = a.dtype
    w = torch.addmm(store.weight(exact), b, a, alpha=scale)  # a new tensor: the store's copy is untouched
    if a0 is not None:
        w.addmm_(b0, a0, alpha=-scale)
    return w.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """y = W x + b + s (B A - B0 A0) x, one autograd node per layer, W never differentiated.

    Why one node rather than the formula in ops: `F.linear(x, W)` would keep every layer's
    dequantized W alive until backward (as large as an fp32 model) and, under autocast, every
    matmul casts and keeps its own copy of x. Here x is cast once to the compute dtype and saved
    once, with A x (r numbers per token); W is saved as the `QuantizedWeight` (its packed copy, which
    the layer holds anyway) and dequantized again in backward. Only x, A, B and a trainable bias
    get gradients; A0 and B0 are the frozen factors of the head's last merge.

    The head is applied in one of two exact forms (`fold_into_weight`): with many tokens, as the
    dense W + s (B A - B0 A0), so that forward and the gradient of x each cost one matmul of W's
    size; with few, as one rank-2r path s [B | -B0] ([A ; A0] x) beside W x. Either way the
    reset-less baseline costs no extra matmul per token.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, store: QuantizedWeight, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None, scale: float) -> torch.Tensor:
        dtype = compute_dtype(x)
        rank, (m, n) = a.shape[0], store.shape
        x2 = x.reshape(-1, n).to(dtype)
        fold = fold_into_weight(x2.shape[0], m, n)
        with torch.autocast(x.device.type, enabled=False):
            bias_c = None if bias is None else bias.to(dtype)
            if fold:
                ua = x2 @ a.to(dtype).t()                             # A x, for the gradient of B
                w = _effective_weight(store, a, b, a0, b0, scale, dtype)
                y = x2 @ w.t() if bias_c is None else torch.addmm(bias_c, x2, w.t())
            else:
                a_cat = (a if a0 is None else torch.cat([a, a0])).to(dtype)
                b_cat = (b if b0 is None else torch.cat([b, -b0], dim=1)).to(dtype)
                u = x2 @ a_cat.t()                                    # [A ; A0] x: (tokens, 2r)
                w = store.weight(dtype)
                y = x2 @ w.t() if bias_c is None else torch.addmm(bias_c, x2, w.t())
                y.addmm_(u, b_cat.t(), alpha=scale)
                # keep A x only, as a copy, so that the 2r-wide u is not kept alive by a view
                ua = u if a0 is None else u[:, :rank].contiguous()
        del w  # dequantized for this call only: backward dequantizes again
        ctx.save_for_backward(x2, ua, a, b, a0, b0)
        ctx.store, ctx.scale, ctx.fold, ctx.x_shape, ctx.x_dtype = store, scale, fold, x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, ua, a, b, a0, b0 = ctx.saved_tensors
        s, dtype = ctx.scale, x2.dtype
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        grad_x = grad_bias = grad_a = grad_b = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.fold:
                gb = g @ b.to(dtype)                                      # (tokens, r)
                if need_x:
                    grad_x = g @ _effective_weight(ctx.store, a, b, a0, b0, s, dtype)
            else:
                a_cat = (a if a0 is None else torch.cat([a, a0])).to(dtype)
                b_cat = (b if b0 is None else torch.cat([b, -b0], dim=1)).to(dtype)
                gb = g @ b_cat                                            # (tokens, r or 2r)
                if need_x:
                    grad_x = g @ ctx.store.weight(dtype)
                    grad_x.addmm_(gb, a_cat, alpha=s)
            if need_x:
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
            if need_a:
                grad_a = torch.mm(gb[:, :a.shape[0]].t(), x2).mul_(s).to(a.dtype)
            if need_b:
                grad_b = torch.mm(g.t(), ua).mul_(s).to(b.dtype)
            if need_bias:
                grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, store: QuantizedWeight, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                a0: torch.Tensor | None, b0: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`LoRALinearFunction` applied: W x + b + s (B A - B0 A0) x (a0 = b0 = None: no baseline)."""
    return LoRALinearFunction.apply(x, store, bias, a, b, a0, b0, scale)


def lora_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """The same layer as plain ops, W x + b + s (B A x - B0 A0 x): what vmap batches over stacked
    heads, and the reference the single-node form is tested against."""
    y = F.linear(x, w, bias)  # first: autograd sums x's gradient terms in the order of their nodes
    z = F.linear(F.linear(x, a), b)
    if a0 is not None:
        z = z - F.linear(F.linear(x, a0), b0)
    return y + scale * z


class LTELinear(nn.Module):
    """y = W x + b + s (B A - B0 A0) x for the head whose factors are plugged in, else y = W x + b.

    W lives in a `QuantizedWeight` and is never trained by gradient. The head factors are not owned
    by this module: `swarm.lte_model.LTEModel` keeps them stacked over heads and plugs one head's
    slice in per call. A plugged head runs through `LoRALinearFunction`; under `vmap` over stacked
    heads (`batched` set by the model) the layer uses the plain formula, which vmap can batch.
    With no factors plugged in, the layer is the plain merged linear layer used for evaluation.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, scale: float):
        super().__init__()
        self.weight_store = weight
        self.out_features, self.in_features = weight.shape
        self.scale = scale
        self.batched = False
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        for name in ("lora_A", "lora_B", "lora_A0", "lora_B0"):
            self.register_buffer(name, None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A is None:
            return F.linear(x, self.weight_store.weight(x.dtype), self.bias)
        if self.batched:
            return lora_linear_reference(x, self.weight_store.weight(x.dtype), self.bias, self.lora_A, self.lora_B,
                                         self.lora_A0, self.lora_B0, self.scale)
        return lora_linear(x, self.weight_store, self.bias, self.lora_A, self.lora_B, self.lora_A0, self.lora_B0,
                           self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"storage={self.weight_store.storage}, scale={self.scale}")
